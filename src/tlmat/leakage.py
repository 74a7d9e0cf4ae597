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

from tlmat.files import atomic_write_text

log = logging.getLogger(__name__)

#: StructureMatcher settings used everywhere (pymatgen's defaults, made explicit):
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
_ROUND = 4  # decimals of the exact fingerprint (Å and fractional coordinates)


def structure_matcher() -> StructureMatcher:
    """The one matcher of the project (intra- and cross-data-set matching alike)."""
    return StructureMatcher(comparator=ElementComparator(), **MATCHER_SETTINGS)


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
    matcher = structure_matcher()
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
        for cluster in _match_group(structures, members, matcher):
            labels[cluster] = next_label
            next_label += 1
    return _renumber(labels)


def _match_group(
    structures: Sequence[Structure], members: list[int], matcher: StructureMatcher
) -> list[list[int]]:
    """Clusters (lists of indices) of one composition group."""
    if len(members) == 1:
        return [members]
    exact: dict[bytes, list[int]] = defaultdict(list)
    for index in members:
        exact[_exact_key(structures[index])].append(index)
    if len(exact) == 1:
        return [members]
    representatives = [indices[0] for indices in exact.values()]
    rep_of = {id(structures[i]): i for i in representatives}
    same = {indices[0]: indices for indices in exact.values()}
    clusters = []
    for group in matcher.group_structures([structures[i] for i in representatives]):
        clusters.append(sorted(j for s in group for j in same[rep_of[id(s)]]))
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

    The kept entry is a published test entry when the crystal has one (all of them when it
    has several: published test ids are never dropped), else an entry of a published subset,
    else the lowest id. The kept entry keeps its own target (no averaging: published test
    targets must stay as published).
    """
    labels = crystal_labels(list(frame["structure"]))
    test, subset = {int(i) for i in test_ids}, {int(i) for i in subset_ids}
    aliases: dict[int, int] = {}
    clusters: dict[int, list[int]] = defaultdict(list)
    for index, label in zip(frame.index, labels, strict=True):
        clusters[int(label)].append(int(index))
    for members in clusters.values():
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda i: (i not in test, i not in subset, i))
        kept = ranked[0]
        aliases.update({i: kept for i in ranked[1:] if i not in test})
    log.info(
        "%s: %d entries are the same crystal as another entry of the data set; collapsed",
        key,
        len(aliases),
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


def dedupe_prepared(
    frame: pd.DataFrame, key: str, published: Mapping | None
) -> tuple[pd.DataFrame, Mapping | None]:
    """Collapse a data set's duplicate crystals before splitting; keep published splits valid.

    Called by ``tlmat prepare`` between cleaning and splitting. Published test ids present in
    the frame are preferred as the kept entry; published trial subsets are remapped.
    """
    test = [int(i) for i in (published or {}).get("test", []) if int(i) in frame.index]
    trials = (published or {}).get("trials", {})
    in_subsets = [int(i) for sizes in trials.values() for ids in sizes.values() for i in ids]
    frame, aliases = collapse_duplicates(frame, key, test, in_subsets)
    if published is None or not aliases:
        return frame, published
    return frame, {**published, "trials": remap_subsets(trials, aliases, test)}


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
