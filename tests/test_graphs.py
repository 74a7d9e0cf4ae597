"""Graph featurization against brute force: neighbour lists, line graph, angles, cache.

The references here are deliberately naive (enumerate lattice images with plain numpy,
compare every pair of bonds), so they check the vectorised code, not restate it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_structures
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from tlmat.graphs import (
    FeaturizerSettings,
    GraphCache,
    atom_feature_table,
    bond_cosines,
    featurize,
    line_graph,
    neighbor_edges,
    structure_to_graph,
)

EdgeKey = tuple[int, int, tuple[int, int, int]]


# ----------------------------------------------------------------------------- references


def brute_force_edges(structure: Structure, cutoff: float, k: int) -> dict[EdgeKey, np.ndarray]:
    """ALIGNN's symmetric k-NN edges by enumerating every lattice image that can be in range.

    Returns {(src, dst, image): float64 vector r_dst + image . L - r_src}.
    """
    lattice = structure.lattice.matrix
    frac = structure.frac_coords
    cart = frac @ lattice
    # Fractional component a of any vector of length <= cutoff is at most
    # cutoff * |column a of L^-1|; add the spread of the atoms' own fractional coordinates.
    inverse = np.linalg.inv(lattice)
    spread = frac.max(axis=0) - frac.min(axis=0)
    reach = np.ceil(cutoff * np.linalg.norm(inverse, axis=0) + spread).astype(int) + 1
    grids = np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij")
    images = np.stack([g.ravel() for g in grids], axis=1)
    origin = np.flatnonzero((images == 0).all(axis=1))[0]
    shifts = images @ lattice
    edges: dict[EdgeKey, np.ndarray] = {}
    for i in range(len(structure)):
        vectors = cart[:, None, :] + shifts[None, :, :] - cart[i]  # (atom j, image, 3)
        distances = np.linalg.norm(vectors, axis=-1)
        within = distances <= cutoff
        within[i, origin] = False
        js, ms = np.nonzero(within)
        if js.size == 0:
            continue
        found = distances[js, ms]
        kth = np.sort(found)[min(k, found.size) - 1]
        for j, m in zip(js[found <= kth + 1e-6], ms[found <= kth + 1e-6], strict=True):
            image = tuple(int(x) for x in images[m])
            edges[(i, int(j), image)] = vectors[j, m]
            edges[(int(j), i, tuple(-x for x in image))] = -vectors[j, m]
    return edges


def edges_as_dict(
    structure: Structure, edge_index: np.ndarray, edge_vec: np.ndarray
) -> dict[EdgeKey, np.ndarray]:
    """Featurizer output keyed like :func:`brute_force_edges` (image recovered from the vector)."""
    lattice = structure.lattice.matrix
    cart = structure.frac_coords @ lattice
    src, dst = edge_index
    shift = edge_vec.astype(np.float64) - (cart[dst] - cart[src])
    images_float = shift @ np.linalg.inv(lattice)
    images = np.rint(images_float).astype(int)
    assert np.abs(images_float - images).max(initial=0.0) < 1e-4, "vector is not r_j + n.L - r_i"
    keys = [
        (int(s), int(d), tuple(int(x) for x in n)) for s, d, n in zip(src, dst, images, strict=True)
    ]
    assert len(set(keys)) == len(keys), "duplicate edges"
    return dict(zip(keys, edge_vec, strict=True))


def brute_force_line_graph(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    """Every (e1, e2) with dst(e1) == src(e2), by comparing all pairs of edges."""
    src, dst = edge_index.numpy()
    e1, e2 = np.nonzero(dst[:, None] == src[None, :])
    return set(zip(e1.tolist(), e2.tolist(), strict=True))


def cos_between(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- structures


def rotated_cubic(a: float, species: list[str], coords: list[list[float]]) -> Structure:
    """A cubic cell in a rotated frame: degenerate shells then differ only by rounding."""
    angle_x, angle_z = 0.37, 1.1
    rx = np.array(
        [[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]]
    )
    rz = np.array(
        [[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]]
    )
    return Structure(Lattice(a * np.eye(3) @ rx @ rz), species, coords)


SIMPLE_CUBIC = rotated_cubic(3.0, ["Po"], [[0.0, 0.0, 0.0]])
BCC = rotated_cubic(2.87, ["Fe", "Fe"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
FCC = rotated_cubic(3.61, ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
SKEWED = Structure(
    Lattice.from_parameters(3.1, 4.3, 6.2, 62, 118, 75),
    ["Si", "O", "O"],
    [[0.1, 0.2, 0.3], [0.55, 0.4, 0.9], [0.8, 0.75, 0.45]],
)
# One atom in a skewed cell: every edge joins the atom to one of its own images.
ONE_ATOM = Structure(Lattice.from_parameters(2.9, 3.3, 3.8, 70, 100, 110), ["Cu"], [[0.2, 0.1, 0]])
RANDOM = make_structures(6, seed=3)

NEIGHBOUR_CASES = [
    pytest.param(SIMPLE_CUBIC, 8.0, 12, id="sc-ties"),
    pytest.param(BCC, 8.0, 12, id="bcc-ties"),
    pytest.param(FCC, 8.0, 12, id="fcc-ties"),
    pytest.param(SIMPLE_CUBIC, 3.5, 12, id="sc-small-cutoff"),
    pytest.param(SKEWED, 8.0, 12, id="skewed"),
    pytest.param(SKEWED, 4.0, 3, id="skewed-k3"),
    pytest.param(ONE_ATOM, 8.0, 12, id="one-atom"),
    pytest.param(ONE_ATOM, 3.0, 12, id="one-atom-small-cutoff"),
    *(pytest.param(s, 8.0, 12, id=f"random{n}") for n, s in enumerate(RANDOM)),
    *(pytest.param(s, 5.0, 4, id=f"random{n}-k4") for n, s in enumerate(RANDOM)),
    *(pytest.param(s, 3.0, 12, id=f"random{n}-small") for n, s in enumerate(RANDOM)),
]


# ----------------------------------------------------------------------------- neighbours


def assert_same_edges(structure: Structure, cutoff: float, k: int) -> dict[EdgeKey, np.ndarray]:
    edge_index, edge_vec = neighbor_edges(structure, cutoff, k)
    assert edge_index.dtype == np.int64 and edge_vec.dtype == np.float32
    got = edges_as_dict(structure, edge_index, edge_vec)
    expected = brute_force_edges(structure, cutoff, k)
    assert set(got) == set(expected)
    for key, vec in expected.items():
        np.testing.assert_allclose(got[key], vec, atol=1e-5)
    assert np.all(np.diff(edge_index[0]) >= 0), "edges are stored sorted by source"
    return got


@pytest.mark.parametrize(("structure", "cutoff", "k"), NEIGHBOUR_CASES)
def test_neighbor_edges_match_brute_force(structure: Structure, cutoff: float, k: int) -> None:
    assert_same_edges(structure, cutoff, k)


@pytest.mark.parametrize(
    ("structure", "cutoff", "per_atom"),
    [
        (SIMPLE_CUBIC, 8.0, 18),  # 6 at a, 12th neighbour in the 12-fold a*sqrt(2) shell
        (BCC, 8.0, 14),  # 8 at a*sqrt(3)/2, 12th in the 6-fold shell at a
        (FCC, 8.0, 12),  # exactly the first shell
        (SIMPLE_CUBIC, 3.5, 6),  # fewer than k within the cutoff: all of them
    ],
)
def test_tied_shells_are_kept_whole(structure: Structure, cutoff: float, per_atom: int) -> None:
    edge_index, _ = neighbor_edges(structure, cutoff, 12)
    np.testing.assert_array_equal(np.bincount(edge_index[0]), [per_atom] * len(structure))


def test_one_atom_cell_bonds_to_its_own_images() -> None:
    got = assert_same_edges(ONE_ATOM, 8.0, 12)
    assert got and all(src == dst == 0 and image != (0, 0, 0) for src, dst, image in got)


def test_isolated_atoms_have_no_edges() -> None:
    structure = Structure(Lattice.cubic(10.0), ["Na"], [[0, 0, 0]])
    edge_index, edge_vec = neighbor_edges(structure, 5.0, 12)
    assert edge_index.shape == (2, 0) and edge_vec.shape == (0, 3)
    graph = structure_to_graph(structure, FeaturizerSettings(cutoff=5.0))
    assert graph.num_nodes == 1 and line_graph(graph.edge_index, 1).shape == (2, 0)


def test_real_structures_match_brute_force(shared_data: Path) -> None:
    from matminer.utils.io import load_dataframe_from_json

    frame = load_dataframe_from_json(shared_data / "dc.json.gz", pbar=False)
    sample = frame["structure"].iloc[[0, 100, 500, 1000]]
    for structure in sample:
        assert_same_edges(structure, 8.0, 12)


# ----------------------------------------------------------------------------- line graph


@pytest.mark.parametrize(
    "structure",
    [SKEWED, ONE_ATOM, BCC, *RANDOM[:3]],
    ids=["skewed", "one-atom", "bcc", "r0", "r1", "r2"],
)
def test_line_graph_matches_brute_force(structure: Structure) -> None:
    graph = structure_to_graph(structure, FeaturizerSettings())
    lg = line_graph(graph.edge_index, graph.num_nodes)
    pairs = list(zip(*lg.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)), "duplicate pairs"
    assert set(pairs) == brute_force_line_graph(graph.edge_index)
    src, dst = graph.edge_index
    in_degree = torch.bincount(dst, minlength=graph.num_nodes)
    out_degree = torch.bincount(src, minlength=graph.num_nodes)
    assert lg.shape[1] == int((in_degree * out_degree).sum())


@pytest.mark.parametrize("structure", [SKEWED, ONE_ATOM, *RANDOM[:3]])
def test_bond_cosines_match_numpy_angles(structure: Structure) -> None:
    graph = structure_to_graph(structure, FeaturizerSettings())
    lg = line_graph(graph.edge_index, graph.num_nodes)
    cos = bond_cosines(graph.edge_vec, lg).numpy()
    # Each pair: angle at b between b->a and b->c, from the brute-force float64 bond vectors.
    reference = brute_force_edges(structure, 8.0, 12)
    keys = list(edges_as_dict(structure, graph.edge_index.numpy(), graph.edge_vec.numpy()))
    expected = [cos_between(-reference[keys[a]], reference[keys[b]]) for a, b in lg.T.tolist()]
    np.testing.assert_allclose(cos, expected, atol=1e-5)
    # Multiset per atom: enumerate every (bond into b, bond out of b) pair independently.
    for atom in range(len(structure)):
        into = [v for (s, d, _), v in reference.items() if d == atom]
        out = [v for (s, d, _), v in reference.items() if s == atom]
        direct = sorted(cos_between(-u, w) for u in into for w in out)
        at_atom = graph.edge_index[1, lg[0]] == atom
        np.testing.assert_allclose(np.sort(cos[at_atom.numpy()]), direct, atol=1e-5)


def test_line_graph_unsorted_edges_and_sinks() -> None:
    # 0->1, 1->2, 2->0, 1->3, a self loop 4->4, node 3 has no out-edges, node 5 is isolated
    edges = torch.tensor([[1, 4, 2, 0, 1, 2, 4], [3, 4, 0, 1, 2, 3, 4]])
    lg = line_graph(edges, 6)
    assert set(zip(*lg.tolist(), strict=True)) == brute_force_line_graph(edges)
    assert lg.shape[1] == len(brute_force_line_graph(edges))
    assert bool((edges[1, lg[0]] == edges[0, lg[1]]).all())


@pytest.mark.parametrize("seed", range(5))
def test_line_graph_random_multigraphs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    edges = torch.from_numpy(rng.integers(0, 9, size=(2, 40)))  # repeats, loops, sinks
    lg = line_graph(edges, 12)
    pairs = list(zip(*lg.tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == brute_force_line_graph(edges)


def test_line_graph_accepts_int16_and_empty() -> None:
    edges = torch.tensor([[0, 1], [1, 0]], dtype=torch.int16)
    assert line_graph(edges, 2).tolist() == [[0, 1], [1, 0]]
    empty = line_graph(torch.zeros((2, 0), dtype=torch.long), 3)
    assert empty.shape == (2, 0) and empty.dtype == torch.long


def test_line_graph_on_batch_never_crosses_graphs() -> None:
    graphs = [structure_to_graph(s, FeaturizerSettings()) for s in [*RANDOM, ONE_ATOM, SKEWED]]
    batch = Batch.from_data_list(graphs)
    lg = line_graph(batch.edge_index, batch.num_nodes)
    graph_of_edge = batch.batch[batch.edge_index[0]]
    assert bool((graph_of_edge[lg[0]] == graph_of_edge[lg[1]]).all())
    # ...and is exactly the per-graph line graphs, shifted by each graph's first edge.
    offsets = np.cumsum([0] + [g.edge_index.shape[1] for g in graphs])
    per_graph = torch.cat(
        [
            line_graph(g.edge_index, g.num_nodes) + int(o)
            for g, o in zip(graphs, offsets, strict=False)
        ],
        dim=1,
    )
    assert torch.equal(lg, per_graph)


# ----------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def small_cache() -> tuple[list[Structure], GraphCache]:
    structures = [*make_structures(10, seed=5), ONE_ATOM]
    ids = [100 + 7 * n for n in range(len(structures))]
    targets = np.linspace(-1.0, 2.0, len(structures)).tolist()
    return structures, featurize(structures, ids, targets, FeaturizerSettings(), progress=False)


def test_featurize_equals_structure_to_graph(
    small_cache: tuple[list[Structure], GraphCache],
) -> None:
    structures, cache = small_cache
    assert len(cache) == len(structures)
    assert cache.z.dtype == torch.uint8 and cache.edge_index.dtype == torch.int16
    assert cache.edge_vec.dtype == torch.float32
    for position, structure in enumerate(structures):
        graph, reference = cache.graph(position), structure_to_graph(structure, cache.settings)
        assert torch.equal(graph.z, reference.z)
        assert torch.equal(graph.edge_index, reference.edge_index)
        assert torch.equal(graph.edge_vec, reference.edge_vec)
        assert graph.num_nodes == reference.num_nodes == len(structure)
        assert graph.y.item() == pytest.approx(float(cache.targets[position]))
    assert cache.position(107) == 1
    assert [int(g.num_nodes) for g in cache.graphs([107, 100])] == [
        len(structures[1]),
        len(structures[0]),
    ]
    with pytest.raises(KeyError, match="101"):
        cache.position(101)


def test_cache_round_trip(small_cache: tuple[list[Structure], GraphCache], tmp_path: Path) -> None:
    _, cache = small_cache
    path = tmp_path / "sub" / "graphs.pt"
    cache.save(path)
    assert not path.with_name("graphs.pt.tmp").exists()
    loaded = GraphCache.load(path, cache.settings)
    assert loaded.settings == cache.settings
    for key in ("ids", "targets", "z", "node_ptr", "edge_index", "edge_vec", "edge_ptr"):
        original, restored = getattr(cache, key), getattr(loaded, key)
        assert restored.dtype == original.dtype and torch.equal(restored, original), key
    assert loaded.ids.tolist() == [100 + 7 * n for n in range(len(cache))]
    assert loaded.targets.tolist() == pytest.approx(np.linspace(-1.0, 2.0, len(cache)))
    assert GraphCache.load(path).settings == cache.settings  # settings check is optional


def test_from_graphs_equals_featurize(small_cache: tuple[list[Structure], GraphCache]) -> None:
    structures, cache = small_cache
    graphs = [structure_to_graph(s, cache.settings) for s in structures]
    rebuilt = GraphCache.from_graphs(
        cache.ids.tolist(), cache.targets.tolist(), graphs, cache.settings
    )
    for key in ("ids", "targets", "z", "node_ptr", "edge_index", "edge_vec", "edge_ptr"):
        assert torch.equal(getattr(rebuilt, key), getattr(cache, key)), key


def _truncated(path: Path, tmp_path: Path) -> Path:
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda good, tmp: _truncated(good, tmp), id="truncated"),
        pytest.param(
            lambda good, tmp: (tmp / "text.pt").write_text("not a cache") and tmp / "text.pt",
            id="text",
        ),
        pytest.param(
            lambda good, tmp: torch.save({"weights": torch.ones(3)}, tmp / "w.pt") or tmp / "w.pt",
            id="foreign-dict",
        ),
        pytest.param(
            lambda good, tmp: torch.save([1, 2], tmp / "list.pt") or tmp / "list.pt",
            id="foreign-list",
        ),
        pytest.param(
            lambda good, tmp: (
                torch.save(
                    {**torch.load(good, weights_only=True), "edge_vec": None}, tmp / "part.pt"
                )
                or tmp / "part.pt"
            ),
            id="missing-tensor",
        ),
        pytest.param(
            lambda good, tmp: (
                torch.save(
                    {**torch.load(good, weights_only=True), "format_version": 99}, tmp / "v99.pt"
                )
                or tmp / "v99.pt"
            ),
            id="other-version",
        ),
        pytest.param(lambda good, tmp: tmp / "missing.pt", id="missing-file"),
    ],
)
def test_load_rejects_foreign_files(
    small_cache: tuple[list[Structure], GraphCache], tmp_path: Path, make_bad
) -> None:
    _, cache = small_cache
    good = tmp_path / "good.pt"
    cache.save(good)
    bad = make_bad(good, tmp_path)
    with pytest.raises(ValueError) as error:
        GraphCache.load(bad)
    assert str(bad) in str(error.value)


def test_load_rejects_other_settings(
    small_cache: tuple[list[Structure], GraphCache], tmp_path: Path
) -> None:
    _, cache = small_cache
    path = tmp_path / "graphs.pt"
    cache.save(path)
    with pytest.raises(ValueError, match="featurizer settings") as error:
        GraphCache.load(path, FeaturizerSettings(cutoff=6.0))
    assert str(path) in str(error.value)


def test_cache_key_changes_with_every_setting() -> None:
    base = FeaturizerSettings()
    changed = {
        "cutoff": 7.5,
        "max_neighbors": 16,
        "atom_features": "other",
        "edge_features": 64,
        "angle_features": 32,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(FeaturizerSettings)}
    keys = {base.cache_key()}
    for name, value in changed.items():
        keys.add(dataclasses.replace(base, **{name: value}).cache_key())
    assert len(keys) == 1 + len(changed)
    assert FeaturizerSettings().cache_key() == base.cache_key()
    assert FeaturizerSettings(cutoff=8).cache_key() == base.cache_key()  # int vs float in YAML


def test_settings_from_dict() -> None:
    assert FeaturizerSettings.from_dict(None) == FeaturizerSettings()
    assert FeaturizerSettings.from_dict({"cutoff": 6}).cutoff == 6.0
    with pytest.raises(ValueError, match="cuttoff"):
        FeaturizerSettings.from_dict({"cuttoff": 6.0, "cutoff": 6.0})
    with pytest.raises(ValueError, match="max_neighbors"):
        FeaturizerSettings(max_neighbors=0)
    with pytest.raises(ValueError, match="cutoff"):
        FeaturizerSettings(cutoff=-1.0)


def test_featurize_checks_lengths_and_handles_empty() -> None:
    with pytest.raises(ValueError, match="2 structures, 1 ids"):
        featurize(make_structures(2), [0], [0.0, 1.0], FeaturizerSettings(), progress=False)
    empty = featurize([], [], [], FeaturizerSettings(), progress=False)
    assert len(empty) == 0 and empty.edge_index.shape == (2, 0)


def test_real_cache_is_small(shared_data: Path, tmp_path: Path) -> None:
    from matminer.utils.io import load_dataframe_from_json

    frame = load_dataframe_from_json(shared_data / "dc.json.gz", pbar=False)
    cache = featurize(
        list(frame["structure"]), list(frame.index), list(frame["target"]), FeaturizerSettings()
    )
    path = tmp_path / "dc.pt"
    cache.save(path)
    assert len(cache) == len(frame) == 1056
    assert path.stat().st_size / len(cache) <= 3000
    for position in (0, 517, 1055):
        reference = structure_to_graph(frame["structure"].iloc[position], cache.settings)
        assert torch.equal(cache.graph(position).edge_index, reference.edge_index)
    counts = Counter(torch.diff(cache.edge_ptr).tolist())
    assert min(counts) > 0, "every real crystal has bonds"


# ----------------------------------------------------------------------------- atom features


def test_atom_feature_table() -> None:
    table = atom_feature_table()
    assert table.shape == (101, 92) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    assert bool((table[1:].abs().sum(dim=1) > 0).all())
    assert bool(((table == 0) | (table == 1)).all()), "CGCNN features are one-hot blocks"
    with pytest.raises(ValueError, match="unknown kind"):
        atom_feature_table("magpie")
