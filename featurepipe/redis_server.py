"""A private, throw-away ``redis-server`` on a free loopback port.

Used by ``make demo`` / ``make test`` and by the test fixtures::

    python -m featurepipe.redis_server -- featurepipe demo   # run a command with REDIS_URL set
    python -m featurepipe.redis_server --ensure-binary       # install redis-server if missing

If ``REDIS_URL`` is already set, the command runs against that server and nothing is
started. Otherwise a ``redis-server`` (installed with apt-get when it is missing and we are
root on Debian/Ubuntu) is started on 127.0.0.1 with persistence off and its files under
``.redis/``, and stopped, by PID, when the command ends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from featurepipe.errors import BackendUnavailable, NotFound

INSTALL_HINT = (
    "redis-server is not installed. Install it with `sudo apt-get install -y redis-server` "
    "(Debian/Ubuntu) or `brew install redis` (macOS), or point featurepipe at an existing "
    "server with REDIS_URL=redis://host:port/0"
)


def ensure_binary() -> str:
    """Return the path of ``redis-server``, installing it with apt-get when possible."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("redis-server not found: installing it with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "redis-server"]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )
        if found:
            return found
    raise NotFound(INSTALL_HINT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1; use as a context manager."""

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = ensure_binary()
        if self.workdir is None:
            Path(".redis").mkdir(exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="redis-", dir=".redis")
            workdir = Path(self._tmp.name)
        else:
            workdir = self.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir.resolve()), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendUnavailable(
                    f"redis-server exited with code {self.process.returncode} on port {self.port}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BackendUnavailable(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featurepipe.redis_server",
        description="Run a command with REDIS_URL pointing at a private redis-server "
        "(or at $REDIS_URL when it is already set).",
    )
    parser.add_argument("--ensure-binary", action="store_true",
                        help="only make sure redis-server is installed, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.ensure_binary:
            if not os.environ.get("REDIS_URL"):
                print(f"redis-server: {ensure_binary()}")
            return 0
        if not command:
            parser.error("give a command after --")
        if os.environ.get("REDIS_URL"):
            return subprocess.call(command)
        with RedisServer() as server:
            print(f"Started a private redis-server at {server.url} (pid {server.process.pid})",
                  file=sys.stderr)
            return subprocess.call(command, env={**os.environ, "REDIS_URL": server.url})
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
