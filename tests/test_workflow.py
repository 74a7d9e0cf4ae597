"""A tiny end-to-end Snakemake run of the whole study DAG on synthetic crystals."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import run_snakemake, synthetic_data_dir

ROOT = Path(__file__).parents[1]
KEYS = ["aa", "bb", "cc"]
OOD = "dd"  # an out-of-domain target: fine-tuned on, never pre-trained on

TINY_STUDY = {
    "datasets": {
        **{k: {"source": "file", "label": k.upper(), "units": "eV"} for k in KEYS},
        OOD: {"source": "file", "label": "DD", "units": "eV", "target_only": True},
    },
    "model": {"arch": "cgcnn", "hidden": 16, "gcn_layers": 1, "readout_layers": 1},
    "train": {"epochs": 2, "batch_size": 16},
    "study": {
        "datasets": KEYS,
        "trials": 2,
        "ft_sizes": [20],
        "pt_size": 30,
        # 100 and 200 are above aa's pool (60 structures less its test set): one run, at 100
        "pt_size_sweep": {"sources": ["aa"], "sizes": [20, 30, 100, 200], "ft_size": 20},
        "strategies": {"pairs": [["aa", "bb"]], "names": ["full", "last_layer", "new_head"]},
        "unfrozen_layers": {"pairs": [["aa", "bb"]], "freeze_before": [2, 7]},
        "learning_rate": {"pairs": [["bb", "cc"]], "lrs": [0.0005, 0.001], "ft_size": 20},
        "sampling": {"pairs": [["bb", "cc"]], "ft_size": 20, "lr": 0.001},
        "mpt": {"variants": ["all", "without_aa"], "targets": ["aa", "bb", OOD], "pt_size": 20},
        "ood_targets": [OOD],
        "chains": [{"stages": ["aa:30", "bb:20", "cc:20"]}, {"stages": ["bb:30", "cc:20"]}],
        # CHGNet fine-tunes are slow on CPU: the family is tested in test_foundation.py
        "families": {"foundation": False},
    },
}


# published runs of two of the tiny study's cells, in the published file's format
PUBLISHED_CSV = (
    "experiment,pt_property,pt_size,ft_property,ft_size,strategy,learning_rate,trial,n_test,"
    "r2,mae,dup_group,source_path\n"
    """scratch,none,,aa,20,scratch,,1,6,0.10,0.5,,S/aa/T1/p.csv
