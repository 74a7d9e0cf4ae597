"""CHGNet's crystal graphs, built once by CHGNet's own converter and cached like ours.

CHGNet does not read tlmat's k-nearest-neighbour graphs: it has its own atom graph (every
neighbour within ``atom_graph_cutoff``) and bond graph (pairs of bonds shorter than
``bond_graph_cutoff`` that share an atom, i.e. its angles), made by
``chgnet.graph.CrystalGraphConverter``. This module runs that converter once per structure
and keeps the resulting ``CrystalGraph`` tensors in one file, as :class:`tlmat.graphs.GraphCache`
does for ours:

* :class:`CHGNetGraphSettings` is everything that changes the graphs (the two cut-offs); its
  :meth:`~CHGNetGraphSettings.cache_key` names the cache file (:func:`cache_path`), so a
  setting change misses the old cache and rebuilds it, and :meth:`CHGNetGraphCache.load`
  refuses a file built with other settings.
* :class:`CHGNetGraphCache` has the interface of ``GraphCache`` that the runs use (``ids``,
  ``targets``, ``position``, ``graph``, ``graphs``, ``save``, ``load``). Its ``graph`` is a
  PyG ``Data`` with ``y``, ``num_nodes`` and the ``CrystalGraph`` itself as ``crystal_graph``:
  PyG's ``DataLoader`` collates that attribute into a list, so the one trainer
  (``tlmat.train``) batches CHGNet graphs unchanged, and the CHGNet backbone assembles the
  list with CHGNet's own ``BatchedGraph.from_graphs`` (``tlmat.models.chgnet``).

The file holds plain tensors, numbers and strings (one concatenated tensor per
``CrystalGraph`` field plus offsets) and is read with ``weights_only=True``. Cached
coordinates and lattices do not require gradients (the converter's do, for CHGNet's
force/stress; a property head needs neither).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure
from torch_geometric.data import Data
from tqdm.auto import tqdm

from tlmat.config import CHGNET_CACHE_FORMAT, CHGNET_CUTOFFS, chgnet_cache_key, chgnet_cutoffs
from tlmat.files import atomic_path
from tlmat.graphs import IdIndexed, not_interactive

log = logging.getLogger(__name__)

#: CrystalGraph tensor fields with a per-graph first dimension, and their trailing shapes
_FIELDS: dict[str, tuple[int, ...]] = {
    "atomic_number": (),
    "atom_frac_coord": (3,),
    "atom_graph": (2,),
    "neighbor_image": (3,),
    "directed2undirected": (),
    "undirected2directed": (),
    "bond_graph": (5,),
    "lattice": (3,),
}
_FLOAT_FIELDS = ("atom_frac_coord", "neighbor_image", "lattice")


@dataclasses.dataclass(frozen=True)
class CHGNetGraphSettings:
    """The converter settings: everything that changes CHGNet's cached graphs.

    The defaults are those of the pre-trained CHGNet 0.3.0 (6 Å atom graph, 3 Å bond graph;
    ``tlmat.config.CHGNET_CUTOFFS``, shared with ``ModelConfig``); they must equal the model's
    ``chgnet_atom_graph_cutoff`` / ``chgnet_bond_graph_cutoff`` (the backbone refuses graphs
    built otherwise).
    """

    atom_graph_cutoff: float = CHGNET_CUTOFFS["chgnet_atom_graph_cutoff"]
    bond_graph_cutoff: float = CHGNET_CUTOFFS["chgnet_bond_graph_cutoff"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "atom_graph_cutoff", float(self.atom_graph_cutoff))
        object.__setattr__(self, "bond_graph_cutoff", float(self.bond_graph_cutoff))
        if not self.atom_graph_cutoff > 0:
            raise ValueError(f"chgnet atom_graph_cutoff must be > 0, got {self.atom_graph_cutoff}")
        if not 0 < self.bond_graph_cutoff <= self.atom_graph_cutoff:
            raise ValueError(
                f"chgnet bond_graph_cutoff must be in (0, atom_graph_cutoff="
                f"{self.atom_graph_cutoff}], got {self.bond_graph_cutoff}"
            )

    @classmethod
    def from_section(cls, model: Mapping | None) -> CHGNetGraphSettings:
        """The settings of a config's ``model`` section (unset cut-offs: the defaults)."""
        return cls(*chgnet_cutoffs(model))

    @classmethod
    def from_model_config(cls, config) -> CHGNetGraphSettings:
        """The graph settings a ``ModelConfig`` of ``arch: chgnet`` needs."""
        return cls(config.chgnet_atom_graph_cutoff, config.chgnet_bond_graph_cutoff)

    def cache_key(self) -> str:
        """Short hash of the settings plus the cache format: any change misses the cache
        (computed torch-free in :func:`tlmat.config.chgnet_cache_key`, which the plan uses)."""
        return chgnet_cache_key(self.atom_graph_cutoff, self.bond_graph_cutoff)


