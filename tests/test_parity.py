"""`make parity`: the preset's cells all have published twins, and the run-by-run table and
verdict compare our runs with the paper's trial by trial."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tlmat.config import load_config
from tlmat.plan import build_plan
from tlmat.report.parity import trial_parity_table, trial_parity_verdict
from tlmat.report.published import read_published_runs
from tlmat.report.runs import RUN_COLUMNS
from tlmat.report.runs import run_frame as _run_frame

ROOT = Path(__file__).parents[1]
PUBLISHED = ROOT / "data" / "published" / "published_runs.csv"
PARITY_RUNS = {
    *{f"scratch/{ds}-800/t1" for ds in ("pz", "dc", "ph", "ebg", "gv")},
    "pt/ph-941/t1",
    "pt/dc-941/t1",
    "pt/gv-941/t1",
    "ft/pt-ph-941/ft-dc-800/full-lr0.001/t1",
    "ft/pt-dc-941/ft-ph-800/full-lr0.001/t1",
    "ft/pt-gv-941/ft-ebg-800/full-lr0.001/t1",
}


def run_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Run records from partial rows: the columns a test leaves out stay empty."""
    return _run_frame(frame.reindex(columns=[*RUN_COLUMNS, *frame.columns.difference(RUN_COLUMNS)]))


def _parity_plan(*overrides: str):
    config = load_config([ROOT / "config.yaml", ROOT / "presets" / "parity.yaml"], [*overrides])
    return config, build_plan(config)


def _record(run_id: str, run, r2: float = 0.5) -> dict:
    """A metrics.json-like record of a planned run (as if it had been trained)."""
    pt = run.checkpoint.split("/")[1].rsplit("-", 1) if run.checkpoint else (None, None)
    return {
        "run_id": run_id,
        "kind": run.kind,
        "model": "alignn",
        "dataset": run.dataset,
        "size": run.size,
        "trial": run.trial,
        "pt_dataset": pt[0],
        "pt_size": int(pt[1]) if pt[1] else None,
        "strategy": run.strategy,
        "lr": run.lr,
        "test_r2": r2,
        "test_mae": 0.02,
        "epochs_run": 100,
        "splits_source": "published",
    }


def _ours(plan) -> pd.DataFrame:
    rows = [_record(k, r) for k, r in plan.runs.items() if r.kind in ("scratch", "finetune")]
    return run_frame(pd.DataFrame(rows))


def test_the_preset_plans_exactly_the_parity_cells():
    _, plan = _parity_plan()
    assert set(plan.runs) == PARITY_RUNS


@pytest.mark.parametrize("trials", [1, 5])
def test_every_cell_and_trial_of_the_preset_has_a_published_twin(trials):
    _, plan = _parity_plan(f"study.trials={trials}")
    table = trial_parity_table(_ours(plan), read_published_runs(PUBLISHED))
    compared = len([r for r in plan.runs.values() if r.kind in ("scratch", "finetune")])
    assert compared == 8 * trials
    assert len(table) == compared  # every run found its cell
    assert table["published_n"].eq(5).all()  # the paper's five trials each
    assert table["published_trial_r2"].notna().all()  # and the same trial among them
    assert table["same_subset"].all()


def _published(rows: list[tuple]) -> pd.DataFrame:
    """Published run records: (family, pt, pt_size, target, strategy, lr, trial, r2)."""
    records = [
        {
            "run_id": f"published/{i}",
            "kind": "scratch" if pt is None else "finetune",
            "model": "alignn",
            "dataset": target,
            "size": 800,
            "trial": trial,
            "pt_dataset": pt,
            "pt_size": pt_size,
            "strategy": strategy,
            "lr": lr,
            "test_r2": r2,
            "test_mae": 1 - r2,
            "family": family,
            "origin": "published",
        }
        for i, (family, pt, pt_size, target, strategy, lr, trial, r2) in enumerate(rows)
    ]
    return run_frame(pd.DataFrame(records))


def test_a_run_is_set_beside_its_trial_twin_and_the_published_spread():
    published = _published(
        [("scratch", None, None, "dc", None, None, t, r2) for t, r2 in [(1, 0.7), (2, 0.5)]]
        + [("scratch", None, None, "dc", None, None, 3, 0.6)]
    )
    ours = run_frame(
        pd.DataFrame(
            [
                {**_base("scratch/dc-800/t1", 1, 0.55), "kind": "scratch"},
                {**_base("scratch/dc-800/t2", 2, 0.45), "kind": "scratch"},
            ]
        )
    )
    table = trial_parity_table(ours, published)
    assert list(table["published_trial_r2"]) == [0.7, 0.5]
    assert table["delta_r2"].round(6).tolist() == [-0.15, -0.05]
    assert table["published_r2_mean"].round(6).tolist() == [0.6, 0.6]
    assert math.isclose(table["published_r2_std"].iloc[0], 0.1)
    assert list(table["inside_range"]) == [True, False]  # 0.45 is below the 0.5 minimum
    assert trial_parity_verdict(table).startswith(
        "1 of 2 runs (cell × trial) within the published trial spread"
    )


def _base(run_id: str, trial: int, r2: float) -> dict:
    return {
        "run_id": run_id,
        "model": "alignn",
        "dataset": "dc",
        "size": 800,
        "trial": trial,
        "pt_dataset": None,
        "pt_size": None,
        "strategy": None,
        "lr": None,
        "test_r2": r2,
        "test_mae": 0.1,
        "epochs_run": 100,
        "splits_source": "published",
    }


def test_a_fine_tune_matches_on_the_stated_rate_and_one_experiment():
    published = _published(
        [
            ("pairwise", "bg", 941, "dc", "full", None, 1, 0.8),
            ("strategies", "bg", 941, "dc", "full", None, 1, 0.1),  # re-used run: not counted
            ("learning_rate", "bg", 941, "dc", "full", 0.01, 1, 0.3),
        ]
    )
    ft = {
        **_base("ft/x/t1", 1, 0.75),
        "kind": "finetune",
        "pt_dataset": "bg",
        "pt_size": 941,
        "strategy": "full",
    }
    ours = run_frame(pd.DataFrame([{**ft, "lr": 0.001}, {**ft, "run_id": "ft/y/t1", "lr": 0.01}]))
    table = trial_parity_table(ours, published).set_index("run_id")
    assert table.loc["ft/x/t1", "published_trial_r2"] == 0.8  # unstated rate: the grid's run
    assert table.loc["ft/y/t1", "published_trial_r2"] == 0.3  # the stated 1e-2 run
    assert (table["published_n"] == 1).all()


def test_no_published_results_or_no_counterpart_gives_an_empty_table():
    ours = run_frame(pd.DataFrame([{**_base("scratch/dc-800/t1", 1, 0.5), "kind": "scratch"}]))
    assert trial_parity_table(ours, None).empty
    other = _published([("scratch", None, None, "pz", None, None, 1, 0.5)])
    table = trial_parity_table(ours, other)
    assert table.empty
    assert trial_parity_verdict(table) == "no run of this study has a published counterpart"


def test_snakemake_dry_run_lists_exactly_the_parity_cells(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        "presets/parity.yaml",
        "--config",
        f"resources_dir={tmp_path}/resources",
        f"results_dir={tmp_path}/parity",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = dict(
        (line.split()[0], int(line.split()[1]))
        for line in result.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    )
    assert (counts["scratch"], counts["pretrain"], counts["finetune"]) == (5, 3, 3)
    assert "mpt_pretrain" not in counts and "chain_stage" not in counts
