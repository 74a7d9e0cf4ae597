"""Atomic file writes: the one place that writes through a temporary name and renames.

A workflow engine (or a reader such as the next job) must never see a half-written file,
even when the writing process is killed or the disk fills mid-write: every artefact of
tlmat (frames, splits, graph caches, checkpoints, run outputs, tables) is written to a
temporary file in the destination's directory and moved into place with ``os.replace``.
Torch-free, so the plan and the report can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    The suffix of ``path`` is kept (``.json.gz`` writers infer compression from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


@contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield temporary paths for several files; on success rename them in the given order.

    A run directory is complete when its last file (``metrics.json``) appears, so callers
    list that one last. On any failure, before or during the renames, every temporary file
    and every file already moved by this call is removed: nothing of the attempt remains.
    """
    targets = [Path(p) for p in paths]
    temporary = [t.with_name(f".{t.name}.partial") for t in targets]
    moved: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        for tmp, target in zip(temporary, targets, strict=True):
            os.replace(tmp, target)
            moved.append(target)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
