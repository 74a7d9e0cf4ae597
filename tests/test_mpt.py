"""Multi-property pre-training: masked loss, multi-label samples, per-property scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch, Data

from tlmat.mpt import head_scalers, labelled_graph, merge_samples, variant_sources
from tlmat.train import _Targets, masked_mse

NAN = float("nan")


def test_masked_loss_equals_hand_computation_with_missing_labels():
    prediction = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    target = torch.tensor([[1.5, NAN], [NAN, 2.0], [4.0, 7.0]])
    # present labels: (1-1.5)², (4-2)², (5-4)², (6-7)² -> mean over 4, not over 6
    expected = (0.25 + 4.0 + 1.0 + 1.0) / 4
    assert masked_mse(prediction, target).item() == pytest.approx(expected)
    diluted = (0.25 + 4.0 + 1.0 + 1.0) / 6
    assert masked_mse(prediction, target).item() != pytest.approx(diluted)


def test_masked_loss_without_missing_labels_is_plain_mse():
    prediction, target = torch.randn(5, 1), torch.randn(5, 1)
    expected = torch.nn.functional.mse_loss(prediction, target)
    assert torch.equal(masked_mse(prediction, target), expected)


def test_masked_loss_gradient_ignores_missing_labels():
    prediction = torch.tensor([[1.0, 2.0]], requires_grad=True)
    masked_mse(prediction, torch.tensor([[0.0, NAN]])).backward()
    assert prediction.grad.tolist() == [[2.0, 0.0]]


def _graph(y: float) -> Data:
    return Data(
        z=torch.tensor([1, 8]), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.tensor([y])
    )


def test_same_crystal_in_two_data_sets_is_one_sample_with_two_labels():
    entries = [("aa", 1, _graph(1.0)), ("aa", 2, _graph(2.0)), ("bb", 7, _graph(30.0))]
    samples = merge_samples(entries, same_crystal=[[("aa", 2), ("bb", 7)]])
    assert len(samples) == 2
    merged = samples[1]
    assert merged.labels == {"aa": 2.0, "bb": 30.0}
    assert merged.members == (("aa", 2), ("bb", 7))
    y = labelled_graph(merged, ["aa", "bb", "cc"]).y
    assert y.shape == (1, 3)
    assert y[0, :2].tolist() == [2.0, 30.0] and math.isnan(y[0, 2].item())
    assert labelled_graph(samples[0], ["aa", "bb"]).y[0, 1].isnan()


def test_per_property_scaling_uses_only_that_propertys_labels():
    entries = [("aa", 1, _graph(1.0)), ("aa", 2, _graph(3.0)), ("bb", 7, _graph(100.0))]
    scalers = head_scalers(merge_samples(entries, []), ["aa", "bb"])
    assert scalers["aa"].mean == pytest.approx(2.0) and scalers["aa"].std == pytest.approx(1.0)
    assert scalers["bb"].mean == pytest.approx(100.0)


def test_batch_targets_are_standardized_per_head_with_nan_kept():
    entries = [("aa", 1, _graph(1.0)), ("aa", 2, _graph(3.0)), ("bb", 7, _graph(100.0))]
    samples = merge_samples(entries, [])
    heads = ["aa", "bb"]
    targets = _Targets(heads, head_scalers(samples, heads))
    batch = Batch.from_data_list([labelled_graph(s, heads) for s in samples])
    z = targets.standardized(batch)
    assert z.shape == (3, 2)
    assert z[:, 0][:2].tolist() == [-1.0, 1.0] and z[2, 1].item() == 0.0
    assert int(torch.isnan(z).sum()) == 3


def test_variants_leave_one_source_out():
    config = {
        "datasets": {"aa": {}, "bb": {}, "cc": {}, "ood": {"target_only": True}},
        "study": {"datasets": ["aa", "bb", "cc", "ood"], "mpt": {"sources": None}},
    }
    assert variant_sources(config, "all") == ["aa", "bb", "cc"]
    assert variant_sources(config, "without_bb") == ["aa", "cc"]
    with pytest.raises(ValueError, match="without_ood"):
        variant_sources(config, "without_ood")


def _run(kind, pt, trial, r2, mae, val=None, pt_size=50, strategy="full"):
    return {
        "run_id": f"{kind}/{pt}-{pt_size}/t{trial}",
        "kind": kind,
        "model": "cgcnn",
        "dataset": "cc",
        "size": 100,
        "trial": trial,
        "pt_dataset": pt,
        "pt_size": pt_size if pt else None,
        "strategy": strategy if pt else None,
        "lr": 0.001,
        "test_r2": r2,
        "test_mae": mae,
        "best_val_loss": val,
    }


def test_mpt_table_compares_with_scratch_and_the_maxed_out_pairwise_model():
    import pandas as pd

    from tlmat.report.runs import StudyDefaults
    from tlmat.report.tables import mpt_table

    mpt = "mpt_without_cc"
    runs = pd.DataFrame(
        [
            _run("scratch", None, 1, 0.1, 1.0),
            _run("scratch", None, 2, 0.2, 1.2),
            _run("finetune", "aa", 1, 0.5, 0.8, val=0.3),
            _run("finetune", "aa", 2, 0.6, 0.9, val=0.3),
            # bb at PT 50: lowest validation loss, but bb was pre-trained larger too
            _run("finetune", "bb", 1, 0.2, 1.1, val=0.1),
            _run("finetune", "bb", 2, 0.3, 1.0, val=0.1),
            # bb maxed out (PT 100): best test R2, yet higher validation loss than aa
            _run("finetune", "bb", 1, 0.9, 0.5, val=0.4, pt_size=100),
            _run("finetune", "bb", 2, 0.95, 0.4, val=0.4, pt_size=100),
            {"run_id": "pt/aa-50/t1", "kind": "pretrain", "model": "cgcnn", "dataset": "aa"}
            | {"size": 50, "trial": 1, "n_train": 40},
            {"run_id": "mpt/t1", "kind": "mpt", "model": "cgcnn", "dataset": mpt}
            | {"size": 50, "trial": 1, "sources": '["aa", "bb"]', "n_train_labels": 90},
            _run("mpt_finetune", mpt, 1, 0.7, 0.6),
            _run("mpt_finetune", mpt, 2, 0.8, 0.7),
        ]
    )
    table = mpt_table(runs, StudyDefaults(pt_size=50, lr=0.001))
    assert len(table) == 1
    row = table.iloc[0]
    assert row["pt_dataset"] == mpt and row["n"] == 2
    assert not row["target_in_pretraining"] and row["pt_labels"] == 90
    assert row["r2_mean"] == pytest.approx(0.75)
    # chosen by validation loss among each source's largest PT size, never by test R2
    assert (row["best_pairwise_source"], row["best_pairwise_pt_size"]) == ("aa", 50)
    assert row["best_pairwise_val_loss"] == pytest.approx(0.3)
    assert row["best_pairwise_pt_labels"] == 40
    assert row["best_pairwise_r2_mean"] == pytest.approx(0.55)
    assert row["n_pairs_vs_pairwise"] == 2
    # ratios of trial means: best pair-wise MAE 0.85 vs MPT 0.65; scratch 1.1 vs MPT 0.65
    expected = (0.85 - 0.65) / 0.85 * 100
    assert row["gain_mae_vs_pairwise"] == pytest.approx(expected)
    assert pd.isna(row["p_mae_paired_t_vs_pairwise"])  # constant differences: no p-value
    assert row["gain_mae"] == pytest.approx((1.1 - 0.65) / 1.1 * 100)
    from tlmat.report.summary import summary_markdown

    text = summary_markdown({"mpt": table})
    assert "## Multi-property pre-training" in text
    assert f"| cgcnn | {mpt} | 1 | {row['gain_mae']:+.1f} | {expected:+.1f} | 1/1 | 0/1 |" in text


def test_mpt_rows_say_when_the_model_saw_the_target():
    import pandas as pd

    from tlmat.report.runs import StudyDefaults
    from tlmat.report.tables import mpt_table

    runs = pd.DataFrame(
        [
            _run("scratch", None, 1, 0.1, 1.0),
            {"run_id": "mpt/t1", "kind": "mpt", "model": "cgcnn", "dataset": "mpt_all"}
            | {"size": 50, "trial": 1, "sources": '["aa", "cc"]', "n_train_labels": 90},
            _run("mpt_finetune", "mpt_all", 1, 0.7, 0.6),
        ]
    )
    table = mpt_table(runs, StudyDefaults(pt_size=50, lr=0.001))
    assert bool(table.iloc[0]["target_in_pretraining"])  # cc's labels were pre-trained on
    from tlmat.report.cells import mpt_transfer_rows
    from tlmat.report.fig_mpt_chains import mpt_bars
    from tlmat.report.summary import summary_markdown

    assert mpt_transfer_rows(table).empty and mpt_bars(table).empty
    assert "| cgcnn | mpt_all |" not in summary_markdown({"mpt": table})


# ----------------------------------------------------------------------------- end to end

SHARED = 8  # crystals of aa that bb also carries, under other ids and with bb's own targets


@pytest.fixture(scope="module")
def mpt_config(tmp_path_factory):
    from conftest import make_frame
    from helpers import tiny_config

    from tlmat.data import write_frame

    root = tmp_path_factory.mktemp("mpt")
    aa = make_frame(40, seed=3, start_id=0)
    bb = make_frame(40, seed=4, start_id=1000)
    for k in range(SHARED):
        bb.iat[k, 0] = aa.iat[k, 0].copy()
    write_frame(aa, root / "data" / "aa.json.gz")
    write_frame(bb, root / "data" / "bb.json.gz")
    return tiny_config(
        root,
        ["aa", "bb"],
        "model={arch: cgcnn, hidden: 16, gcn_layers: 1}",
        "study={datasets: [aa, bb]}",
        "train.epochs=3",
    )


def test_mpt_pretraining_merges_shared_crystals_and_keeps_test_crystals_out(mpt_config):
    from tlmat import runs
    from tlmat.checkpoint import load_checkpoint
    from tlmat.leakage import load_overlap
    from tlmat.mpt import MPTSpec, execute_mpt, source_split

    inputs = runs.ensure_inputs(mpt_config, ["aa", "bb"], overlap=True)
    overlap = load_overlap(inputs.overlap)
    out = Path(mpt_config["resources_dir"]).parent / "mpt"
    metrics = execute_mpt(
        mpt_config, MPTSpec("all", 100, 1, out, "mpt/all-100/pt/t1"), inputs=inputs
    )

    assert metrics["kind"] == "mpt" and metrics["dataset"] == "mpt_all"
    assert metrics["sources"] == ["aa", "bb"]
    assert set(metrics["per_source"]) == {"aa", "bb"}
    assert metrics["n_train_labels"] > metrics["n_train"]  # shared crystals: two labels
    payload = load_checkpoint(out / "model.pt")
    assert payload["model_config"]["heads"] == ["aa", "bb"]
    assert set(payload["target_stats"]) == {"aa", "bb"}
    assert payload["lineage"][0]["dataset"] == "mpt_all"
    subsets = json.loads((out / "subset_ids.json").read_text())  # per source: ids are per set
    assert set(subsets["sources"]) == {"aa", "bb"} and subsets["run_id"] == "mpt/all-100/pt/t1"

    # the guard: a bb entry that is an aa test crystal never enters pre-training
    aa_test = set(inputs.splits_of("aa")["test"])
    shared_test = [k for k in range(SHARED) if k in aa_test]
    bb_split = source_split(
        mpt_config,
        "bb",
        100,
        1,
        inputs.cache(mpt_config, "bb").ids.tolist(),
        inputs.splits_of("bb"),
        overlap.excluded("bb"),
    )
    leaked = {1000 + k for k in shared_test} & set(bb_split.train + bb_split.val)
    assert not leaked
    assert metrics["n_excluded_overlap"] >= len(shared_test)


def test_fine_tuning_an_mpt_model_reuses_the_targets_head(mpt_config):
    from tlmat.runs import RunSpec, execute_run

    root = Path(mpt_config["resources_dir"]).parent
    checkpoint = root / "mpt" / "model.pt"
    if not checkpoint.is_file():
        pytest.skip("needs the MPT run of the previous test")
    spec = RunSpec(
        "mpt/all-100/ft-aa-20/full-lr0.001/t1",
        "aa",
        20,
        1,
        root / "mpt-ft",
        kind="mpt_finetune",
        checkpoint=checkpoint,
        strategy="full",
    )
    metrics = execute_run(mpt_config, spec)
    assert metrics["kind"] == "mpt_finetune"
    assert metrics["pt_dataset"] == "mpt_all" and metrics["strategy"] == "full"
    assert metrics["chain"] == "mpt_all:100>aa:20"
