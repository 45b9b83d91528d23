"""Several server processes on one port: ``featurepipe serve --workers N`` (N > 1).

The supervising process starts N ``python -m serving`` processes with the flags it was given
plus ``--workers 1 --reuse-port --port P`` (SO_REUSEPORT: the kernel spreads connections among
them), each a full server with its own Redis connections; worker i serves metrics on
``--metrics-port`` + i. A worker that dies is restarted; SIGTERM / SIGINT drain every worker
(``grace`` seconds) and return.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from serving.options import ServerOptions

logger = logging.getLogger("serving")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In a worker (Linux): get SIGTERM when the supervisor dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(workers: int, options: ServerOptions, argv: Sequence[str], grace: float) -> int:
    """Run ``workers`` server processes on ``options``' port, each started with ``argv`` (the
    command's own flags); restart one that dies; the exit status once stopped (0)."""
    port = options.port or _free_port(options.host)
    stopping = False

    def spawn(i: int) -> subprocess.Popen[bytes]:
        extra = ["--workers", "1", "--reuse-port", "--port", str(port)]
        if options.metrics_port is not None:
            extra += ["--metrics-port", str(options.metrics_port + i if options.metrics_port else 0)]
        return subprocess.Popen([sys.executable, "-m", "serving", *argv, *extra],
                                preexec_fn=_die_with_parent)

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = [spawn(i) for i in range(workers)]
    print(f"supervising {workers} server processes on {options.host}:{port} (pids "
          f"{', '.join(str(c.pid) for c in children)}); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    while not stopping:
        time.sleep(0.2)
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping:
                logger.warning("worker %d (pid %d) exited with %s; restarting it", i, child.pid,
                               child.returncode)
                time.sleep(0.5)
                children[i] = spawn(i)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0
