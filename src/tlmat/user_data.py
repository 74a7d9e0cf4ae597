"""Your own property as a target: a registry entry of ``source: file`` that you supply.

``path`` is either a matminer-format frame (``.json.gz``/``.json``: columns ``structure`` and
``target``, integer index = ids) or a CSV of ids and measured values (columns ``id`` and
``value``; ``target:`` in the entry names another value column) beside a folder of CIF/POSCAR
files (``structures:``, default the CSV's own folder). A CSV row's structure is the file in
its optional ``file`` column, else ``<id>.cif``, ``<id>.vasp``, ``<id>.poscar`` or
``<id>/POSCAR``. Ids are integers, as every data set's (they name rows of the splits and of
each run's ``predictions.csv``).

Every problem is one line naming the file: an unparsable structure file, a missing or
non-numeric value, a duplicate id, a missing structure file, and (at ``tlmat prepare``,
:func:`check_enough`) fewer structures than the study's smallest FT size. The checks run
before anything is written, so a bad file leaves nothing partial behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from tlmat.data import DataError, DatasetSpec, _as_structure, read_frame
from tlmat.structure_files import StructureFileError, read_structure, structure_problem

log = logging.getLogger(__name__)

ID_COLUMN = "id"
VALUE_COLUMN = "value"
FILE_COLUMN = "file"
#: where a CSV row's structure is looked for, in ``structures/``, when it names no ``file``
CANDIDATES = ("{id}.cif", "{id}.vasp", "{id}.poscar", "{id}/POSCAR")


def is_csv(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv"


def load_user_dataset(spec: DatasetSpec) -> pd.DataFrame:
    """The frame of a ``source: file`` entry, checked (one line naming the file if bad)."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"datasets.{spec.key}.path: {path}: file not found")
    if is_csv(path):
        folder = Path(spec.structures) if spec.structures else path.parent
        return read_values_csv(path, folder, spec.target or VALUE_COLUMN, spec.drop_bad_records)
    if spec.structures:
        raise DataError(
            f"datasets.{spec.key}.structures: only a CSV path reads a structures folder; "
            f"{path} is a matminer-format frame, which holds its structures"
        )
    return check_frame(read_frame(path), path, spec.drop_bad_records)


def check_frame(frame: pd.DataFrame, path: Path, drop_bad: bool = False) -> pd.DataFrame:
    """A user's matminer-format frame: unique integer ids, a value and a usable structure
    in every row (``drop_bad``: rows without are left to cleaning, which drops them)."""
    if not pd.api.types.is_integer_dtype(frame.index):
        raise DataError(f"{path}: the frame's index must be integer ids, found {frame.index.dtype}")
    twice = frame.index[frame.index.duplicated()]
    if len(twice):
        raise DataError(f"{path}: duplicate id {int(twice[0])} ({len(twice)} duplicate row(s))")
    if drop_bad:
        return frame
    values = pd.to_numeric(frame["target"], errors="coerce")
    for ident, value in values.items():
        if not math.isfinite(value):
            raise DataError(f"{path}: id {ident}: missing value ({frame.at[ident, 'target']!r})")
    for ident, record in frame["structure"].items():
        checked = _as_structure(record)
        problem = checked if isinstance(checked, str) else structure_problem(checked)
        if problem:
            raise DataError(f"{path}: id {ident}: {problem}")
    return frame


def read_values_csv(
    csv: Path, folder: Path, value_column: str = VALUE_COLUMN, drop_bad: bool = False
) -> pd.DataFrame:
    """A matminer-format frame from a CSV of ids and values and their structure files.

    ``drop_bad``: rows with a missing value or an unreadable structure file are dropped and
    logged instead of failing (a bad id, a duplicate or a missing file still fail).
    """
    table = _read_csv(csv, value_column)
    if not Path(folder).is_dir():
        raise DataError(f"{csv}: structures folder {folder} not found")
    ids, structures, values, dropped = [], [], [], []
    seen: dict[int, int] = {}
    for row, record in enumerate(table.to_dict("records")):
        line = row + 2  # the header is line 1
        ident = _parse_id(csv, line, record[ID_COLUMN])
        if ident in seen:
            raise DataError(f"{csv}: duplicate id {ident} (lines {seen[ident]} and {line})")
        seen[ident] = line
        file = _structure_file(csv, line, ident, folder, record.get(FILE_COLUMN, ""))
        try:
            value = _parse_value(csv, line, ident, record[value_column])
            structure = read_structure(file)
        except (StructureFileError, DataError) as err:
            if not drop_bad:
                raise
            dropped.append(str(err))
            continue
        ids.append(ident)
        structures.append(structure)
        values.append(value)
    for reason in dropped:
        log.warning("dropped (drop_bad_records): %s", reason)
    index = pd.Index(ids, dtype="int64", name=ID_COLUMN)
    return pd.DataFrame({"structure": structures, "target": values}, index=index)


def _read_csv(csv: Path, value_column: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{csv}: not a readable CSV ({why})") from None
    missing = [c for c in (ID_COLUMN, value_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv}: needs columns {ID_COLUMN!r} and {value_column!r} (optional "
            f"{FILE_COLUMN!r}); missing {missing}, found {list(table.columns)}"
        )
    if table.empty:
        raise DataError(f"{csv}: no rows")
    return table


def _parse_id(csv: Path, line: int, raw: str) -> int:
    try:
        return int(str(raw).strip())
    except ValueError:
        raise DataError(
            f"{csv}: line {line}: id {raw!r} is not an integer (ids are integers, as in "
            "every data set; name files freely in a 'file' column)"
        ) from None


def _parse_value(csv: Path, line: int, ident: int, raw: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        what = "missing value" if not str(raw).strip() else f"value {raw!r} is not a number"
        raise DataError(f"{csv}: line {line} (id {ident}): {what}")
    return value


def _structure_file(csv: Path, line: int, ident: int, folder: Path, named: str) -> Path:
    """The row's structure file: its ``file`` entry, else the one candidate name found."""
    if str(named).strip():
        path = Path(folder) / str(named).strip()
        if not path.is_file():
            raise DataError(f"{csv}: line {line} (id {ident}): structure file {path} not found")
        return path
    found = [Path(folder) / c.format(id=ident) for c in CANDIDATES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{csv}: line {line} (id {ident}): several structure files ({names})")
    if not found:
        names = ", ".join(c.format(id=ident) for c in CANDIDATES)
        raise DataError(f"{csv}: line {line} (id {ident}): no structure file ({names}) in {folder}")
    return found[0]


def smallest_ft_size(config: Mapping) -> int | None:
    sizes = config.get("study", {}).get("ft_sizes") or []
    return min(sizes) if sizes else None


def check_enough(config: Mapping, spec: DatasetSpec, n_structures: int, n_test: int) -> None:
    """A data set you supply must leave, after its test set, at least the study's smallest
    FT size: checked at ``tlmat prepare``, before anything is written."""
    smallest = smallest_ft_size(config)
    if spec.source != "file" or not spec.path or smallest is None:
        return
    pool = n_structures - n_test
    if pool < smallest:
        raise DataError(
            f"{spec.path}: {n_structures} usable structures, {n_test} held out for test, "
            f"leaving {pool}: fewer than the smallest FT size {smallest} (study.ft_sizes); "
            "supply more structures or lower study.ft_sizes"
        )
