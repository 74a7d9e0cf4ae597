"""Sampling of FT subsets: random (today's draws, published subsets) vs stratified
(equal shares of target-quantile bins); the sampling family, run ids, subset_ids.json and
the sampling table."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_frame
from helpers import synthetic_data_dir, tiny_config
from test_aggregate import DEFAULTS, finetune, scratch, write_run

from tlmat.cli import build_parser
from tlmat.config import load_config
from tlmat.data import STRATA, make_splits, quantile_bins, seeded_rng, subset_ids
from tlmat.plan import SUBSET_IDS, build_plan
from tlmat.report.runs import collect_runs
from tlmat.report.tables import build_tables, sampling_table
from tlmat.runs import RunSpec, execute_run

ROOT = Path(__file__).parents[1]
IDS = list(range(1000, 1400))
TARGETS = {i: float(np.sin(i) * 3 + (i % 7)) for i in IDS}


def _splits() -> dict:
    return make_splits(IDS, "dc", seed=3, test_fraction=0.1)


def test_random_reproduces_todays_draws_and_published_subsets():
    splits = _splits()
    pool = np.asarray(sorted(set(IDS) - set(splits["test"])), dtype=np.int64)
    today = seeded_rng(3, "dc", "subset", 2, 50).choice(pool, size=50, replace=False)
    assert subset_ids(splits, IDS, 50, 2) == [int(i) for i in today]
    assert subset_ids(splits, IDS, 50, 2, sampling="random", targets=TARGETS) == list(today)
    published = {**splits, "trials": {"trial1": {"5": [1001, 1002, 1003, 1004, 1005]}}}
    assert subset_ids(published, IDS, 5, 1) == [1001, 1002, 1003, 1004, 1005]
    # a published subset is a random draw: a stratified run draws its own
    stratified = subset_ids(published, IDS, 5, 1, sampling="stratified", targets=TARGETS)
    assert stratified != [1001, 1002, 1003, 1004, 1005] and len(set(stratified)) == 5


def test_stratified_draws_are_deterministic_per_seed_and_trial_and_cover_every_bin():
    splits = _splits()
    draw = subset_ids(splits, IDS, 53, 1, sampling="stratified", targets=TARGETS)
    assert draw == subset_ids(splits, IDS, 53, 1, sampling="stratified", targets=TARGETS)
    assert draw != subset_ids(splits, IDS, 53, 2, sampling="stratified", targets=TARGETS)
    other_seed = {**splits, "seed": 4}
    assert draw != subset_ids(other_seed, IDS, 53, 1, sampling="stratified", targets=TARGETS)
    assert len(set(draw)) == 53 and not set(draw) & set(splits["test"])
    pool = sorted(set(IDS) - set(splits["test"]))
    bins = dict(zip(pool, quantile_bins([TARGETS[i] for i in pool], STRATA), strict=True))
    per_bin = np.bincount([bins[i] for i in draw], minlength=STRATA)
    assert per_bin.min() >= 53 // STRATA and per_bin.max() <= 53 // STRATA + 1  # every bin
    # the whole pool, and fewer structures than bins, still work
    assert (
        sorted(subset_ids(splits, IDS, len(pool), 1, sampling="stratified", targets=TARGETS))
        == pool
    )
    assert len(subset_ids(splits, IDS, 3, 1, sampling="stratified", targets=TARGETS)) == 3


def test_quantile_bins_are_equal_count():
    bins = quantile_bins([5.0, 1.0, 1.0, 1.0, 3.0, 2.0, 9.0, 0.0, 4.0, 4.0], 5)
    assert np.bincount(bins).tolist() == [2, 2, 2, 2, 2]
    assert bins[7] == 0 and bins[6] == 4  # lowest and highest target


def test_sampling_family_ids_and_counts():
    plan = build_plan(load_config([ROOT / "config.yaml"]))
    ids = plan.requested["sampling"]
    stratified = [i for i in ids if i.endswith("-stratified/t1")]
    assert "ft/pt-bg-941/ft-dc-500/full-lr0.0001/t1" in ids  # random: today's id
    assert "ft/pt-bg-941/ft-dc-500/full-lr0.0001-stratified/t1" in stratified
    assert len(stratified) == 4
    assert plan["ft/pt-bg-941/ft-dc-500/full-lr0.0001-stratified/t1"].sampling == "stratified"
    assert plan["ft/pt-bg-941/ft-dc-500/full-lr0.0001/t1"].sampling == "random"
    assert sum(plan[i].kind == "finetune" for i in ids) == 4 * 2 * 5
    # finetune.sampling: stratified moves every plain fine-tune to its stratified twin
    config = load_config([ROOT / "config.yaml"], ["finetune.sampling=stratified"])
    grid = build_plan(config).requested["pairwise"]
    assert all(i.endswith("-stratified/" + i.rsplit("/", 1)[1]) for i in grid if i[:3] == "ft/")


def test_cli_passes_sampling_to_the_run():
    args = build_parser().parse_args(
        ["finetune", "--checkpoint", "m.pt", "--dataset", "dc", "--size", "10", "--trial", "1"]
        + ["--out", "x", "--sampling", "stratified"]
    )
    assert args.sampling == "stratified"
    with pytest.raises(ValueError, match="sampling must be one of"):
        RunSpec("r", "dc", 10, 1, "x", sampling="quantile")


def test_subset_ids_json_matches_the_run(tmp_path):
    synthetic_data_dir(tmp_path, {"aa": 40})
    config = tiny_config(tmp_path, ["aa"], "train.epochs=1")
    spec = RunSpec("scratch/aa-20/t1", "aa", 20, 1, tmp_path / "run", sampling="stratified")
    metrics = execute_run(config, spec, progress=False)
    record = json.loads((tmp_path / "run" / SUBSET_IDS).read_text())
    assert len(record["train"]) == metrics["n_train"] and len(record["val"]) == metrics["n_val"]
    assert len(record["train"]) + len(record["val"]) == 20 and metrics["sampling"] == "stratified"
    assert record["sampling"] == "stratified" and record["run_id"] == "scratch/aa-20/t1"
    frame = make_frame(40, seed=10)  # the frame synthetic_data_dir wrote for aa
    assert set(record["train"] + record["val"]) <= set(frame.index)


def test_sampling_table_rows_and_comparison_with_random(tmp_path):
    records = [scratch("dc", 500, t, 0.4, 2.0) for t in (1, 2, 3)]
    for t, (mae_r, mae_s) in enumerate([(1.0, 0.8), (1.2, 1.0), (1.4, 1.1)], start=1):
        records.append(finetune("bg", "dc", 500, t, 0.6, mae_r, lr=1e-4))
        stratified = finetune("bg", "dc", 500, t, 0.7, mae_s, lr=1e-4)
        stratified["run_id"] = stratified["run_id"].replace(f"/t{t}", f"-stratified/t{t}")
        records.append({**stratified, "sampling": "stratified"})
    records.append(finetune("fe", "dc", 500, 1, 0.5, 1.5))  # a grid cell: not studied
    runs = collect_runs([write_run(tmp_path, r) for r in records])
    table = sampling_table(runs, DEFAULTS).set_index("sampling")
    assert list(table.index) == ["random", "stratified"]
    assert table.loc["random", "n"] == 3 and table.loc["stratified", "mae_mean"] == pytest.approx(
        (0.8 + 1.0 + 1.1) / 3
    )
    assert table.loc["stratified", "n_pairs_vs_random"] == 3
    assert table.loc["stratified", "gain_mae_vs_random"] == pytest.approx(
        (1.2 - 2.9 / 3) / 1.2 * 100
    )
    assert table.loc["stratified", "n_pairs"] == 3  # paired with the (random) scratch runs
    # stratified runs stay out of every other table, unless they are the plain ones
    for defaults, mae in ((DEFAULTS, 1.2), (replace(DEFAULTS, sampling="stratified"), 2.9 / 3)):
        tables = build_tables(runs, defaults)
        lr_table = tables["learning_rate"]
        cell = lr_table[(lr_table["pt_dataset"] == "bg") & (lr_table["size"] == 500)]
        assert cell["n"].tolist() == [3] and cell["mae_mean"].tolist() == [pytest.approx(mae)]
        assert len(tables["sampling"]) == 2
