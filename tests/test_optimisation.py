"""Optimisation as the paper ran it: batch size by run size, learning rate by run kind, and
model selection (``train.select``: the final weights, or the best-validation ones)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_structures, synthetic_target
from helpers import synthetic_data_dir, tiny_config

from tlmat import runs, train
from tlmat.config import load_config
from tlmat.graphs import FeaturizerSettings, featurize
from tlmat.models import ModelConfig, build_model
from tlmat.train import TargetScaler, TrainSettings, fit, predict, targets_of

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- batch size, lr


def test_batch_size_by_run_size():
    settings = TrainSettings(batch_size=16, batch_size_by_size=[[100, 2], [10, 1]])
    sizes = {2: 1, 10: 1, 11: 2, 100: 2, 101: 16, 200: 16, 500: 16, 941: 16}
    assert {n: settings.batch_size_for(n) for n in sizes} == sizes
    assert TrainSettings(batch_size=16).batch_size_for(10) == 16  # no map: one batch size


@pytest.mark.parametrize(
    ("kind", "size", "batch", "lr"),
    [
        ("scratch", 10, 1, 1e-3),
        ("scratch", 100, 2, 1e-3),
        ("scratch", 500, 16, 1e-3),
        ("finetune", 10, 1, 1e-3),
        ("finetune", 100, 2, 1e-3),
        ("finetune", 500, 16, 1e-3),
        ("finetune", 800, 16, 1e-3),
        ("pretrain", 941, 16, 1e-4),
    ],
)
def test_config_yaml_runs_train_with_the_papers_batch_and_lr(kind, size, batch, lr):
    """config.yaml: batch 1/2/16 at 10/100/more structures for scratch and fine-tune runs
    alike (the paper's config_git-<size>.json), PT at 1e-4, FT and scratch at 1e-3."""
    config = load_config([ROOT / "config.yaml"])
    checkpoint = Path("pt.pt") if kind == "finetune" else None
    spec = runs.RunSpec("r", "bg", size, 1, Path("out"), kind=kind, checkpoint=checkpoint)
    settings = runs._train_settings(config, spec)
    assert (settings.batch_size, settings.lr) == (batch, lr)
    assert (settings.epochs, settings.select) == (500, "final")


def test_a_run_records_its_batch_size_and_selection(tmp_path):
    synthetic_data_dir(tmp_path, {"syn": 40})
    config = tiny_config(tmp_path, ["syn"], "train.batch_size_by_size=[[10, 1], [100, 2]]")
    spec = runs.RunSpec("scratch/syn-20/t1", "syn", 20, 1, tmp_path / "run")
    metrics = runs.execute_run(config, spec, progress=False)
    assert metrics["batch_size"] == 2 and metrics["select"] == "best_val"


def test_batch_of_one_trains_on_a_one_atom_crystal(tmp_path):
    """Batch 1 (FT 10) on a one-atom cell: the atom-level BatchNorm sees one row, so that
    step runs it on its running statistics instead of failing."""
    synthetic_data_dir(tmp_path, {"syn": 40})
    config = tiny_config(tmp_path, ["syn"], "train.batch_size_by_size=[[10, 1]]")
    spec = runs.RunSpec("scratch/syn-10/t1", "syn", 10, 1, tmp_path / "run")
    metrics = runs.execute_run(config, spec, progress=False)
    assert metrics["batch_size"] == 1 and metrics["epochs_run"] == 3
    model = build_model(ModelConfig(hidden=8, embedding=4, alignn_layers=1, gcn_layers=1))
    model.train()
    train._batchnorm_eval(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and not any(m.training for m in norms)


# ----------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def tiny():
    structures = make_structures(20, seed=5)
    targets = [synthetic_target(s) for s in structures]
    cache = featurize(structures, range(20), targets, FeaturizerSettings(), progress=False)
    graphs = cache.graphs(range(20))
    return graphs[:16], graphs[16:], TargetScaler.fit(targets_of(graphs[:16]))


def _fit_recording(monkeypatch, tiny, settings, val_losses):
    """Fit a tiny model with the given validation losses (the best is not the last), keeping
    the weights at the end of every epoch; returns the model, the result and those weights."""
    train_g, val_g, scaler = tiny
    states: list[dict] = []

    def fake_evaluate(model, targets, loader, device):
        states.append(copy.deepcopy(model.state_dict()))
        loss = val_losses[len(states) - 1]
        return loss, loss

    monkeypatch.setattr(train, "_evaluate_loss", fake_evaluate)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(hidden=16, embedding=8, alignn_layers=1, gcn_layers=1, heads=("y",))
    )
    result = fit(model, "y", train_g, val_g, scaler, settings, seed=0, progress=False)
    return model, result, states


def _predictions(model, states, epoch, graphs, scaler):
    twin = copy.deepcopy(model)
    twin.load_state_dict(states[epoch - 1])
    return predict(twin, "y", graphs, scaler)


def test_select_final_tests_the_last_epochs_weights(monkeypatch, tiny):
    settings = TrainSettings(epochs=3, batch_size=4, lr=1e-2, select="final", patience=1)
    model, result, states = _fit_recording(monkeypatch, tiny, settings, [1.0, 0.5, 0.9])
    _, val_g, scaler = tiny
    ours = predict(model, "y", val_g, scaler)
    assert np.array_equal(ours, _predictions(model, states, 3, val_g, scaler))
    assert not np.allclose(ours, _predictions(model, states, 2, val_g, scaler))
    # every epoch ran although patience 1 had passed after epoch 3's worse loss
    assert (result.epochs_run, result.selected_epoch, result.best_epoch) == (3, 3, 2)
    assert result.best_val_loss == 0.5


def test_select_best_val_keeps_the_best_weights_and_stops_early(monkeypatch, tiny):
    settings = TrainSettings(epochs=6, batch_size=4, lr=1e-2, select="best_val", patience=2)
    losses = [1.0, 0.5, 0.9, 0.8, 0.1, 0.1]
    model, result, states = _fit_recording(monkeypatch, tiny, settings, losses)
    _, val_g, scaler = tiny
    ours = predict(model, "y", val_g, scaler)
    assert np.array_equal(ours, _predictions(model, states, 2, val_g, scaler))
    assert not np.allclose(ours, _predictions(model, states, 4, val_g, scaler))
    assert (result.epochs_run, result.selected_epoch, result.best_epoch) == (4, 2, 2)


def test_best_val_is_the_default_selection():
    assert TrainSettings().select == "best_val"
    assert load_config([])["train"]["select"] == "best_val"
    with pytest.raises(ValueError, match="train.select"):
        TrainSettings(select="last")


# ----------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def test_resume_under_select_final_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    synthetic_data_dir(tmp_path, {"aa": 40})
    config = tiny_config(
        tmp_path,
        ["aa"],
        "model={arch: cgcnn, hidden: 16, gcn_layers: 1}",
        "train.epochs=5",
        "train.select=final",
        "train.patience=1",
        "train.resume_every=1",
    )

    def spec(name, resume=False):
        return runs.RunSpec("pt/aa-30/t1", "aa", 30, 1, tmp_path / name, "pretrain", resume=resume)

    whole = runs.execute_run(config, spec("whole"), progress=False)
    assert (whole["epochs_run"], whole["selected_epoch"]) == (5, 5)
    real, calls = train._save_resume, {"n": 0}

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted

    cut = spec("cut", resume=True)
    with monkeypatch.context() as patch:
        patch.setattr(train, "_save_resume", save_then_die)
        with pytest.raises(Interrupted):
            runs.execute_run(config, cut, progress=False)
    resumed = runs.execute_run(config, cut, progress=False)
    volatile = {"wall_time_s"}
    assert {k: v for k, v in resumed.items() if k not in volatile} == {
        k: v for k, v in whole.items() if k not in volatile
    }


# ----------------------------------------------------------------------------- report


def test_learning_rate_table_keeps_each_strategy(tmp_path):
    import test_aggregate as agg

    from tlmat.report.runs import StudyDefaults, collect_runs
    from tlmat.report.tables import learning_rate

    records = [agg.scratch("dc", 500, t, 0.4, 1.0) for t in (1, 2)]
    for strategy in ("full", "new_head", "new_head_freeze"):
        for lr in (1e-2, 1e-3):
            records += [
                agg.finetune("bg", "dc", 500, t, 0.5, 0.8, strategy=strategy, lr=lr) for t in (1, 2)
            ]
    runs = collect_runs([agg.write_run(tmp_path, r) for r in records])
    lr_strategies = ("full", "new_head", "new_head_freeze")
    defaults = StudyDefaults(pt_size=941, lr=1e-3, lr_strategies=lr_strategies)
    table = learning_rate(runs, defaults)
    assert "strategy" in table.columns
    assert sorted(zip(table["strategy"], table["lr"], strict=True)) == sorted(
        (s, lr) for s in lr_strategies for lr in (1e-2, 1e-3)
    )
    plain = learning_rate(runs, StudyDefaults(pt_size=941, lr=1e-3))  # no list: the default
    assert set(plain["strategy"]) == {"full"}
