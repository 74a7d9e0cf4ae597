"""Small builders shared by tests: tiny configs and a synthetic data directory."""

from __future__ import annotations

from pathlib import Path

from conftest import make_frame

from tlmat.config import load_config
from tlmat.data import write_frame

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
