"""Small builders shared by tests: tiny configs and a synthetic data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_frame

from tlmat.config import load_config
from tlmat.data import write_frame
from tlmat.plan import FAMILIES

ROOT = Path(__file__).parents[1]
TINY_MODEL = "model={arch: alignn, hidden: 32, embedding: 16, alignn_layers: 1, gcn_layers: 1}"


def synthetic_data_dir(root: Path, sizes: dict[str, int]) -> Path:
    """Matminer-format frames <key>.json.gz of synthetic crystals, one per key."""
    data = root / "data"
    for n, (key, size) in enumerate(sizes.items()):
        write_frame(make_frame(size, seed=10 + n, start_id=1000 * n), data / f"{key}.json.gz")
    return data


def tiny_config(root: Path, keys: list[str], *extra: str) -> dict:
    """A validated config over synthetic data sets ``keys`` with a tiny ALIGNN."""
    registry = "{" + ", ".join(f"{k}: {{source: file, label: {k.upper()}}}" for k in keys) + "}"
    return load_config(
        [],
        [
            f"data_dir={root / 'data'}",
            f"resources_dir={root / 'resources'}",
            f"datasets={registry}",
            TINY_MODEL,
            "train.epochs=3",
            *extra,
        ],
    )


def pairwise_study(keys: list[str], trials: int) -> dict:
    """A workflow config (tiny CGCNN, 2 epochs) with scratch, PT and pair-wise FT only."""
    return {
        "data_dir": "data",
        "datasets": {k: {"source": "file", "label": k.upper(), "units": "eV"} for k in keys},
        "model": {"arch": "cgcnn", "hidden": 16, "gcn_layers": 1, "readout_layers": 1},
        "train": {"epochs": 2, "batch_size": 16},
        "study": {
            "datasets": list(keys),
            "trials": trials,
            "ft_sizes": [20],
            "pt_size": 30,
            "ood_targets": [],
            # scratch and the grid only: every other family of the plan off
            "families": {f: False for f in FAMILIES if f not in ("scratch", "pairwise")},
        },
    }


def run_snakemake(workdir: Path, *args: str, cores: str = "2") -> subprocess.CompletedProcess:
    """The study's Snakefile on ``workdir/tiny.yaml``, with this interpreter's bin on PATH
    (the rules call ``tlmat``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "tiny.yaml"),
        "--cores",
        cores,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
