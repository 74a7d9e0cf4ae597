"""The CLI: bad input gives one line on stderr, exit status 2 and no output files."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_MODEL, synthetic_data_dir

from tlmat.cli import main


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic_data_dir(tmp_path, {"aa": 40, "bb": 40})
    (tmp_path / "config.yaml").write_text(
        "data_dir: data\n"
        "datasets:\n  aa: {source: file}\n  bb: {source: file}\n"
        "train: {epochs: 2}\n"
    )
    return tmp_path


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _run(*args: str) -> int:
    return main([*args, "--set", TINY_MODEL, "--quiet"])


def test_train_and_finetune_from_the_command_line(workspace):
    assert _run("train", "-d", "aa", "-n", "20", "-o", "runs/pt", "--kind", "pretrain") == 0
    metrics = json.loads((workspace / "runs/pt/metrics.json").read_text())
    assert metrics["kind"] == "pretrain" and metrics["run_id"] == "runs/pt"
    assert len(list((workspace / "resources/datasets").glob("aa-*.json.gz"))) == 1
    code = _run(
        "finetune",
        "-d",
        "bb",
        "-n",
        "20",
        "-o",
        "runs/ft",
        "--checkpoint",
        "runs/pt/model.pt",
        "--strategy",
        "freeze_before:5",
        "--lr",
        "0.0005",
        "--run-id",
        "ft/x",
    )
    assert code == 0
    metrics = json.loads((workspace / "runs/ft/metrics.json").read_text())
    assert (metrics["strategy"], metrics["lr"], metrics["pt_dataset"]) == (
        "freeze_before:5",
        0.0005,
        "aa",
    )


def test_standalone_train_rebuilds_when_the_data_source_changes(workspace, capsys):
    """Prepared data are keyed by their source: data_dir B never trains on A's frames."""
    args = ["train", "-d", "aa", "-n", "20", "-o"]
    assert _run(*args, "runs/a") == 0
    other = workspace / "other"
    other.mkdir()
    (other / "aa.json.gz").write_bytes(b"not a frame")  # a corrupt file in B must fail
    assert _run(*args, "runs/b", "--set", f"data_dir={other}") == 2
    assert "aa.json.gz" in _error_line(capsys)
    assert not (workspace / "runs/b/metrics.json").exists()

    synthetic_data_dir(other.parent / "fresh", {"aa": 30})
    assert _run(*args, "runs/c", "--set", f"data_dir={other.parent / 'fresh' / 'data'}") == 0
    frames = sorted((workspace / "resources/datasets").glob("aa-*.json.gz"))
    assert len(frames) == 2  # one per source, neither overwritten
    first, third = (json.loads((workspace / f"runs/{r}/metrics.json").read_text()) for r in "ac")
    assert (first["n_test"], third["n_test"]) == (4, 3)  # 10 % of 40 and of 30 structures

    # editing the source file in place rebuilds it too (make's rule: source newer)
    before = {p: p.stat().st_mtime_ns for p in frames}
    fresh = other.parent / "fresh"
    synthetic_data_dir(fresh, {"aa": 26})
    assert _run(*args, "runs/d", "--set", f"data_dir={fresh / 'data'}") == 0
    rebuilt = [p for p in frames if p.stat().st_mtime_ns != before[p]]
    assert len(rebuilt) == 1
    assert json.loads((workspace / "runs/d/metrics.json").read_text())["n_test"] < third["n_test"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "-d", "zz", "-n", "20", "-o", "out"], "unknown data set key 'zz'"),
        (
            ["train", "-d", "aa", "-n", "20", "-o", "out", "--set", "train.epochs=0"],
            "key 'train.epochs': 0 is less than the minimum of 1",
        ),
        (
            ["train", "-d", "aa", "-n", "20", "-o", "out", "--set", "train.device=tpu"],
            "key 'train.device': 'tpu' is not one of",
        ),
        (
            ["finetune", "-d", "aa", "-n", "20", "-o", "out", "--checkpoint", "nope.pt"],
            "nope.pt: checkpoint not found",
        ),
        (["train", "-d", "aa", "-n", "20", "-o", "out", "--trial", "0"], "trial must be >= 1"),
        (
            ["train", "-d", "aa", "-n", "20", "-o", "out", "-c", "missing.yaml"],
            "missing.yaml: config file not found",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(workspace, capsys, args, message):
    assert _run(*args) == 2
    line = _error_line(capsys)
    assert line.startswith("tlmat: error: ") and message in line, line
    assert not (workspace / "out").exists()


def test_not_matminer_file_and_unknown_strategy(workspace, capsys):
    (workspace / "data" / "aa.json.gz").write_bytes(b"garbage")
    assert _run("prepare", "-d", "aa") == 2
    assert "aa.json.gz: not a matminer-format frame" in _error_line(capsys)
    assert not (workspace / "resources").exists()
    assert _run("train", "-d", "bb", "-n", "20", "-o", "pt") == 0
    code = _run(
        "finetune",
        "-d",
        "bb",
        "-n",
        "20",
        "-o",
        "out",
        "--checkpoint",
        "pt/model.pt",
        "--strategy",
        "everything",
    )
    assert code == 2 and "unknown fine-tune strategy 'everything'" in _error_line(capsys)
    assert not (workspace / "out").exists()
