"""Data sets: registry, loading (local frame / matminer / jarvis-tools), cleaning and splits.

A data set is a matminer-format frame: index = integer id, columns ``structure``
(pymatgen Structure) and ``target`` (float). Splits are a fixed held-out test set per data
set plus per-trial subsets drawn from the rest; every random choice derives from the
config seed, the trial and the size, so a (data set, size, trial) subset is the same for
scratch and transfer runs and paired comparisons are valid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from tlmat.files import atomic_path

log = logging.getLogger(__name__)

FRAME_COLUMNS = ("structure", "target")


class DataError(ValueError):
    """A data problem, reported to the user as one line."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One registry entry of ``config.yaml``'s ``datasets``."""

    key: str
    source: str
    name: str | None = None
    target: str | None = None
    path: str | None = None
    structures: str | None = None  # source file + CSV path: folder of CIF/POSCAR files
    label: str = ""
    units: str = ""
    target_only: bool = False
    drop_bad_records: bool = False
    in_mptrj: bool | None = None  # read by the report only (foundation.csv), never here

    @classmethod
    def from_config(cls, config: Mapping, key: str) -> DatasetSpec:
        registry = config.get("datasets", {})
        if key not in registry:
            raise DataError(
                f"unknown data set key {key!r}; the config's 'datasets' registry has "
                f"{sorted(registry)}"
            )
        entry = dict(registry[key])
        entry.setdefault("label", key)
        return cls(key=key, **entry)


# ----------------------------------------------------------------------------- loading


def read_frame(path: str | os.PathLike, columns: Sequence[str] = FRAME_COLUMNS) -> pd.DataFrame:
    """Read a matminer-format frame, with a one-line error when it is not one.

    ``columns``: the ones it must have (``tlmat predict`` reads frames without targets)."""
    from matminer.utils.io import load_dataframe_from_json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        frame = load_dataframe_from_json(str(path), pbar=False)
    except Exception as err:  # noqa: BLE001 - many decoders, one message
        raise DataError(
            f"{path}: not a matminer-format frame ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); write it with "
            "matminer.utils.io.store_dataframe_as_json(df, path, orient='split')"
        ) from err
    if not isinstance(frame, pd.DataFrame) or not set(columns) <= set(frame.columns):
        found = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        needed = " and ".join(repr(c) for c in columns)
        raise DataError(f"{path}: a frame needs columns {needed}; found {found}")
    return frame[list(columns)]


