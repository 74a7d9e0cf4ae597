"""Fine-tune strategies train exactly the parameters they should; bad checkpoints fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_structures, synthetic_target
from helpers import synthetic_data_dir, tiny_config
from torch import nn

from tlmat import runs
from tlmat.checkpoint import CheckpointError, load_checkpoint
from tlmat.graphs import FeaturizerSettings, featurize
from tlmat.models import ModelConfig, build_model
from tlmat.plan import RUN_FILES
from tlmat.train import TargetScaler, TrainSettings, fit, targets_of
from tlmat.transfer import PAPER_CHILDREN, StrategyError, apply_strategy, paper_children

ALIGNN_LAYERS, GCN_LAYERS = 4, 4  # the paper's structure; small widths keep the test fast
CGCNN_LAYERS = 3
NAMED = ("full", "last_layer", "unfreeze_2body", "unfreeze_3body", "new_head", "new_head_freeze")
FREEZE_BEFORE = tuple(f"freeze_before:{n}" for n in range(1, 8))


@pytest.fixture(scope="module")
def graphs():
    structures = make_structures(12, seed=7)
    targets = [synthetic_target(s) for s in structures]
    return featurize(structures, range(12), targets, FeaturizerSettings(), False).graphs(range(12))


def _pretrained(arch: str = "alignn") -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "alignn":
        config = ModelConfig(
            hidden=16, embedding=8, alignn_layers=ALIGNN_LAYERS, gcn_layers=GCN_LAYERS,
            heads=("pt",),
        )  # fmt: skip
    else:  # with one readout layer, so that child 6 has parameters
        config = ModelConfig(
            arch="cgcnn", hidden=16, gcn_layers=CGCNN_LAYERS, readout_layers=1, heads=("pt",)
        )
    return build_model(config)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k}


def paper_child(name: str, arch: str) -> tuple[int, str]:
    """(the paper's child 1..7, ALIGNN sub-layer) of a parameter name, written out here
    independently of ``tlmat.transfer``: 1 atom embedding, 2 edge embedding, 3 angle
    embedding, 4 ALIGNN layers (node_update | edge_update), 5 GCN layers, 6 pooling
    (+ readout), 7 final linear layer."""
    parts = name.split(".")
    if parts[0] == "heads":
        return 7, ""
    if parts[1] == "embedding":
        return {"atom": 1, "edge": 2, "angle": 3}[parts[2]], ""
    if parts[1] == "readout":
        return 6, ""
    assert parts[1] == "graph_layers", name
    index = int(parts[2])
    if arch == "alignn" and index < ALIGNN_LAYERS:
        return 4, parts[3]
    return 5, ""


def expected_trainable(arch: str, strategy: str) -> set[str]:
    """The exact trainable parameter names: the paper's definition of each strategy."""
    model = _pretrained(arch)
    if strategy.startswith("new_head"):  # the paper's new head: Linear(16, 64) -> Linear(64, 1)
        heads = {f"heads.ft.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    else:
        heads = {"heads.ft.weight", "heads.ft.bias"}
    backbone = [n for n, _ in model.named_parameters() if not n.startswith("heads")]

    def keep(name: str) -> bool:
        child, sub = paper_child(name, arch)
        if strategy in ("full", "new_head"):
            return True
        if strategy in ("last_layer", "new_head_freeze"):
            return False
        if strategy == "unfreeze_2body":  # atom-graph convolutions
            return (child == 4 and sub == "node_update") or child == 5
        if strategy == "unfreeze_3body":  # line-graph convolutions
            return child == 4 and sub == "edge_update"
        return child >= int(strategy.split(":")[1])  # freeze_before:N

    return heads | {name for name in backbone if keep(name)}


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_alignn_children_are_the_papers():
    model = _pretrained()
    children = paper_children(model)
    assert list(children) == list(range(1, 8)) and len(PAPER_CHILDREN) == 7
    assert children[4] == [f"backbone.graph_layers.{i}" for i in range(4)]
    assert children[5] == [f"backbone.graph_layers.{i}" for i in range(4, 8)]
    for layer in children[4]:  # each ALIGNN layer: atom-graph conv, then line-graph conv
        assert [n for n, _ in model.get_submodule(layer).named_children()] == [
            "node_update",
            "edge_update",
        ]
    names = [n for n, _ in model.named_parameters()]
    order = [paper_child(n, "alignn")[0] for n in names]
    assert order == sorted(order) and set(order) == {1, 2, 3, 4, 5, 7}  # no readout: original


def test_alignn_strategies_train_exactly_the_papers_parameters():
    for strategy in (*NAMED, *FREEZE_BEFORE):
        model = apply_strategy(_pretrained(), strategy, "ft")
        assert _trainable(model) == expected_trainable("alignn", strategy), strategy
    # spelled out for the two the paper defines by convolution kind
    conv = {f"{m}.{p}" for m in ("node_linear", "edge_gate", "bn_nodes", "bn_edges")
            for p in ("weight", "bias")}  # fmt: skip
    head = {"heads.ft.weight", "heads.ft.bias"}
    two_body = {f"backbone.graph_layers.{i}.node_update.{p}" for i in range(4) for p in conv}
    two_body |= {f"backbone.graph_layers.{i}.{p}" for i in range(4, 8) for p in conv}
    three_body = {f"backbone.graph_layers.{i}.edge_update.{p}" for i in range(4) for p in conv}
    assert _trainable(apply_strategy(_pretrained(), "unfreeze_2body", "ft")) == head | two_body
    assert _trainable(apply_strategy(_pretrained(), "unfreeze_3body", "ft")) == head | three_body
    assert _trainable(apply_strategy(_pretrained(), "last_layer", "ft")) == head


@pytest.mark.parametrize("n", range(1, 8))
def test_freeze_before_n_freezes_exactly_the_children_before_n(n):
    for arch in ("alignn", "cgcnn"):
        model = apply_strategy(_pretrained(arch), f"freeze_before:{n}", "ft")
        for name, parameter in model.named_parameters():
            child = paper_child(name, arch)[0]
            assert parameter.requires_grad == (child >= n), (arch, n, name)
        frozen = {m for k in range(1, n) for m in paper_children(model)[k]}
        assert model.frozen == frozen
    assert _trainable(apply_strategy(_pretrained(), "freeze_before:1", "ft")) == _trainable(
        apply_strategy(_pretrained(), "full", "ft")
    )
    assert _trainable(apply_strategy(_pretrained(), "freeze_before:7", "ft")) == {
        "heads.ft.weight",
        "heads.ft.bias",
    }


def test_cgcnn_strategies_train_the_analogous_groups():
    for strategy in (*NAMED, *FREEZE_BEFORE):
        if strategy == "unfreeze_3body":
            with pytest.raises(StrategyError) as err:
                apply_strategy(_pretrained("cgcnn"), strategy, "ft")
            assert "\n" not in str(err.value) and "CGCNN has none" in str(err.value)
            continue
        model = apply_strategy(_pretrained("cgcnn"), strategy, "ft")
        assert _trainable(model) == expected_trainable("cgcnn", strategy), strategy
    layers = {n for n, _ in _pretrained("cgcnn").named_parameters() if ".graph_layers." in n}
    model = apply_strategy(_pretrained("cgcnn"), "unfreeze_2body", "ft")
    assert _trainable(model) == layers | {"heads.ft.weight", "heads.ft.bias"}


@pytest.mark.parametrize("strategy", [*NAMED, "freeze_before:4"])
def test_a_training_step_moves_only_trainable_parameters_and_statistics(strategy, graphs):
    model = _pretrained()
    old_head = model.heads["pt"].weight.clone()
    apply_strategy(model, strategy, "ft")
    assert list(model.heads) == ["ft"] and model.config.heads == ("ft",)
    if strategy.startswith("new_head"):
        assert model.config.mlp_heads == ("ft",)
        assert [m.weight.shape for m in model.heads["ft"]] == [(64, 16), (1, 64)]
    else:
        assert torch.equal(model.heads["ft"].weight, old_head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats_before = _buffers(model)
    settings = TrainSettings(epochs=1, batch_size=4, lr=1e-2, patience=5)
    fit(model, "ft", graphs, graphs, TargetScaler.fit(targets_of(graphs)), settings, 0, False)
    after = model.state_dict()
    trainable = expected_trainable("alignn", strategy)
    changed = {n for n, _ in model.named_parameters() if not torch.equal(before[n], after[n])}
    assert changed <= trainable, (strategy, changed - trainable)
    # every trainable module moved (the last line-graph BatchNorm never sees data)
    modules = {n.rsplit(".", 2)[0] for n in trainable if ".bn_" not in n}
    moved_modules = {n.rsplit(".", 2)[0] for n in changed}
    assert modules <= moved_modules, (strategy, modules - moved_modules)
    # frozen BatchNorm statistics stay those of pre-training
    moved = {name for name, value in stats_before.items() if not torch.equal(value, after[name])}
    frozen_modules = {n.rsplit(".", 2)[0] for n, _ in model.named_parameters()} - {
        n.rsplit(".", 2)[0] for n in trainable
    }
    frozen_stats = {name for name in stats_before if name.rsplit(".", 2)[0] in frozen_modules}
    assert not moved & frozen_stats, (strategy, moved & frozen_stats)
    assert bool(moved) == (strategy not in ("last_layer", "new_head_freeze")), strategy


def test_fine_tuned_new_head_survives_a_checkpoint(tmp_path):
    model = apply_strategy(_pretrained("cgcnn"), "new_head", "ft")
    config = ModelConfig.from_dict(model.config.to_dict())
    assert config.mlp_heads == ("ft",)
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())  # same head shapes
    again = apply_strategy(rebuilt, "last_layer", "next")  # a chain reuses the two-layer head
    assert again.config.mlp_heads == ("next",) and isinstance(again.heads["next"], nn.Sequential)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("partial", "unknown fine-tune strategy 'partial'; known: full, last_layer, "),
        ("freeze_graph", "unknown fine-tune strategy 'freeze_graph'"),
        ("freeze_before:0", "'freeze_before:0': N must be an integer from 1 to 7"),
        ("freeze_before:8", "'freeze_before:8': N must be an integer from 1 to 7"),
        ("freeze_before:x", "'freeze_before:x': N must be an integer from 1 to 7"),
        ("freeze_before4", "unknown fine-tune strategy 'freeze_before4'"),
    ],
)
def test_bad_strategies_are_one_line_errors(strategy, message):
    with pytest.raises(StrategyError) as err:
        apply_strategy(_pretrained(), strategy, "ft")
    assert message in str(err.value) and "\n" not in str(err.value)
    model = ModelConfig(hidden=8, embedding=4, alignn_layers=0, gcn_layers=1)
    with pytest.raises(StrategyError, match="alignn_layers: 0"):
        apply_strategy(build_model(model), "unfreeze_3body", "ft")


