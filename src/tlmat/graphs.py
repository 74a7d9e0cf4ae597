"""Crystal structure -> graph featurization, the per-batch bond-angle line graph, and the cache.

Conventions (shared with :mod:`tlmat.models`):

* A graph stores atomic numbers ``z`` (the 92-dim CGCNN features are looked up in the model,
  so the cache stays small), directed edges ``edge_index`` (row 0 = source atom ``i``,
  row 1 = destination atom ``j``) and ``edge_vec`` = r_j + image . lattice - r_i, the
  Cartesian vector from ``i`` to the periodic image of ``j`` it is bonded to.
* Edges follow ALIGNN's k-nearest-neighbour rule: every atom keeps the neighbours within
  ``cutoff`` whose distance is at most its ``max_neighbors``-th smallest distance (ties
  kept), and the edge set is made symmetric (i->j with image n implies j->i with -n).
  Each graph's edges are stored sorted by (src, dst, image), so the order is reproducible.
* The line graph connects bond e1 = (a->b) to bond e2 = (b->c) (backtracking included, as
  DGL's ``line_graph`` does for ALIGNN); its feature is the cosine of the angle at ``b``
  between -edge_vec[e1] and edge_vec[e2].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure
from pymatgen.optimization.neighbors import find_points_in_spheres
from torch_geometric.data import Data
from tqdm.auto import tqdm

from tlmat.config import CACHE_FORMAT_VERSION, FeaturizerSettings
from tlmat.files import atomic_path

log = logging.getLogger(__name__)

# A point this close to its own centre is the centre itself (pymatgen's default tolerance).
_SELF_TOL = 1e-8
# Distances within this of the k-th smallest one count as ties: symmetric crystals have
# degenerate shells whose computed lengths differ only by rounding.
_TIE_TOL = 1e-6


def structure_arrays(structure: Structure) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The plain arrays the edge search needs: lattice matrix, Cartesian coords, Z, pbc.

    Read straight from the sites' fractional coordinates: ``Structure.cart_coords`` and
    ``Structure.atomic_numbers`` go through per-site properties that cost more than the
    whole neighbour search on a small cell.
    """
    sites = structure.sites
    matrix = np.ascontiguousarray(structure.lattice.matrix, dtype=np.float64)
    if sites:
        frac = np.array([site.frac_coords for site in sites], dtype=np.float64)
    else:
        frac = np.zeros((0, 3))
    cart = np.ascontiguousarray(frac @ matrix)
    z = np.fromiter((site.specie.Z for site in sites), dtype=np.int64, count=len(sites))
    pbc = np.ascontiguousarray(structure.lattice.pbc, dtype=np.int64)
    return matrix, cart, z, pbc


