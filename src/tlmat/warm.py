"""Warm start: a resident process that has imported torch, PyG and pymatgen forks each job.

A training job spends ≈4.5 s of a 2-core machine importing torch, torch-geometric (which
pulls in torch._dynamo), pymatgen and scikit-learn before its first step; the quick study
runs 166 of them. With ``TLMAT_WARM=1`` (the workflow sets it) a ``tlmat`` training verb
does not import any of that: it connects to a per-machine server over a Unix socket, hands
over its argv, environment, working directory and stdin/stdout/stderr, and the server
forks a child that runs :func:`tlmat.cli.main` as the job would have, writes to the job's
own log, and reports its exit status back. The child is the same code on the same inputs:
every random choice is seeded inside the job, so the numbers do not change (checked by
tests/test_warm.py and by the demo's tables).

- The first job on a machine starts the server (``tlmat _warm-server``) and waits for it;
  the server exits after :data:`IDLE_SECONDS` (``TLMAT_WARM_IDLE``, default 120) without
  a job. Jobs that cannot reach a
  server (none starts, socket refused) run in their own process as before.
- One server per interpreter, working directory and source tree: the socket name hashes
  them, so editing tlmat's code never runs a job with stale code.
- A job whose client dies (Snakemake cancels it, SLURM preempts it) dies with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SERVE_VERB = "_warm-server"
"""``tlmat _warm-server SOCKET``: the server's entry (hidden from ``tlmat --help``)."""
ENV_FLAG = "TLMAT_WARM"
"""``1``: training verbs run in a forked child of the warm server (set by the workflow)."""
INSIDE_FLAG = "TLMAT_WARM_CHILD"
VERBS = ("train", "finetune", "mpt")
IDLE_SECONDS = float(os.environ.get("TLMAT_WARM_IDLE", 120))
START_TIMEOUT = 120.0
_EXIT = struct.Struct("!i")


def enabled(argv: Sequence[str]) -> bool:
    """Whether this invocation should be forwarded to the warm server."""
    return (
        os.environ.get(ENV_FLAG) == "1"
        and not os.environ.get(INSIDE_FLAG)
        and bool(argv)
        and argv[0] in VERBS
    )


def _source_fingerprint() -> str:
    """Names, sizes and mtimes of the package's files: any edit gives another server."""
    root = Path(__file__).parent
    entries = sorted(
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in root.rglob("*")
        if p.suffix in (".py", ".c", ".yaml") and "__pycache__" not in p.parts
    )
    return "\n".join(entries)


def socket_path(cwd: str | None = None) -> Path:
    """The server's socket for this interpreter, working directory, source tree and SLURM
    job (a child must run inside its own job's allocation and accounting)."""
    key = "\n".join(
        [
            sys.executable,
            os.path.abspath(cwd or os.getcwd()),
            os.environ.get("SLURM_JOB_ID", ""),
            _source_fingerprint(),
        ]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tlmat-warm-{os.getuid()}-{digest}.sock"


# ----------------------------------------------------------------------------- client


def run_remote(argv: Sequence[str]) -> int | None:
    """Run ``tlmat argv`` in a child of the warm server; None when none can be had."""
    path = socket_path()
    conn = _connect(path) or (_start_server(path) and _connect(path))
    if not conn:
        return None
    with conn:
        request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)})
        payload = request.encode()
        socket.send_fds(conn, [_EXIT.pack(len(payload)) + payload], [0, 1, 2])
        reply = _recv_exactly(conn, _EXIT.size)
    if reply is None:
        print("tlmat: error: the warm job process died without a status", file=sys.stderr)
        return 1
    return _EXIT.unpack(reply)[0]


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path) -> bool:
    """Start the server (one per socket: a lock file serialises racing first jobs)."""
    lock = path.with_suffix(".lock")
    import fcntl

    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        probe = _connect(path)
        if probe:
            probe.close()
            return True
        log = path.with_suffix(".log")
        with open(log, "ab") as out:
            subprocess.Popen(
                [sys.executable, "-m", "tlmat.cli", SERVE_VERB, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, ENV_FLAG: "0"},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            probe = _connect(path)
            if probe:
                probe.close()
                return True
            time.sleep(0.05)
    return False


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ----------------------------------------------------------------------------- server


def _preload() -> None:
    """Everything a training job imports, so forked children start at their first step."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime loads
    import torch_geometric.loader  # noqa: F401

    import tlmat.mpt  # noqa: F401
    import tlmat.runs  # noqa: F401


def serve(path: Path, main: Callable[[list[str]], int], idle: float = IDLE_SECONDS) -> None:
    """Accept jobs on ``path`` until ``idle`` seconds pass without one; each runs ``main``
    (the CLI's, passed in so that this module does not import the CLI that imports it)."""
    _preload()
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            if os.fork() == 0:
                server.close()
                _run_child(conn, main)  # never returns
            conn.close()
    finally:
        if path.exists():
            path.unlink(missing_ok=True)
        server.close()


def _run_child(conn: socket.socket, main: Callable[[list[str]], int]) -> None:
    """Become the job: its stdio, directory and environment; then run the CLI."""
    code = 1
    try:
        conn.settimeout(None)
        header, fds, _, _ = socket.recv_fds(conn, _EXIT.size, 3)
        payload = _recv_exactly(conn, _EXIT.unpack(header)[0])
        request = json.loads(payload)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[INSIDE_FLAG] = "1"
        threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - report like an uncaught exception would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.sendall(_EXIT.pack(code))
        finally:
            os._exit(code)


def _die_with_client(conn: socket.socket) -> None:
    """The client never sends after its request: EOF means it is gone; so is the job."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    os._exit(143)
