"""``python -m serving [options]``: run the feature server (``featurepipe serve`` calls this).

With ``--workers N`` (N > 1) this process supervises N server processes that share the
port (SO_REUSEPORT; the kernel spreads connections among them): each is a full server
with its own Redis connections; worker i serves metrics on ``--metrics-port`` + i.
SIGTERM / SIGINT drain every worker (``--grace`` seconds) and exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from featurepipe.errors import FeaturepipeError
from serving.logs import configure
from serving.options import ServerOptions, TlsFiles

logger = logging.getLogger("serving")


def parser() -> argparse.ArgumentParser:
    """The command line; the server's defaults are :class:`ServerOptions`'."""
    d = ServerOptions()
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=None, help="feature repo folder (default: ./feature_repo)")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="port (0: any free port)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    p.add_argument("--threads", type=int, default=d.max_workers,
                   help="request threads per process")
    p.add_argument("--max-rows", type=int, default=d.max_rows, help="most entity rows per request")
    p.add_argument("--max-concurrent-calls", type=int, default=d.max_concurrent_calls,
                   help="calls accepted at once per process; more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest request or response message")
    p.add_argument("--redis-timeout", type=float, default=d.redis_timeout,
                   help="seconds to wait for Redis before answering UNAVAILABLE")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tokens", default=None,
                   help="YAML/JSON file: bearer token -> allowed feature services or \"*\"")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="serve Prometheus /metrics on this port (0: any free port)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds calls in flight may take to finish on SIGTERM")
    p.add_argument("--reuse-port", action="store_true",
                   help="share the port with other processes (set for each --workers process)")
    return p


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The :class:`ServerOptions` the parsed flags ask for (InvalidInput when out of range)."""
    return ServerOptions(
        host=args.host,
        port=args.port,
        max_workers=args.threads,
        max_rows=args.max_rows,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_calls=args.max_concurrent_calls,
        redis_timeout=args.redis_timeout,
        tls=TlsFiles(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None,
        tokens=args.tokens,
        metrics_port=args.metrics_port,
        reuse_port=args.reuse_port,
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m serving`` with ``argv``; the exit status (2: bad options or repo)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    configure(args.log_format)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: pass both --tls-cert and --tls-key, or neither", file=sys.stderr)
        return 2
    try:
        options = server_options(args)  # checked here, before any worker starts
        if args.workers > 1:
            return supervise(args, argv)
        run_one(args, options)
    except FeaturepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_one(args: argparse.Namespace, options: ServerOptions) -> None:
    """One server process, until SIGTERM / SIGINT."""
    from serving.server import serve

    serve(args.repo, options, grace=args.grace,
          announce=lambda line: print(line, file=sys.stderr, flush=True))


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


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``args.workers`` server processes on one port; restart one that dies."""
    port = args.port or _free_port(args.host)
    stopping = False

    def spawn(i: int) -> subprocess.Popen[bytes]:
        extra = ["--workers", "1", "--reuse-port", "--port", str(port)]
        if args.metrics_port is not None:
            extra += ["--metrics-port", str(args.metrics_port + i if args.metrics_port else 0)]
        return subprocess.Popen([sys.executable, "-m", "serving", *argv, *extra],
                                preexec_fn=_die_with_parent)

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = [spawn(i) for i in range(args.workers)]
    print(f"supervising {args.workers} server processes on {args.host}:{port} (pids "
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
    deadline = time.monotonic() + args.grace + 5
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
