"""Native CPU kernels: C files shipped in ``tlmat/models/kernels``, built on first use, ctypes.

Why: on CPU the ALIGNN line graph makes the model memory-bound; eager PyTorch walks the
[bond pairs, hidden] tensors ~40 times per layer, a fused loop ~10 times. C without torch
headers builds in about a second (a torch C++ extension takes tens of seconds) and needs only
a C compiler; ctypes releases the GIL, so chunks run in parallel on Python threads. Without a
compiler, or with ``TLMAT_NATIVE=0``, ``load`` returns None and callers take their
pure-PyTorch path.

This module is the only place that knows how kernels are built, cached and called; a model
file names its kernel file and the argument kinds of its functions (``load``), then runs them
over row chunks (``parallel_chunks``, ``run_chunks``). Nothing is compiled at import time.

Environment:

* ``TLMAT_NATIVE=0`` (or false/no/off): never build or load kernels;
* ``TLMAT_KERNEL_CACHE``: directory for built libraries (default ``$XDG_CACHE_HOME`` or
  ``~/.cache``, then ``tlmat/kernels``, with ``$TMPDIR/tlmat-kernels-<uid>`` as fallback);
* ``CC``: the C compiler (default ``gcc``, else ``cc``);
* ``TLMAT_MALLOC_TUNE=0``: ``tune_malloc`` leaves glibc's allocator alone.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "tlmat.models"
KERNEL_DIR = "kernels"

_FLAG_SETS = (
    # vectorised expf comes from glibc's libmvec, which gcc only calls under -ffast-math;
    # -ffast-math is given to the compile step only, so the link does not add crtfastmath
    # (which would switch the whole process to flush-denormals-to-zero)
    (["-O3", "-march=native", "-ffast-math"], ["-lmvec", "-lm"]),
    (["-O3"], ["-lm"]),
)

# argument kinds of a kernel function: i = 64-bit integer, p = pointer (data_ptr(), 0 = NULL)
_ARG_KINDS = {"i": ctypes.c_int64, "p": ctypes.c_void_p}


def native_enabled() -> bool:
    """False when the user switched native kernels off with ``TLMAT_NATIVE=0``."""
    return os.environ.get("TLMAT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_source(name: str) -> str:
    """The text of the packaged ``kernels/<name>.c``, read through ``importlib.resources``.

    Why resources and not ``__file__``: the package may be installed from a wheel or a zip,
    and the C file is package data like the YAML schemas.
    """
    path = resources.files(KERNEL_PACKAGE) / KERNEL_DIR / f"{name}.c"
    return path.read_text(encoding="utf-8")


def _cache_dirs() -> list[Path]:
    """Where built libraries are kept: $TLMAT_KERNEL_CACHE, else the user cache, else /tmp."""
    if os.environ.get("TLMAT_KERNEL_CACHE"):
        return [Path(os.environ["TLMAT_KERNEL_CACHE"])]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [
        base / "tlmat" / "kernels",
        Path(tempfile.gettempdir()) / f"tlmat-kernels-{os.getuid()}",
    ]


def _machine_tag() -> str:
    """CPU identity for the cache key: a library built with -march=native is per CPU model."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _compile(source: str, name: str) -> ctypes.CDLL:
    """The library built from ``source``, from the cache when an identical build exists.

    The cache key hashes the source text, compiler, flags and CPU, so editing the .c file,
    switching compilers or moving the cache to another CPU model triggers a fresh build.
    Flag sets and cache directories are tried in order; all errors are reported together.
    """
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    errors = []
    for cflags, libs in _FLAG_SETS:
        key = hashlib.sha1(
            "\n".join([source, compiler, *cflags, *libs, _machine_tag()]).encode()
        ).hexdigest()[:16]
        for directory in _cache_dirs():
            target = directory / f"{name}-{key}.so"
            try:
                if not target.exists():
                    _build(compiler, source, name, cflags, libs, target)
                return ctypes.CDLL(str(target))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                errors.append(str(err))
    raise RuntimeError("; ".join(errors))