scratch,none,,aa,20,scratch,,2,6,0.20,0.4,,S/aa/T2/p.csv
pairwise_pt941,aa,30,bb,20,ALL-UF,,1,6,0.30,0.3,,P/aa/T1/bb/p.csv
pairwise_pt941,aa,30,bb,20,ALL-UF,,2,6,0.50,0.2,,P/aa/T2/bb/p.csv
"""
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    synthetic_data_dir(workdir, {k: 60 for k in [*KEYS, OOD]})
    (workdir / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (workdir / "published.csv").write_text(PUBLISHED_CSV)
    tiny = {**TINY_STUDY, "data_dir": "data", "published_results": "published.csv"}
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    result = run_snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_tables_cover_the_whole_grid(study):
    tables = study / "results" / "tables"
    runs = pd.read_csv(tables / "runs.csv")
    kinds = {"scratch", "pretrain", "finetune", "mpt", "mpt_finetune", "chain"}
    assert set(runs["kind"]) == kinds
    assert OOD not in set(runs.loc[runs["kind"] == "pretrain", "dataset"])
    leakage = pd.read_csv(tables / "leakage.csv")
    assert len(leakage) == 12 and set(leakage["pt_pool"]) == {*KEYS, OOD}
    grid = pd.read_csv(tables / "pairwise_grid.csv")
    assert len(grid) == 9  # 3 sources x (2 study targets + the OOD target) at one FT size
    assert set(grid.loc[grid["dataset"] == OOD, "pt_dataset"]) == set(KEYS)
    assert OOD not in set(grid["pt_dataset"])
    mpt = pd.read_csv(tables / "mpt.csv")
    # a target only from a model that never saw its labels: the OOD target from `all`, aa
    # from without_aa; neither model has a head for it, so `full` runs as new_head
    assert sorted(zip(mpt["pt_dataset"], mpt["dataset"], mpt["strategy"], strict=True)) == [
        ("mpt_all", OOD, "new_head"),
        ("mpt_without_aa", "aa", "new_head"),
    ]
    assert not mpt["target_in_pretraining"].any() and (mpt["pt_labels"] > 0).all()
    assert (mpt["n"] == 2).all() and (mpt["n_pairs"] == 2).all()
    assert mpt["best_pairwise_source"].notna().all() and (mpt["n_pairs_vs_pairwise"] == 2).all()
    assert (grid["n"] == 2).all() and grid["r2_mean"].notna().all()
    assert grid["gain_mae"].notna().all() and grid["p_mae_paired_t"].notna().any()
    strategies = pd.read_csv(tables / "strategies.csv")
    # + new_head_freeze: the learning-rate family's run of bb -> cc at the default rate
    assert set(strategies["strategy"]) == {"full", "last_layer", "new_head", "new_head_freeze"}
    unfrozen = pd.read_csv(tables / "unfrozen_layers.csv")
    assert sorted(unfrozen["freeze_before"]) == [2, 7] and (unfrozen["n"] == 2).all()
    assert set(pd.read_csv(tables / "pt_size_sweep.csv")["pt_size"]) == {20, 30, 100}  # 200: 100's
    assert set(pd.read_csv(tables / "learning_rate.csv")["lr"]) == {0.0005, 0.001}
    assert "gain" in (tables / "summary.md").read_text().lower()
    chains = pd.read_csv(tables / "chains.csv").set_index("chain")
    assert chains.loc["aa:30>bb:20>cc:20", "n_stages"] == 2
    assert chains.loc["bb:30>cc:20", "n_stages"] == 1
    assert chains.loc["aa:30>bb:20", "n_stages"] == 1
    final = chains.loc[["aa:30>bb:20>cc:20", "bb:30>cc:20"]]
    assert (final["n_pairs"] == 2).all() and final["mape_mean"].notna().all()
    three = chains.loc["aa:30>bb:20>cc:20"]  # beside the one-stage transfer aa -> cc
    assert (three["one_stage_chain"], three["one_stage_n"]) == ("aa:30>cc:20", 2)
    figures = sorted(p.name for p in (study / "results" / "figures").iterdir())
    assert {"chains_cgcnn.png", "chain_curves_cgcnn.png", "mpt_cgcnn.png"} <= set(figures)
    assert "pairwise_r2_cgcnn.png" in figures and "parity_cgcnn.pdf" in figures
    assert "unfrozen_layers_cgcnn.png" in figures
    assert all((study / "results" / "figures" / f).stat().st_size > 1000 for f in figures)


def test_sampling_runs_reach_their_table_and_write_their_subsets(study):
    sampling = pd.read_csv(study / "results/tables/sampling.csv")  # random: the grid's runs
    assert sorted(sampling["sampling"]) == ["random", "stratified"] and (sampling["n"] == 2).all()
    assert (sampling["n_pairs"] == 2).all()
    assert sampling.loc[sampling["sampling"] == "stratified", "n_pairs_vs_random"].tolist() == [2]
    stratified = study / "results/runs/ft/pt-bb-30/ft-cc-20/full-lr0.001-stratified/t1"
    record = json.loads((stratified / "subset_ids.json").read_text())
    metrics = json.loads((stratified / "metrics.json").read_text())
    assert record["sampling"] == metrics["sampling"] == "stratified"
    assert len(record["train"]) == metrics["n_train"] and len(record["val"]) == metrics["n_val"]


def test_comparison_with_published_runs(study):
    tables = study / "results" / "tables"
    comparison = pd.read_csv(tables / "comparison.csv")
    cells = set(zip(comparison["table"], comparison["pt_dataset"].fillna(""), strict=True))
    assert {("scratch", ""), ("pairwise_grid", "aa")} <= cells
    grid = pd.read_csv(tables / "pairwise_grid.csv").set_index(["pt_dataset", "dataset"])
    assert grid.loc[("aa", "bb"), "published_r2_mean"] == pytest.approx(0.4)
    assert grid.loc[("aa", "bb"), "delta_r2"] == pytest.approx(
        grid.loc[("aa", "bb"), "r2_mean"] - 0.4
    )
    assert "## Comparison with the published runs" in (tables / "summary.md").read_text()
    parity = study / "results" / "figures" / "published_parity_cgcnn.png"
    assert parity.stat().st_size > 10_000


def test_pt_sizes_that_cap_to_one_pool_run_once(study):
    pool = json.loads((study / "results/pools/aa.json").read_text())
    assert pool["dataset"] == "aa" and 40 < pool["pool"] < 60
    runs = study / "results/runs"
    assert (runs / "pt/aa-100/t1/metrics.json").is_file()
    assert not (runs / "pt/aa-200").exists()  # the same pool as 100: never trained
    assert not list(runs.glob("ft/pt-aa-200/*"))
    pt = json.loads((runs / "pt/aa-100/t1/metrics.json").read_text())
    assert pt["n_train"] + pt["n_val"] == pool["pool"]
    sweep = pd.read_csv(study / "results/tables/pt_size_sweep.csv")
    capped = sweep[sweep["pt_size"] >= 100]
    assert set(capped["pt_size"]) == {100} and set(capped["pt_n"]) == {pool["pool"]}


def test_second_run_has_nothing_to_do_and_one_deleted_run_reruns_alone(study):
    again = run_snakemake(study, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    victim = study / "results/runs/ft/pt-aa-30/ft-bb-20/full-lr0.001/t1/metrics.json"
    victim.unlink()
    plan = run_snakemake(study, "-n", "--quiet", "rules")
    rows = [line.split() for line in (plan.stdout + plan.stderr).splitlines()]
    counts = {row[0]: row[1] for row in rows if len(row) == 2 and row[1].isdigit()}
    assert counts == {"finetune": "1", "aggregate": "1", "figures": "1", "all": "1", "total": "4"}


def test_a_two_stage_chain_leaves_three_checkpoints_with_their_lineage(study):
    from tlmat.checkpoint import load_checkpoint

    runs = study / "results" / "runs"
    stages = [
        runs / "pt/aa-30/t1",
        runs / "chain/aa-30.bb-20/t1",
        runs / "chain/aa-30.bb-20.cc-20/t1",
    ]
    table = pd.read_csv(study / "results/tables/runs.csv").set_index("run_id")
    for depth, stage in enumerate(stages, start=1):
        payload = load_checkpoint(stage / "model.pt")
        assert len(payload["lineage"]) == depth
        assert str(stage.relative_to(runs)) in table.index
    assert table.loc["chain/aa-30.bb-20.cc-20/t1", "chain"] == "aa:30>bb:20>cc:20"
    assert table.loc["chain/aa-30.bb-20.cc-20/t1", "kind"] == "chain"
