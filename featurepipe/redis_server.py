"""redis-server processes featurepipe starts itself, always on 127.0.0.1.

Two kinds:

* :class:`LocalRedis`, the project's own online store when ``REDIS_URL`` is not set: one
  ``redis-server`` per feature repo, its files (RDB snapshot, log, pid and port) under
  ``<repo>/.redis/``, started on demand by any command that needs Redis and left running
  between commands, so what ``make demo`` materialised is still there for ``featurepipe
  serve``, the notebooks and the Feast SDK. ``featurepipe redis status|start|stop``.
* :class:`RedisServer`, a throw-away server on a free port (persistence off, files in a
  temporary folder), stopped by PID when the block ends: the tests' fixtures and
  :func:`run_with_redis`, ``featurepipe redis run -- COMMAND`` or ``python -m
  featurepipe.redis_server -- COMMAND`` (runs COMMAND with ``REDIS_URL`` set).
* :class:`RedisClusterServers`, throw-away primaries of one Redis Cluster (no replicas, the
  16,384 slots split evenly), each on a port whose cluster bus port (+10,000) is free too:
  the tests' cluster fixture and the cluster benchmarks.

``python -m featurepipe.redis_server --ensure-binary`` installs ``redis-server`` with
apt-get when it is missing and we are root on Debian/Ubuntu.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import click

from featurepipe.core.process import pid_alive as _pid_alive
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

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.extra_args = list(extra_args)  # more redis-server settings (--name value ...)
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
             "--appendonly", "no", "--dir", str(workdir.resolve()), "--protected-mode", "yes", *self.extra_args],
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

    def kill(self) -> None:
        """SIGKILL the server (ours, by its process handle): a crash, for failover tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


CLUSTER_SLOTS = 16_384
CLUSTER_BUS_OFFSET = 10_000


def cluster_port(attempts: int = 200) -> int:
    """A free port on 127.0.0.1 whose cluster bus port (``port + 10000``) is free too."""
    for _ in range(attempts):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET <= 65_535 and _port_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise BackendUnavailable(f"found no free port whose +{CLUSTER_BUS_OFFSET} bus port is free in {attempts} tries")


class RedisClusterServers:
    """``nodes`` redis-server primaries of one Redis Cluster on 127.0.0.1, no replicas, the
    slots split evenly in node order; use as a context manager (stopped by PID at the end).

    ``cluster-require-full-coverage no``: while a primary is down, the others go on serving
    their slots (what featurepipe's server is tested on; the default stops the whole cluster).
    :meth:`kill` and :meth:`restart` crash and bring back one node on its port and with its
    ``nodes.conf``, so it rejoins owning the same slots.
    """

    def __init__(self, nodes: int = 3, node_timeout_ms: int = 2_000) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.count = nodes
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def connection_string(self) -> str:
        """Feast's form for ``redis_type: redis_cluster``: ``host:port,host:port,...``."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def slot_ranges(self, index: int) -> tuple[int, int]:
        """The first and last slot node ``index`` was given."""
        per = CLUSTER_SLOTS // self.count
        first = index * per
        return first, CLUSTER_SLOTS - 1 if index == self.count - 1 else first + per - 1

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        import redis

        Path(".redis").mkdir(exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="redis-cluster-", dir=".redis")
        try:
            for i in range(self.count):
                server = RedisServer(workdir=Path(self._tmp.name) / f"node-{i}", port=cluster_port(),
                                     extra_args=self._cluster_args())
                self.servers.append(server)
                server.start()
            for i, server in enumerate(self.servers):
                with redis.Redis(port=server.port) as client:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", *self.slot_ranges(i))
            with redis.Redis(port=self.ports[0]) as first:
                for port in self.ports[1:]:
                    first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _cluster_args(self) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no"]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok, knows every node and has every
        slot of every node covered (raises BackendUnavailable after ``timeout``)."""
        import redis

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                ready = True
                for server in self.servers:
                    with redis.Redis(port=server.port, socket_timeout=1) as client:
                        info = client.execute_command("CLUSTER", "INFO")
                        text = info.decode() if isinstance(info, bytes) else str(info)
                        nodes = client.execute_command("CLUSTER", "NODES")
                        nodes = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
                    last = f"node {server.port}: {text.splitlines()[0]}"
                    if ("cluster_state:ok" not in text or f"cluster_known_nodes:{self.count}" not in text
                            or "fail" in nodes or "handshake" in nodes):
                        ready = False
                        break
                if ready:
                    return
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise BackendUnavailable(f"the Redis Cluster on ports {self.ports} was not ready in {timeout}s ({last})")

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a primary lost)."""
        self.servers[index].kill()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again on its port with its ``nodes.conf``; wait until the
        cluster is whole again."""
        self.servers[index].start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


LOCAL_DIR = ".redis"
STATE_FILE = "server.json"
# Redis 7's own snapshot points: a lost process loses at most minutes of writes, and a clean
# stop (`featurepipe redis stop`, SIGTERM) saves everything.
SAVE_POINTS = "3600 1 300 100 60 10000"
_STARTED: list[subprocess.Popen[bytes]] = []


