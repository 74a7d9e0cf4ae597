"""Aggregation against hand-computed numbers on a tiny hand-made study.

The expected gains, confidence intervals and p-values are written out in closed form here
(not recomputed with the code under test), so a sign or pairing mistake cannot cancel out.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlmat.report import stats, summary
from tlmat.report.names import TABLE_NAMES
from tlmat.report.runs import OPTIONAL_RUN_COLUMNS, RUN_COLUMNS, StudyDefaults, collect_runs
from tlmat.report.tables import (
    TABLE_COLUMNS,
    build_tables,
    ft_size_sweep,
    learning_rate,
    pairwise_grid,
    pt_size_sweep,
    scratch_table,
    strategies,
    summarize_with_gain,
    unfrozen_layers,
    write_tables,
)

DEFAULTS = StudyDefaults(pt_size=941, lr=1e-3, strategy="full")
# Student t quantile t_{0.975, df=2} in closed form: (2p - 1) / sqrt(2 p (1 - p)), p = 0.975.
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
# Two-sided p-value of t = 4 with df = 2: 1 - t / sqrt(2 + t^2) = 1 - 2 sqrt(2) / 3.
P_T4_DF2 = 1 - 2 * math.sqrt(2) / 3


def run_record(run_id: str, **overrides: object) -> dict:
    """A complete, contract-conforming metrics.json record; tests override what matters."""
    record = {
        "run_id": run_id,
        "kind": "scratch",
        "model": "alignn",
        "dataset": "dc",
        "size": 800,
        "trial": 1,
        "seed": 1,
        "pt_dataset": None,
        "pt_size": None,
        "strategy": None,
        "lr": 1e-3,
        "n_train": 800,
        "n_val": 100,
        "n_test": 100,
        "test_r2": 0.5,
        "test_mae": 1.0,
        "test_mape": 0.1,
        "best_epoch": 10,
        "epochs_run": 20,
        "best_val_loss": 0.3,
        "wall_time_s": 12.5,
        "device": "cpu",
        "versions": {"torch": "2.5.0", "tlmat": "0.1.0"},
        "config_hash": "abc123",
    }
    record.update(overrides)
    return record


def write_run(root: Path, record: dict) -> Path:
    """Write ``<root>/<run_id>/metrics.json`` as the training code does."""
    path = root / record["run_id"] / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def scratch(dataset: str, size: int, trial: int, r2: float, mae: float, **kw: object) -> dict:
    return run_record(
        f"scratch/{dataset}-{size}/t{trial}",
        dataset=dataset,
        size=size,
        trial=trial,
        seed=trial,
        test_r2=r2,
        test_mae=mae,
        **kw,
    )


def finetune(
    pt: str,
    dataset: str,
    size: int,
    trial: int,
    r2: float,
    mae: float,
    *,
    pt_size: int = 941,
    strategy: str = "full",
    lr: float = 1e-3,
) -> dict:
    tag = strategy if lr == 1e-3 else f"{strategy}-lr{lr}"
    return run_record(
        f"ft/pt-{pt}-{pt_size}/ft-{dataset}-{size}/{tag}/t{trial}",
        kind="finetune",
        dataset=dataset,
        size=size,
        trial=trial,
        seed=trial,
        pt_dataset=pt,
        pt_size=pt_size,
        strategy=strategy,
        lr=lr,
        test_r2=r2,
        test_mae=mae,
    )


def hand_made_study() -> list[dict]:
    """Scratch vs FE->DC at 800 uses scratch MAE [1, 2, 3] and TL MAE [0.5, 1.5, 2]."""
    records = [
        scratch("dc", 800, 1, 0.5, 1.0),
        scratch("dc", 800, 2, 0.6, 2.0),
        scratch("dc", 800, 3, 0.8, 3.0),
        scratch("dc", 100, 1, 0.2, 4.0),
        scratch("dc", 100, 2, 0.4, 5.0),
        finetune("fe", "dc", 800, 1, 0.6, 0.5),
        finetune("fe", "dc", 800, 2, 0.9, 1.5),
        finetune("fe", "dc", 800, 3, 0.8, 2.0),
        finetune("fe", "dc", 100, 1, 0.3, 3.0),
        finetune("fe", "dc", 100, 2, 0.5, 4.0),
        finetune("bg", "dc", 800, 1, 0.7, 0.9),
        # ablations: must stay out of the pair-wise grid
        finetune("fe", "dc", 800, 1, 0.55, 0.8, strategy="last_layer"),
        finetune("fe", "dc", 800, 2, 0.65, 1.6, strategy="last_layer"),
        finetune("fe", "dc", 800, 1, 0.58, 0.7, lr=1e-4),
        finetune("fe", "dc", 800, 1, 0.52, 0.95, pt_size=100),
        run_record("pt/fe-941/t1", kind="pretrain", dataset="fe", size=941, test_r2=0.99),
    ]
    return records


@pytest.fixture()
def study(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "runs", r) for r in hand_made_study()]


@pytest.fixture()
def runs(study: list[Path]) -> pd.DataFrame:
    return collect_runs(study)


def row(table: pd.DataFrame, **keys: object) -> pd.Series:
    """The single row of ``table`` matching ``keys``."""
    mask = np.ones(len(table), dtype=bool)
    for key, value in keys.items():
        mask &= (table[key] == value).to_numpy()
    assert mask.sum() == 1, f"expected one row for {keys}, found {mask.sum()}"
    return table[mask].iloc[0]


# ----------------------------------------------------------------------------- collect_runs


def test_collect_runs_one_sorted_row_per_run(runs: pd.DataFrame) -> None:
    assert len(runs) == len(hand_made_study())
    assert list(runs["run_id"]) == sorted(runs["run_id"])
    assert list(runs.columns[: len(RUN_COLUMNS)]) == list(RUN_COLUMNS)
    assert runs["size"].dtype == "Int64"
    assert runs.loc[runs["kind"] == "scratch", "pt_size"].isna().all()


def test_collect_runs_keeps_extras_and_flattens_dicts(tmp_path: Path) -> None:
    record = run_record("scratch/dc-800/t1", host="node1", extra={"a": {"b": 2}}, tags=[1, 2])
    runs = collect_runs([write_run(tmp_path, record)])
    assert runs.loc[0, "host"] == "node1"
    assert runs.loc[0, "extra.a.b"] == 2
    assert runs.loc[0, "versions.torch"] == "2.5.0"
    assert json.loads(runs.loc[0, "tags"]) == [1, 2]
    assert "versions" not in runs.columns


def test_collect_runs_rejects_invalid_json(tmp_path: Path) -> None:
    bad = tmp_path / "broken" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"run_id": "x", ')
    with pytest.raises(ValueError, match=r"broken/metrics\.json: not valid JSON"):
        collect_runs([bad])


def test_collect_runs_rejects_missing_keys(tmp_path: Path) -> None:
    record = run_record("scratch/dc-800/t1")
    del record["test_mae"], record["seed"]
    path = write_run(tmp_path, record)
    with pytest.raises(ValueError, match=r"metrics\.json: missing required keys: seed, test_mae"):
        collect_runs([path])


def test_collect_runs_rejects_non_object_and_unknown_kind(tmp_path: Path) -> None:
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object"):
        collect_runs([listing])
    path = write_run(tmp_path, run_record("a/t1", kind="distill"))
    with pytest.raises(ValueError, match="unknown kind 'distill'"):
        collect_runs([path])


def test_collect_runs_rejects_duplicate_run_ids(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a", run_record("scratch/dc-800/t1"))
    second = write_run(tmp_path / "b", run_record("scratch/dc-800/t1"))
    with pytest.raises(ValueError, match="duplicate run_id.*scratch/dc-800/t1"):
        collect_runs([first, second])


def test_collect_runs_empty_has_header() -> None:
    assert list(collect_runs([]).columns) == [
        *RUN_COLUMNS,
        *OPTIONAL_RUN_COLUMNS,
    ]


# ----------------------------------------------------------------------------- statistics


def test_describe_ci_uses_t_distribution() -> None:
    out = stats.describe([0.5, 1.5, 2.0], "mae")
    std = math.sqrt(((0.5 - 4 / 3) ** 2 + (1.5 - 4 / 3) ** 2 + (2.0 - 4 / 3) ** 2) / 2)
    assert out["mae_mean"] == pytest.approx(4 / 3)
    assert out["mae_std"] == pytest.approx(std)
    assert out["mae_ci95"] == pytest.approx(T975_DF2 * std / math.sqrt(3))
    single = stats.describe([2.0, float("nan")], "r2")
    assert (
        single["r2_mean"] == 2.0 and math.isnan(single["r2_std"]) and math.isnan(single["r2_ci95"])
    )


def test_relative_gain_sign_and_negative_scratch_r2() -> None:
    # relative to |scratch R²|, so a TL better than a negative scratch R² is positive
    assert stats.relative_gain(0.0, -0.5, lower_is_better=False) == pytest.approx(100.0)
    assert math.isnan(stats.relative_gain(0.9, 0.0, lower_is_better=False))  # undefined, not inf
    assert stats.relative_gain(1.0, 2.0, lower_is_better=True) == pytest.approx(50.0)
    assert stats.relative_gain(2.0, 1.0, lower_is_better=True) == pytest.approx(-100.0)


def test_paired_p_value_matches_closed_form() -> None:
    # differences 0.5, 0.5, 1.0: mean 2/3, sd sqrt(1/12), t = 4, df = 2
    assert stats.paired_p_value([0.5, 1.5, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(P_T4_DF2)
    assert math.isnan(stats.paired_p_value([0.5], [1.0]))
    assert math.isnan(stats.paired_p_value([0.8, 1.8], [1.0, 2.0]))  # constant difference


# ----------------------------------------------------------------------------- tables


def test_pairwise_grid_shape_and_plain_runs_only(runs: pd.DataFrame) -> None:
    grid = pairwise_grid(runs, DEFAULTS)
    assert list(grid.columns) == list(TABLE_COLUMNS["pairwise_grid"])
    cells = set(zip(grid["pt_dataset"], grid["dataset"], grid["size"], strict=True))
    assert cells == {("fe", "dc", 100), ("fe", "dc", 800), ("bg", "dc", 800)}
    assert set(grid["pt_size"]) == {941}
    # the last_layer / lr 1e-4 / pt_size 100 runs of FE->DC 800 are not averaged in
    assert row(grid, pt_dataset="fe", size=800)["n"] == 3


def test_pairwise_grid_gain_and_p_value_by_hand(runs: pd.DataFrame) -> None:
    cell = row(pairwise_grid(runs, DEFAULTS), pt_dataset="fe", size=800)
    std_mae = math.sqrt(((0.5 - 4 / 3) ** 2 + (1.5 - 4 / 3) ** 2 + (2.0 - 4 / 3) ** 2) / 2)
    assert cell["mae_mean"] == pytest.approx(4 / 3)
    assert cell["mae_ci95"] == pytest.approx(T975_DF2 * std_mae / math.sqrt(3))
    assert cell["r2_mean"] == pytest.approx((0.6 + 0.9 + 0.8) / 3)
    assert cell["scratch_mae_mean"] == pytest.approx(2.0)
    assert cell["scratch_r2_mean"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    # ratio of trial means: MAE (2 - 4/3)/2 ; R² (2.3/3 - 1.9/3)/(1.9/3)
    assert cell["gain_mae"] == pytest.approx((2.0 - 4 / 3) / 2.0 * 100)
    assert cell["gain_r2"] == pytest.approx((2.3 - 1.9) / 1.9 * 100)
    assert cell["n_pairs"] == 3
    assert cell["p_mae_paired_t"] == pytest.approx(P_T4_DF2)
    # R² improvements 0.1, 0.3, 0.0: mean 0.4/3, sd sqrt(0.07/3) -> closed-form t, df 2
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 + (0.3 - 0.4 / 3) ** 2 + (0.4 / 3) ** 2) / 2)
    t = (0.4 / 3) / (sd / math.sqrt(3))
    assert cell["p_r2_paired_t"] == pytest.approx(1 - t / math.sqrt(2 + t**2))
    # 95 % CI of the gain: the paired MAE improvements (0.5, 0.5, 1.0) over the scratch mean
    assert cell["gain_mae_ci95"] == pytest.approx(
        T975_DF2 * math.sqrt(1 / 12) / math.sqrt(3) / 2.0 * 100
    )
    assert not cell["unstable_r2_gain"]


def test_gain_is_ratio_of_means_where_per_trial_ratios_explode(tmp_path: Path) -> None:
    """Scratch R² 0.01 and 0.39 in two trials: a per-trial ratio would give +3000 %."""
    records = [
        scratch("pz", 800, 1, 0.01, 1.0),
        scratch("pz", 800, 2, 0.39, 1.0),
        finetune("fe", "pz", 800, 1, 0.31, 0.9),
        finetune("fe", "pz", 800, 2, 0.29, 0.7),
    ]
    runs = collect_runs([write_run(tmp_path, r) for r in records])
    cell = row(pairwise_grid(runs, DEFAULTS), pt_dataset="fe")
    per_trial_mean = ((0.31 - 0.01) / 0.01 + (0.29 - 0.39) / 0.39) / 2 * 100
    assert per_trial_mean > 1400  # what the old formula reported
    assert cell["gain_r2"] == pytest.approx((0.30 - 0.20) / 0.20 * 100)  # +50 %
    assert cell["gain_mae"] == pytest.approx((1.0 - 0.8) / 1.0 * 100)
    assert not cell["unstable_r2_gain"]  # |0.20| >= 0.1


def test_unstable_r2_gain_flag_and_left_out_of_r2_averages(tmp_path: Path) -> None:
    records = [
        scratch("pz", 800, 1, 0.05, 1.0),
        scratch("dc", 800, 1, 0.5, 1.0),
        finetune("fe", "pz", 800, 1, 0.15, 0.9),  # +200 % R² gain on a near-zero scratch
        finetune("fe", "dc", 800, 1, 0.55, 0.8),  # +10 %
    ]
    runs = collect_runs([write_run(tmp_path, r) for r in records])
    tables = build_tables(runs, DEFAULTS)
    grid = tables["pairwise_grid"]
    assert row(grid, dataset="pz")["unstable_r2_gain"]
    assert not row(grid, dataset="dc")["unstable_r2_gain"]
    head = tables["headline"].set_index(["definition", "unstable_r2_cells"])
    largest = "all pairs, largest FT size"
    included, excluded = head.loc[(largest, "included")], head.loc[(largest, "excluded")]
    assert included["gain_r2"] == pytest.approx((200.0 + 10.0) / 2)
    assert excluded["gain_r2"] == pytest.approx(10.0)
    assert excluded["cells"] == 2 and excluded["cells_r2"] == 1 and excluded["unstable_cells"] == 1
    assert included["gain_mae"] == excluded["gain_mae"] == pytest.approx((10.0 + 20.0) / 2)
    assert included["paper_gain_r2"] == 28.4 and included["paper_gain_mae"] == 17.1


def test_pairwise_grid_single_pair_has_no_p_value(runs: pd.DataFrame) -> None:
    cell = row(pairwise_grid(runs, DEFAULTS), pt_dataset="bg", size=800)
    assert cell["n_pairs"] == 1
    # the scratch cell's mean over all its trials (2.0), as the scratch table shows it
    assert cell["scratch_mae_mean"] == pytest.approx(2.0)
    assert cell["gain_mae"] == pytest.approx((2.0 - 0.9) / 2.0 * 100)
    assert math.isnan(cell["p_mae_paired_t"]) and math.isnan(cell["mae_std"])


def test_default_pt_size_none_means_largest(runs: pd.DataFrame) -> None:
    by_none = pairwise_grid(runs, StudyDefaults(pt_size=None, lr=1e-3))
    by_map = pairwise_grid(runs, StudyDefaults(pt_size={"fe": 941, "bg": 941}, lr=1e-3))
    pd.testing.assert_frame_equal(by_none, pairwise_grid(runs, DEFAULTS))
    pd.testing.assert_frame_equal(by_map, by_none)


def test_scratch_table(runs: pd.DataFrame) -> None:
    table = scratch_table(runs)
    assert list(table.columns) == list(TABLE_COLUMNS["scratch"])
    small = row(table, dataset="dc", size=100)
    assert small["n"] == 2
    assert small["mae_mean"] == pytest.approx(4.5)
    # n = 2: t_{0.975,1} = tan(pi * 0.475) = 12.706...; std of (4, 5) = 1/sqrt(2), se = 1/2
    assert small["mae_ci95"] == pytest.approx(math.tan(math.pi * 0.475) * 0.5)


def test_ambiguous_scratch_baseline_is_an_error(tmp_path: Path) -> None:
    records = [scratch("dc", 800, 1, 0.5, 1.0), scratch("dc", 800, 1, 0.4, 1.1, lr=1e-4)]
    records[1]["run_id"] = "scratch/dc-800/lr1e-4/t1"
    runs = collect_runs([write_run(tmp_path, r) for r in records])
    with pytest.raises(ValueError, match="ambiguous scratch baseline"):
        scratch_table(runs)
    picked = scratch_table(runs, StudyDefaults(pt_size=None, lr=1e-3, scratch_lr=1e-3))
    assert picked["mae_mean"].tolist() == [1.0]


def test_ft_size_sweep_has_scratch_source(runs: pd.DataFrame) -> None:
    sweep = ft_size_sweep(runs, DEFAULTS)
    assert list(sweep.columns) == list(TABLE_COLUMNS["ft_size_sweep"])
    assert set(zip(sweep["source"], sweep["size"], strict=True)) == {
        ("scratch", 100),
        ("scratch", 800),
        ("fe", 100),
        ("fe", 800),
        ("bg", 800),
    }
    assert row(sweep, source="scratch", size=800)["mae_mean"] == pytest.approx(2.0)


def test_pt_size_sweep_keeps_every_pt_size(runs: pd.DataFrame) -> None:
    sweep = pt_size_sweep(runs, DEFAULTS)
    small = row(sweep, pt_dataset="fe", pt_size=100, size=800)
    assert small["n"] == 1
    assert small["gain_mae"] == pytest.approx((2.0 - 0.95) / 2.0 * 100)
    assert row(sweep, pt_dataset="fe", pt_size=941, size=800)["n"] == 3


def test_strategies_table(runs: pd.DataFrame) -> None:
    table = strategies(runs, DEFAULTS)
    last = row(table, pt_dataset="fe", size=800, strategy="last_layer")
    assert last["n"] == 2
    assert last["gain_mae"] == pytest.approx((2.0 - 1.2) / 2.0 * 100)
    # differences 0.2, 0.4: t = 0.3 / 0.1 = 3 with df = 1 (Cauchy): p = 1 - 2 atan(3) / pi
    assert last["p_mae_paired_t"] == pytest.approx(1 - 2 * math.atan(3) / math.pi)
    assert row(table, pt_dataset="fe", size=800, strategy="full")["n"] == 3


def test_unfrozen_layers_table(tmp_path: Path) -> None:
    records = hand_made_study() + [
        finetune("fe", "dc", 800, t, 0.7, mae, strategy=f"freeze_before:{n}")
        for n, maes in ((1, (0.5, 1.0)), (7, (1.5, 2.0)))
        for t, mae in zip((1, 2), maes, strict=True)
    ]
    for record in records:  # the plan's run-id tag: freeze_before1
        record["run_id"] = record["run_id"].replace(":", "")
    runs = collect_runs([write_run(tmp_path, r) for r in records])
    table = unfrozen_layers(runs, DEFAULTS)
    assert list(table.columns) == list(TABLE_COLUMNS["unfrozen_layers"])
    assert sorted(table["freeze_before"]) == [1, 7]
    assert sorted(table["unfrozen_children"]) == [1, 7]
    first = row(table, freeze_before=1)
    assert first["n"] == 2 and first["mae_mean"] == pytest.approx(0.75)
    assert first["gain_mae"] == pytest.approx((2.0 - 0.75) / 2.0 * 100)  # scratch MAE 1, 2, 3
    # the strategy table keeps the paper's strategies only
    assert not set(strategies(runs, DEFAULTS)["strategy"]) & {"freeze_before:1", "freeze_before:7"}
    assert unfrozen_layers(collect_runs([]), DEFAULTS).empty


def test_learning_rate_table(runs: pd.DataFrame) -> None:
    table = learning_rate(runs, DEFAULTS)
    assert sorted(table.loc[(table["pt_dataset"] == "fe") & (table["size"] == 800), "lr"]) == [
        1e-4,
        1e-3,
    ]
    assert row(table, pt_dataset="fe", size=800, lr=1e-4)["gain_mae"] == pytest.approx(65.0)
    assert set(table["strategy"]) == {"full"}


def test_summary_markdown_headlines(runs: pd.DataFrame) -> None:
    meta = {
        "dc": {"label": "Dielectric constant", "units": ""},
        "fe": {"label": "Formation energy"},
    }
    text = summary.summary_markdown(build_tables(runs, DEFAULTS), meta)
    assert text.startswith("# Transfer-learning study: summary")
    # the headline table leads: largest FT size cells FE (MAE gain 33.3 %) and BG (55 %)
    first_section = text.split("## ")[1]
    assert first_section.startswith("Headline")
    fe, bg = (2.0 - 4 / 3) / 2.0 * 100, (2.0 - 0.9) / 2.0 * 100
    assert "| alignn | all pairs, largest FT size | included | 2/2 | " in text
    assert f"{(fe + bg) / 2:+.1f}" in text
    assert "| alignn | Dielectric constant (dc) | 800 | Formation energy (fe) |" in text
    assert "Holm–Bonferroni-adjusted" in text
    # ablations compare levels only in cells where they were varied (FE->DC at 800 here), so
    # the default level is not averaged over the whole grid
    assert "**Best learning rate (alignn)**: `0.0001`" in text
    r2_gain = {lr: (r2 - 1.9 / 3) / (1.9 / 3) * 100 for lr, r2 in (("lr", 0.58), ("last", 0.6))}
    assert f"| alignn | 0.0001 | 1 | {r2_gain['lr']:+.1f} | +65.0 | 0 |" in text
    assert f"| alignn | last_layer | 1 | {r2_gain['last']:+.1f} | +40.0 | 0 |" in text
    # the PT-size sweep likewise: FE at PT 100 and 941 on the one cell run at both (DC at
    # 800), not FE->DC at 100 nor BG->DC, which were run at PT 941 only
    pt_sizes = text.split("## PT-size sweep")[1].split("## ")[0]
    assert "| alignn | Formation energy (fe) | 100 | — | 1 | -17.9 | +52.5 | 0 |" in pt_sizes
    assert "| alignn | Formation energy (fe) | 941 | — | 1 | +21.1 | +33.3 | 0 |" in pt_sizes
    assert "| bg |" not in pt_sizes


def test_summary_significance_uses_holm_adjusted_p() -> None:
    """Three cells at raw p < 0.05; after Holm only the smallest survives."""
    grid = pd.DataFrame(
        {
            "model": "m",
            "gain_mae": [10.0, 10.0, 10.0],
            "p_mae_paired_t_holm": stats.adjust_p_values([0.01, 0.03, 0.04]),
            "negative_transfer": False,
            "unstable_r2_gain": False,
        }
    )
    assert summary._grid_rows(grid) == [["m", "3", "3/3", "1/3", "0", "0"]]


def test_summary_markdown_without_runs() -> None:
    empty = collect_runs([])
    text = summary.summary_markdown(build_tables(empty, DEFAULTS))
    assert "No runs found." in text and "_No runs in this family._" in text


# ----------------------------------------------------------------------------- writing


def test_write_tables_writes_every_file(study: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "tables"
    written = write_tables(study, out, DEFAULTS)
    names = [p.name for p in written]
    assert names == [
        "runs.csv",
        "scratch.csv",
        "pairwise_grid.csv",
        "ft_size_sweep.csv",
        "pt_size_sweep.csv",
        "strategies.csv",
        "unfrozen_layers.csv",
        "learning_rate.csv",
        "sampling.csv",
        "mpt.csv",
        "chains.csv",
        "foundation.csv",
        "headline.csv",
        "comparison.csv",
        "trial_parity.csv",
        "environment.csv",
        "recommendation.csv",
        "summary.md",
    ]
    assert all(p.stat().st_size > 0 for p in written)
    assert not list(out.glob(".*.tmp")), "temp files must not be left behind"
    grid = pd.read_csv(out / "pairwise_grid.csv")
    assert len(grid) == 3 and grid["size"].dtype == np.int64
    assert pd.read_csv(out / "runs.csv")["run_id"].is_unique


def test_tables_are_the_registered_ones_in_order(runs: pd.DataFrame) -> None:
    # the workflow declares TABLE_NAMES as outputs: a table missing here would fail the rule
    assert list(build_tables(runs, DEFAULTS)) == list(TABLE_NAMES)
    assert ("runs", *TABLE_COLUMNS) == TABLE_NAMES


def test_name_registry_imports_without_heavy_packages() -> None:
    # Snakemake imports tlmat.report.names every time it parses the workflow
    code = (
        "import sys, tlmat.report.names; "
        "print(sorted(m for m in ('pandas', 'matplotlib', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_write_tables_empty_families_have_headers(tmp_path: Path) -> None:
    only_scratch = [write_run(tmp_path / "runs", scratch("dc", 800, 1, 0.5, 1.0))]
    out = tmp_path / "tables"
    write_tables(only_scratch, out, DEFAULTS)
    for name, columns in TABLE_COLUMNS.items():
        table = pd.read_csv(out / f"{name}.csv")
        assert list(table.columns) == list(columns), name
    assert len(pd.read_csv(out / "pairwise_grid.csv")) == 0
    assert len(pd.read_csv(out / "scratch.csv")) == 1


def test_negative_transfer_flags_significantly_worse_tl_only() -> None:
    keys = ["model", "pt_dataset", "dataset", "size"]

    def runs(kind, pt, maes):
        return pd.DataFrame(
            {
                "model": "m",
                "pt_dataset": pt,
                "dataset": "d",
                "size": 10,
                "kind": kind,
                "trial": [1, 2, 3],
                "test_r2": [0.5, 0.5, 0.5],
                "test_mae": maes,
            }
        )

    scratch = runs("scratch", None, [1.0, 1.1, 0.9])
    worse = runs("finetune", "bad", [1.5, 1.62, 1.41])  # worse in every trial, consistently
    better = runs("finetune", "good", [0.5, 0.6, 0.45])
    noisy = runs("finetune", "noisy", [1.2, 0.8, 1.0])  # worse on average, not significantly
    table = summarize_with_gain(pd.concat([worse, better, noisy]), scratch, keys)
    flags = dict(zip(table["pt_dataset"], table["negative_transfer"], strict=True))
    assert flags == {"bad": True, "good": False, "noisy": False}
    bad = table.set_index("pt_dataset").loc["bad"]
    assert bad["p_mae_paired_t_holm"] < stats.ALPHA and bad["gain_mae"] < 0
    # Holm over the table's three cells: the smallest p times 3
    assert bad["p_mae_paired_t_holm"] == pytest.approx(3 * table["p_mae_paired_t"].min())


def test_negative_transfer_uses_adjusted_p() -> None:
    """Raw p 0.04 (< 0.05) in 3 cells: Holm lifts the larger two above 0.05."""
    gain = pd.Series([-5.0, -5.0, -5.0])
    adjusted = stats.adjust_p_values([0.04, 0.01, 0.045])  # 0.08, 0.03, 0.08
    assert stats.negative_transfer(gain, pd.Series([0.04, 0.01, 0.045])).tolist() == [True] * 3
    assert stats.negative_transfer(gain, adjusted).tolist() == [False, True, False]


def test_holm_adjustment_by_hand() -> None:
    # sorted p 0.01, 0.02, 0.04, 0.30 -> 4*0.01, max(3*0.02, .), max(2*0.04, .), max(0.30, .)
    adjusted = stats.adjust_p_values([0.04, 0.01, float("nan"), 0.30, 0.02])
    assert adjusted.iloc[:2].tolist() == pytest.approx([0.08, 0.04])
    assert math.isnan(adjusted.iloc[2])
    assert adjusted.iloc[3:].tolist() == pytest.approx([0.30, 0.06])
