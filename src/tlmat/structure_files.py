"""Structures from files a user supplies: CIF and POSCAR files, or folders of them.

One reader for ``tlmat predict`` and for user targets (``tlmat.user_data``), so a file that
trains is a file that predicts, and every unreadable one is reported the same way: one line
naming the file and the reason (:class:`StructureFileError`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pymatgen.core import Structure

from tlmat.data import DataError, _as_structure

#: suffixes read as structure files (case-insensitive); ``POSCAR*``/``CONTCAR*`` names too
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")
VASP_NAMES = ("POSCAR", "CONTCAR")
#: the largest atomic number the CGCNN atom-feature table (``tlmat.graphs``) covers
MAX_Z = 100


class StructureFileError(DataError):
    """A structure file that cannot be used: one line naming the file and why."""


def is_structure_file(path: Path) -> bool:
    """Whether a folder entry is read as a structure (README, CSV, hidden files are not)."""
    name = path.name
    if name.startswith(".") or not path.is_file():
        return False
    return path.suffix.lower() in STRUCTURE_SUFFIXES or name.upper().startswith(VASP_NAMES)


def structure_files(folder: Path) -> list[Path]:
    """Every structure file under ``folder`` (sub-folders too), in a fixed (sorted) order."""
    return sorted(p for p in Path(folder).rglob("*") if is_structure_file(p))


def file_id(path: Path, root: Path | None = None) -> str:
    """The id a structure file goes by: its path below ``root`` without a structure suffix
    (``a/POSCAR`` stays ``a/POSCAR``, ``NaCl.cif`` is ``NaCl``)."""
    relative = Path(path).relative_to(root) if root is not None else Path(Path(path).name)
    if relative.suffix.lower() in STRUCTURE_SUFFIXES:
        relative = relative.with_suffix("")
    return relative.as_posix()


def read_structure(path: str | Path) -> Structure:
    """One CIF/POSCAR file as a Structure a graph can be built from.

    Checked here, so the message can name the file: parsable, ordered (no partial
    occupancies: a graph needs one element per site), elements the atom features cover,
    and the cleaning rules of the data sets (sites present, none closer than 0.5 Å).
    """
    path = Path(path)
    if not path.is_file():
        raise StructureFileError(f"{path}: structure file not found")
    kind = "CIF" if path.suffix.lower() == ".cif" else "structure file"
    try:
        with warnings.catch_warnings():  # pymatgen warns about every rounding it fixes
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as err:  # noqa: BLE001 - every parser failure gets the same line
        why = str(err).splitlines()[0] if str(err) else ""
        raise StructureFileError(
            f"{path}: unparsable {kind} ({type(err).__name__}{': ' + why if why else ''})"
        ) from None
    problem = structure_problem(structure)
    if problem:
        raise StructureFileError(f"{path}: {problem}")
    return structure


def structure_problem(structure: Structure) -> str | None:
    """Why a parsed structure cannot be featurized, or None when it can."""
    if not structure.is_ordered:
        return "disordered structure (partial occupancies); give one element per site"
    checked = _as_structure(structure)
    if isinstance(checked, str):
        return checked
    beyond = sorted({site.specie.symbol for site in structure if site.specie.Z > MAX_Z})
    if beyond:
        return f"element(s) {beyond} beyond Z = {MAX_Z}, which the atom features cover"
    return None


def structure_inputs(source: Path) -> list[tuple[str, Path]]:
    """``(id, file)`` of every structure file ``source`` names: itself, or the files of a
    folder (ids below it). A folder without structure files is an error."""
    source = Path(source)
    if source.is_dir():
        found = structure_files(source)
        if not found:
            raise StructureFileError(
                f"{source}: no structure files (*.cif, *.vasp, *.poscar, POSCAR*, CONTCAR*) "
                "in this folder"
            )
        return [(file_id(p, source), p) for p in found]
    if source.exists():
        return [(file_id(source), source)]
    raise StructureFileError(f"{source}: no such file or folder")
