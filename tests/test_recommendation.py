"""The recommendation for a target (issue 14 §2): options ranked by validation, never by test.

Hand-made run records (no training): the ranking, the intervals over trials, the MPT models
left out because they saw the target, the universal model's rows and the one-line text; and
the example preset plans the user's target (plan level, no Snakemake).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from tlmat.config import load_config
from tlmat.plan import build_plan, study_datasets
from tlmat.report import stats
from tlmat.report.names import TABLE_NAMES
from tlmat.report.recommendation import (
    RECOMMENDATION_COLUMNS,
    option_line,
    recommendation_table,
    summary_lines,
)
from tlmat.report.runs import StudyDefaults, run_frame
from tlmat.report.summary import summary_markdown
from tlmat.report.tables import TABLE_COLUMNS, build_tables

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = StudyDefaults(pt_size=941, lr=1e-3, strategy="full", target_only=("mine",))


def record(run_id: str, kind: str, trial: int, r2: float, val: float, **kw: object) -> dict:
    base = {
        "run_id": run_id,
        "kind": kind,
        "model": "alignn",
        "dataset": "mine",
        "size": 100,
        "trial": trial,
        "seed": trial,
        "pt_dataset": None,
        "pt_size": None,
        "strategy": None,
        "lr": 1e-3,
        "n_train": 90,
        "n_val": 10,
        "n_test": 15,
        "test_r2": r2,
        "test_mae": 1.0 - r2,
        "test_mape": 0.1,
        "best_epoch": 5,
        "epochs_run": 8,
        "best_val_loss": val,
        "wall_time_s": 1.0,
        "device": "cpu",
        "config_hash": "abc",
    }
    base.update(kw)
    return base


def scratch(trial: int, r2: float, val: float, **kw: object) -> dict:
    size = kw.get("size", 100)
    ds = kw.get("dataset", "mine")
    return record(f"scratch/{ds}-{size}/t{trial}", "scratch", trial, r2, val, **kw)


def finetune(src: str, trial: int, r2: float, val: float, strategy: str = "full", **kw) -> dict:
    size = kw.get("size", 100)
    ds = kw.get("dataset", "mine")
    return record(
        f"ft/pt-{src}-941/ft-{ds}-{size}/{strategy}-lr0.001/t{trial}",
        "finetune",
        trial,
        r2,
        val,
        pt_dataset=src,
        pt_size=941,
        strategy=strategy,
        **kw,
    )


def mpt_model(variant: str, sources: list[str]) -> dict:
    return record(
        f"mpt/{variant}-300/pt/t1",
        "mpt",
        1,
        0.0,
        0.1,
        dataset=f"mpt_{variant}",
        size=300,
        sources=sources,
        strategy=None,
    )


def mpt_finetune(variant: str, trial: int, r2: float, val: float, **kw) -> dict:
    ds = kw.pop("dataset", "mine")
    return record(
        f"mpt/{variant}-300/ft-{ds}-100/new_head-lr0.001/t{trial}",
        "mpt_finetune",
        trial,
        r2,
        val,
        dataset=ds,
        pt_dataset=f"mpt_{variant}",
        pt_size=300,
        strategy="new_head",
        **kw,
    )


def chgnet(trial: int, r2: float, val: float, strategy: str = "full") -> dict:
    return record(
        f"foundation/chgnet-0.3.0/ft-mine-100/{strategy}-lr0.001/t{trial}",
        "finetune",
        trial,
        r2,
        val,
        model="chgnet",
        pt_dataset="chgnet",
        strategy=strategy,
    )


def frame(records: list[dict]) -> pd.DataFrame:
    return run_frame(pd.DataFrame.from_records(records))


def study_runs() -> pd.DataFrame:
    """Three trials on 'mine' at FT 100: scratch, gv (best validation), bg (best test R²,
    worse validation), CHGNet, and MPT models that did and did not see the target."""
    rows = []
    for t, (s, g, b, c) in enumerate(
        [(0.30, 0.60, 0.80, 0.50), (0.34, 0.66, 0.82, 0.52), (0.32, 0.63, 0.84, 0.54)], 1
    ):
        rows += [
            scratch(t, s, 0.60 + t / 100),
            finetune("gv", t, g, 0.20 + t / 100),
            finetune("bg", t, b, 0.40 + t / 100),
            chgnet(t, c, 0.30 + t / 100),
            mpt_finetune("all", t, 0.55, 0.25 + t / 100),
            # a model that pre-trained on mine itself: lowest validation loss, yet no transfer
            mpt_finetune("with_mine", t, 0.99, 0.01),
        ]
    rows += [mpt_model("all", ["gv", "bg"]), mpt_model("with_mine", ["gv", "mine"])]
    return frame(rows)


def test_ranking_uses_validation_not_test():
    table = recommendation_table(study_runs(), DEFAULTS)
    cell = table[(table["dataset"] == "mine") & (table["size"] == 100)].sort_values("rank")
    assert cell.iloc[0]["source"] == "gv:941"  # lowest mean validation loss
    best_test = cell.loc[cell["r2_mean"].idxmax()]
    assert (
        best_test["source"] == "bg:941" and best_test["rank"] > 1
    )  # best test R², not ranked first
    assert list(cell["val_loss_mean"]) == sorted(cell["val_loss_mean"])
    assert list(cell["rank"]) == list(range(1, len(cell) + 1))
    assert list(table.columns) == list(RECOMMENDATION_COLUMNS)


def test_interval_is_a_t_interval_over_trials_and_gain_is_paired():
    table = recommendation_table(study_runs(), DEFAULTS)
    top = table[table["rank"] == 1].iloc[0]
    r2 = [0.60, 0.66, 0.63]
    expected = stats.describe(r2, "r2")
    assert top["n"] == 3
    assert top["r2_mean"] == pytest.approx(0.63)
    assert top["r2_ci95"] == pytest.approx(expected["r2_ci95"])
    assert top["r2_low"] == pytest.approx(0.63 - expected["r2_ci95"])
    assert top["r2_high"] == pytest.approx(0.63 + expected["r2_ci95"])
    diffs = stats.describe([0.60 - 0.30, 0.66 - 0.34, 0.63 - 0.32], "d")
    assert top["n_pairs"] == 3
    assert top["d_r2_mean"] == pytest.approx(diffs["d_mean"])
    assert top["d_r2_ci95"] == pytest.approx(diffs["d_ci95"])
    assert top["gain_r2"] == pytest.approx((0.63 - 0.32) / 0.32 * 100)
    assert math.isfinite(top["p_mae_paired_t"])


def test_mpt_models_that_saw_the_target_are_left_out():
    table = recommendation_table(study_runs(), DEFAULTS)
    sources = set(table["source"])
    assert "mpt_all" in sources
    assert "mpt_with_mine" not in sources  # its 0.01 validation loss would have ranked first


def test_mpt_without_its_own_record_is_kept_only_when_its_name_shows_it_never_saw_the_target():
    rows = [scratch(1, 0.3, 0.5, dataset="dc"), scratch(1, 0.3, 0.5)]
    rows += [mpt_finetune("all", 1, 0.5, 0.2, dataset="dc")]  # all saw dc: out
    rows += [mpt_finetune("without_dc", 1, 0.5, 0.2, dataset="dc")]  # left dc out: in
    rows += [mpt_finetune("all", 1, 0.5, 0.2)]  # mine is target-only: never an MPT source
    table = recommendation_table(frame(rows), DEFAULTS)
    assert set(table.loc[table["dataset"] == "dc", "source"]) == {"scratch", "mpt_without_dc"}
    assert set(table.loc[table["dataset"] == "mine", "source"]) == {"scratch", "mpt_all"}


def test_universal_model_rows_are_options_and_get_their_own_line():
    rows = [scratch(t, 0.3, 0.6) for t in (1, 2)] + [chgnet(t, 0.7, 0.1) for t in (1, 2)]
    rows += [finetune("gv", t, 0.5, 0.3) for t in (1, 2)]
    table = recommendation_table(frame(rows), DEFAULTS)
    top = table[table["rank"] == 1].iloc[0]
    assert (top["model"], top["source"], top["scratch_model"]) == ("chgnet", "chgnet", "alignn")
    assert top["n_pairs"] == 2  # paired with the study's scratch runs of the same trials
    assert top["line"].startswith("fine-tune the universal model CHGNet with strategy full;")


def test_one_line_text():
    table = recommendation_table(study_runs(), DEFAULTS)
    top = table[table["rank"] == 1].iloc[0]
    low, high = top["r2_low"], top["r2_high"]
    assert top["line"].startswith(
        f"pre-train on gv (PT 941) with strategy full; expected R² 0.63 "
        f"(95 % CI {low:.2f}–{high:.2f}) at FT 100; +0.31 R² over scratch (95 % CI "
    )
    one = dict(top) | {"n": 1, "r2_ci95": float("nan"), "d_r2_ci95": float("nan")}
    assert option_line(one, DEFAULTS.lr) == (
        "pre-train on gv (PT 941) with strategy full; expected R² 0.63 (one trial: no "
        "interval) at FT 100; +0.31 R² over scratch"
    )
    base = table[table["source"] == "scratch"].iloc[0]
    assert base["line"].startswith("train from scratch (alignn); expected R² 0.32")


def test_runs_without_validation_loss_are_not_ranked():
    rows = [scratch(1, 0.3, float("nan")), finetune("gv", 1, 0.6, float("nan"))]
    table = recommendation_table(frame(rows), DEFAULTS)
    assert table["rank"].isna().all()
    assert "No runs with a validation loss" in "\n".join(summary_lines(table))


def test_registered_like_the_other_tables_and_in_the_summary():
    assert "recommendation" in TABLE_NAMES
    assert TABLE_COLUMNS["recommendation"] == RECOMMENDATION_COLUMNS
    tables = build_tables(study_runs(), DEFAULTS)
    assert not tables["recommendation"].empty
    meta = {"mine": {"label": "My property", "units": ""}}
    text = summary_markdown(tables, meta)
    assert "## Recommendation" in text
    assert "**My property (mine)** (target-only)" in text
    assert "* FT 100: pre-train on gv (PT 941) with strategy full; expected R² 0.63" in text


def test_other_targets_get_their_rank_one_option_at_the_largest_ft_size():
    rows = []
    for size, (s, g) in {100: (0.2, 0.4), 500: (0.5, 0.7)}.items():
        rows += [scratch(1, s, 0.5, dataset="dc", size=size)]
        rows += [finetune("bg", 1, g, 0.2, dataset="dc", size=size)]
    # a chain's intermediate stage: dc at 2000, no scratch there, so no recommendation
    rows += [finetune("fe", 1, 0.9, 0.1, dataset="dc", size=2000)]
    table = recommendation_table(frame(rows), DEFAULTS)
    assert set(table["size"]) == {100, 500, 2000}  # the csv keeps every cell
    text = "\n".join(summary_lines(table))
    assert "The other targets, at their largest FT size with a scratch baseline:" in text
    assert "| dc | 500 | bg:941 full | 0.70 | +0.20 | 2 |" in text  # options of that cell
    assert "| dc | 2000 |" not in text


# ----------------------------------------------------------------------------- the preset


def test_my_target_preset_plans_the_user_target():
    config = load_config([ROOT / "config.yaml", ROOT / "presets" / "my-target.yaml"])
    assert config["datasets"]["mine"]["target_only"]
    assert Path(config["datasets"]["mine"]["path"]).is_file()
    plan = build_plan(config)
    mine = [run for run in plan.runs.values() if run.dataset == "mine"]
    sizes = set(config["study"]["ft_sizes"])
    assert {run.size for run in mine} == sizes
    sources = {
        run.checkpoint.split("/")[1].rsplit("-", 1)[0]
        for run in mine
        if run.kind == "finetune" and run.checkpoint
    }
    assert sources == {ds for ds in config["study"]["datasets"]}  # every PT source
    kinds = {run.kind for run in mine}
    assert {"scratch", "finetune", "mpt_finetune"} <= kinds
    strategies = {run.strategy for run in mine if run.kind == "finetune"}
    assert len(strategies) > 1  # each source with several strategies
    assert "mine" in study_datasets(config)  # prepared and matched for leakage
    assert not any(run.kind == "pretrain" and run.dataset == "mine" for run in plan.runs.values())
    if config["study"]["families"].get("foundation"):
        assert any(run.id.startswith("foundation/") for run in mine)


def test_quick_preset_includes_the_user_target():
    config = load_config([ROOT / "config.yaml", ROOT / "presets" / "quick.yaml"])
    plan = build_plan(config)
    mine = {run.id for run in plan.runs.values() if run.dataset == "mine"}
    assert {f"scratch/mine-{size}/t1" for size in config["study"]["ft_sizes"]} <= mine
    assert any(run_id.startswith("mpt/all-") for run_id in mine)
    # enough structures for the largest FT size after the test set
    frame = json.loads(gzip.decompress(Path(config["datasets"]["mine"]["path"]).read_bytes()))
    n = len(frame["index"])
    assert n * (1 - config["test_fraction"]) >= max(config["study"]["ft_sizes"])