def write_frame(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a matminer-format frame atomically (temp file + rename)."""
    from matminer.utils.io import store_dataframe_as_json

    with atomic_path(path) as tmp:
        store_dataframe_as_json(frame, str(tmp), compression="gz", orient="split", pbar=False)


def load_matminer(spec: DatasetSpec) -> pd.DataFrame:
    from matminer.datasets import load_dataset as matminer_load

    if not spec.name or not spec.target:
        raise DataError(f"datasets.{spec.key}: source 'matminer' needs 'name' and 'target'")
    try:
        raw = matminer_load(spec.name)
    except Exception as err:  # noqa: BLE001 - network, checksum, unknown name
        raise DataError(
            f"datasets.{spec.key}: matminer could not load {spec.name!r} "
            f"({type(err).__name__}); when offline, put {spec.key}.json.gz into data_dir"
        ) from err
    return _select_columns(raw, spec)


def load_jarvis(spec: DatasetSpec) -> pd.DataFrame:
    from jarvis.db.figshare import data as jarvis_data

    if not spec.name or not spec.target:
        raise DataError(f"datasets.{spec.key}: source 'jarvis' needs 'name' and 'target'")
    try:
        records = jarvis_data(spec.name)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"datasets.{spec.key}: jarvis-tools could not load {spec.name!r} "
            f"({type(err).__name__}); when offline, put {spec.key}.json.gz into data_dir"
        ) from err
    return jarvis_frame(records, spec.target, spec.key)


def jarvis_frame(records: Sequence[Mapping], target: str, key: str = "jarvis") -> pd.DataFrame:
    """A matminer-format frame from JARVIS-DFT records (``jarvis.db.figshare.data`` format).

    Structures go through pymatgen's JARVIS adaptor; the index is the number of the JARVIS id
    (``JVASP-76195`` -> 76195) so ids stay integers like every other data set's; JARVIS
    writes missing values as ``"na"``, which cleaning then drops as non-numeric targets.
    """
    from jarvis.core.atoms import Atoms
    from pymatgen.io.jarvis import JarvisAtomsAdaptor

    if records and target not in records[0]:
        raise DataError(f"datasets.{key}: JARVIS records have no field {target!r}")
    ids, structures, targets = [], [], []
    for n, record in enumerate(records):
        jid = str(record.get("jid", n))
        digits = "".join(ch for ch in jid.rsplit("-", 1)[-1] if ch.isdigit())
        ids.append(int(digits) if digits else n)
        structures.append(JarvisAtomsAdaptor.get_structure(Atoms.from_dict(record["atoms"])))
        targets.append(record.get(target))
    return pd.DataFrame(
        {"structure": structures, "target": targets}, index=pd.Index(ids, dtype=np.int64)
    )


def _select_columns(raw: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    missing = [c for c in ("structure", spec.target) if c not in raw.columns]
    if missing:
        raise DataError(
            f"datasets.{spec.key}: {spec.name!r} has no column(s) {missing}; "
            f"columns are {list(raw.columns)}"
        )
    frame = raw[["structure", spec.target]].rename(columns={spec.target: "target"})
    return frame.reset_index(drop=True)


# ----------------------------------------------------------------------------- cleaning


MIN_DISTANCE = 0.5  # Å: closer atoms are a broken record (overlapping sites), not a crystal


def _as_structure(value: object) -> Structure | str:
    """The record's Structure, or why it cannot be used (unparsable, no sites, overlapping)."""
    try:
        structure = value if isinstance(value, Structure) else Structure.from_dict(value)
    except Exception as err:  # noqa: BLE001 - any malformed record is reported the same way
        return f"unparsable structure ({type(err).__name__})"
    if len(structure) == 0:
        return "zero sites"
    # periodic neighbour search (fast), self-pairs excluded: any pair closer than 0.5 Å
    if len(structure.get_neighbor_list(MIN_DISTANCE)[0]):
        return f"atoms closer than {MIN_DISTANCE} Å"
    return structure


def _fingerprint(structure: Structure, target: float) -> bytes:
    """Exact identity of a record: lattice, species, coordinates and target."""
    parts = (
        np.round(structure.lattice.matrix, 8).tobytes(),
        np.asarray(structure.atomic_numbers).tobytes(),
        np.round(structure.frac_coords, 8).tobytes(),
        np.float64(target).tobytes(),
    )
    return b"|".join(parts)


def keeper_order(
    test_ids: Collection[int] = (), subset_ids: Collection[int] = ()
) -> Callable[[int], tuple]:
    """The one policy of every duplicate step: the sort key that ranks a duplicate group.

    The member kept is a published test id (all of them when several are: a published test
    set is never altered), else a member of a published trial subset, else the lowest id.
    Every other member is dropped; one whose kept twin is a test id leaves the training
    pool with it (a "test twin").
    """
    test, subset = {int(i) for i in test_ids}, {int(i) for i in subset_ids}
    return lambda i: (int(i) not in test, int(i) not in subset, int(i))


def resolve_duplicates(
    groups: Iterable[Sequence[int]],
    test_ids: Collection[int] = (),
    subset_ids: Collection[int] = (),
) -> dict[int, int]:
    """``{dropped id: kept id}`` for groups of ids that are one entry (:func:`keeper_order`).

    Published test ids are never dropped, even when a group holds several of them.
    """
    test, rank = {int(i) for i in test_ids}, keeper_order(test_ids, subset_ids)
    aliases: dict[int, int] = {}
    for members in groups:
        ranked = sorted((int(i) for i in members), key=rank)
        aliases.update({i: ranked[0] for i in ranked[1:] if i not in test})
    return aliases


def duplicate_counts(aliases: Mapping[int, int], test_ids: Collection[int]) -> dict[str, int]:
    """What the duplicate steps dropped: every duplicate, and those that were twins of a
    published test entry (they leave the training pool). Written into the splits file."""
    test = {int(i) for i in test_ids}
    return {
        "n_duplicates_dropped": len(aliases),
        "n_test_twins_dropped": sum(int(kept) in test for kept in aliases.values()),
    }


def clean(
    frame: pd.DataFrame,
    key: str,
    drop_bad_records: bool = False,
    test_ids: Collection[int] = (),
    subset_ids: Collection[int] = (),
    aliases: dict[int, int] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check every record; drop exact duplicates; bad records are an error unless dropped.

    A bad record has a non-numeric/NaN/inf target, or a structure that cannot be parsed, has
    zero sites or atoms closer than 0.5 Å. By default one is an error naming the data set,
    the count, the first ids and the reason, since silently training on less data than asked
    changes the study; ``datasets.<key>.drop_bad_records: true`` drops them instead (for
    sources with known gaps, e.g. JARVIS writes missing values as "na").

    Of exact duplicates (same structure and target), the member kept follows
    :func:`keeper_order`: a published test id (``test_ids``) is never dropped, and its exact
    twins leave the data (counted as ``test_twins``). ``aliases``, when given, receives
    ``{dropped id: kept id}`` (published subsets are remapped with it).

    Returns the cleaned frame (integer index named ``id``) and the counts, which are logged.
    """
    counts = {"input": len(frame)}
    frame = frame.copy()
    if not pd.api.types.is_integer_dtype(frame.index):
        frame = frame.reset_index(drop=True)
    frame = frame[~frame.index.duplicated(keep="first")]
    counts["duplicate_ids"] = counts["input"] - len(frame)

    targets = pd.to_numeric(frame["target"], errors="coerce").astype(float)
    reasons = pd.Series("", index=frame.index, dtype=object)
    reasons[~np.isfinite(targets.to_numpy())] = "target is not a finite number"
    structures = frame["structure"].map(_as_structure)
    broken = structures.map(lambda s: isinstance(s, str))
    reasons[broken & (reasons == "")] = structures[broken & (reasons == "")]
    bad = reasons != ""
    counts["non_finite_target"] = int((reasons == "target is not a finite number").sum())
    counts["bad_structure"] = int(bad.sum()) - counts["non_finite_target"]
    if bad.any() and not drop_bad_records:
        raise DataError(_bad_records_message(key, reasons[bad]))
    frame = frame[~bad].assign(target=targets[~bad], structure=structures[~bad])

    prints = [_fingerprint(s, t) for s, t in zip(frame["structure"], frame["target"], strict=True)]
    groups: dict[bytes, list[int]] = {}
    for index, fingerprint in zip(frame.index, prints, strict=True):
        groups.setdefault(fingerprint, []).append(int(index))
    dropped = resolve_duplicates(groups.values(), test_ids, subset_ids)
    counts["exact_duplicates"] = len(dropped)
    counts["test_twins"] = duplicate_counts(dropped, test_ids)["n_test_twins_dropped"]
    frame = frame.drop(index=list(dropped))
    if aliases is not None:
        aliases.update(dropped)
    frame.index = frame.index.astype(np.int64).rename("id")
    counts["kept"] = len(frame)
    log.info("%s: cleaning %s", key, ", ".join(f"{k}={v}" for k, v in counts.items()))
    if counts["kept"] == 0:
        raise DataError(f"{key}: no usable records left after cleaning ({counts})")
    return frame, counts


def _bad_records_message(key: str, reasons: pd.Series) -> str:
    first = "; ".join(f"id {i}: {why}" for i, why in list(reasons.items())[:3])
    more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
    return (
        f"datasets.{key}: {len(reasons)} bad record(s): {first}{more}; fix them in the data, "
        f"or set datasets.{key}.drop_bad_records: true to drop them"
    )


# ----------------------------------------------------------------------------- splits


def seeded_rng(seed: int, *labels: object) -> np.random.Generator:
    """A generator keyed by the config seed and labels: the one derivation of every random
    choice (splits, subsets, model initialisation), stable across runs and processes."""
    keys = [seed] + [zlib.crc32(str(label).encode()) for label in labels]
    return np.random.default_rng(keys)


def make_splits(
    ids: Sequence[int],
    key: str,
    seed: int,
    test_fraction: float,
    published: Mapping | None = None,
) -> dict:
    """Held-out test ids (+ published trial subsets) for one data set.

    With ``published`` (this data set's entry of a splits file), its test ids and trial
    subsets are reused exactly when the test structures are in the data. When none of them
    are (e.g. bg/fe in the offline pools, whose test structures were never published), a
    seeded test set is drawn instead and logged; a partial overlap is an error.
    """
    id_array = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
    present = set(id_array.tolist())
    if published is not None:
        test = [int(i) for i in published.get("test", [])]
        found = [i for i in test if i in present]
        if found and len(found) == len(test):
            trials = {
                trial: {str(size): [int(i) for i in members] for size, members in sizes.items()}
                for trial, sizes in published.get("trials", {}).items()
            }
            _check_subsets_present(key, trials, present)
            return {
                "dataset": key,
                "source": "published",
                "seed": seed,
                "test": test,
                "trials": trials,
            }
        if found:
            raise DataError(
                f"splits_file: {len(test) - len(found)} of {len(test)} test ids of {key!r} are "
                "missing from the data; use the data the splits were made for"
            )
        log.warning(
            "%s: none of the %d published test structures are in the data; "
            "drawing a seeded %.0f %% test set instead",
            key,
            len(test),
            100 * test_fraction,
        )
    n_test = max(1, round(test_fraction * len(id_array)))
    test_ids = seeded_rng(seed, key, "test").choice(id_array, size=n_test, replace=False)
    return {
        "dataset": key,
        "source": "generated",
        "seed": seed,
        "test": sorted(int(i) for i in test_ids),
        "trials": {},
    }


def _check_subsets_present(key: str, trials: Mapping, present: set[int]) -> None:
    for trial, sizes in trials.items():
        for size, members in sizes.items():
            missing = [i for i in members if i not in present]
            if missing:
                raise DataError(
                    f"splits_file: {key}.trials.{trial}.{size} has {len(missing)} ids that are "
                    f"not in the data (e.g. {missing[:3]})"
                )


def read_published_splits(path: str | os.PathLike | None, key: str) -> Mapping | None:
    """This data set's entry of a splits file, or None (no file / key not in it)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"splits_file {path}: not found")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"splits_file {path}: not valid JSON ({err.msg})") from err
    return splits.get(key)


#: how a training subset is drawn from the pool (``finetune.sampling``)
SAMPLING_METHODS = ("random", "stratified")
#: equal-count target-quantile bins of a stratified draw (fewer when the subset is smaller)
STRATA = 10


def subset_ids(
    splits: Mapping,
    pool_ids: Sequence[int],
    size: int,
    trial: int,
    cap: bool = False,
    sampling: str = "random",
    targets: Mapping[int, float] | None = None,
) -> list[int]:
    """The training subset (train + val) of ``size`` for ``trial``, outside the test set.

    ``random``: the published subset when the splits carry one for (trial, size); otherwise
    a seeded draw from the pool. ``stratified``: a seeded draw of equal shares from
    :data:`STRATA` equal-count quantile bins of the pool's ``targets``
    (:func:`stratified_draw`); published subsets are random draws, so they are not used.
    A request larger than the pool is an error naming the data set and sizes, except with
    ``cap`` (pre-training: "PT on up to N", as the paper's 100K PT size is about the whole
    BG/FE pool), where it is capped with a log line.
    """
    if sampling not in SAMPLING_METHODS:
        raise DataError(f"unknown sampling {sampling!r}; use one of {list(SAMPLING_METHODS)}")
    published = splits.get("trials", {}).get(f"trial{trial}", {}).get(str(size))
    if published is not None and sampling == "random":
        return [int(i) for i in published]
    test = set(splits["test"])
    pool = np.asarray(sorted(int(i) for i in pool_ids if int(i) not in test), dtype=np.int64)
    if size > len(pool) and not cap:
        raise DataError(
            f"{splits['dataset']}: a subset of {size} was requested, but the data set has "
            f"{len(pool) + len(test)} structures and {len(test)} are held out for test, "
            f"leaving {len(pool)}; lower the FT size in the config or supply more data"
        )
    if size > len(pool):
        log.warning(
            "%s: requested %d structures but the pool outside the test set holds %d; using all",
            splits["dataset"],
            size,
            len(pool),
        )
        size = len(pool)
    if sampling == "stratified":
        if targets is None:
            raise DataError(f"{splits['dataset']}: a stratified draw needs the pool's targets")
        rng = seeded_rng(splits["seed"], splits["dataset"], "stratified", trial, size)
        return stratified_draw(pool, [targets[int(i)] for i in pool], size, rng)
    chosen = seeded_rng(splits["seed"], splits["dataset"], "subset", trial, size).choice(
        pool, size=size, replace=False
    )
    return [int(i) for i in chosen]


def quantile_bins(targets: Sequence[float], n_bins: int) -> np.ndarray:
    """Bin (0 .. n_bins - 1) of every target: equal-count bins of the targets' ranks (ties
    broken by position, so bins stay equal in count whatever the ties)."""
    order = np.argsort(np.asarray(targets, dtype=float), kind="stable")
    bins = np.empty(len(order), dtype=np.int64)
    for b, members in enumerate(np.array_split(order, n_bins)):
        bins[members] = b
    return bins


def stratified_draw(
    pool: Sequence[int], targets: Sequence[float], size: int, rng: np.random.Generator
) -> list[int]:
    """``size`` ids of ``pool``, an equal share from each of ``min(STRATA, size)``
    equal-count target-quantile bins (the remainder goes to bins chosen by ``rng``)."""
    pool = np.asarray(pool, dtype=np.int64)
    n_bins = max(1, min(STRATA, size, len(pool)))
    bins = quantile_bins(targets, n_bins)
    shares = np.full(n_bins, size // n_bins)
    spare = np.flatnonzero(np.bincount(bins, minlength=n_bins) > shares)
    shares[rng.choice(spare, size=size % n_bins, replace=False)] += 1
    chosen = [rng.choice(pool[bins == b], size=k, replace=False) for b, k in enumerate(shares)]
    return [int(i) for i in np.concatenate(chosen)]


def train_val_split(
    ids: Sequence[int], val_fraction: float, seed: int, *labels: object
) -> tuple[list[int], list[int]]:
    """Seeded split of a subset into train and validation (at least one of each)."""
    ids = np.asarray(list(ids), dtype=np.int64)
    if len(ids) < 2:
        raise DataError(f"a subset of {len(ids)} structure(s) cannot be split into train and val")
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    order = seeded_rng(seed, "val", *labels).permutation(len(ids))
    return [int(i) for i in ids[order[n_val:]]], [int(i) for i in ids[order[:n_val]]]
