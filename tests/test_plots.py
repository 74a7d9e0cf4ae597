"""Figures are produced (PNG + PDF, non-empty) from a small synthetic study, and skipped cleanly
when a family has no data. Numbers are not checked here; :mod:`test_aggregate` does that."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlmat.report.fig_runs import best_runs
from tlmat.report.fig_style import pair_label, prop_label
from tlmat.report.figures import write_figures
from tlmat.report.names import FIGURE_FAMILIES, FIGURE_TABLES, FIGURES, TABLE_NAMES
from tlmat.report.runs import StudyDefaults
from tlmat.report.tables import write_tables

DEFAULTS = StudyDefaults(pt_size=941, lr=1e-3)
META = {
    "pz": {"label": "Piezoelectric modulus", "units": "C/m²"},
    "dc": {"label": "Dielectric constant", "units": ""},
    "ph": {"label": "Phonon DOS peak", "units": "cm⁻¹"},
    "bg": {"label": "PBE band gap", "units": "eV"},
    "fe": {"label": "Formation energy", "units": "eV/atom"},
}
#: the figures the synthetic study has data for (no MPT, chains or published comparison)
DRAWN = (
    "pairwise_r2",
    "pairwise_mae",
    "r2_vs_ft_size",
    "r2_vs_pt_size",
    "strategies",
    "unfrozen_layers",
    "learning_rate",
    "learning_curves",
    "parity",
)


def _write_run(root: Path, rng: np.random.Generator, **fields: object) -> Path:
    """One run directory with metrics.json, history.csv and predictions.csv (random values)."""
    r2 = float(rng.uniform(0.3, 0.9))
    record = {
        "kind": "scratch",
        "model": "alignn",
        "seed": fields["trial"],
        "pt_dataset": None,
        "pt_size": None,
        "strategy": None,
        "lr": 1e-3,
        "n_train": fields["size"],
        "n_val": 10,
        "n_test": 30,
        "test_r2": r2,
        "test_mae": float(rng.uniform(0.1, 1.0)),
        "test_mape": 0.1,
        "best_epoch": 8,
        "epochs_run": 12,
        "best_val_loss": 0.2,
        "wall_time_s": 1.0,
        "device": "cpu",
        "versions": {"torch": "2.5.0"},
        "config_hash": "h",
        **fields,
    }
    run_dir = root / str(record["run_id"])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(record))
    epochs = np.arange(1, 13)
    pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 1.0 / epochs,
            "val_loss": 1.2 / epochs + 0.05,
            "val_mae": 0.5 / epochs,
            "lr": 1e-3,
        }
    ).to_csv(run_dir / "history.csv", index=False)
    target = rng.normal(size=30)
    pd.DataFrame(
        {"id": range(30), "target": target, "prediction": target + rng.normal(0, 0.3, 30)}
    ).to_csv(run_dir / "predictions.csv", index=False)
    return run_dir / "metrics.json"


def _ft(pt: str, target: str, size: int, trial: int, pt_size: int = 941, **kw: object) -> dict:
    strategy = str(kw.get("strategy", "full"))
    lr, tag = kw.get("lr", 1e-3), strategy.replace(":", "")  # the plan's tag: freeze_before4
    return {
        "run_id": f"ft/pt-{pt}-{pt_size}/ft-{target}-{size}/{tag}-lr{lr}/t{trial}",
        "kind": "finetune",
        "dataset": target,
        "size": size,
        "trial": trial,
        "pt_dataset": pt,
        "pt_size": pt_size,
        "strategy": strategy,
        "lr": lr,
    }


def synthetic_study(root: Path) -> list[Path]:
    """Every family of the study, small: 3 targets, 3 sources, 2 FT sizes, 2 trials."""
    rng = np.random.default_rng(0)
    targets, sources, sizes, trials = ("pz", "dc", "ph"), ("fe", "bg", "dc"), (100, 800), (1, 2)
    specs: list[dict] = []
    for target in targets:
        for size in sizes:
            for trial in trials:
                specs.append(
                    {
                        "run_id": f"scratch/{target}-{size}/t{trial}",
                        "dataset": target,
                        "size": size,
                        "trial": trial,
                    }
                )
                specs += [_ft(pt, target, size, trial) for pt in sources]
    for pt in ("fe", "bg"):
        for pt_size in (5000, 50000):
            specs += [_ft(pt, t, 800, trial, pt_size) for t in targets for trial in trials]
    for strategy in ("last_layer", "new_head"):
        specs += [_ft("fe", "dc", 800, trial, strategy=strategy) for trial in trials]
    for lr in (1e-4, 1e-2):
        specs += [_ft("bg", "pz", 800, trial, lr=lr) for trial in trials]
    for n in (1, 4, 7):
        specs += [_ft("fe", "dc", 800, t, strategy=f"freeze_before:{n}") for t in trials]
    specs.append(
        {"run_id": "pt/fe-941/t1", "kind": "pretrain", "dataset": "fe", "size": 941, "trial": 1}
    )
    return [_write_run(root, rng, **spec) for spec in specs]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    runs_dir, tables_dir = root / "runs", root / "tables"
    write_tables(synthetic_study(runs_dir), tables_dir, DEFAULTS, META)
    return runs_dir, tables_dir


def test_write_figures_writes_every_figure(study: tuple[Path, Path], tmp_path: Path) -> None:
    runs_dir, tables_dir = study
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_figures(tables_dir, runs_dir, tmp_path / "fig", META, dpi=50)
    expected = {f"{name}_alignn.{fmt}" for name in DRAWN for fmt in ("png", "pdf")}
    assert {p.name for p in written} == expected
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path
        assert path.stat().st_size > 1000, path
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert not glyphs, glyphs  # units such as C/m² and cm⁻¹ must render
    import matplotlib.pyplot as plt

    assert not plt.get_fignums(), "every figure must be closed"


def test_write_figures_skips_missing_families(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    rng = np.random.default_rng(1)
    files = [
        _write_run(runs_dir, rng, run_id=f"scratch/dc-100/t{t}", dataset="dc", size=100, trial=t)
        for t in (1, 2)
    ]
    write_tables(files, tmp_path / "tables", DEFAULTS)
    written = write_figures(tmp_path / "tables", runs_dir, tmp_path / "fig", META, dpi=50)
    stems = {p.stem for p in written}
    assert stems == {"r2_vs_ft_size_alignn", "learning_curves_alignn", "parity_alignn"}


def test_write_figures_without_tables_or_runs(tmp_path: Path) -> None:
    assert write_figures(tmp_path / "none", tmp_path / "none", tmp_path / "fig", {}, dpi=50) == []


def test_every_registered_figure_has_a_table_and_a_caption() -> None:
    # the workflow declares each figure (by family) with its caption for `snakemake --report`
    root = Path(__file__).resolve().parents[1]
    assert set(FIGURE_TABLES.values()) <= set(TABLE_NAMES)
    assert list(FIGURE_FAMILIES) == list(FIGURES)
    for name in FIGURES:
        assert (root / "workflow" / "report" / f"{name}.rst").is_file(), name


def test_labels_use_metadata() -> None:
    assert prop_label("fe", META) == "Formation energy (eV/atom)"
    assert prop_label("dc", META) == "Dielectric constant"
    assert prop_label("xx", META) == "XX"
    assert pair_label("fe", "dc", META) == "Formation energy → Dielectric constant"


def test_best_runs_pick_highest_r2() -> None:
    runs = pd.DataFrame(
        {"run_id": ["a", "b", "c"], "dataset": ["dc", "dc", "pz"], "test_r2": [0.5, 0.7, np.nan]}
    )
    assert best_runs(runs)["run_id"].tolist() == ["b"]


def test_write_figures_without_scratch_baseline(tmp_path: Path) -> None:
    """Fine-tuning runs alone (no scratch yet): gains are NaN but figures still draw."""
    runs_dir = tmp_path / "runs"
    rng = np.random.default_rng(2)
    specs = [_ft(pt, "dc", 800, t) for pt in ("fe", "bg") for t in (1, 2)]
    specs += [_ft("fe", "dc", 800, t, strategy="last_layer") for t in (1, 2)]
    files = [_write_run(runs_dir, rng, **spec) for spec in specs]
    write_tables(files, tmp_path / "tables", DEFAULTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        written = write_figures(tmp_path / "tables", runs_dir, tmp_path / "fig", META, dpi=50)
    assert {p.stem for p in written} == {
        "pairwise_r2_alignn",
        "pairwise_mae_alignn",
        "r2_vs_ft_size_alignn",
        "strategies_alignn",
        "parity_alignn",
    }
