"""Per-job start-up cost and the quick study's wall time, cold and warm (tlmat.warm).

    .venv/bin/python benchmarks/startup.py                 # per-job overhead, ~1 min
    .venv/bin/python benchmarks/startup.py --demo          # + the whole quick study twice
    .venv/bin/python benchmarks/startup.py --demo --modes warm   # only the warm demo

A job's overhead is measured the way the workflow runs it: ``tlmat train`` given its graph
cache and splits (prepared once beforehand), a 100-structure pz subset of the demo data,
the quick preset's model, one epoch. Its wall time is start-up (process start, imports,
config), data loading, one short epoch and writing the run; ``import_s`` is the import
time of ``tlmat.runs`` alone (``python -X importtime``). ``cold`` runs each job in its own
process (``TLMAT_WARM=0``), ``warm`` forks it from the warm server (``TLMAT_WARM=1``; the
server is started before the timed runs). ``--demo`` times ``snakemake --cores 2`` on
``presets/quick.yaml`` (demo data, install excluded) in a fresh results/resources
directory per mode. Results go to benchmarks/startup.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = ["--config", str(ROOT / "config.yaml"), "--config", str(ROOT / "presets/quick.yaml")]


def _env(mode: str) -> dict:
    return {
        **os.environ,
        "TLMAT_WARM": "1" if mode == "warm" else "0",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


def _tlmat(args: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "tlmat"), *args], env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def import_seconds() -> float:
    """Cumulative import time of tlmat.runs (what a cold training job imports)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tlmat.runs"],
        capture_output=True,
        text=True,
        check=True,
    )
    line = [x for x in out.stderr.splitlines() if re.search(r"\| tlmat\.runs$", x)][-1]
    return int(line.split("|")[1]) / 1e6


def job_overhead(jobs: int, modes: list[str], work: Path) -> dict:
    """Wall time of ``jobs`` tiny training jobs per mode, inputs prepared beforehand."""
    settings = ["--set", f"resources_dir={work / 'resources'}", "--quiet", "--no-progress"]
    env = _env("cold")
    _tlmat(["featurize", *CONFIGS, "--dataset", "pz", *settings], env, ROOT)
    layout = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sys; from tlmat.config import load_config; "
                "from tlmat.plan import Layout; "
                f"c = load_config({CONFIGS[1::2]!r}, ['resources_dir={work / 'resources'}']); "
                "l = Layout.from_config(c); print(json.dumps([str(l.graphs('pz')), "
                "str(l.splits('pz'))]))",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    )
    results = {}
    for mode in modes:
        env = _env(mode)
        train = [
            "train",
            *CONFIGS,
            *settings,
            "--dataset",
            "pz",
            "--size",
            "100",
            "--epochs",
            "1",
            "--graphs",
            layout[0],
            "--splits",
            layout[1],
        ]
        if mode == "warm":  # start the server first: the timed jobs are the later ones
            _tlmat([*train, "--out", str(work / "warmup")], env, work)
        times = [
            _tlmat([*train, "--out", str(work / f"{mode}{n}")], env, work) for n in range(jobs)
        ]
        results[mode] = {"median_s": round(statistics.median(times), 3), "runs_s": times}
    return results


def demo_time(mode: str) -> dict:
    """Wall time of the quick study (demo data) from an empty results/resources folder."""
    with tempfile.TemporaryDirectory(prefix=f"tlmat-demo-{mode}-") as tmp:
        command = [
            str(BIN / "snakemake"),
            "--cores",
            "2",
            "--configfile",
            "presets/quick.yaml",
            "--config",
            f"results_dir={tmp}/results",
            f"resources_dir={tmp}/resources",
            "--quiet",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, env=_env(mode), cwd=ROOT, capture_output=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(done.stderr.decode()[-2000:])
        n_runs = len(list(Path(tmp, "results", "runs").rglob("metrics.json")))
    return {"wall_s": round(seconds, 1), "training_runs": n_runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per mode")
    parser.add_argument("--modes", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--demo", action="store_true", help="also time the whole quick study")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "startup.json")
    args = parser.parse_args()
    results: dict = {
        "import_tlmat_runs_s": round(import_seconds(), 3),
        "cpu_count": os.cpu_count(),
        "load_average_1min_start": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="tlmat-startup-") as tmp:
        results["job"] = job_overhead(args.jobs, args.modes, Path(tmp))
    if args.demo:
        results["demo"] = {mode: demo_time(mode) for mode in args.modes}
    results["load_average_1min_end"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
