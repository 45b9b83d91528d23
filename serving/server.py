"""The gRPC feature server: Feast's ``feast.serving.ServingService`` read straight from Redis.

Besides ServingService (``GetOnlineFeatures``, ``GetFeastServingInfo``) it serves the
standard ``grpc.health.v1.Health`` (SERVING while Redis answers a PING) and server
reflection, so ``grpcurl`` and load balancers work out of the box; optionally TLS,
bearer tokens (:mod:`serving.auth`) and Prometheus metrics (:mod:`serving.metrics`).

Run it in-process::

    with FeatureServer(repo, port=0) as server:     # port 0: any free port
        print(server.address)
        ...

or blocking, as ``featurepipe serve`` does: ``serve(repo, port=6566, announce=click.echo)``.

The process never imports the Feast SDK, pandas or DuckDB: the registry is parsed with
Feast's generated protos (:mod:`serving.registry`). Feature metadata is resolved into a
cache once; a background thread re-reads the registry when its file changes (checked
every ``registry_refresh_seconds``), so ``feast apply`` takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from featurepipe.config import ONLINE_STORE_TYPE
from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from serving import backend, protos
from serving.auth import TokenPolicy
from serving.catalog import Catalog, Plan
from serving.errors import status_for
from serving.lookup import OnlineReader
from serving.metrics import ServerMetrics
from serving.registry import parse_registry, registry_bytes
from serving.repo_config import ServingRepoConfig, read_repo_config
from serving.validation import parse_request as _parse_request

logger = logging.getLogger(__name__)

SERVICE_NAME = protos.SERVING_SERVICE
DEFAULT_PORT = 6566
DEFAULT_MAX_ROWS = 1000
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

for _module in (health_pb2, reflection_pb2):  # so reflection can describe them too
    protos.load_file(_module.DESCRIPTOR.name, bytes(_module.DESCRIPTOR.serialized_pb))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate (chain) and private key."""

    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
        except OSError as exc:
            raise InvalidInput(f"cannot read TLS files: {exc}; pass --tls-cert and --tls-key") from exc
        return grpc.ssl_server_credentials([pair])