def cache_path(directory: str | os.PathLike, settings: CHGNetGraphSettings) -> Path:
    """``<directory>/chgnet-<key>.pt``: one file per setting, so a change rebuilds."""
    return Path(directory) / f"chgnet-{settings.cache_key()}.pt"


def _converter(settings: CHGNetGraphSettings):
    from chgnet.graph import CrystalGraphConverter

    return CrystalGraphConverter(
        atom_graph_cutoff=settings.atom_graph_cutoff,
        bond_graph_cutoff=settings.bond_graph_cutoff,
        algorithm="fast",
        on_isolated_atoms="ignore",  # counted and logged by featurize_chgnet
    )


class CHGNetGraphCache(IdIndexed):
    """CHGNet ``CrystalGraph``s of one data set in flat tensors, with ids and targets.

    ``tensors[field]`` is the concatenation over graphs of that ``CrystalGraph`` field and
    ``ptr[field]`` its offsets (graph ``p`` is rows ``ptr[p]:ptr[p+1]``); lattices are
    stored as 3 rows per graph.
    """

    kind = "chgnet graph cache"

    def __init__(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        ptr: dict[str, torch.Tensor],
        settings: CHGNetGraphSettings,
    ) -> None:
        self._index(ids, targets)
        self.tensors, self.ptr, self.settings = tensors, ptr, settings

    def crystal_graph(self, position: int):
        """The ``CrystalGraph`` at row ``position`` (views into the cache, no copy)."""
        from chgnet.graph import CrystalGraph

        parts = {}
        for field in _FIELDS:
            start, stop = int(self.ptr[field][position]), int(self.ptr[field][position + 1])
            parts[field] = self.tensors[field][start:stop]
        return CrystalGraph(
            **parts,
            atom_graph_cutoff=self.settings.atom_graph_cutoff,
            bond_graph_cutoff=self.settings.bond_graph_cutoff,
            graph_id=str(int(self.ids[position])),
        )

    def graph(self, position: int) -> Data:
        """A PyG ``Data`` carrying the ``CrystalGraph`` (``crystal_graph``) and its target
        as ``y``, so ``tlmat.train`` batches it like one of our graphs."""
        crystal_graph = self.crystal_graph(position)
        return Data(
            y=self.targets[position].view(1).float(),
            num_nodes=int(crystal_graph.atomic_number.numel()),
            crystal_graph=crystal_graph,
        )

    @classmethod
    def from_crystal_graphs(
        cls,
        ids: Sequence[int],
        targets: Sequence[float],
        crystal_graphs: Sequence,
        settings: CHGNetGraphSettings,
    ) -> CHGNetGraphCache:
        if not len(ids) == len(targets) == len(crystal_graphs):
            raise ValueError(
                f"chgnet graph cache: {len(ids)} ids, {len(targets)} targets, "
                f"{len(crystal_graphs)} graphs: they must match"
            )
        tensors, ptr = {}, {}
        for field, tail in _FIELDS.items():
            parts = [getattr(g, field).detach().reshape(-1, *tail) for g in crystal_graphs]
            dtype = torch.float32 if field in _FLOAT_FIELDS else torch.int32
            tensors[field] = (
                torch.cat(parts).to(dtype).contiguous()
                if parts
                else torch.zeros(0, *tail, dtype=dtype)
            )
            counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
            ptr[field] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return cls(
            ids=torch.as_tensor(np.asarray(ids, dtype=np.int64)),
            targets=torch.as_tensor(np.asarray(targets, dtype=np.float64)),
            tensors=tensors,
            ptr=ptr,
            settings=settings,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a killed job never leaves a cache that looks complete."""
        payload = {
            "format_version": CHGNET_CACHE_FORMAT,
            "kind": "chgnet",
            "settings": dataclasses.asdict(self.settings),
            "ids": self.ids,
            "targets": self.targets,
            "tensors": self.tensors,
            "ptr": self.ptr,
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(
        cls, path: str | os.PathLike, settings: CHGNetGraphSettings | None = None
    ) -> CHGNetGraphCache:
        """Read a cache written by :meth:`save` (``weights_only=True``); a foreign, stale or
        differently built file is a one-line ValueError naming it, never half-used."""
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            raise ValueError(f"{path}: not a readable tlmat chgnet graph cache ({err})") from err
        if (
            not isinstance(payload, dict)
            or payload.get("kind") != "chgnet"
            or payload.get("format_version") != CHGNET_CACHE_FORMAT
        ):
            raise ValueError(
                f"{path}: not a tlmat chgnet graph cache of format {CHGNET_CACHE_FORMAT}"
            )
        try:
            stored = CHGNetGraphSettings(**payload["settings"])
            tensors, ptr = payload["tensors"], payload["ptr"]
            missing = [f for f in _FIELDS if f not in tensors or f not in ptr]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: chgnet graph cache is incomplete ({err})") from err
        if missing:
            raise ValueError(f"{path}: chgnet graph cache lacks {missing}")
        if settings is not None and stored != settings:
            raise ValueError(
                f"{path}: built with chgnet graph settings {stored}, "
                f"but the run asks for {settings}"
            )
        return cls(payload["ids"], payload["targets"], tensors, ptr, stored)


def featurize_chgnet(
    structures: Sequence[Structure],
    ids: Sequence[int],
    targets: Sequence[float],
    settings: CHGNetGraphSettings,
    progress: bool | None = None,
) -> CHGNetGraphCache:
    """Convert every structure once with CHGNet's ``CrystalGraphConverter``.

    An atom with no neighbour within ``atom_graph_cutoff`` (CHGNet warns: such a crystal is
    far from what it was trained on; e.g. slabs with wide vacuum among Materials Project
    entries) keeps its graph, only without bonds for that atom, so every data set and test set
    stays whole and runs of other models pair with CHGNet's; the structures are counted and
    logged. A structure without a single bond is an error naming its id.
    """
    if not len(structures) == len(ids) == len(targets):
        raise ValueError(
            f"featurize_chgnet: {len(structures)} structures, {len(ids)} ids, "
            f"{len(targets)} targets"
        )
    converter = _converter(settings)
    graphs = []
    bar = tqdm(
        zip(structures, ids, strict=True),
        total=len(structures),
        desc="chgnet graphs",
        unit="struct",
        disable=not_interactive(progress),
    )
    isolated = []
    for structure, ident in bar:
        try:
            graph = converter(structure, graph_id=str(ident))
        except ValueError as err:
            raise ValueError(f"structure {ident}: {str(err).splitlines()[0]}") from err
        n_bonded = len(torch.unique(graph.atom_graph[:, 0])) if len(graph.atom_graph) else 0
        if n_bonded == 0:
            raise ValueError(
                f"structure {ident}: no two atoms within atom_graph_cutoff="
                f"{settings.atom_graph_cutoff} Å, CHGNet has no graph for it"
            )
        if n_bonded < len(structure):
            isolated.append(str(ident))
        graphs.append(graph)
    if isolated:
        log.warning(
            "%d structure(s) with atoms that have no neighbour within %g Å (kept; CHGNet "
            "sees those atoms without bonds): %s%s",
            len(isolated),
            settings.atom_graph_cutoff,
            ", ".join(isolated[:5]),
            " …" if len(isolated) > 5 else "",
        )
    return CHGNetGraphCache.from_crystal_graphs(ids, targets, graphs, settings)


def cached_chgnet_graphs(
    directory: str | os.PathLike,
    structures: Sequence[Structure],
    ids: Sequence[int],
    targets: Sequence[float],
    settings: CHGNetGraphSettings,
    progress: bool | None = None,
) -> CHGNetGraphCache:
    """The cache of ``settings`` in ``directory``: read when it exists, else built and saved.

    The file name carries the settings' key, so other cut-offs never reuse it; a file whose
    ids or targets differ (another data set, subset or label) is rebuilt too.
    """
    path = cache_path(directory, settings)
    if path.is_file():
        cache = CHGNetGraphCache.load(path, settings)
        same_ids = cache.ids.tolist() == [int(i) for i in ids]
        wanted = np.asarray(targets, dtype=np.float64)
        if same_ids and np.array_equal(cache.targets.numpy(), wanted, equal_nan=True):
            return cache
    cache = featurize_chgnet(structures, ids, targets, settings, progress)
    cache.save(path)
    return cache
