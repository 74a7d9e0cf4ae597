"""The paper's published per-run results: read as run records, its numbers reproduced.

Reads ../shared/reference/published_runs.csv when it is there (the reference the shipped copy
was taken from), else the shipped copy data/published/published_runs.csv; either way, seconds.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA
from helpers import ROOT

from tlmat.cli import main
from tlmat.report import compare, published
from tlmat.report.figures import write_figures
from tlmat.report.names import PUBLISHED_FIGURES
from tlmat.report.runs import RUN_COLUMNS, StudyDefaults, collect_runs
from tlmat.report.tables import build_tables, write_tables

SHIPPED = ROOT / "data" / "published" / "published_runs.csv"
REFERENCE = SHARED_DATA.parent / "reference" / "published_runs.csv"
SOURCE = REFERENCE if REFERENCE.is_file() else SHIPPED
DEFAULTS = StudyDefaults(pt_size=941, lr=1e-3, strategy="full")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.read_csv(SOURCE)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return build_tables(published.read_published_runs(SOURCE), DEFAULTS)


def headline(tables: dict, definition: str, unstable: str = "included") -> pd.Series:
    table = tables["headline"].set_index(["definition", "unstable_r2_cells"])
    return table.loc[(definition, unstable)]


def test_shipped_copy_is_the_reference() -> None:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    assert SHIPPED.read_bytes() == REFERENCE.read_bytes()
    assert (SHIPPED.parent / "README.md").is_file(), "provenance README must ship with it"


def test_records_have_the_run_contract(rows: pd.DataFrame) -> None:
    runs = published.read_published_runs(SOURCE)
    assert len(runs) == len(rows) == 2855
    assert runs["run_id"].is_unique and set(runs["origin"]) == {"published"}
    assert set(runs["model"]) == {"alignn"}
    assert runs["family"].value_counts().to_dict() == {
        "pt_size_sweep": 1500,
        "pairwise": 1050,
        "scratch": 175,
        "strategies": 100,
        "learning_rate": 30,
    }
    assert runs.loc[runs["kind"] == "scratch", "pt_dataset"].isna().all()
    assert set(runs["strategy"].dropna()) == {
        "full",
        "last_layer",
        "unfreeze_2body",
        "unfreeze_3body",
        "new_head",
        "new_head_freeze",
    }
    assert list(runs.columns[: len(RUN_COLUMNS)]) == list(RUN_COLUMNS)


def test_grid_means_at_ft800_equal_the_files_cell_means(rows, tables) -> None:
    grid = tables["pairwise_grid"]
    grid = grid[grid["size"] == 800].set_index(["pt_dataset", "dataset"])
    file = rows[(rows["experiment"] == "pairwise_pt941") & (rows["ft_size"] == 800)]
    expected = file.groupby(["pt_property", "ft_property"])[["r2", "mae"]].mean()
    assert len(grid) == len(expected) == 42
    for (pt, ft), cell in expected.iterrows():
        assert grid.loc[(pt, ft), "r2_mean"] == pytest.approx(cell["r2"], abs=1e-4)
        assert grid.loc[(pt, ft), "mae_mean"] == pytest.approx(cell["mae"], abs=1e-4)
        assert grid.loc[(pt, ft), "n"] == 5


def test_headline_reproduces_the_papers_numbers(tables) -> None:
    ft200 = headline(tables, "all pairs, FT 200–800")
    assert (ft200["gain_r2"], ft200["gain_mae"]) == (
        pytest.approx(27.9, abs=0.1),
        pytest.approx(17.4, abs=0.1),
    )
    assert ft200["cells"] == 126
    no_pz = headline(tables, "FT 200–800 without PZ targets")
    assert (no_pz["gain_r2"], no_pz["gain_mae"]) == (
        pytest.approx(29.1, abs=0.1),
        pytest.approx(17.1, abs=0.1),
    )
    # the other definitions of the reference README
    assert headline(tables, "all pairs, largest FT size")["gain_r2"] == pytest.approx(21.9, abs=0.1)
    assert headline(tables, "all pairs, FT 100–800")["gain_r2"] == pytest.approx(44.8, abs=0.1)
    assert headline(tables, "all pairs, all FT sizes")["gain_mae"] == pytest.approx(29.3, abs=0.1)
    # without the unstable cells the R² number no longer explodes with the FT range
    assert headline(tables, "all pairs, FT 100–800", "excluded")["gain_r2"] < 30
    assert set(tables["headline"]["paper_gain_r2"]) == {28.4}


def test_strategy_and_lr_tables_hold_the_papers_single_runs(rows, tables) -> None:
    codes = published.STRATEGY_CODES
    strat = tables["strategies"].set_index(["pt_dataset", "dataset", "size", "strategy"])
    for run in rows[rows["experiment"] == "ft_strategy"].itertuples():
        cell = strat.loc[(run.pt_property, run.ft_property, run.ft_size, codes[run.strategy])]
        assert cell["n"] == 1 and cell["r2_mean"] == pytest.approx(run.r2)
    assert len(strat) == 100  # the trial-5 ALL-UF copies stay out of the grid and vice versa
    lrs = tables["learning_rate"].set_index(["pt_dataset", "dataset", "strategy", "lr"])
    for run in rows[rows["experiment"] == "learning_rate"].itertuples():
        cell = lrs.loc[(run.pt_property, run.ft_property, codes[run.strategy], run.learning_rate)]
        assert cell["n"] == 1 and cell["mae_mean"] == pytest.approx(run.mae)
    assert len(lrs) == 30


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.drop(columns="r2"), "missing columns: r2"),
        (lambda f: f.assign(strategy="FREEZE-ALL"), "unknown strategy FREEZE-ALL"),
        (lambda f: f.assign(experiment="mystery"), "unknown experiment mystery"),
        (lambda f: f.assign(mae=["x"] + [0.1] * (len(f) - 1)), "column mae is missing or not"),
        (lambda f: pd.concat([f, f.iloc[:1]]), "appears twice"),
    ],
)
def test_bad_published_file_is_a_one_line_error(tmp_path, rows, edit, message, capsys) -> None:
    bad = tmp_path / "bad.csv"
    edit(rows.head(20).copy()).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=message):
        published.read_published_runs(bad)
    out = tmp_path / "tables"
    assert main(["aggregate", "--published-only", "--published", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0]
    assert not out.exists()


def test_paper_tables_and_figures_from_published_runs_alone(tmp_path) -> None:
    out = tmp_path / "tables"
    assert (
        main(["aggregate", "--published-only", "--published", str(SOURCE), "--out", str(out)]) == 0
    )
    assert pd.read_csv(out / "headline.csv")["cells"].max() == 210
    assert (out / "summary.md").read_text().split("\n## ")[1].startswith("Headline")
    written = write_figures(
        out, tmp_path / "none", tmp_path / "figures", {}, dpi=40, names=PUBLISHED_FIGURES
    )
    assert sorted(p.name for p in written if p.suffix == ".png") == sorted(
        f"{name}_alignn.png" for name in PUBLISHED_FIGURES
    )


def test_snakemake_paper_target_plans_tables_then_figures(tmp_path) -> None:
    # from another working directory: the shipped copy is found in the repository
    command = [sys.executable, "-m", "snakemake", "paper", "-n", "--quiet", "rules"]
    command += ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path)]
    command += ["--configfile", str(ROOT / "config.yaml")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for rule in ("paper_tables", "paper_figures", "paper"):
        assert rule in result.stdout


# ----------------------------------------------------------------------------- comparison


def _cell(pt: str, ds: str, size: int, strategy: str, lr: float, r2: float, mae: float) -> dict:
    """One table cell (PT 941) as our tables or the published ones hold it."""
    return {
        "model": "cgcnn",
        "pt_dataset": pt,
        "pt_size": 941,
        "dataset": ds,
        "size": size,
        "strategy": strategy,
        "lr": lr,
        "n": 1,
        "r2_mean": r2,
        "r2_std": math.nan,
        "mae_mean": mae,
        "mae_std": math.nan,
    }


def test_with_published_matches_on_all_keys_but_model_and_lr_wildcard() -> None:
    keys = ("model", "pt_dataset", "pt_size", "dataset", "size", "strategy", "lr")
    ours = pd.DataFrame(
        [
            _cell("bg", "dc", 800, "full", 1e-3, 0.60, 0.02),
            _cell("bg", "dc", 800, "last_layer", 1e-3, 0.10, 0.05),
            _cell("fe", "bg", 500, "full", 1e-2, 0.50, 0.2),
        ]
    )
    theirs = pd.DataFrame(
        [
            {**_cell("bg", "dc", 800, "full", np.nan, 0.64, 0.018), "model": "alignn", "n": 5},
            {**_cell("fe", "bg", 500, "full", 1e-2, 0.54, 0.17), "model": "alignn"},
        ]
    )
    merged = compare.with_published(ours, theirs, keys)
    assert list(merged.columns) == [*ours.columns, *compare.PUBLISHED_COLUMNS]
    assert merged["published_n"].tolist()[0] == 5  # unstated published lr matches ours
    assert math.isnan(merged["published_n"].tolist()[1])  # no published last_layer cell
    assert merged["delta_r2"].tolist()[0] == pytest.approx(-0.04)
    assert merged["delta_r2"].tolist()[2] == pytest.approx(-0.04)
    comparison = compare.comparison_table({"strategies": merged}, 941)
    assert len(comparison) == 2 and comparison["within_0.05_r2"].all()
    assert set(comparison["table"]) == {"strategies"}


def test_study_tables_with_published_columns_and_parity_figure(tmp_path) -> None:
    """A study of ours that reproduces two published scratch cells and misses one grid cell."""
    from test_aggregate import finetune, scratch, write_run

    records = [
        scratch("dc", 800, 1, 0.70, 0.018),
        scratch("dc", 800, 2, 0.62, 0.020),
        scratch("ph", 800, 1, 0.90, 0.05),
        finetune("bg", "dc", 800, 1, 0.30, 0.03),
    ]
    runs = collect_runs([write_run(tmp_path / "runs", r) for r in records])
    theirs = published.read_published_runs(SOURCE)
    out = tmp_path / "tables"
    write_tables(runs, out, DEFAULTS, published=theirs)
    scratch_table = pd.read_csv(out / "scratch.csv").set_index("dataset")
    assert scratch_table.loc["dc", "published_n"] == 5
    assert scratch_table.loc["dc", "delta_r2"] == pytest.approx(
        0.66 - scratch_table.loc["dc", "published_r2_mean"]
    )
    comparison = pd.read_csv(out / "comparison.csv")
    # our BG->DC full run is a grid cell and, at the default lr, the strategies table's
    # full cell: compared with the grid's 5-trial mean and with the strategy study's run
    assert list(comparison["table"]) == ["scratch", "scratch", "pairwise_grid", "strategies"]
    assert not comparison["within_0.05_r2"].tolist()[2]
    text = (out / "summary.md").read_text()
    assert "## Comparison with the published runs" in text
    within = int(comparison["within_0.05_r2"].sum())
    assert f"{within} of 4 cells that both studies have" in text
    written = write_figures(
        out, tmp_path / "runs", tmp_path / "figures", {}, dpi=40, names=["published_parity"]
    )
    assert [p.name for p in written] == [
        "published_parity_alignn.png",
        "published_parity_alignn.pdf",
    ]


def test_the_papers_findings_read_off_its_own_runs(tables) -> None:
    """The findings section on the published runs: paper scale, and the strategy ranking
    the paper states (all ≈ 2B > 3B > last layer) at the largest FT size."""
    from tlmat.report.findings import findings_rows, study_scale

    assert study_scale(tables["runs"]) == "paper scale"
    rows = {row[0]: row[1] for row in findings_rows(tables)}
    order = rows["full ≈ unfreeze_2body > unfreeze_3body > last_layer"]
    names = [part.split()[0] for part in order.removeprefix("mean R²: ").split(" > ")]
    assert names[:3] == ["full", "unfreeze_2body", "unfreeze_3body"] and names[-1] == "last_layer"
    assert rows["unfreezing all layers (`full`) is the best strategy"].endswith("of 20 cells")
    headline_row = rows["pair-wise TL beats scratch: +28.4 % R², +17.1 % MAE on average"]
    assert headline_row.startswith("+23.9 % R², +17.4 % MAE")
