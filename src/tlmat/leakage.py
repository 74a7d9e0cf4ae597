"""Leakage control: which structures of different data sets are the same crystal.

Data sets of the study draw on the same underlying databases (most bg, fe, gv, ph, dc and pz
structures are Materials Project entries), so a held-out test crystal of one data set can sit,
under another id, in another data set's pre-training pool. Ids cannot show this; structures
can. :func:`crystal_labels` groups structures into crystals, :func:`find_overlap` applies
it to every study data set and :func:`write_overlap` writes ``overlap.json`` (pool ids to
exclude from pre-training, cross-data-set clusters that multi-property pre-training merges
into multi-label samples, and per-pair counts) and the leakage table.

Matching: structures are first grouped by reduced composition (oxidation states ignored);
inside a group, records identical to 1e-4 (lattice and fractional coordinates) are one
crystal without further work, and the remaining distinct records are compared with pymatgen's
:class:`StructureMatcher` (see :data:`MATCHER_SETTINGS`). Groups with a single distinct record
cost nothing, which keeps the whole offline study (≈30 K structures) well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import ElementComparator, StructureMatcher
from pymatgen.core import Structure
from tqdm.auto import tqdm

from tlmat.data import duplicate_counts, resolve_duplicates
from tlmat.files import atomic_write_text

log = logging.getLogger(__name__)

#: StructureMatcher settings of bulk crystals (pymatgen's defaults, made explicit):
#: ltol 0.2 (fractional lattice length), stol 0.3 (site tolerance, in units of the average
#: free length per atom), angle_tol 5°. ``primitive_cell`` reduces both structures to their
#: primitive cells, so a supercell of a crystal matches it without the slow
#: ``attempt_supercell`` search; ``scale`` normalises volumes, so the same crystal relaxed
#: with slightly different settings (different database snapshots) still matches. Species are
#: compared as elements (oxidation-state decorations are ignored).
MATCHER_SETTINGS: dict = {
    "ltol": 0.2,
    "stol": 0.3,
    "angle_tol": 5.0,
    "primitive_cell": True,
    "scale": True,
    "attempt_supercell": False,
}
#: Settings for slabs (structures with vacuum, see :func:`vacuum_axis`; e.g. JARVIS 2D).
#: A slab's volume is mostly vacuum, so volume scaling would rescale the layer itself and
#: merge distinct layers (other lattice constants) of one composition; and the site
#: tolerance, in units of the free length per atom, would grow with the vacuum. Slabs are
#: therefore rebuilt with a fixed vacuum (:func:`normalize_slab`: the vacuum padding no
#: longer matters) and matched without scaling and with tighter tolerances: in-plane
#: lattice lengths within 5 %, sites within 0.1 of the (fixed-vacuum) free length.
SLAB_MATCHER_SETTINGS: dict = {
    "ltol": 0.05,
    "stol": 0.1,
    "angle_tol": 3.0,
    "primitive_cell": True,
    "scale": False,
    "attempt_supercell": False,
}
VACUUM_GAP = 7.0  # Å: an empty layer at least this thick along a lattice axis makes a slab
SLAB_VACUUM = 20.0  # Å: the vacuum every slab is rebuilt with before matching
_ROUND = 4  # decimals of the exact fingerprint (Å and fractional coordinates)


def structure_matcher() -> StructureMatcher:
    """The one matcher of bulk crystals (intra- and cross-data-set matching alike)."""
    return StructureMatcher(comparator=ElementComparator(), **MATCHER_SETTINGS)


def slab_matcher() -> StructureMatcher:
    """The matcher of slabs (:data:`SLAB_MATCHER_SETTINGS`), on :func:`normalize_slab` forms."""
    return StructureMatcher(comparator=ElementComparator(), **SLAB_MATCHER_SETTINGS)


def vacuum_axis(structure: Structure) -> tuple[int, float] | None:
    """(lattice axis, where the layer starts as a fractional coordinate) of a slab, else None.

    A slab has an empty layer at least :data:`VACUUM_GAP` thick between the planes of its
    atoms along one lattice axis (the widest one is taken); bulk crystals have none.
    """
    matrix, frac = structure.lattice.matrix, structure.frac_coords % 1.0
    best: tuple[float, int, float] | None = None
    for axis in range(3):
        others = [matrix[k] for k in range(3) if k != axis]
        spacing = structure.volume / np.linalg.norm(np.cross(*others))
        coords = np.sort(frac[:, axis])
        gaps = np.diff(np.append(coords, coords[0] + 1.0)) * spacing
        widest = int(np.argmax(gaps))
        if gaps[widest] >= VACUUM_GAP and (best is None or gaps[widest] > best[0]):
            best = (float(gaps[widest]), axis, float(coords[(widest + 1) % len(coords)]))
    return None if best is None else (best[1], best[2])


def normalize_slab(structure: Structure, axis: int, layer_start: float) -> Structure:
    """The slab with its atoms kept in place and the vacuum axis replaced by the layer's
    normal, :data:`SLAB_VACUUM` longer than the layer is thick: the same layer gives the
    same structure whatever vacuum padding (or stacking vector) it was stored with."""
    matrix = structure.lattice.matrix.copy()
    frac = structure.frac_coords.copy()
    frac[:, axis] = (frac[:, axis] - layer_start) % 1.0  # the layer is now contiguous
    frac[:, axis] = np.where(frac[:, axis] > 1.0 - 1e-9, 0.0, frac[:, axis])
    cart = frac @ matrix
    a, b = (matrix[k] for k in range(3) if k != axis)
    normal = np.cross(a, b) / np.linalg.norm(np.cross(a, b))
    normal *= np.sign(normal @ matrix[axis])
    heights = cart @ normal
    thickness = float(heights.max() - heights.min())
    matrix[axis] = normal * (thickness + SLAB_VACUUM)
    cart -= np.outer(heights.min(), normal)  # the layer starts at height 0
    return Structure(matrix, structure.species, cart, coords_are_cartesian=True)


def _composition_key(structure: Structure) -> str:
    return structure.composition.element_composition.reduced_formula


def _exact_key(structure: Structure) -> bytes:
    """Identity of a record up to rounding: lattice, species and fractional coordinates."""
    order = np.lexsort((*np.round(structure.frac_coords, _ROUND).T, structure.atomic_numbers))
    return b"|".join(
        (
            np.round(structure.lattice.matrix, _ROUND).tobytes(),
            np.asarray(structure.atomic_numbers)[order].tobytes(),
            (np.round(structure.frac_coords[order], _ROUND) % 1.0).tobytes(),
        )
    )


def crystal_labels(structures: Sequence[Structure], progress: bool | None = None) -> np.ndarray:
    """One integer label per structure; equal labels = the same crystal.

    Labels are numbered in order of first appearance, so they are deterministic.
    """
    by_composition: dict[str, list[int]] = defaultdict(list)
    for index, structure in enumerate(structures):
        by_composition[_composition_key(structure)].append(index)
    labels = np.full(len(structures), -1, dtype=np.int64)
    matchers = (structure_matcher(), slab_matcher())
    groups = [members for members in by_composition.values()]
    work = [g for g in groups if len(g) > 1]
    log.info(
        "matching %d structures: %d compositions, %d with more than one structure",
        len(structures),
        len(groups),
        len(work),
    )
    next_label = 0
    for members in tqdm(groups, desc="matching crystals", disable=_disable(progress)):
        for cluster in _match_group(structures, members, matchers):
            labels[cluster] = next_label
            next_label += 1
    return _renumber(labels)


def _match_group(
    structures: Sequence[Structure],
    members: list[int],
    matchers: tuple[StructureMatcher, StructureMatcher],
) -> list[list[int]]:
    """Clusters (lists of indices) of one composition group: bulk crystals and slabs are
    matched apart, each with its own matcher (a slab is never its bulk parent)."""
    if len(members) == 1:
        return [members]
    exact: dict[bytes, list[int]] = defaultdict(list)
    for index in members:
        exact[_exact_key(structures[index])].append(index)
    if len(exact) == 1:
        return [members]
    bulk, slabs = [], []
    for indices in exact.values():
        vacuum = vacuum_axis(structures[indices[0]])
        if vacuum is None:
            bulk.append((structures[indices[0]], indices))
        else:
            slabs.append((normalize_slab(structures[indices[0]], *vacuum), indices))
    clusters = []
    for matcher, records in zip(matchers, (bulk, slabs), strict=True):
        if len(records) == 1:
            clusters.append(sorted(records[0][1]))
        elif records:
            same = {id(structure): indices for structure, indices in records}
            for group in matcher.group_structures([structure for structure, _ in records]):
                clusters.append(sorted(j for s in group for j in same[id(s)]))
    return clusters


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels in order of first appearance (0, 1, 2, ...)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64)


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = only in a terminal."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------- duplicates


def collapse_duplicates(
    frame: pd.DataFrame, key: str, test_ids: Sequence[int] = (), subset_ids: Sequence[int] = ()
) -> tuple[pd.DataFrame, dict[int, int]]:
    """Keep one entry per crystal of a data set; returns the frame and ``{dropped: kept}``.

    The kept entry follows the one duplicate policy (:func:`tlmat.data.keeper_order`): a
    published test entry when the crystal has one (all of them when it has several:
    published test ids are never dropped), else an entry of a published subset, else the
    lowest id. Twins of a test entry leave the data set. The kept entry keeps its own
    target (no averaging: published test targets must stay as published).
    """
    labels = crystal_labels(list(frame["structure"]))
    clusters: dict[int, list[int]] = defaultdict(list)
    for index, label in zip(frame.index, labels, strict=True):
        clusters[int(label)].append(int(index))
    aliases = resolve_duplicates(clusters.values(), test_ids, subset_ids)
    counts = duplicate_counts(aliases, test_ids)
    log.info(
        "%s: %d entries are the same crystal as another entry of the data set; collapsed "
        "(%d of them twins of a published test entry)",
        key,
        counts["n_duplicates_dropped"],
        counts["n_test_twins_dropped"],
    )
    return frame.drop(index=list(aliases)), aliases


def remap_subsets(trials: Mapping, aliases: Mapping[int, int], test_ids: Sequence[int]) -> dict:
    """Published trial subsets with collapsed ids replaced by their kept twin.

    A collapsed id whose twin is a test entry is dropped from the subset instead (the
    subset would otherwise train on a test crystal); an id listed twice is kept once.
    """
    test = {int(i) for i in test_ids}
    remapped: dict = {}
    for trial, sizes in trials.items():
        remapped[trial] = {}
        for size, members in sizes.items():
            new = [aliases.get(int(i), int(i)) for i in members]
            new = list(dict.fromkeys(i for i in new if i not in test))
            if len(new) < len(members):
                log.info(
                    "%s.%s: %d of %d ids dropped (duplicates of a test entry or of each other)",
                    trial,
                    size,
                    len(members) - len(new),
                    len(members),
                )
            remapped[trial][size] = new
    return remapped


def published_ids(published: Mapping | None) -> tuple[list[int], list[int]]:
    """(test ids, ids of every trial subset) of a data set's splits-file entry."""
    published = published or {}
    test = [int(i) for i in published.get("test", [])]
    trials = published.get("trials", {})
    return test, [int(i) for sizes in trials.values() for ids in sizes.values() for i in ids]


