"""Crystal structure -> graph featurization, the per-batch bond-angle line graph, and the cache.

Conventions (shared with :mod:`tlmat.models`):

* A graph stores atomic numbers ``z`` (the 92-dim CGCNN features are looked up in the model,
  so the cache stays small), directed edges ``edge_index`` (row 0 = source atom ``i``,
  row 1 = destination atom ``j``) and ``edge_vec`` = r_j + image . lattice - r_i, the
  Cartesian vector from ``i`` to the periodic image of ``j`` it is bonded to.
* Edges follow ALIGNN's k-nearest-neighbour rule: every atom keeps the neighbours within
  ``cutoff`` whose distance is at most its ``max_neighbors``-th smallest distance (ties
  kept), and the edge set is made symmetric (i->j with image n implies j->i with -n).
* The line graph connects bond e1 = (a->b) to bond e2 = (b->c) (backtracking included, as
  DGL's ``line_graph`` does for ALIGNN); its feature is the cosine of the angle at ``b``
  between -edge_vec[e1] and edge_vec[e2].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure
from torch_geometric.data import Data
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FeaturizerSettings:
    """Everything that changes the cached graphs; its hash names the cache directory."""

    cutoff: float = 8.0
    max_neighbors: int = 12
    atom_features: str = "cgcnn"
    edge_features: int = 80
    angle_features: int = 40

    def cache_key(self) -> str:
        payload = json.dumps(
            {**dataclasses.asdict(self), "format": CACHE_FORMAT_VERSION}, sort_keys=True
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, values: dict | None) -> FeaturizerSettings:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"featurizer: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def neighbor_edges(
    structure: Structure, cutoff: float, max_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric k-nearest-neighbour edges of one periodic structure.

    Returns ``edge_index`` (2, E) int64 and ``edge_vec`` (E, 3) float32.
    """
    centers, neighbors, images, distances = structure.get_neighbor_list(cutoff)
    if len(centers) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.float32)
    # rank neighbours of each centre by distance, keep those within the k-th distance (ties)
    order = np.lexsort((distances, centers))
    centers, neighbors, images, distances = (
        centers[order],
        neighbors[order],
        images[order],
        distances[order],
    )
    counts = np.bincount(centers, minlength=len(structure))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    kth = starts + np.minimum(counts, max_neighbors) - 1
    threshold = np.full(len(structure), -np.inf)
    has = counts > 0
    threshold[has] = distances[kth[has]]
    keep = distances <= threshold[centers] + 1e-6
    src, dst, img = centers[keep], neighbors[keep], images[keep].astype(np.int64)
    # symmetrize and deduplicate on (src, dst, image)
    src, dst, img = (
        np.concatenate((src, dst)),
        np.concatenate((dst, src)),
        np.concatenate((img, -img)),
    )
    keys = np.stack((src, dst, img[:, 0], img[:, 1], img[:, 2]), axis=1)
    keys = np.unique(keys, axis=0)
    src, dst, img = keys[:, 0], keys[:, 1], keys[:, 2:]
    cart = structure.cart_coords
    vec = cart[dst] + img @ structure.lattice.matrix - cart[src]
    return np.stack((src, dst)), vec.astype(np.float32)


def structure_to_graph(structure: Structure, settings: FeaturizerSettings) -> Data:
    """One structure as a PyG ``Data`` with ``z``, ``edge_index`` and ``edge_vec``."""
    edge_index, edge_vec = neighbor_edges(structure, settings.cutoff, settings.max_neighbors)
    return Data(
        z=torch.as_tensor(structure.atomic_numbers, dtype=torch.long),
        edge_index=torch.from_numpy(edge_index),
        edge_vec=torch.from_numpy(edge_vec),
        num_nodes=len(structure),
    )


def line_graph(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Bond pairs (e1, e2) with dst(e1) == src(e2), vectorised; shape (2, T)."""
    src, dst = edge_index
    num_edges = src.numel()
    order = torch.argsort(src, stable=True)
    out_degree = torch.bincount(src, minlength=num_nodes)
    out_start = torch.cumsum(out_degree, 0) - out_degree
    pairs_per_edge = out_degree[dst]
    e1 = torch.repeat_interleave(torch.arange(num_edges, device=src.device), pairs_per_edge)
    first = torch.cumsum(pairs_per_edge, 0) - pairs_per_edge
    rank = torch.arange(e1.numel(), device=src.device) - first[e1]
    e2 = order[out_start[dst[e1]] + rank]
    return torch.stack((e1, e2))


def bond_cosines(edge_vec: torch.Tensor, lg_edge_index: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle at the shared atom between -edge_vec[e1] and edge_vec[e2]."""
    r1 = -edge_vec[lg_edge_index[0]]
    r2 = edge_vec[lg_edge_index[1]]
    cos = (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1)).clamp_min(1e-12)
    return cos.clamp(-1.0, 1.0)