class _ServingServicer:
    """Translates gRPC calls into catalog + reader calls, and errors into status codes.

    GetOnlineFeatures returns the response already serialized (see :mod:`serving.wire`);
    :meth:`add_to` registers it with a pass-through serializer.
    """

    def __init__(self, server: FeatureServer) -> None:
        self._server = server
        self._version = package_version("feast")

    def _authorize(self, context: grpc.ServicerContext, feature_service: str | None) -> None:
        policy = self._server.tokens
        if policy is not None:
            header = next(
                (v for k, v in context.invocation_metadata() if k == "authorization"), None
            )
            policy.check(header if isinstance(header, str) else None, feature_service)

    def GetFeastServingInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            self._authorize(context, "")
        except FeaturepipeError as exc:
            if status_for(exc) == grpc.StatusCode.UNAUTHENTICATED:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return protos.GetFeastServingInfoResponse(version=self._version)

    def GetOnlineFeatures(self, raw: bytes, context: grpc.ServicerContext) -> bytes:  # noqa: N802
        started = time.perf_counter()
        server = self._server
        label, rows, code = "features", 0, grpc.StatusCode.OK
        try:
            request = _parse_request(raw)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                context.abort(code, "the call's deadline passed before the server could start it")
            service = request.feature_service if request.WhichOneof("kind") == "feature_service" \
                else None
            if service is not None:
                label = service if service in server.catalog.services else "unknown"
            self._authorize(context, service)
            body, rows = server.get_online_features_serialized(request)
            return body
        except FeaturepipeError as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.error("GetOnlineFeatures failed: %s", exc, extra={"feature_service": label})
            else:
                logger.info("GetOnlineFeatures: %s: %s", code.name, exc,
                            extra={"feature_service": label, "code": code.name})
            context.abort(code, str(exc))
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError" \
                    or code != grpc.StatusCode.OK:
                raise  # context.abort() above
            code = grpc.StatusCode.INTERNAL
            logger.exception("GetOnlineFeatures failed unexpectedly")
            context.abort(
                code, f"internal error ({type(exc).__name__}: {exc}); see the feature server's log"
            )
        finally:
            if server.metrics is not None:
                server.metrics.observe(label, code.name, time.perf_counter() - started, rows)
        raise AssertionError("unreachable: context.abort raises")

    def add_to(self, server: grpc.Server) -> None:
        """Register both methods, as the generated ``add_ServingServiceServicer_to_server``."""
        handlers = {
            "GetFeastServingInfo": grpc.unary_unary_rpc_method_handler(
                self.GetFeastServingInfo,
                request_deserializer=protos.GetFeastServingInfoRequest.FromString,
                response_serializer=protos.GetFeastServingInfoResponse.SerializeToString,
            ),
            "GetOnlineFeatures": grpc.unary_unary_rpc_method_handler(
                self.GetOnlineFeatures,  # parses the request itself: see _parse_request
                request_deserializer=None,
                response_serializer=None,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


class FeatureServer:
    """The gRPC server, run in-process: ``start()``, ``port``, ``stop(grace)``.

    Args:
        repo: the feature repo folder (default: ``featurepipe.config.find_repo()``).
        host, port: where to listen; port 0 picks a free port (see ``.port``).
        max_workers: request threads.
        max_rows: the most entity rows one request may ask for.
        max_message_bytes: the largest request and response message.
        registry_refresh_seconds: how often to check the registry for changes.
        redis_timeout: seconds to connect to Redis and to wait for a reply.
        health_interval: seconds between the Redis PINGs behind the health status.
        tls: certificate and key files; None serves plaintext.
        tokens: a :class:`~serving.auth.TokenPolicy` (or its file); None: no authentication.
        metrics_port: port of the Prometheus ``/metrics`` endpoint (0: any free port, None: off).
        reuse_port: share the port with other server processes (SO_REUSEPORT).
        max_concurrent_calls: calls accepted at once; more are refused RESOURCE_EXHAUSTED.
        store: an already opened Feast ``FeatureStore`` (its repo is used instead of ``repo``).
    """

    def __init__(
        self,
        repo: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_workers: int = 8,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        registry_refresh_seconds: float = 5.0,
        redis_timeout: float = 1.0,
        health_interval: float = 1.0,
        tls: TlsFiles | None = None,
        tokens: TokenPolicy | str | os.PathLike[str] | None = None,
        metrics_port: int | None = None,
        reuse_port: bool = False,
        max_concurrent_calls: int = 1000,
        store: Any = None,
    ) -> None:
        if max_rows < 1:
            raise InvalidInput(f"max_rows must be at least 1, got {max_rows}")
        if max_message_bytes < 1024:
            raise InvalidInput(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if store is not None:
            repo = store.repo_path
        self.repo = repo
        self.host = host
        self.requested_port = port
        self.max_workers = max_workers
        self.max_rows = max_rows
        self.max_message_bytes = max_message_bytes
        self.registry_refresh_seconds = registry_refresh_seconds
        self.redis_timeout = redis_timeout
        self.health_interval = health_interval
        self.tls = tls
        self.tokens = tokens if tokens is None or isinstance(tokens, TokenPolicy) \
            else TokenPolicy.from_file(tokens)
        self.metrics_port = metrics_port
        self.reuse_port = reuse_port
        self.max_concurrent_calls = max_concurrent_calls
        self.metrics: ServerMetrics | None = ServerMetrics() if metrics_port is not None else None
        self.port = 0
        self.config: ServingRepoConfig | None = None
        self._catalog: Catalog | None = None
        self._reader: OnlineReader | None = None
        self._grpc: grpc.Server | None = None
        self._health_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
        self._health = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=self._health_pool
        )
        self._serving: bool | None = None
        self._registry_signature: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after start)."""
        return f"{self.host}:{self.port}"

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise FeaturepipeError("the feature server is not started; call start() first")
        return self._catalog

    def start(self) -> FeatureServer:
        """Open the registry and Redis, bind the port and start serving."""
        self._open_backends()
        try:
            self._bind()
            if self.metrics is not None and self.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(self.host, self.metrics_port)
        except BaseException:
            assert self._reader is not None
            self._reader.client.close()
            raise
        self._check_health()
        assert self._grpc is not None
        self._grpc.start()
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)
        self._monitor.start()
        logger.info("serving %s on %s", SERVICE_NAME, self.address,
                    extra={"port": self.port, "pid": os.getpid()})
        return self

    def _open_backends(self) -> None:
        from featurepipe.config import export_redis_env, find_repo

        export_redis_env(self.repo)
        self.config = config = read_repo_config(find_repo(self.repo))
        if config.online_type not in ("redis", ONLINE_STORE_TYPE):
            raise InvalidInput(
                f"online_store type {config.online_type!r} in feature_store.yaml is not "
                "supported; featurepipe serve reads the redis online store"
            )
        if config.redis_type != "redis":
            raise InvalidInput(
                f"online_store redis_type {config.redis_type!r} is not supported by featurepipe "
                "serve yet; use a single Redis server (redis_type: redis)"
            )
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
            config.connection_string, timeout=self.redis_timeout,
            max_connections=self.max_workers + 4,
        )
        observe = self.metrics.redis_latency.observe if self.metrics is not None else None
        self._reader = OnlineReader(client, max_rows=self.max_rows, on_fetch=observe)

    def _bind(self) -> None:
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="serve"),
            options=[
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_calls,
        )
        _ServingServicer(self).add_to(self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc,
            pool=protos.pool,
        )
        where = f"{self.host}:{self.requested_port}"
        try:
            if self.tls is not None:
                self.port = self._grpc.add_secure_port(where, self.tls.credentials())
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
        request = _parse_request(request.SerializeToString())  # our own copy, unknown fields dropped
        body, _ = self.get_online_features_serialized(request)
        return protos.GetOnlineFeaturesResponse.FromString(body)

    def plan_for(self, request: Any) -> Plan:
        """The cached plan of a request's feature service or feature list."""
        catalog = self.catalog
        kind = request.WhichOneof("kind")
        if kind == "feature_service" and request.feature_service:
            return catalog.plan_for_service(request.feature_service, request.full_feature_names)
        if kind == "features":
            return catalog.plan_for_refs(list(request.features.val), request.full_feature_names)
        raise InvalidInput(
            "the request names no features; set feature_service to a feature service name "
            "or features to a list of 'view:feature' references"
        )

    def get_online_features_serialized(self, request: Any) -> tuple[bytes, int]:
        """The serialized response to one request and its row count (raises featurepipe errors)."""
        assert self._reader is not None, "start() the server first"
        plan = self.plan_for(request)
        try:
            return self._reader.read(plan, request.entities, request.request_context)
        except FeaturepipeError as exc:
            if status_for(exc) == grpc.StatusCode.UNAVAILABLE:
                self._set_serving(False)
            raise

    def refresh(self, force: bool = False) -> bool:
        """Reload the registry into a new catalog if it changed; True when reloaded."""
        assert self.config is not None
        file = self.config.registry_file
        signature = None
        if file is not None:
            try:
                st = file.stat()
                signature = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                signature = (0, 0)
            if not force and signature == self._registry_signature:
                return False
        data = registry_bytes(self.config) if signature != (0, 0) else b""
        catalog = Catalog(parse_registry(data, self.config.project))
        if not catalog.services and not catalog.views:
            logger.warning("the registry holds no feature views; run `featurepipe apply`")
        self._catalog = catalog
        self._registry_signature = signature
        if self.metrics is not None and not force:
            self.metrics.registry_reloads.inc()
        return True

    def _check_health(self) -> None:
        assert self._reader is not None
        self._set_serving(self._reader.ping())

    def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        if self.metrics is not None:
            self.metrics.redis_up.set(1 if serving else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)
        if serving:
            logger.info("Redis answers: health SERVING")
        else:
            logger.warning("Redis does not answer: health NOT_SERVING")

    def _watch(self) -> None:
        """Background loop: PING Redis for the health status, re-read a changed registry."""
        since_refresh = 0.0
        while not self._stopping.wait(self.health_interval):
            self._check_health()
            since_refresh += self.health_interval
            if since_refresh >= self.registry_refresh_seconds:
                since_refresh = 0.0
                try:
                    if self.refresh():
                        logger.info("registry changed: feature metadata reloaded")
                except Exception:  # keep serving the last good catalog
                    logger.warning("could not reload the registry; keeping the last one", exc_info=True)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: health goes NOT_SERVING, new calls are refused, and calls in
        flight get ``grace`` seconds to finish."""
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._monitor is not None:
            self._monitor.join(timeout=self.redis_timeout + 1)
            self._monitor = None
        if self._reader is not None:
            self._reader.client.close()
        if self.metrics is not None:
            self.metrics.close()
        self._health_pool.shutdown(wait=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True when it stopped."""
        return self._stopping.wait(timeout)

    def __enter__(self) -> FeatureServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def serve(
    repo: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_workers: int = 8,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
    grace: float = 5.0,
    **options: Any,
) -> None:
    """Run the feature server until ``stop`` is set, or SIGINT / SIGTERM arrives; then
    drain calls in flight for up to ``grace`` seconds.

    ``announce`` receives one line once the port is bound (the CLI passes ``click.echo``);
    ``ready`` is set at the same moment. ``options`` go to :class:`FeatureServer`.
    """
    stop = stop or threading.Event()
    server = FeatureServer(repo, host=host, port=port, max_workers=max_workers, **options).start()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        if announce is not None:
            metrics = (f", metrics on http://{host}:{server.metrics_port}/metrics"
                       if server.metrics is not None else "")
            announce(
                f"serving {SERVICE_NAME} on {server.address} (project "
                f"{server.catalog.project!r}, {len(server.catalog.services)} feature services"
                f"{', TLS' if server.tls else ''}{', tokens' if server.tokens else ''}{metrics}); "
                "Ctrl-C to stop"
            )
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        logger.info("stopping: draining calls in flight (up to %.1fs)", grace)
    finally:
        server.stop(grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