def dedupe_prepared(
    frame: pd.DataFrame,
    key: str,
    published: Mapping | None,
    earlier: Mapping[int, int] | None = None,
) -> tuple[pd.DataFrame, Mapping | None, dict[int, int]]:
    """Collapse a data set's duplicate crystals before splitting; keep published splits valid.

    Called by ``tlmat prepare`` between cleaning and splitting. Published test ids present in
    the frame are always the entry kept; published trial subsets are remapped with every
    duplicate step's aliases (``earlier``: cleaning's exact duplicates). Returns the frame,
    the published entry and ``{dropped id: kept id}`` of both steps.
    """
    test, in_subsets = published_ids(published)
    test = [i for i in test if i in frame.index]
    frame, collapsed = collapse_duplicates(frame, key, test, in_subsets)
    aliases = {
        int(dropped): collapsed.get(int(kept), int(kept))
        for dropped, kept in (earlier or {}).items()
    }
    aliases.update(collapsed)
    if published is None or not aliases:
        return frame, published, aliases
    trials = published.get("trials", {})
    return frame, {**published, "trials": remap_subsets(trials, aliases, test)}, aliases


# ----------------------------------------------------------------------------- overlap


@dataclasses.dataclass(frozen=True)
class Overlap:
    """The content of ``overlap.json``: see :func:`find_overlap` and :func:`write_overlap`."""

    datasets: list[str]
    exclude: dict[str, list[int]]
    clusters: list[list[tuple[str, int]]]
    counts: list[dict]

    def excluded(self, ds: str) -> set[int]:
        """Pool ids of ``ds`` that are the same crystal as another data set's test entry."""
        return {int(i) for i in self.exclude.get(ds, [])}

    def to_json(self) -> dict:
        return {
            "datasets": self.datasets,
            "exclude": self.exclude,
            "same_crystal": [[[ds, i] for ds, i in cluster] for cluster in self.clusters],
            "counts": self.counts,
        }


