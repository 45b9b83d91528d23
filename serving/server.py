"""The gRPC feature server: Feast's ``feast.serving.ServingService`` read straight from Redis.

Besides ServingService (``GetOnlineFeatures``, ``GetFeastServingInfo``: see
:mod:`serving.servicer`) it serves the standard ``grpc.health.v1.Health`` (SERVING while
Redis answers a PING, on a Redis Cluster every primary: :mod:`serving.health`) and server reflection, so ``grpcurl`` and load
balancers work out of the box; optionally TLS, bearer tokens (:mod:`serving.auth`) and
Prometheus metrics (:mod:`serving.metrics`). :class:`~serving.options.ServerOptions` says
how it runs.

Run it in-process::

    with FeatureServer(repo, port=0) as server:     # port 0: any free port
        print(server.address)
        ...

or blocking, as ``featurepipe serve`` does: ``serve(repo, port=6566, announce=click.echo)``.

The process never imports the Feast SDK, pandas or DuckDB: the registry is parsed with
Feast's generated protos (:mod:`serving.registry`). Feature metadata is resolved into a
cache once; a background thread checks the registry every ``registry_refresh_seconds`` and
swaps in a new catalog only when it changed (:class:`~serving.registry.RegistryWatcher`
says what each kind of registry costs to check), so ``feast apply`` takes effect without a
restart and requests never wait for a check.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from featurepipe.config import export_redis_env, find_repo
from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from serving import backend, protos
from serving.catalog import Catalog
from serving.clock import request_clock
from serving.health import HealthStatus
from serving.lookup import OnlineReader
from serving.metrics import ServerMetrics
from serving.options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_ROWS,
    DEFAULT_PORT,
    ServerOptions,
    TlsFiles,
)
from serving.plan import Plan
from serving.registry import RegistryWatcher
from serving.repo_config import ServingRepoConfig, check_servable, read_repo_config
from serving.servicer import SERVICE_NAME, ServingServicer
from serving.validation import parse_request

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_ROWS", "DEFAULT_PORT", "SERVICE_NAME",
    "FeatureServer", "ServerOptions", "TlsFiles", "serve",
]

logger = logging.getLogger(__name__)

for _module in (health_pb2, reflection_pb2):  # so reflection can describe them too
    protos.load_file(_module.DESCRIPTOR.name, bytes(_module.DESCRIPTOR.serialized_pb))


class FeatureServer:
    """The gRPC server, run in-process: ``start()``, ``port``, ``stop(grace)``.

    Args:
        repo: the feature repo folder (default: ``featurepipe.config.find_repo()``).
        options: how it runs (:class:`~serving.options.ServerOptions`; default: its defaults).
        store: an already opened Feast ``FeatureStore`` (its repo is used instead of ``repo``).
        **overrides: :class:`ServerOptions` fields to change, e.g. ``port=0``.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str] | None = None,
        options: ServerOptions | None = None,
        *,
        store: Any = None,
        **overrides: Any,
    ) -> None:
        options = options or ServerOptions()
        self.options = dataclasses.replace(options, **overrides) if overrides else options
        self.repo = store.repo_path if store is not None else repo
        self.host = self.options.host
        self.tls = self.options.tls
        self.tokens = self.options.token_policy()
        self.metrics: ServerMetrics | None = (
            ServerMetrics() if self.options.metrics_port is not None else None
        )
        self.port = 0  # the bound port, after start()
        self.metrics_port = self.options.metrics_port  # the bound metrics port, after start()
        self.config: ServingRepoConfig | None = None
        self._catalog: Catalog | None = None
        self._reader: OnlineReader | None = None
        self._grpc: grpc.Server | None = None
        self._health = HealthStatus(self.metrics)
        self._registry: RegistryWatcher | None = None
        self._refreshing = threading.Lock()  # refresh() is public: one check at a time
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._registry_monitor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after start)."""
        return f"{self.host}:{self.port}"

    @property
    def catalog(self) -> Catalog:
        """The registry snapshot requests are planned from now."""
        if self._catalog is None:
            raise FeaturepipeError("the feature server is not started; call start() first")
        return self._catalog

    def start(self) -> FeatureServer:
        """Open the registry and Redis, bind the port and start serving."""
        self._open_backends()
        assert self._reader is not None
        try:
            self._bind()
            if self.metrics is not None and self.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(self.host, self.metrics_port)
        except BaseException:
            self._reader.close()
            raise
        self._health.set(self._reader.ping(), self._reader.node_health)
        assert self._grpc is not None
        self._grpc.start()
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)
        self._monitor.start()
        self._registry_monitor = threading.Thread(target=self._watch_registry,
                                                  name="serve-registry", daemon=True)
        self._registry_monitor.start()
        logger.info("serving %s on %s", SERVICE_NAME, self.address,
                    extra={"port": self.port, "pid": os.getpid()})
        return self

    def _open_backends(self) -> None:
        export_redis_env(self.repo)
        self.config = config = read_repo_config(find_repo(self.repo))
        check_servable(config)
        self._registry = RegistryWatcher(config)
        try:
            self.refresh(force=True)
        except FeaturepipeError:
            raise
        except Exception as exc:
            raise BackendUnavailable(
                f"cannot read the registry of {config.repo} ({type(exc).__name__}: "
                f"{exc}); check `registry:` in feature_store.yaml and run `featurepipe apply`"
            ) from exc
        client = backend.connect(
            config.connection_string, timeout=self.options.redis_timeout,
            max_connections=self.options.max_workers + 4, redis_type=config.redis_type,
        )
        observe = self.metrics.redis_latency.observe if self.metrics is not None else None
        self._reader = OnlineReader(client, max_rows=self.options.max_rows, on_fetch=observe,
                                    clock=request_clock(self.options.clock))

    def _bind(self) -> None:
        options = self.options
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="serve"),
            options=[
                ("grpc.so_reuseport", 1 if options.reuse_port else 0),
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.max_send_message_length", options.max_message_bytes),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_calls,
        )
        ServingServicer(
            self.get_online_features_serialized, lambda: self.catalog.services,
            tokens=self.tokens, metrics=self.metrics,
        ).add_to(self._grpc)
        self._health.add_to(self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc,
            pool=protos.pool,
        )
        where = f"{self.host}:{options.port}"
        try:
            if self.tls is not None:
                credentials = grpc.ssl_server_credentials([self.tls.key_and_cert()])
                self.port = self._grpc.add_secure_port(where, credentials)
            else:
                self.port = self._grpc.add_insecure_port(where)
        except RuntimeError as exc:
            raise InvalidInput(
                f"cannot listen on {where} ({exc}); is another server using the port? Pick "
                "another with --port (0 = any free port)"
            ) from exc

    def get_online_features(self, request: Any) -> Any:
        """Answer one request in-process: a ``GetOnlineFeaturesResponse`` (raises featurepipe
        errors). ``request`` may be Feast's generated message or :mod:`serving.protos`'."""
        request = parse_request(request.SerializeToString())  # our own copy, unknown fields dropped
        body, _ = self.get_online_features_serialized(request)
        return protos.GetOnlineFeaturesResponse.FromString(body)

    def plan_for(self, request: Any) -> Plan:
        """The cached plan of a request's feature service or feature list."""
        return self.catalog.plan_for_request(request)

    def get_online_features_serialized(self, request: Any) -> tuple[bytes, int]:
        """The serialized response to one request and its row count (raises featurepipe errors)."""
        assert self._reader is not None, "start() the server first"
        plan = self.catalog.plan_for_request(request)
        try:
            return self._reader.read(plan, request.entities, request.request_context)
        except BackendUnavailable:
            nodes = self._reader.node_health  # a cluster with a primary down still serves the others' keys
            self._health.set(len(nodes) > 1 and any(nodes.values()), nodes)
            raise

    def refresh(self, force: bool = False) -> bool:
        """Swap in a new catalog if the registry changed (always when ``force``); True when
        swapped. Requests in flight keep the catalog they started with."""
        assert self._registry is not None, "start() the server first"
        with self._refreshing:
            definitions = self._registry.check(force)
        if definitions is None:
            return False
        catalog = Catalog(definitions)
        if not catalog.services and not catalog.views:
            logger.warning("the registry holds no feature views; run `featurepipe apply`")
        self._catalog = catalog
        if self.metrics is not None and not force:
            self.metrics.registry_reloads.inc()
        return True

    def _watch(self) -> None:
        """Background loop: PING Redis for the health status."""
        assert self._reader is not None
        while not self._stopping.wait(self.options.health_interval):
            self._health.set(self._reader.ping(), self._reader.node_health)

    def _watch_registry(self) -> None:
        """Background loop: check the registry for changes, on a thread of its own so a slow
        registry (an object store, a remote one) delays neither requests nor health."""
        while not self._stopping.wait(self.options.registry_refresh_seconds):
            try:
                if self.refresh():
                    logger.info("registry changed: feature metadata reloaded")
            except Exception:  # keep serving the last good catalog
                logger.warning("could not reload the registry; keeping the last one", exc_info=True)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: health goes NOT_SERVING, new calls are refused, and calls in
        flight get ``grace`` seconds to finish."""
        self._stopping.set()
        self._health.shut_down()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._monitor is not None:
            self._monitor.join(timeout=self.options.redis_timeout + 1)
            self._monitor = None
        if self._registry_monitor is not None:  # a check under way is left to finish (daemon)
            self._registry_monitor.join(timeout=1.0)
            self._registry_monitor = None
        if self._reader is not None:
            self._reader.close()
        if self.metrics is not None:
            self.metrics.close()
        self._health.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True when it stopped."""
        return self._stopping.wait(timeout)

    def __enter__(self) -> FeatureServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def serve(
    repo: str | os.PathLike[str] | None = None,
    options: ServerOptions | None = None,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
    grace: float = 5.0,
    **overrides: Any,
) -> None:
    """Run the feature server until ``stop`` is set, or SIGINT / SIGTERM arrives; then
    drain calls in flight for up to ``grace`` seconds.

    ``announce`` receives one line once the port is bound (the CLI passes ``click.echo``);
    ``ready`` is set at the same moment. ``options`` and ``overrides`` go to
    :class:`FeatureServer`.
    """
    stop = stop or threading.Event()
    server = FeatureServer(repo, options, **overrides).start()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        if announce is not None:
            announce(_announcement(server))
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        logger.info("stopping: draining calls in flight (up to %.1fs)", grace)
    finally:
        server.stop(grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _announcement(server: FeatureServer) -> str:
    """The line ``serve`` announces once the port is bound."""
    metrics = (f", metrics on http://{server.host}:{server.metrics_port}/metrics"
               if server.metrics is not None else "")
    catalog = server.catalog
    return (
        f"serving {SERVICE_NAME} on {server.address} (project {catalog.project!r}, "
        f"{len(catalog.services)} feature services{', TLS' if server.tls else ''}"
        f"{', tokens' if server.tokens else ''}{metrics}); Ctrl-C to stop"
    )
