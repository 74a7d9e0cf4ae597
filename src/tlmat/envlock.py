"""The pinned environment: ``requirements/lock.txt`` and the conda files made from it.

A rerun of the study months later must get the same numbers, and the same numbers need the
same library versions, not whatever PyPI serves that day. So ``pyproject.toml`` keeps the
*bounds* a user may install, while ``requirements/lock.txt`` holds the one exact, hashed set
that ``make install`` (hence ``make test``, ``make demo`` and CI) installs. The lock is made by
pip-tools' ``pip-compile`` (it uses pip's own resolver and configuration, so it sees the
index and wheels pip sees), never by hand; ``make lock`` runs :func:`lock`.

torch is the one exception: its build (CPU, CUDA x.y) depends on the machine, not on the
study, so the lock leaves it out (``--unsafe-package torch``) and ``make install`` installs
``requirements/torch.txt``'s pin first, as it always did; the lock is resolved *with* that
pin, so torch's own dependencies are locked too.

``envs/tlmat.yaml`` (CPU) and ``envs/tlmat-gpu.yaml`` are written from the lock by the same
command, so the conda environments cannot drift from it; ``tests/test_lock.py`` checks that
the three agree and that the lock still answers ``pyproject.toml``.

Usage (from the repository root): ``python -m tlmat.envlock lock [pip-compile options]``
(e.g. ``--upgrade`` or ``--upgrade-package numpy``), ``python -m tlmat.envlock conda``,
``python -m tlmat.envlock check``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

LOCK = Path("requirements/lock.txt")
TORCH_PIN = Path("requirements/torch.txt")
PYPROJECT = Path("pyproject.toml")
#: the command pip-compile names in the lock's header (how to regenerate it)
COMPILE_COMMAND = "make lock"
#: extras locked beside the runtime dependencies (``make install`` installs ``.[dev]``)
LOCKED_EXTRAS: tuple[str, ...] = ("dev",)
#: left out of the lock: its build is the machine's choice (``requirements/torch.txt``)
UNLOCKED = canonicalize_name("torch")
#: conda environment file -> (torch index, what it is for); ``None`` = pip's default index,
#: which under Linux serves the CUDA build of torch
CONDA_ENVS: dict[Path, tuple[str | None, str]] = {
    Path("envs/tlmat.yaml"): (
        "https://download.pytorch.org/whl/cpu",
        "CPU build of torch; the environment every rule names (`conda:`).",
    ),
    Path("envs/tlmat-gpu.yaml"): (
        None,
        "PyPI's Linux torch wheel, a CUDA build (torch's nvidia-* wheels are not locked).",
    ),
}


class LockError(RuntimeError):
    """The lock cannot be made or read; the message is one line that says what to do."""


@dataclass(frozen=True)
class Pin:
    """One locked package: its exact version and what requires it (pip-compile's ``via``)."""

    version: str
    via: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- reading


_PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_VIA_ONE = re.compile(r"^\s+# via (.+)$")
_VIA_MORE = re.compile(r"^\s+#   (.+)$")


def read_lock(path: Path | str) -> dict[NormalizedName, Pin]:
    """The pins of a pip-compile output file, by canonical name, with their ``via`` notes."""
    path = Path(path)
    if not path.is_file():
        raise LockError(f"{path}: no lock file; run `{COMPILE_COMMAND}`")
    pins: dict[NormalizedName, Pin] = {}
    current: NormalizedName | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _PIN_LINE.match(line):
            current = canonicalize_name(match[1])
            pins[current] = Pin(match[2])
        elif current is not None and (match := _VIA_ONE.match(line) or _VIA_MORE.match(line)):
            note = match[1].strip()
            if note:
                pins[current] = Pin(pins[current].version, (*pins[current].via, note))
        elif not line.startswith(" "):
            current = None
    return pins


def lock_python(path: Path | str) -> str:
    """The Python version (``3.11``) the lock was compiled with, from pip-compile's header."""
    match = re.search(r"pip-compile with Python (\d+\.\d+)", Path(path).read_text("utf-8"))
    if not match:
        raise LockError(f"{path}: no 'pip-compile with Python X.Y' header; run `make lock`")
    return match[1]


def torch_pin(path: Path | str = TORCH_PIN) -> Requirement:
    """The torch requirement ``make install`` installs first (``torch==X.Y.Z``)."""
    lines = [ln.split("#")[0].strip() for ln in Path(path).read_text("utf-8").splitlines()]
    specs = [Requirement(ln) for ln in lines if ln]
    if len(specs) != 1 or canonicalize_name(specs[0].name) != UNLOCKED:
        raise LockError(f"{path}: expected exactly one line 'torch==<version>'")
    return specs[0]


def declared(pyproject: Path | str, extras: Sequence[str] = LOCKED_EXTRAS) -> list[Requirement]:
    """Every requirement of ``pyproject.toml``: the dependencies, then the locked extras."""
    project = tomllib.loads(Path(pyproject).read_text("utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    specs = [*project.get("dependencies", []), *(s for e in extras for s in optional.get(e, []))]
    return [Requirement(spec) for spec in specs]


# ----------------------------------------------------------------------------- checking


def unmet_bounds(
    pyproject: Path | str = PYPROJECT, lock_file: Path | str = LOCK, torch: Path | str = TORCH_PIN
) -> list[str]:
    """One line per dependency of ``pyproject.toml`` that the lock does not pin inside its bound.

    The cheap check (no resolver, no network): it catches a bound raised or a dependency
    added without ``make lock``. torch is checked against ``requirements/torch.txt``.
    """
    pins = read_lock(lock_file)
    torch_version = next(iter(torch_pin(torch).specifier)).version
    problems = []
    for req in declared(pyproject):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name == UNLOCKED:
            version, where = torch_version, str(torch)
        elif name in pins:
            version, where = pins[name].version, str(lock_file)
        else:
            problems.append(f"{req} is not pinned in {lock_file}: run `{COMPILE_COMMAND}`")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(
                f"pyproject.toml asks {req} but {where} pins {req.name}=={version}: "
                f"run `{COMPILE_COMMAND}`"
            )
    return problems


def compile_command(output: Path | str, *, hashes: bool, extra: Sequence[str] = ()) -> list[str]:
    """The pip-compile call that makes the lock (run from the repository root).

    Index and find-links options are not written into the lock: they are this machine's pip
    configuration, not the project's. The build backend runs in this environment
    (``--no-build-isolation``: setuptools is locked) so that no build environment is fetched.
    """
    return [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        *(f"--extra={extra_name}" for extra_name in LOCKED_EXTRAS),
        "--strip-extras",
        f"--unsafe-package={UNLOCKED}",
        f"--constraint={TORCH_PIN}",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--no-emit-trusted-host",
        "--no-build-isolation",
        *(["--generate-hashes"] if hashes else []),
        f"--output-file={output}",
        *extra,
        str(PYPROJECT),
    ]


def _pip_compile(root: Path, output: Path | str, *, hashes: bool, extra: Sequence[str] = ()):
    """Run pip-compile in ``root``; a failure is one line plus pip-compile's own last words."""
    if shutil.which("pip-compile") is None and not _has_piptools():
        raise LockError("pip-compile is not installed: `make install` (pip-tools is a dev extra)")
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": COMPILE_COMMAND}
    done = subprocess.run(
        compile_command(output, hashes=hashes, extra=extra),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = [ln for ln in done.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        raise LockError(f"pip-compile failed in {root}: {' | '.join(last[-3:])}")


def _has_piptools() -> bool:
    try:
        import piptools  # noqa: F401
    except ImportError:
        return False
    return True


def recompile(root: Path | str = ".") -> dict[NormalizedName, Pin]:
    """What pip-compile makes of ``root``'s pyproject.toml now, starting from its lock.

    pip-compile keeps the pins of an existing output file wherever they still fit, so on an
    unchanged ``pyproject.toml`` it reproduces the lock, and any difference means the lock is
    stale. It runs on a copy (the lock is never rewritten) and without hashes, which pip
    checks at install time and which depend on which indexes this machine's pip sees.
    """
    root = Path(root)
    with tempfile.TemporaryDirectory(prefix="tlmat-lock-") as tmp:
        work = Path(tmp)
        for name in (PYPROJECT, TORCH_PIN, Path("README.md")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, work / name)
        (work / LOCK).write_text(_without_hashes((root / LOCK).read_text("utf-8")), "utf-8")
        _pip_compile(work, LOCK, hashes=False)
        return read_lock(work / LOCK)


def _without_hashes(text: str) -> str:
    """A hashed pip-compile file as the unhashed one: pins and notes, no ``--hash`` lines."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--hash=")]
    return "\n".join(ln.removesuffix(" \\") for ln in lines) + "\n"


def differences(
    expected: Mapping[NormalizedName, Pin], actual: Mapping[NormalizedName, Pin]
) -> list[str]:
    """One line per package whose pin or ``via`` differs between two locks."""
    lines = []
    for name in sorted(set(expected) | set(actual)):
        old, new = actual.get(name), expected.get(name)
        if old is None:
            lines.append(f"{name}=={new.version} is missing from the lock")
        elif new is None:
            lines.append(f"{name}=={old.version} is locked but no longer required")
        elif old.version != new.version:
            lines.append(f"{name} is locked at {old.version}, pip-compile now picks {new.version}")
        elif old.via != new.via:
            lines.append(
                f"{name}: required by {', '.join(new.via)}, lock says {', '.join(old.via)}"
            )
    return lines


def stale(root: Path | str = ".") -> list[str]:
    """Why ``root``'s lock no longer answers its pyproject.toml (empty: it is current)."""
    root = Path(root)
    problems = unmet_bounds(root / PYPROJECT, root / LOCK, root / TORCH_PIN)
    if problems:  # no need to run the resolver to know
        return problems
    return differences(recompile(root), read_lock(root / LOCK))


# ----------------------------------------------------------------------------- conda


def runtime_names(pins: Mapping[NormalizedName, Pin], roots: Iterable[str]) -> set[str]:
    """The locked packages the study needs at run time: ``roots`` and all they require.

    The dev tools (pytest, ruff, pip-tools …) and what only they require stay out of the
    conda environments, which exist to run the rules. The graph is read from pip-compile's
    ``via`` notes: ``b  # via a`` is the edge a → b.
    """
    children: dict[str, set[str]] = {}
    for name, pin in pins.items():
        for parent in pin.via:
            if not parent.startswith("-") and "(" not in parent:
                children.setdefault(canonicalize_name(parent), set()).add(name)
    seen: set[str] = set()
    todo = [canonicalize_name(root) for root in roots]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(children.get(name, ()))
    return seen


def conda_env(
    pins: Mapping[NormalizedName, Pin],
    python: str,
    torch: Requirement,
    runtime: Sequence[Requirement],
    torch_index: str | None,
    about: str,
) -> str:
    """The text of one conda environment file: Python from conda-forge, the lock's pins by pip.

    Everything goes through pip so that the versions are exactly the lock's (conda-forge
    builds would be other versions or other builds); tlmat itself is installed by
    ``envs/tlmat.post-deploy.sh`` under Snakemake, or by hand (docs/install.md).
    """
    names = runtime_names(pins, [req.name for req in runtime])
    lines = [
        f"# Generated from {LOCK} by `{COMPILE_COMMAND}` (python -m tlmat.envlock): do not edit.",
        f"# {about}",
        "# Exact versions of the lock; see docs/install.md#conda.",
        "name: tlmat" if torch_index else "name: tlmat-gpu",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
    ]
    if torch_index:
        lines.append(f"      - --extra-index-url {torch_index}")
    lines.append(f"      - {torch}")
    lines += [f"      - {name}=={pins[name].version}" for name in sorted(names) if name in pins]
    return "\n".join(lines) + "\n"


def write_conda_envs(root: Path | str = ".") -> list[Path]:
    """(Re)write every file of :data:`CONDA_ENVS` from the lock."""
    root = Path(root)
    pins = read_lock(root / LOCK)
    python = lock_python(root / LOCK)
    torch = torch_pin(root / TORCH_PIN)
    runtime = declared(root / PYPROJECT, extras=())
    written = []
    for path, (index, about) in CONDA_ENVS.items():
        text = conda_env(pins, python, torch, runtime, index, about)
        (root / path).write_text(text, encoding="utf-8")
        written.append(root / path)
    return written


def conda_drift(root: Path | str = ".") -> list[str]:
    """The conda files that differ from what the lock makes (empty: they agree)."""
    root = Path(root)
    pins = read_lock(root / LOCK)
    python = lock_python(root / LOCK)
    torch = torch_pin(root / TORCH_PIN)
    runtime = declared(root / PYPROJECT, extras=())
    drift = []
    for path, (index, about) in CONDA_ENVS.items():
        want = conda_env(pins, python, torch, runtime, index, about)
        have = (root / path).read_text("utf-8") if (root / path).is_file() else ""
        if have != want:
            drift.append(f"{path} differs from {LOCK}: run `{COMPILE_COMMAND}`")
    return drift


# ----------------------------------------------------------------------------- commands


def lock(root: Path | str = ".", extra: Sequence[str] = ()) -> list[Path]:
    """Regenerate the lock with pip-compile (``extra``: e.g. ``--upgrade``), then conda files."""
    root = Path(root)
    _pip_compile(root, LOCK, hashes=True, extra=extra)
    problems = unmet_bounds(root / PYPROJECT, root / LOCK, root / TORCH_PIN)
    if problems:
        raise LockError(problems[0])
    return [root / LOCK, *write_conda_envs(root)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tlmat.envlock {lock,conda,check}``; errors are one line on stderr."""
    parser = argparse.ArgumentParser(prog="python -m tlmat.envlock", description=__doc__)
    parser.add_argument("verb", choices=("lock", "conda", "check"))
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root")
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb != "lock":
        parser.error(f"unknown arguments: {' '.join(extra)}")
    try:
        if args.verb == "lock":
            for path in lock(args.root, extra):
                print(f"wrote {path}")
        elif args.verb == "conda":
            for path in write_conda_envs(args.root):
                print(f"wrote {path}")
        else:
            problems = stale(args.root) + conda_drift(args.root)
            for line in problems:
                print(line, file=sys.stderr)
            return 1 if problems else 0
    except LockError as err:
        print(f"tlmat.envlock: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
