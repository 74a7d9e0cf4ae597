"""The pinned environment: requirements/lock.txt answers pyproject.toml, and the rest follows it.

A lock that has drifted from ``pyproject.toml`` silently installs something else than the
project declares, so these tests fail as soon as the two disagree: a cheap check (every
declared dependency pinned inside its bound) and pip-compile's own verdict (resolving again,
starting from the lock, changes nothing). The conda files and the Makefile's torch must say
what the lock says, and the environment running the tests must be the locked one.
"""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from tlmat import envlock

ROOT = Path(__file__).resolve().parents[1]


def needs_pip_compile() -> None:
    """pip-compile's check needs pip-tools (a dev extra) and the lock's Python and index."""
    pytest.importorskip("piptools", reason="pip-tools is not installed: run `make install`")
    python = envlock.lock_python(ROOT / envlock.LOCK)
    if f"{sys.version_info.major}.{sys.version_info.minor}" != python:
        pytest.skip(f"the lock is compiled for Python {python}; pip-compile may differ here")


def copy_project(tmp_path: Path) -> Path:
    """The files the lock is made from, in a scratch root (the real ones are never edited)."""
    for name in (envlock.PYPROJECT, envlock.TORCH_PIN, envlock.LOCK, Path("README.md")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    return tmp_path


def test_every_dependency_is_pinned_inside_its_bound() -> None:
    assert (
        envlock.unmet_bounds(
            ROOT / envlock.PYPROJECT, ROOT / envlock.LOCK, ROOT / envlock.TORCH_PIN
        )
        == []
    )
    names = {canonicalize_name(r.name) for r in envlock.declared(ROOT / envlock.PYPROJECT)}
    assert {"pytest", "ruff", "snakefmt", "pip-tools"} <= names  # the dev extra is locked


def test_lock_is_what_pip_compile_makes() -> None:
    needs_pip_compile()
    assert (
        envlock.differences(envlock.recompile(ROOT), envlock.read_lock(ROOT / envlock.LOCK)) == []
    )


def test_changing_a_bound_without_relocking_fails(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    locked = envlock.read_lock(root / envlock.LOCK)["tqdm"].version
    pyproject = root / envlock.PYPROJECT
    text, n = re.subn(r'"tqdm>=[^"]*"', f'"tqdm>=4.66,<{locked}"', pyproject.read_text())
    assert n == 1
    pyproject.write_text(text)

    problems = envlock.unmet_bounds(pyproject, root / envlock.LOCK, root / envlock.TORCH_PIN)
    assert len(problems) == 1 and "tqdm" in problems[0] and "make lock" in problems[0]
    assert envlock.stale(root) == problems
    needs_pip_compile()  # and pip-compile itself sees it: it would pick an older tqdm
    changed = envlock.differences(envlock.recompile(root), envlock.read_lock(root / envlock.LOCK))
    assert any(line.startswith(f"tqdm is locked at {locked}") for line in changed), changed


def test_a_new_dependency_without_relocking_fails(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    pyproject = root / envlock.PYPROJECT
    pyproject.write_text(pyproject.read_text().replace('"psutil>=5.9",', '"psutil>=5.9", "six",'))
    problems = envlock.stale(root)
    assert problems == [f"six is not pinned in {root / envlock.LOCK}: run `make lock`"]


def test_conda_environments_are_made_from_the_lock() -> None:
    assert envlock.conda_drift(ROOT) == []
    pins = envlock.read_lock(ROOT / envlock.LOCK)
    torch = str(envlock.torch_pin(ROOT / envlock.TORCH_PIN))
    for path in envlock.CONDA_ENVS:
        env = yaml.safe_load((ROOT / path).read_text())
        deps = env["dependencies"]
        assert f"python={envlock.lock_python(ROOT / envlock.LOCK)}" in deps
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        assert torch in pip
        pinned = dict(line.split("==") for line in pip if "==" in line and line != torch)
        assert {"numpy", "torch-geometric", "snakemake", "pymatgen"} <= set(pinned)
        assert "pytest" not in pinned and "pip-tools" not in pinned  # run time only
        assert all(pins[canonicalize_name(n)].version == v for n, v in pinned.items())
    assert (ROOT / "envs/tlmat.post-deploy.sh").is_file()  # installs tlmat under Snakemake


def test_makefile_installs_the_lock_after_the_locked_torch() -> None:
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M)
    assert spec and spec[1] == str(envlock.torch_pin(ROOT / envlock.TORCH_PIN))
    install = makefile.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "$(LOCK)" in install.splitlines()[0]  # a new lock reinstalls
    steps = [line.strip() for line in install.splitlines()[1:]]
    torch_step = next(i for i, s in enumerate(steps) if "$(TORCH_SPEC)" in s)
    lock_step = steps.index("$(BIN)/python -m pip install --quiet -r $(LOCK)")
    assert (
        torch_step < lock_step < steps.index("$(BIN)/python -m pip install --quiet --no-deps -e .")
    )
    assert re.search(r"^LOCK := requirements/lock.txt$", makefile, re.M)


def test_the_running_environment_is_the_locked_one() -> None:
    # `make test` installs the lock before pytest runs: every locked version must be the one here
    wrong = []
    for name, pin in envlock.read_lock(ROOT / envlock.LOCK).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != pin.version:
            wrong.append(f"{name}: {have}, locked {pin.version}")
    assert wrong == [], "not the locked environment, run `make install`: " + "; ".join(wrong)


def test_read_lock_keeps_versions_and_via(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "#    make lock\n#\nFoo_Bar==1.2 \\\n    --hash=sha256:ab\n    # via\n"
        "    #   baz\n    #   tlmat (pyproject.toml)\nqux==3.0\n    # via foo-bar\n\n"
        "# The following packages are considered to be unsafe in a requirements file:\n"
        "# torch\n"
    )
    pins = envlock.read_lock(lock)
    assert pins == {
        "foo-bar": envlock.Pin("1.2", ("baz", "tlmat (pyproject.toml)")),
        "qux": envlock.Pin("3.0", ("foo-bar",)),
    }
    assert envlock.runtime_names(pins, ["Foo_Bar"]) == {"foo-bar", "qux"}
    with pytest.raises(envlock.LockError, match="no lock file; run `make lock`"):
        envlock.read_lock(tmp_path / "missing.txt")
