"""Building blocks shared by the ALIGNN and CGCNN backbones.

Everything here is plain PyTorch on flat tensors (no DGL, no torch-scatter), so the models run
on a stock CPU install of torch + torch-geometric.
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
from pathlib import Path

import torch
from torch import nn

from tlmat.graphs import atom_feature_table

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _cgcnn_table() -> torch.Tensor:
    """The 92-dim CGCNN table, read once per process (it is parsed from JSON)."""
    return atom_feature_table("cgcnn")


def cgcnn_feature_table() -> torch.Tensor:
    """A fresh copy of the CGCNN table, so a model's buffer never aliases the cached one."""
    return _cgcnn_table().clone()


class RBFExpansion(nn.Module):
    """Gaussian basis on ``[vmin, vmax]`` with SchNet's width (gamma = 1 / bin spacing).

    This is ALIGNN's ``RBFExpansion`` (``lengthscale=None``) so the inputs are the paper's.
    """

    def __init__(self, vmin: float, vmax: float, bins: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(vmin, vmax, bins), persistent=False)
        spacing = (vmax - vmin) / (bins - 1) if bins > 1 else 1.0
        self.gamma = 1.0 / spacing

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (values.unsqueeze(1) - self.centers) ** 2)

    def extra_repr(self) -> str:
        c = self.centers
        return f"vmin={float(c[0]):g}, vmax={float(c[-1]):g}, bins={c.numel()}"


class MLPLayer(nn.Sequential):
    """ALIGNN's ``MLPLayer``: Linear -> BatchNorm1d -> SiLU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.SiLU()
        )


def make_readout(hidden: int, layers: int) -> nn.Module:
    """``layers`` blocks of Linear(hidden, hidden) + SiLU after pooling.

    This is the part the transfer-learning strategies re-initialise or fine-tune separately
    from the graph layers; with ``layers=0`` it is an ``nn.Sequential()`` that passes its
    input through, so ``backbone.readout`` always exists and freezing it is always legal.
    """
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, hidden), nn.SiLU()]
    return nn.Sequential(*blocks)


def mean_pool(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Average of the node rows of each graph (ALIGNN's ``AvgPooling``), one scatter."""
    summed = x.new_zeros(num_graphs, x.shape[1]).index_add_(0, batch, x)
    counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(x.dtype)
    return summed / counts.unsqueeze(1)


def graph_assignment(batch) -> tuple[torch.Tensor, int]:
    """(graph index of every node, number of graphs); a lone ``Data`` counts as one graph."""
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.zeros(batch.z.numel(), dtype=torch.long, device=batch.z.device), 1
    return index, int(batch.num_graphs)


# --------------------------------------------------------------------------------------------
# Native CPU kernels: a small C file compiled on first use and called through ctypes.
#
# Why: on CPU the ALIGNN line graph makes the model memory-bound; eager PyTorch walks the
# [bond pairs, hidden] tensors ~40 times per layer, a fused loop ~10 times. C without torch
# headers builds in about a second (a torch C++ extension takes tens of seconds) and needs a C
# compiler; ctypes releases the GIL, so chunks run in parallel on Python threads. Without a
# compiler, or with TLMAT_NATIVE=0, callers fall back to their pure-PyTorch path.
# --------------------------------------------------------------------------------------------

_FLAG_SETS = (
    # vectorised expf comes from glibc's libmvec, which gcc only calls under -ffast-math;
    # -ffast-math is given to the compile step only, so the link does not add crtfastmath
    # (which would switch the whole process to flush-denormals-to-zero)
    (["-O3", "-march=native", "-ffast-math"], ["-lmvec", "-lm"]),
    (["-O3"], ["-lm"]),
)


def native_enabled() -> bool:
    """False when the user switched native kernels off with ``TLMAT_NATIVE=0``."""
    return os.environ.get("TLMAT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


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
                    _build(compiler, source, cflags, libs, target)
                return ctypes.CDLL(str(target))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                errors.append(str(err))
    raise RuntimeError("; ".join(errors))


def _build(compiler: str, source: str, cflags: list[str], libs: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_file, obj, lib = Path(tmp, "k.c"), Path(tmp, "k.o"), Path(tmp, "k.so")
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
def load_native(source: str, name: str, signatures: tuple[tuple[str, str], ...]):
    """The compiled library, or None (logged once) if it cannot be built on this machine.

    ``signatures`` lists (function, argument kinds): ``i`` a 64-bit integer, ``p`` a pointer
    (a tensor's ``data_ptr()``, or 0 for NULL).
    """
    if not native_enabled():
        return None
    try:
        lib = _compile(source, name)
        kinds = {"i": ctypes.c_int64, "p": ctypes.c_void_p}
        for fn, args in signatures:
            getattr(lib, fn).argtypes = [kinds[a] for a in args]
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


def run_chunks(fn, chunks: list[tuple[int, int]], args) -> None:
    """Call ``fn(*args(i, start, stop))`` for every chunk, in parallel on Python threads."""
    first = args(0, *chunks[0])
    if len(first) != len(fn.argtypes):  # ctypes would silently accept extra arguments
        raise TypeError(f"{fn.__name__}: {len(first)} arguments for {len(fn.argtypes)}")
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
_ALLOCATOR_TUNED: list[bool] = []


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Why: a training step allocates and frees tens of [bond pairs, hidden] tensors of ~20 MB.
    By default glibc serves those with fresh ``mmap`` pages and unmaps them on free, so every
    step pays ~6,000 page faults per tensor; on a VM that was a quarter of the step time.
    With ``mmap`` off and trimming effectively off, freed blocks are reused. The cost is that
    the process's RSS stays at its peak. Idempotent; skipped (False) on non-glibc systems or
    with ``TLMAT_MALLOC_TUNE=0``.
    """
    if _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED[0]
    ok = False
    if os.environ.get("TLMAT_MALLOC_TUNE", "1") != "0" and platform.system() == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            )
        except (OSError, AttributeError):
            ok = False
    _ALLOCATOR_TUNED.append(ok)
    return ok