def load_overlap(path: str | os.PathLike) -> Overlap:
    """Read ``overlap.json``, with a one-line error naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: overlap file not found; run `tlmat leakage` first")
    try:
        data = json.loads(path.read_text())
        return Overlap(
            datasets=[str(ds) for ds in data["datasets"]],
            exclude={str(ds): [int(i) for i in ids] for ds, ids in data["exclude"].items()},
            clusters=[[(str(ds), int(i)) for ds, i in c] for c in data["same_crystal"]],
            counts=list(data["counts"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: not an overlap file ({type(err).__name__}: {err}); delete it and rerun "
            "`tlmat leakage`"
        ) from err


def find_overlap(
    entries: Mapping[str, tuple[pd.DataFrame, Sequence[int]]], progress: bool | None = None
) -> Overlap:
    """Overlap of data sets given as ``{ds: (frame, test ids)}``."""
    datasets = list(entries)
    members = [(ds, int(i)) for ds in datasets for i in entries[ds][0].index]
    structures = [s for ds in datasets for s in entries[ds][0]["structure"]]
    labels = crystal_labels(structures, progress)
    tests = {ds: {int(i) for i in entries[ds][1]} for ds in datasets}
    cluster_members: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for member, label in zip(members, labels, strict=True):
        cluster_members[int(label)].append(member)
    label_of = dict(zip(members, labels.tolist(), strict=True))
    # labels of each data set's test crystals
    test_labels = {
        ds: {label_of[(ds, i)] for i in tests[ds] if (ds, i) in label_of} for ds in datasets
    }
    exclude, counts = {}, []
    for ds in datasets:
        pool = [int(i) for i in entries[ds][0].index if int(i) not in tests[ds]]
        hits = set()
        for other in datasets:
            if other == ds:
                continue
            overlap = [i for i in pool if label_of[(ds, i)] in test_labels[other]]
            hits.update(overlap)
            counts.append(
                {
                    "pt_pool": ds,
                    "ft_test": other,
                    "n_pool": len(pool),
                    "n_test": sum((other, i) in label_of for i in tests[other]),
                    "n_overlap": len(overlap),
                }
            )
        exclude[ds] = sorted(hits)
    clusters = [
        sorted(group) for group in cluster_members.values() if len({ds for ds, _ in group}) > 1
    ]
    return Overlap(datasets, exclude, sorted(clusters), counts)


def write_overlap(overlap: Overlap, overlap_out: Path, table_out: Path) -> Overlap:
    """Write ``overlap.json`` and the leakage table (one row per PT pool x FT test set)."""
    for ds in overlap.datasets:
        log.info(
            "%s: %d pool structures match other data sets' test structures",
            ds,
            len(overlap.exclude[ds]),
        )
    atomic_write_text(overlap_out, json.dumps(overlap.to_json(), indent=1))
    atomic_write_text(table_out, leakage_table(overlap).to_csv(index=False))
    return overlap


def leakage_table(overlap: Overlap) -> pd.DataFrame:
    """One row per PT pool x FT test set pair: sizes, overlapping pool entries, fraction."""
    columns = ["pt_pool", "ft_test", "n_pool", "n_test", "n_overlap"]
    table = pd.DataFrame(overlap.counts, columns=columns)
    table["fraction"] = table["n_overlap"] / table["n_pool"].where(table["n_pool"] > 0)
    return table