def knn_edges(
    cart: np.ndarray,
    matrix: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    max_neighbors: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric k-nearest-neighbour edges from plain arrays (see the module docstring).

    Returns ``src`` (E,) int64, ``dst`` (E,) int64 and ``image`` (E, 3) int64, sorted by
    (src, dst, image). Works on arrays so :func:`featurize` never builds per-structure
    objects; ``edge_vec`` is ``cart[dst] + image @ matrix - cart[src]``.
    """
    num_nodes = len(cart)
    if num_nodes == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    centers, neighbors, images, distances = find_points_in_spheres(
        cart, cart, r=float(cutoff), pbc=pbc, lattice=matrix, tol=_SELF_TOL
    )
    # Encode each image as one int64 "cell" number now, so that every later step filters and
    # sorts 1-D arrays (images are exact small integers stored as floats).
    span = int(np.abs(images).max()) if images.size else 0
    base = 2 * span + 1
    cells = base**3
    cell = (images @ np.array([base * base, base, 1.0])).astype(np.int64)
    cell += span * (base * base + base + 1)
    keep = (centers != neighbors) | (distances > _SELF_TOL)  # drop each atom itself
    counts = np.bincount(centers, minlength=num_nodes)
    most = int(counts.max()) if counts.size else 0
    if most > max_neighbors:
        # k-th smallest distance per centre: scatter each centre's distances into one padded
        # row and partition all rows at once (no per-centre loop, no full sort).
        if np.any(centers[1:] < centers[:-1]):
            order = np.argsort(centers, kind="stable")
            centers, neighbors, cell, distances, keep = (
                centers[order],
                neighbors[order],
                cell[order],
                distances[order],
                keep[order],
            )
        slot = np.arange(centers.size) - (np.cumsum(counts) - counts)[centers]
        table = np.full((num_nodes, most), np.inf)
        table[centers, slot] = np.where(keep, distances, np.inf)
        kth = np.partition(table, max_neighbors - 1, axis=1)[:, max_neighbors - 1]
        keep &= distances <= kth[centers] + _TIE_TOL
    centers, neighbors, cell = centers[keep], neighbors[keep], cell[keep]
    # Symmetrize and deduplicate on one int64 key per (src, dst, image): sorting 1-D keys is
    # several times faster than np.unique(axis=0) on rows and gives the same order.
    # The reverse edge j->i has image -n, i.e. cell number cells - 1 - cell.
    keys = np.concatenate(
        (
            (centers * num_nodes + neighbors) * cells + cell,
            (neighbors * num_nodes + centers) * cells + (cells - 1 - cell),
        )
    )
    keys.sort()
    if keys.size > 1:
        fresh = np.empty(keys.size, bool)
        fresh[0] = True
        np.not_equal(keys[1:], keys[:-1], out=fresh[1:])
        keys = keys[fresh]
    pair, cell = np.divmod(keys, cells)
    src, dst = np.divmod(pair, num_nodes)
    image = cell[:, None] // np.array([base * base, base, 1]) % base - span
    return src, dst, image


def edge_vectors(
    cart: np.ndarray, matrix: np.ndarray, src: np.ndarray, dst: np.ndarray, image: np.ndarray
) -> np.ndarray:
    """``edge_vec`` = r_j + image . lattice - r_i as float32 (computed in float64)."""
    return (cart[dst] + image @ matrix - cart[src]).astype(np.float32)


def neighbor_edges(
    structure: Structure, cutoff: float, max_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric k-nearest-neighbour edges of one periodic structure.

    Returns ``edge_index`` (2, E) int64 and ``edge_vec`` (E, 3) float32, edges sorted by
    (src, dst, image).
    """
    matrix, cart, _, pbc = structure_arrays(structure)
    src, dst, image = knn_edges(cart, matrix, pbc, cutoff, max_neighbors)
    return np.stack((src, dst)), edge_vectors(cart, matrix, src, dst, image)


def structure_to_graph(structure: Structure, settings: FeaturizerSettings) -> Data:
    """One structure as a PyG ``Data`` with ``z``, ``edge_index`` and ``edge_vec``.

    Same arrays as :func:`featurize` stores (it is the reference the cache is tested against).
    """
    matrix, cart, z, pbc = structure_arrays(structure)
    src, dst, image = knn_edges(cart, matrix, pbc, settings.cutoff, settings.max_neighbors)
    return Data(
        z=torch.from_numpy(z),
        edge_index=torch.from_numpy(np.stack((src, dst))),
        edge_vec=torch.from_numpy(edge_vectors(cart, matrix, src, dst, image)),
        num_nodes=len(z),
    )


def line_graph(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Bond pairs (e1, e2) with dst(e1) == src(e2), vectorised; shape (2, T) int64.

    Runs on every training batch, so it uses no Python loop and one host sync. Pairs come
    grouped by e1 (ascending), and within a group e2 ascending; ``edge_index`` need not be
    sorted. Edges are numbered by position, so on a concatenated batch no pair crosses graphs.
    """
    edge_index = edge_index.long()
    src, dst = edge_index[0], edge_index[1]
    device = src.device
    out_degree = torch.bincount(src, minlength=num_nodes)
    # Slot of each node's first out-edge once edges are (stably) sorted by source.
    out_start = torch.cumsum(out_degree, 0) - out_degree
    # e1 = (a->b) pairs with every out-edge of b; its pairs occupy one contiguous run.
    pairs_per_edge = out_degree.index_select(0, dst)
    first_pair = torch.cumsum(pairs_per_edge, 0) - pairs_per_edge
    shift = out_start.index_select(0, dst) - first_pair
    is_sorted = (src[1:] >= src[:-1]).all()
    total, is_sorted = torch.stack((pairs_per_edge.sum(), is_sorted.long())).tolist()
    e1 = torch.repeat_interleave(pairs_per_edge, output_size=total)
    slot = shift.index_select(0, e1).add_(torch.arange(total, device=device))
    # Cached graphs are stored sorted by source, so slots usually are edge ids already.
    e2 = slot if is_sorted else torch.argsort(src, stable=True).index_select(0, slot)
    return torch.stack((e1, e2))


def bond_cosines(edge_vec: torch.Tensor, lg_edge_index: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle at the shared atom between -edge_vec[e1] and edge_vec[e2].

    Clamped to [-1, 1] because rounding can step just outside, which would NaN an arccos.
    """
    r1 = -edge_vec[lg_edge_index[0]]
    r2 = edge_vec[lg_edge_index[1]]
    cos = (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1)).clamp_min(1e-12)
    return cos.clamp(-1.0, 1.0)


def _index_dtype(max_nodes: int) -> torch.dtype:
    """Smallest integer type for graph-local atom indices: int16 keeps the cache small."""
    return torch.int16 if max_nodes <= torch.iinfo(torch.int16).max + 1 else torch.int32


class IdIndexed:
    """Rows of a per-structure cache (``ids``, ``targets``, one graph per row) addressed by
    data-set id: shared by :class:`GraphCache` and CHGNet's graph cache."""

    #: what the cache is called in errors
    kind = "graph cache"

    def _index(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.targets = ids, targets
        self._position = {int(i): n for n, i in enumerate(ids.tolist())}
        if len(self._position) != len(ids):
            raise ValueError(f"{self.kind}: ids are not unique")

    def __len__(self) -> int:
        return self.ids.numel()

    def position(self, ident: int) -> int:
        """Row of structure ``ident`` (ids are data-set ids, not positions)."""
        try:
            return self._position[int(ident)]
        except KeyError as err:
            raise KeyError(f"id {ident} is not in the {self.kind}") from err

    def graph(self, position: int) -> Data:
        raise NotImplementedError

    def graphs(self, ids: Sequence[int]) -> list[Data]:
        return [self.graph(self.position(i)) for i in ids]


class GraphCache(IdIndexed):
    """All graphs of one data set in flat tensors (as PyG's InMemoryDataset collates them).

    ``ids`` and ``targets`` travel with the graphs so a training run needs only this file.
    ``edge_index`` holds graph-local atom indices (int16 where they fit), so graph ``p`` is
    the slices ``node_ptr[p]:node_ptr[p+1]`` and ``edge_ptr[p]:edge_ptr[p+1]``.
    """

    _KEYS = ("ids", "targets", "z", "node_ptr", "edge_index", "edge_vec", "edge_ptr")

    def __init__(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        z: torch.Tensor,
        node_ptr: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vec: torch.Tensor,
        edge_ptr: torch.Tensor,
        settings: FeaturizerSettings,
    ) -> None:
        self._index(ids, targets)
        self.z, self.node_ptr = z, node_ptr
        self.edge_index, self.edge_vec, self.edge_ptr = edge_index, edge_vec, edge_ptr
        self.settings = settings

    def graph(self, position: int) -> Data:
        """Graph at row ``position`` with int64 indices and its target as ``y``."""
        n0, n1 = int(self.node_ptr[position]), int(self.node_ptr[position + 1])
        e0, e1 = int(self.edge_ptr[position]), int(self.edge_ptr[position + 1])
        return Data(
            z=self.z[n0:n1].long(),
            edge_index=self.edge_index[:, e0:e1].long(),
            edge_vec=self.edge_vec[e0:e1],
            y=self.targets[position].view(1).float(),
            num_nodes=n1 - n0,
        )

    @classmethod
    def from_arrays(
        cls,
        ids: Sequence[int],
        targets: Sequence[float],
        z: np.ndarray,
        node_counts: np.ndarray,
        edge_index: np.ndarray,
        edge_vec: np.ndarray,
        edge_counts: np.ndarray,
        settings: FeaturizerSettings,
    ) -> GraphCache:
        """Cache from already concatenated arrays (graph-local ``edge_index``, shape (2, E))."""
        if not len(ids) == len(targets) == len(node_counts) == len(edge_counts):
            raise ValueError(
                f"graph cache: {len(ids)} ids, {len(targets)} targets, "
                f"{len(node_counts)} graphs: they must match"
            )
        node_ptr = np.zeros(len(node_counts) + 1, np.int64)
        np.cumsum(node_counts, out=node_ptr[1:])
        edge_ptr = np.zeros(len(edge_counts) + 1, np.int64)
        np.cumsum(edge_counts, out=edge_ptr[1:])
        max_nodes = int(np.max(node_counts, initial=0))
        return cls(
            ids=torch.as_tensor(np.asarray(ids, dtype=np.int64)),
            targets=torch.as_tensor(np.asarray(targets, dtype=np.float64)),
            z=torch.from_numpy(np.ascontiguousarray(z, dtype=np.uint8)),
            node_ptr=torch.from_numpy(node_ptr),
            edge_index=torch.from_numpy(np.ascontiguousarray(edge_index)).to(
                _index_dtype(max_nodes)
            ),
            edge_vec=torch.from_numpy(np.ascontiguousarray(edge_vec, dtype=np.float32)),
            edge_ptr=torch.from_numpy(edge_ptr),
            settings=settings,
        )

    @classmethod
    def from_graphs(
        cls,
        ids: Sequence[int],
        targets: Sequence[float],
        graphs: Sequence[Data],
        settings: FeaturizerSettings,
    ) -> GraphCache:
        """Cache from per-structure ``Data`` objects (graph-local edge indices)."""
        return cls.from_arrays(
            ids,
            targets,
            z=np.concatenate([g.z.numpy() for g in graphs]) if graphs else np.zeros(0),
            node_counts=np.array([g.num_nodes for g in graphs], np.int64),
            edge_index=(
                np.concatenate([g.edge_index.numpy() for g in graphs], axis=1)
                if graphs
                else np.zeros((2, 0), np.int64)
            ),
            edge_vec=(
                np.concatenate([g.edge_vec.numpy() for g in graphs])
                if graphs
                else np.zeros((0, 3), np.float32)
            ),
            edge_counts=np.array([g.edge_index.shape[1] for g in graphs], np.int64),
            settings=settings,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a killed job never leaves a cache that looks complete."""
        payload = {
            "format_version": CACHE_FORMAT_VERSION,
            "settings": dataclasses.asdict(self.settings),
            **{key: getattr(self, key) for key in self._KEYS},
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(
        cls, path: str | os.PathLike, settings: FeaturizerSettings | None = None
    ) -> GraphCache:
        """Read a cache written by :meth:`save`; every way it can be wrong is a ValueError
        naming the file, so a stale or foreign cache is reported, never half-used.

        ``settings``, when given, must equal the settings the cache was built with.
        """
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise ValueError(f"{path}: not a readable tlmat graph cache ({err})") from err
        if not isinstance(payload, dict) or payload.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"{path}: not a tlmat graph cache of format {CACHE_FORMAT_VERSION}")
        missing = [k for k in cls._KEYS if not isinstance(payload.get(k), torch.Tensor)]
        if missing or not isinstance(payload.get("settings"), dict):
            raise ValueError(f"{path}: tlmat graph cache lacks {missing or ['settings']}")
        try:
            stored = FeaturizerSettings.from_dict(payload["settings"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: graph cache has invalid settings ({err})") from err
        if settings is not None and stored != settings:
            raise ValueError(
                f"{path}: built with featurizer settings {stored}, but the run asks for {settings}"
            )
        return cls(**{k: payload[k] for k in cls._KEYS}, settings=stored)


def _featurize_arrays(
    structures: Sequence[Structure], cutoff: float, max_neighbors: int, progress: bool = False
) -> tuple[np.ndarray, ...]:
    """Flat arrays (z, node_counts, edge_index, edge_vec, edge_counts) for ``structures``.

    Collects per-structure numpy arrays and concatenates once at the end: building a PyG
    ``Data`` per structure cost more than its neighbour search.
    """
    n = len(structures)
    z_parts: list[np.ndarray] = []
    src_parts: list[np.ndarray] = []
    dst_parts: list[np.ndarray] = []
    vec_parts: list[np.ndarray] = []
    node_counts = np.zeros(n, np.int64)
    edge_counts = np.zeros(n, np.int64)
    bar = tqdm(structures, desc="featurize", unit="struct", disable=not progress)
    for position, structure in enumerate(bar):
        matrix, cart, z, pbc = structure_arrays(structure)
        src, dst, image = knn_edges(cart, matrix, pbc, cutoff, max_neighbors)
        z_parts.append(z)
        src_parts.append(src)
        dst_parts.append(dst)
        vec_parts.append(edge_vectors(cart, matrix, src, dst, image))
        node_counts[position] = len(z)
        edge_counts[position] = len(src)
    if n == 0:
        return (
            np.zeros(0, np.int64),
            node_counts,
            np.zeros((2, 0), np.int64),
            np.zeros((0, 3), np.float32),
            edge_counts,
        )
    edge_index = np.stack((np.concatenate(src_parts), np.concatenate(dst_parts)))
    return (
        np.concatenate(z_parts),
        node_counts,
        edge_index,
        np.concatenate(vec_parts),
        edge_counts,
    )


def featurize(
    structures: Sequence[Structure],
    ids: Sequence[int],
    targets: Sequence[float],
    settings: FeaturizerSettings,
    progress: bool | None = None,
) -> GraphCache:
    """Build the graph of every structure once; progress bar unless running non-interactively.

    The graphs are exactly :func:`structure_to_graph`'s, in input order.
    """
    if not len(structures) == len(ids) == len(targets):
        raise ValueError(
            f"featurize: {len(structures)} structures, {len(ids)} ids, {len(targets)} targets"
        )
    arrays = _featurize_arrays(
        structures, settings.cutoff, settings.max_neighbors, progress=not not_interactive(progress)
    )
    z, node_counts, edge_index, edge_vec, edge_counts = arrays
    return GraphCache.from_arrays(
        ids, targets, z, node_counts, edge_index, edge_vec, edge_counts, settings
    )


def not_interactive(progress: bool | None) -> bool:
    """Progress bars are off under CI or when stderr is not a terminal, unless forced."""
    if progress is not None:
        return not progress
    import sys

    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def atom_feature_table(kind: str = "cgcnn") -> torch.Tensor:
    """Per-element input features indexed by atomic number (row 0 unused, zeros).

    ``cgcnn`` is the 92-dim table of Xie & Grossman that ALIGNN uses, read from the copy
    that ships with jarvis-tools so our features are the paper's, bit for bit.
    """
    if kind != "cgcnn":
        raise ValueError(f"featurizer.atom_features: unknown kind {kind!r}; known: ['cgcnn']")
    import jarvis.core

    table_path = Path(jarvis.core.__file__).parent / "atom_init.json"
    table = json.loads(table_path.read_text())
    max_z = max(int(k) for k in table)
    features = torch.zeros(max_z + 1, len(next(iter(table.values()))))
    for z, values in table.items():
        features[int(z)] = torch.tensor(values, dtype=torch.float32)
    return features
