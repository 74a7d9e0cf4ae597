"""What a study's numbers rest on: unwritable outputs, kills, determinism, unknown presets."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import pairwise_study, run_snakemake, synthetic_data_dir, tiny_config

from tlmat import runs
from tlmat.cli import main
from tlmat.runs import RunSpec, execute_run

ROOT = Path(__file__).parents[1]
CGCNN = "model={arch: cgcnn, hidden: 16, gcn_layers: 1}"
VOLATILE = {"wall_time_s"}


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarantees")
    synthetic_data_dir(root, {"aa": 40})
    return tiny_config(root, ["aa"], CGCNN, "train.epochs=3")


def _spec(config, name: str) -> RunSpec:
    out = Path(config["resources_dir"]).parent / name
    return RunSpec("scratch/aa-30/t1", "aa", 30, 1, out)


def test_same_config_and_seed_give_identical_metrics(config):
    first = execute_run(config, _spec(config, "first"))
    second = execute_run(config, _spec(config, "second"))
    assert _stable(first) == _stable(second)
    a = (Path(config["resources_dir"]).parent / "first" / "predictions.csv").read_text()
    b = (Path(config["resources_dir"]).parent / "second" / "predictions.csv").read_text()
    assert a == b


def test_unwritable_output_directory_is_one_line_and_leaves_nothing(config, capsys, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the run directory should go")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    code = main(
        ["train", "-c", str(config_file), "-d", "aa", "-n", "30", "-o", str(blocker / "run"), "-q"]
    )
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"tlmat: error: {blocker / 'run'}: cannot write the run directory")
    assert blocker.read_text().startswith("a file")


def test_disk_full_while_saving_leaves_no_run_files(config, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "save_checkpoint", full)
    spec = _spec(config, "full-disk")
    with pytest.raises(OSError, match="cannot write the run outputs .No space left on device."):
        execute_run(config, spec)
    left = sorted(p.name for p in spec.out_dir.iterdir() if p.name != ".resume.pt")
    # no model.pt, metrics.json or .partial files; the subset is written before training
    assert left == ["subset_ids.json"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_training_job_leaves_nothing_finished_and_resumes(config, tmp_path, sig):
    cfg = {**config, "train": {**config["train"], "epochs": 400, "patience": 400}}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "tlmat.cli",
        "train",
        "-c",
        str(config_file),
        "-d",
        "aa",
        "-n",
        "30",
        "-o",
        str(out),
        "--resume",
        "--set",
        "train.resume_every=1",
        "-q",
    ]
    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".resume.pt").exists() and job.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished within 2 minutes"
        time.sleep(0.05)
    assert job.poll() is None, job.stderr.read()
    os.kill(job.pid, sig)
    job.wait(timeout=60)
    assert job.returncode != 0
    finished = [name for name in runs.RUN_FILES if (out / name).exists()]
    assert finished == []  # nothing that passes as finished
    short = [*command, "--set", "train.epochs=3", "--set", "train.patience=3"]
    done = subprocess.run(short, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3


def test_workflow_metrics_are_identical_with_one_and_two_cores(tmp_path):
    metrics = {}
    for cores in ("1", "2"):
        work = tmp_path / f"cores{cores}"
        synthetic_data_dir(work, {"aa": 50, "bb": 50})
        (work / "config.yaml").write_text((ROOT / "config.yaml").read_text())
        (work / "tiny.yaml").write_text(yaml.safe_dump(pairwise_study(["aa", "bb"], trials=1)))
        result = run_snakemake(work, cores=cores)
        assert result.returncode == 0, result.stderr[-3000:]
        files = sorted((work / "results" / "runs").rglob("metrics.json"))
        metrics[cores] = {
            str(f.relative_to(work)): _stable(json.loads(f.read_text())) for f in files
        }
    assert len(metrics["1"]) == 6  # 2 scratch, 2 PT, 2 FT
    assert metrics["1"] == metrics["2"]


def test_unknown_preset_is_one_line_from_make():
    result = subprocess.run(
        ["make", "-n", "demo", "PRESET=nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown PRESET 'nope'" in lines[0], lines
    assert "available: " in lines[0] and "quick" in lines[0].split("available: ")[1]
