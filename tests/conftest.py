"""Shared fixtures: small synthetic crystals, so most tests need no real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure

torch.set_num_threads(1)

SHARED_DATA = Path(
    os.environ.get("TLMAT_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")
)
ELEMENTS = ["Li", "O", "Si", "Mg", "Al", "Na", "Cl", "Ti"]


def make_structures(n: int, seed: int = 0) -> list[Structure]:
    """Random small crystals (1-4 atoms, skewed cells) with atoms >= 1.5 Å apart."""
    rng = np.random.default_rng(seed)
    structures: list[Structure] = []
    while len(structures) < n:
        a, b, c = rng.uniform(3.0, 5.5, size=3)
        alpha, beta, gamma = rng.uniform(75, 105, size=3)
        lattice = Lattice.from_parameters(a, b, c, alpha, beta, gamma)
        n_atoms = int(rng.integers(1, 5))
        species = list(rng.choice(ELEMENTS, size=n_atoms))
        coords = rng.uniform(0, 1, size=(n_atoms, 3))
        structure = Structure(lattice, species, coords)
        if n_atoms > 1 and np.min(structure.distance_matrix[np.triu_indices(n_atoms, 1)]) < 1.5:
            continue
        structures.append(structure)
    return structures


def synthetic_target(structure: Structure) -> float:
    """A smooth, learnable property: mean atomic number scaled by density."""
    return float(np.mean(structure.atomic_numbers) * structure.density / 10.0)


def make_frame(n: int, seed: int = 0, start_id: int = 0) -> pd.DataFrame:
    """A matminer-format frame: index id, columns structure + target."""
    structures = make_structures(n, seed)
    frame = pd.DataFrame(
        {"structure": structures, "target": [synthetic_target(s) for s in structures]},
        index=pd.Index(range(start_id, start_id + n)),
    )
    return frame


@pytest.fixture(scope="session")
def structures() -> list[Structure]:
    return make_structures(40, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "splits.json").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set TLMAT_SHARED_DATA)")
    return SHARED_DATA