def _build(
    compiler: str, source: str, name: str, cflags: list[str], libs: list[str], target: Path
) -> None:
    """Compile and link in a private temp dir next to ``target``, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # the hashed text is what gets compiled (not the packaged path), so key and library
        # always match; the file keeps its name so compiler messages point at <name>.c
        c_file, obj, lib = Path(tmp, f"{name}.c"), Path(tmp, "k.o"), Path(tmp, "k.so")
        c_file.write_text(source)
        for cmd in (
            [compiler, *cflags, "-fPIC", "-c", str(c_file), "-o", str(obj)],
            [compiler, "-shared", str(obj), "-o", str(lib), *libs],
        ):
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: {run.stderr.strip()[-2000:]}")
        os.replace(lib, target)  # atomic: concurrent builders never see half a file


@functools.cache
def load(name: str, signatures: tuple[tuple[str, str], ...]) -> ctypes.CDLL | None:
    """The compiled ``kernels/<name>.c``, or None (logged once) if it cannot be used here.

    ``signatures`` lists (function, argument kinds): ``i`` a 64-bit integer, ``p`` a pointer
    (a tensor's ``data_ptr()``, or 0 for NULL); every function returns void. Built on the
    first call and cached per process, so importing a model never compiles anything.
    """
    if not native_enabled():
        return None
    try:
        lib = _compile(kernel_source(name), name)
        for fn, args in signatures:
            getattr(lib, fn).argtypes = [_ARG_KINDS[a] for a in args]
            getattr(lib, fn).restype = None
        return lib
    except Exception as err:  # noqa: BLE001 - any failure means: use the PyTorch path
        log.warning("native %s kernels unavailable, using the PyTorch path: %s", name, err)
        return None


# (owning pid, workers, pool): a forked child inherits the object but not its threads, so
# it must not reuse the parent's pool (its futures would never run)
_POOL: list[tuple[int, int, concurrent.futures.ThreadPoolExecutor]] = []


MIN_CHUNK_ROWS = 1024  # below this a thread hand-off costs more than it saves


def parallel_chunks(rows: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per torch thread (fewer for small inputs)."""
    k = max(1, min(torch.get_num_threads(), rows // MIN_CHUNK_ROWS))
    bounds = [rows * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def run_chunks(
    fn: Callable[..., object],
    chunks: list[tuple[int, int]],
    args: Callable[[int, int, int], Sequence[object]],
) -> None:
    """Call ``fn(*args(i, start, stop))`` for every chunk, in parallel on Python threads.

    ``fn`` is a kernel function from ``load`` (anything with ``argtypes``); its arity is
    checked because ctypes would silently accept extra arguments.
    """
    first = args(0, *chunks[0])
    argtypes = fn.argtypes  # type: ignore[attr-defined]
    if len(first) != len(argtypes):
        raise TypeError(f"{fn.__name__}: {len(first)} arguments for {len(argtypes)}")
    if len(chunks) == 1:
        fn(*first)
        return
    workers = len(chunks) - 1
    if not _POOL or _POOL[0][0] != os.getpid() or _POOL[0][1] < workers:
        if _POOL and _POOL[0][0] == os.getpid():
            _POOL[0][2].shutdown(wait=False)
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tlmat")
        _POOL[:] = [(os.getpid(), workers, pool)]
    pool = _POOL[0][2]
    futures = [pool.submit(fn, *args(i, *c)) for i, c in enumerate(chunks) if i > 0]
    fn(*first)
    for future in futures:
        future.result()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_TUNED: list[bool] = []


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Why: a training step allocates and frees tens of [bond pairs, hidden] tensors of ~20 MB.
    By default glibc serves those with fresh ``mmap`` pages and unmaps them on free, so every
    step pays ~6,000 page faults per tensor; on a VM that was a quarter of the step time.
    With ``mmap`` off and trimming effectively off, freed blocks are reused. The cost is that
    the process's RSS stays at its peak.

    This changes a process-wide setting, so the library never calls it on its own: the
    ``tlmat`` command line calls it once in ``main()``, and scripts that train or benchmark
    in-process (tests, notebooks, ``benchmarks/run.py``) must call it themselves if they want
    the speed. Idempotent; skipped (False) on non-glibc systems or with
    ``TLMAT_MALLOC_TUNE=0``.
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    ok = False
    if os.environ.get("TLMAT_MALLOC_TUNE", "1") != "0" and platform.system() == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            )
        except (OSError, AttributeError):
            ok = False
    _MALLOC_TUNED.append(ok)
    return ok