def _ping(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False



def _pid_is_redis(pid: int) -> bool:
    """True if ``pid`` runs redis-server (so a recycled pid is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _pid_alive(pid)  # no /proc (macOS): trust the pid
    return b"redis-server" in cmdline


@dataclass(frozen=True)
class LocalRedisState:
    """What ``<repo>/.redis/server.json`` records of the running server."""

    pid: int
    port: int
    dir: str
    started: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def feast_form(self) -> str:
        """The connection in Feast's ``host:port,db=0`` form."""
        return f"127.0.0.1:{self.port},db=0"


class LocalRedis:
    """The project-local ``redis-server`` of one feature repo (files under ``<repo>/.redis/``).

    :meth:`ensure` returns the running server, starting it when needed (under a file lock, so
    two commands starting at once share one server); it keeps running after the command
    ends, and a later start reuses its port and loads its snapshot. A copied repo never
    talks to the original's server: the server must report its own ``dir`` as ours.

    >>> LocalRedis(Path("feature_repo")).ensure().url     # doctest: +SKIP
    'redis://127.0.0.1:41873/0'
    """

    def __init__(self, repo: Path) -> None:
        self.dir = (Path(repo) / LOCAL_DIR).resolve()

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def _read_state(self) -> LocalRedisState | None:
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
            return LocalRedisState(int(raw["pid"]), int(raw["port"]), str(raw["dir"]), str(raw["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def status(self) -> LocalRedisState | None:
        """The server of this repo if it is running and answering, else None."""
        state = self._read_state()
        if state is None or state.dir != str(self.dir) or not _pid_alive(state.pid):
            return None
        if not _pid_is_redis(state.pid) or not _ping(state.port):
            return None
        return state

    def ensure(self, timeout: float = 10.0) -> LocalRedisState:
        """The running server, started now if it is not running."""
        state = self.status()
        if state is not None:
            return state
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.status()  # another command may have started it meanwhile
            if state is None:
                state = self._start(timeout)
            return state

    def _start(self, timeout: float) -> LocalRedisState:
        binary = ensure_binary()
        previous = self._read_state()
        port = previous.port if previous is not None and _port_free(previous.port) else free_port()
        log = (self.dir / "redis.log").open("ab")
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
             "--dir", str(self.dir), "--dbfilename", "dump.rdb", "--save", SAVE_POINTS,
             "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the command (and its Ctrl-C)
        )
        log.close()
        _STARTED.append(process)  # kept referenced: it is meant to outlive this object
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BackendUnavailable(
                    f"the local redis-server exited with code {process.returncode} on port {port}; "
                    f"see {self.dir / 'redis.log'}"
                )
            if _ping(port, 0.2):
                state = LocalRedisState(process.pid, port, str(self.dir),
                                        datetime.now(timezone.utc).isoformat(timespec="seconds"))
                tmp = self.state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
                os.replace(tmp, self.state_path)
                print(f"started the local redis-server for this repo at {state.url} (pid {state.pid}, "
                      f"files in {self.dir}); stop it with `featurepipe redis stop`", file=sys.stderr)
                return state
            time.sleep(0.02)
        process.kill()
        process.wait()
        raise BackendUnavailable(f"the local redis-server did not answer on port {port} in {timeout}s; "
                                 f"see {self.dir / 'redis.log'}")

    def stop(self, timeout: float = 30.0) -> LocalRedisState | None:
        """Stop the server (SIGTERM: Redis saves its snapshot first); the one stopped, or None."""
        state = self.status()
        if state is None:
            return None
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(state.pid):
            try:  # our own child (a test's process) must be reaped, not left a zombie
                if os.waitpid(state.pid, os.WNOHANG)[0] == state.pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if _pid_alive(state.pid) and _pid_is_redis(state.pid):
            raise BackendUnavailable(f"the local redis-server (pid {state.pid}) did not stop in {timeout}s")
        return state


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@click.command("run", context_settings={"help_option_names": ["-h", "--help"], "ignore_unknown_options": True,
                                        "allow_interspersed_args": False})
@click.option("--ensure-binary", "only_install", is_flag=True,
              help="Only make sure redis-server is installed (with apt-get, as root), then exit.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] COMMAND [ARGS]...")
@click.pass_context
def run_with_redis(ctx: click.Context, /, only_install: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND with REDIS_URL pointing at a private redis-server (or at $REDIS_URL when it
    is already set); exit with COMMAND's status.

    \b
    featurepipe redis run -- make test
    python -m featurepipe.redis_server -- make test     (the same command)
    python -m featurepipe.redis_server --ensure-binary  (what `make install` runs)
    """
    try:
        if only_install:
            if not os.environ.get("REDIS_URL"):
                click.echo(f"redis-server: {ensure_binary()}")
            ctx.exit(0)
        if not command:
            raise click.UsageError("give a command after --")
        if os.environ.get("REDIS_URL"):
            ctx.exit(subprocess.call(command))
        with RedisServer() as server:
            assert server.process is not None  # started by __enter__
            click.echo(f"Started a private redis-server at {server.url} (pid {server.process.pid})", err=True)
            ctx.exit(subprocess.call(command, env={**os.environ, "REDIS_URL": server.url}))
    except NotFound as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    except KeyboardInterrupt:
        ctx.exit(130)


if __name__ == "__main__":
    run_with_redis.main(prog_name="python -m featurepipe.redis_server")
