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
