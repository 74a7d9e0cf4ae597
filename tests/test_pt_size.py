"""PT sizes above the pool: one run under its actual size, never noise replicates."""

from __future__ import annotations

import json

from helpers import synthetic_data_dir, tiny_config

from tlmat.runs import RunSpec, execute_run

CGCNN = "model={arch: cgcnn, hidden: 16, gcn_layers: 1}"


def test_pt_sizes_that_cap_to_the_same_pool_are_one_run(tmp_path):
    synthetic_data_dir(tmp_path, {"aa": 30})
    config = tiny_config(tmp_path, ["aa"], CGCNN, "train.epochs=2", "exclude_test_overlap=false")
    results = {}
    for size in (50, 100):  # 30 structures, the test set held out: a smaller pool
        spec = RunSpec(f"pt/aa-{size}/t1", "aa", size, 1, tmp_path / str(size), "pretrain")
        results[size] = execute_run(config, spec)
    pool = results[50]["n_train"] + results[50]["n_val"]
    assert pool < 30 - results[50]["n_test"] + 1  # test entries (and duplicates) are out
    spec = RunSpec(f"pt/aa-{pool}/t1", "aa", pool, 1, tmp_path / str(pool), "pretrain")
    results[pool] = execute_run(config, spec)  # exactly the pool: the same run again

    assert {m["size"] for m in results.values()} == {50, 100, pool}  # the requested sizes
    assert {m["n_train"] + m["n_val"] for m in results.values()} == {pool}  # what was trained
    same = ("test_r2", "test_mae", "seed", "n_train", "best_val_loss")
    assert [results[50][k] for k in same] == [results[100][k] for k in same]
    assert [results[50][k] for k in same] == [results[pool][k] for k in same]
    predictions = {s: (tmp_path / str(s) / "predictions.csv").read_text() for s in results}
    assert predictions[50] == predictions[100] == predictions[pool]
    subset = json.loads((tmp_path / "100" / "subset_ids.json").read_text())
    assert len(subset["train"]) + len(subset["val"]) == pool


def test_the_pt_size_table_lists_each_pool_once_under_its_actual_size():
    import pandas as pd

    from tlmat.report.runs import StudyDefaults
    from tlmat.report.tables import pt_size_sweep

    def run(pt_size, pt_n, trial, r2):
        return {
            "run_id": f"ft/{pt_size}/t{trial}",
            "kind": "finetune",
            "model": "cgcnn",
            "dataset": "dc",
            "size": 100,
            "trial": trial,
            "pt_dataset": "fe",
            "pt_size": pt_size,
            "pt_n": pt_n,
            "strategy": "full",
            "lr": 0.001,
            "test_r2": r2,
            "test_mae": 1 - r2,
        }

    rows = [run(941, 941, t, 0.5) for t in (1, 2)] + [run(5000, 4000, t, 0.6) for t in (1, 2)]
    rows += [run(10000, 4000, t, 0.6) for t in (1, 2)]  # capped to the same 4000: one run
    table = pt_size_sweep(pd.DataFrame(rows), StudyDefaults(pt_size=941, lr=0.001))
    assert list(zip(table["pt_size"], table["pt_n"], strict=True)) == [(941, 941), (5000, 4000)]


def _full_plan():
    from pathlib import Path

    from tlmat.config import load_config
    from tlmat.plan import build_plan

    root = Path(__file__).parents[1]
    return build_plan(load_config([root / "config.yaml"], ["data_dir=/nonexistent-offline-dir"]))


def test_planned_pt_sizes_above_the_pool_collapse_onto_the_smallest_that_caps():
    plan = _full_plan()
    assert plan.pool_sources() == ["bg", "fe"]  # the sweep's sources: 941 ... 100K each
    # fe pool of 7,000: 10K, 50K and 100K all train on it; 10K is the one that runs
    alias = plan.collapse({"fe": 7000, "bg": 200_000})
    assert alias["ft/pt-fe-50000/ft-dc-800/full-lr0.001/t3"] == (
        "ft/pt-fe-10000/ft-dc-800/full-lr0.001/t3"
    )
    assert alias["pt/fe-100000/t1"] == "pt/fe-10000/t1"
    assert "pt/fe-10000/t1" not in alias and "pt/fe-5000/t1" not in alias  # below or = 10K
    assert not any(k.startswith(("pt/bg-", "ft/pt-bg-")) for k in alias)  # bg: none caps
    kept = set(plan.kept_ids({"fe": 7000, "bg": 200_000}))
    assert kept == set(plan.runs) - set(alias)
    # 2 PT runs and 2 sizes x 6 targets x 5 trials of fine-tunes run once instead of thrice
    assert len(alias) == 2 + 2 * 6 * 5
    assert {plan.runs[k].checkpoint for k in kept if plan.runs[k].checkpoint} <= kept


def test_only_runs_on_a_larger_pt_size_wait_for_the_pools():
    plan = _full_plan()
    dependent = set(plan.pool_dependent_ids())
    assert "pt/fe-941/t1" not in dependent and "pt/fe-1000/t1" in dependent
    assert "ft/pt-fe-100000/ft-dc-800/full-lr0.001/t1" in dependent
    assert not any(k.startswith("scratch/") for k in dependent)
    assert set(plan.fixed_ids()) | dependent == set(plan.runs)
    # pools at least as large as every planned size: nothing collapses
    assert plan.kept_ids({"fe": 10**6, "bg": 10**6}) == sorted(plan.runs)
    assert plan.metrics_files([]) == []


def test_a_fine_tune_without_a_planned_counterpart_keeps_its_own_pt_run():
    plan = _full_plan()
    # the lr/strategy studies use fe only at 941; a hypothetical 50K run of a study that
    # has no 10K counterpart is never mapped to a run that is not planned
    alias = plan.collapse({"fe": 7000, "bg": 7000})
    assert all(target in plan.runs for target in alias.values())
