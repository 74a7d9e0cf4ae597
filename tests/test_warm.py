"""Warm start: a job run by a fork of the warm server is the same job, with the same numbers,
output files, log lines and exit status as one run in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_MODEL, synthetic_data_dir

from tlmat import warm

TRAIN = ["train", "-d", "aa", "-n", "20", "--set", TINY_MODEL, "--set", "train.epochs=2"]


@pytest.fixture()
def workspace(tmp_path):
    synthetic_data_dir(tmp_path, {"aa": 40})
    (tmp_path / "config.yaml").write_text("data_dir: data\ndatasets:\n  aa: {source: file}\n")
    return tmp_path


def _tlmat(cwd: Path, *args: str, warm_start: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, warm.ENV_FLAG: "1" if warm_start else "0", "TLMAT_WARM_IDLE": "20"}
    env.pop(warm.INSIDE_FLAG, None)
    command = [sys.executable, "-m", "tlmat.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _numbers(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "run_id")}


def test_a_warm_job_equals_a_cold_one(workspace):
    cold = _tlmat(workspace, *TRAIN, "-o", "cold", warm_start=False)
    assert cold.returncode == 0, cold.stderr
    assert not warm.socket_path(str(workspace)).exists()

    first = _tlmat(workspace, *TRAIN, "-o", "warm1", warm_start=True)
    assert first.returncode == 0, first.stderr
    assert warm.socket_path(str(workspace)).exists()  # the first job started the server
    started = time.monotonic()
    second = _tlmat(workspace, *TRAIN, "-o", "warm2", warm_start=True)
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stderr

    expected = _numbers(workspace / "cold" / "metrics.json")
    for run in ("warm1", "warm2"):
        assert _numbers(workspace / run / "metrics.json") == expected
        assert (workspace / run / "predictions.csv").read_bytes() == (
            workspace / "cold" / "predictions.csv"
        ).read_bytes()
    # the job's own stderr carries its log lines, as in a cold run
    assert "test R2" in second.stderr and "test R2" in cold.stderr
    assert elapsed < 60


def test_a_warm_job_reports_errors_like_a_cold_one(workspace):
    args = ["train", "-d", "zz", "-n", "20", "-o", "out"]
    cold = _tlmat(workspace, *args, warm_start=False)
    hot = _tlmat(workspace, *args, warm_start=True)
    assert cold.returncode == hot.returncode == 2
    line = [x for x in hot.stderr.splitlines() if x.startswith("tlmat: error:")]
    assert line and "unknown data set key 'zz'" in line[0]
    assert not (workspace / "out").exists()


def test_only_training_verbs_under_the_flag_go_warm(monkeypatch):
    monkeypatch.setenv(warm.ENV_FLAG, "1")
    assert warm.enabled(["train", "-d", "x"]) and warm.enabled(["mpt"])
    assert not warm.enabled(["aggregate"]) and not warm.enabled([])
    monkeypatch.setenv(warm.INSIDE_FLAG, "1")  # a child never forwards again
    assert not warm.enabled(["train"])
    monkeypatch.delenv(warm.INSIDE_FLAG)
    monkeypatch.setenv(warm.ENV_FLAG, "0")
    assert not warm.enabled(["train"])
