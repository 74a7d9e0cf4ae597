"""`--resume`: a run cut off after some epochs ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import synthetic_data_dir, tiny_config

from tlmat import train
from tlmat.runs import RunSpec, execute_run

VOLATILE = {"wall_time_s"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    synthetic_data_dir(root, {"aa": 40})
    model = "model={arch: cgcnn, hidden: 16, gcn_layers: 1}"
    return tiny_config(
        root, ["aa"], model, "train.epochs=6", "train.patience=6", "train.resume_every=1"
    )


def _spec(config, name, resume=False):
    out = Path(config["resources_dir"]).parent / name
    return RunSpec(
        run_id="pt/aa-30/t1",
        dataset="aa",
        size=30,
        trial=1,
        out_dir=out,
        kind="pretrain",
        resume=resume,
    )


class Interrupted(Exception):
    pass


def _cut_after(monkeypatch, epochs: int) -> None:
    """Make the trainer die like a killed job right after ``epochs`` epochs were saved."""
    real = train._save_resume
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == epochs:
            raise Interrupted

    monkeypatch.setattr(train, "_save_resume", save_then_die)


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


def test_resumed_run_equals_uninterrupted_run(config, monkeypatch):
    whole = execute_run(config, _spec(config, "whole"))
    spec = _spec(config, "cut", resume=True)
    with monkeypatch.context() as patch:
        _cut_after(patch, 3)
        with pytest.raises(Interrupted):
            execute_run(config, spec)
    assert (spec.out_dir / ".resume.pt").is_file()
    assert not (spec.out_dir / "metrics.json").exists()  # nothing passes as finished
    resumed = execute_run(config, spec)
    assert _stable(resumed) == _stable(whole)
    history = (spec.out_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + whole["epochs_run"]
    assert not (spec.out_dir / ".resume.pt").exists()  # cleaned up once finished
    assert json.loads((spec.out_dir / "metrics.json").read_text())["test_mae"] == whole["test_mae"]


def test_without_resume_flag_a_cut_run_starts_over(config, monkeypatch, caplog):
    spec = _spec(config, "fresh")
    with monkeypatch.context() as patch:
        _cut_after(patch, 2)
        with pytest.raises(Interrupted):
            execute_run(config, spec)
    restarted = execute_run(config, spec)
    assert restarted["epochs_run"] == 6
    assert "resuming" not in caplog.text


def test_state_of_another_config_is_not_resumed(config, monkeypatch, caplog):
    spec = _spec(config, "other", resume=True)
    with monkeypatch.context() as patch:
        _cut_after(patch, 2)
        with pytest.raises(Interrupted):
            execute_run(config, spec)
    changed = {**config, "train": {**config["train"], "lr": 0.002}}
    with caplog.at_level("WARNING"):
        execute_run(changed, spec)
    assert "another run or config" in caplog.text