def test_reusing_a_head_of_a_multi_head_model_needs_its_name():
    model = build_model(dataclasses.replace(_pretrained().config, heads=("a", "b")))
    with pytest.raises(StrategyError, match=r"heads \['a', 'b'\] and none is 'c'"):
        apply_strategy(model, "full", "c")
    apply_strategy(model, "last_layer", "b")
    assert list(model.heads) == ["b"]


def test_finetune_refuses_bad_checkpoints(tmp_path):
    synthetic_data_dir(tmp_path, {"src": 40, "dst": 40})
    config = tiny_config(tmp_path, ["src", "dst"])
    pre = runs.execute_run(
        config, runs.RunSpec("pt", "src", 20, 1, tmp_path / "pt"), progress=False
    )
    assert pre["kind"] == "scratch"
    checkpoint = tmp_path / "pt" / "model.pt"

    def finetune(path, cfg=config, strategy="full"):
        spec = runs.RunSpec("ft", "dst", 20, 1, tmp_path / "ft", "finetune", path, strategy)
        return runs.execute_run(cfg, spec, progress=False)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable tlmat checkpoint"):
        finetune(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a tlmat checkpoint"):
        finetune(foreign)
    payload = load_checkpoint(checkpoint)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit the model"):
        finetune(tmp_path / "mismatch.pt")
    other = tiny_config(tmp_path, ["src", "dst"], "featurizer.cutoff=6.0")
    with pytest.raises(CheckpointError, match="pre-trained with featurizer"):
        finetune(checkpoint, cfg=other)
    with pytest.raises(StrategyError, match="unknown fine-tune strategy"):
        finetune(checkpoint, strategy="nope")
    # nothing a rerun would take as finished (subset_ids.json, written at the draw, may stay)
    assert not any((tmp_path / "ft" / name).exists() for name in RUN_FILES)
    metrics = finetune(checkpoint)
    assert (metrics["pt_dataset"], metrics["pt_size"], metrics["chain"]) == (
        "src",
        20,
        "src:20>dst:20",
    )