class GraphCache:
    """All graphs of one data set in flat tensors (as PyG's InMemoryDataset collates them).

    ``ids`` and ``targets`` travel with the graphs so a training run needs only this file.
    """

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
        self.ids, self.targets = ids, targets
        self.z, self.node_ptr = z, node_ptr
        self.edge_index, self.edge_vec, self.edge_ptr = edge_index, edge_vec, edge_ptr
        self.settings = settings
        self._position = {int(i): n for n, i in enumerate(ids.tolist())}

    def __len__(self) -> int:
        return self.ids.numel()

    def position(self, ident: int) -> int:
        try:
            return self._position[int(ident)]
        except KeyError as err:
            raise KeyError(f"id {ident} is not in the graph cache") from err

    def graph(self, position: int) -> Data:
        n0, n1 = int(self.node_ptr[position]), int(self.node_ptr[position + 1])
        e0, e1 = int(self.edge_ptr[position]), int(self.edge_ptr[position + 1])
        return Data(
            z=self.z[n0:n1].long(),
            edge_index=self.edge_index[:, e0:e1].long(),
            edge_vec=self.edge_vec[e0:e1],
            y=self.targets[position].view(1).float(),
            num_nodes=n1 - n0,
        )

    def graphs(self, ids: Sequence[int]) -> list[Data]:
        return [self.graph(self.position(i)) for i in ids]

    @classmethod
    def from_graphs(
        cls,
        ids: Sequence[int],
        targets: Sequence[float],
        graphs: Sequence[Data],
        settings: FeaturizerSettings,
    ) -> GraphCache:
        node_counts = torch.tensor([g.num_nodes for g in graphs], dtype=torch.long)
        edge_counts = torch.tensor([g.edge_index.shape[1] for g in graphs], dtype=torch.long)
        zero = torch.zeros(1, dtype=torch.long)
        return cls(
            ids=torch.as_tensor(list(ids), dtype=torch.long),
            targets=torch.as_tensor(list(targets), dtype=torch.float64),
            z=torch.cat([g.z for g in graphs]).to(torch.uint8),
            node_ptr=torch.cat((zero, node_counts.cumsum(0))),
            edge_index=torch.cat([g.edge_index for g in graphs], dim=1).to(torch.int16),
            edge_vec=torch.cat([g.edge_vec for g in graphs]),
            edge_ptr=torch.cat((zero, edge_counts.cumsum(0))),
            settings=settings,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a killed job never leaves a cache that looks complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        payload = {
            "format_version": CACHE_FORMAT_VERSION,
            "settings": dataclasses.asdict(self.settings),
            "ids": self.ids,
            "targets": self.targets,
            "z": self.z,
            "node_ptr": self.node_ptr,
            "edge_index": self.edge_index,
            "edge_vec": self.edge_vec,
            "edge_ptr": self.edge_ptr,
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: FeaturizerSettings | None = None) -> GraphCache:
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise ValueError(f"{path}: not a readable tlmat graph cache ({err})") from err
        if not isinstance(payload, dict) or payload.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"{path}: not a tlmat graph cache of format {CACHE_FORMAT_VERSION}")
        stored = FeaturizerSettings(**payload["settings"])
        if settings is not None and stored != settings:
            raise ValueError(
                f"{path}: built with featurizer settings {stored}, but the run asks for {settings}"
            )
        keys = ("ids", "targets", "z", "node_ptr", "edge_index", "edge_vec", "edge_ptr")
        return cls(**{k: payload[k] for k in keys}, settings=stored)


def featurize(
    structures: Sequence[Structure],
    ids: Sequence[int],
    targets: Sequence[float],
    settings: FeaturizerSettings,
    progress: bool | None = None,
) -> GraphCache:
    """Build the graph of every structure once; progress bar unless running non-interactively."""
    graphs = [
        structure_to_graph(s, settings)
        for s in tqdm(structures, desc="featurize", unit="struct", disable=not_interactive(progress))
    ]
    return GraphCache.from_graphs(ids, targets, graphs, settings)


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
