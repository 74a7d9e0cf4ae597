"""Fine-tune strategies train exactly the parameters they should; bad checkpoints fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_structures, synthetic_target
from helpers import synthetic_data_dir, tiny_config

from tlmat import runs
from tlmat.checkpoint import CheckpointError, load_checkpoint
from tlmat.graphs import FeaturizerSettings, featurize
from tlmat.models import ModelConfig, build_model
from tlmat.train import TargetScaler, TrainSettings, fit, targets_of
from tlmat.transfer import STRATEGIES, StrategyError, apply_strategy

EXPECTED_TRAINABLE = {
    "full": ("backbone.embedding", "backbone.graph_layers", "backbone.readout", "heads"),
    "last_layer": ("heads",),
    "freeze_graph": ("backbone.readout", "heads"),
    "new_head": ("backbone.embedding", "backbone.graph_layers", "backbone.readout", "heads"),
    "new_head_freeze": ("heads",),
}


@pytest.fixture(scope="module")
def graphs():
    structures = make_structures(12, seed=7)
    targets = [synthetic_target(s) for s in structures]
    return featurize(structures, range(12), targets, FeaturizerSettings(), False).graphs(range(12))


def _pretrained() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(hidden=16, embedding=8, alignn_layers=1, gcn_layers=1, heads=("pt",))
    return build_model(config)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_trains_exactly_its_parameters(strategy, graphs):
    model = _pretrained()
    old_head = model.heads["pt"].weight.clone()
    apply_strategy(model, strategy, "ft")
    assert list(model.heads) == ["ft"] and model.config.heads == ("ft",)
    head_reused = torch.equal(model.heads["ft"].weight, old_head)
    assert head_reused == (not strategy.startswith("new_head"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats_before = _buffers(model)
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-2, patience=5)
    fit(model, "ft", graphs, graphs, TargetScaler.fit(targets_of(graphs)), settings, 0, False)
    after = model.state_dict()
    expected = EXPECTED_TRAINABLE[strategy]
    changed = {n for n, _ in model.named_parameters() if not torch.equal(before[n], after[n])}
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == name.startswith(expected), (strategy, name)
        if not name.startswith(expected):
            assert name not in changed, (strategy, name)
    # every trainable group moved (a parameter off the output's gradient path may not)
    for prefix in expected:
        assert any(name.startswith(prefix) for name in changed), (strategy, prefix)
    moved = {name for name, value in stats_before.items() if not torch.equal(value, after[name])}
    frozen_stats = {name for name in stats_before if not name.startswith(expected)}
    assert not moved & frozen_stats, (strategy, moved & frozen_stats)
    assert bool(moved) == ("backbone.graph_layers" in expected), strategy


def test_unknown_strategy():
    with pytest.raises(StrategyError, match="unknown fine-tune strategy 'partial'; known: "):
        apply_strategy(_pretrained(), "partial", "ft")


def test_reusing_a_head_of_a_multi_head_model_needs_its_name():
    model = build_model(dataclasses.replace(_pretrained().config, heads=("a", "b")))
    with pytest.raises(StrategyError, match=r"heads \['a', 'b'\] and none is 'c'"):
        apply_strategy(model, "full", "c")
    apply_strategy(model, "last_layer", "b")
    assert list(model.heads) == ["b"]


def test_finetune_refuses_bad_checkpoints(tmp_path):
    synthetic_data_dir(tmp_path, {"src": 40, "dst": 40})
    config = tiny_config(tmp_path, ["src", "dst"])
    pre = runs.execute_run(config, runs.RunSpec("pt", "src", 20, 1, tmp_path / "pt"), False)
    assert pre["kind"] == "scratch"
    checkpoint = tmp_path / "pt" / "model.pt"

    def finetune(path, cfg=config, strategy="full"):
        spec = runs.RunSpec("ft", "dst", 20, 1, tmp_path / "ft", "finetune", path, strategy)
        return runs.execute_run(cfg, spec, False)

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
    assert not (tmp_path / "ft").exists()
    metrics = finetune(checkpoint)
    assert (metrics["pt_dataset"], metrics["pt_size"], metrics["chain"]) == (
        "src",
        20,
        "src:20>dst:20",
    )
