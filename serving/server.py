"""The gRPC feature server: Feast's ``feast.serving.ServingService`` read straight from Redis.

Besides ServingService (``GetOnlineFeatures``, ``GetFeastServingInfo``) it serves the
standard ``grpc.health.v1.Health`` (SERVING while Redis answers a PING) and server
reflection, so ``grpcurl`` and load balancers work out of the box.

Run it in-process::

    with FeatureServer(repo, port=0) as server:     # port 0: any free port
        print(server.address)
        ...

or blocking, as ``featurepipe serve`` does: ``serve(repo, port=6566, announce=click.echo)``.

Feature metadata is resolved from the registry into a cache once; a background thread
re-reads the registry when its file changes (checked every ``registry_refresh_seconds``),
so ``feast apply`` takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from feast.protos.feast.serving import ServingService_pb2, ServingService_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from serving import backend
from serving.catalog import Catalog
from serving.errors import status_for
from serving.lookup import OnlineReader

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

SERVICE_NAME = ServingService_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name
DEFAULT_PORT = 6566
DEFAULT_MAX_ROWS = 1000


class _ServingServicer(ServingService_pb2_grpc.ServingServiceServicer):
    """Translates gRPC calls into catalog + reader calls, and errors into status codes.

    GetOnlineFeatures returns the response already serialized (see :mod:`serving.wire`);
    :meth:`add_to` registers it with a pass-through serializer.
    """

    def __init__(self, server: FeatureServer) -> None:
        self._server = server
        self._version = package_version("feast")

    def GetFeastServingInfo(  # noqa: N802 (gRPC method name)
        self, request: ServingService_pb2.GetFeastServingInfoRequest, context: grpc.ServicerContext
    ) -> ServingService_pb2.GetFeastServingInfoResponse:
        return ServingService_pb2.GetFeastServingInfoResponse(version=self._version)

    def GetOnlineFeatures(  # noqa: N802 (gRPC method name)
        self, request: ServingService_pb2.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> bytes:
        try:
            return self._server.get_online_features_serialized(request)
        except FeaturepipeError as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.error("GetOnlineFeatures failed: %s", exc)
            context.abort(code, str(exc))
        except Exception as exc:
            logger.exception("GetOnlineFeatures failed unexpectedly")
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}: {exc}); see the feature server's log",
            )
        raise AssertionError("unreachable: context.abort raises")

    def add_to(self, server: grpc.Server) -> None:
        """Register both methods, as the generated ``add_ServingServiceServicer_to_server``."""
        pb = ServingService_pb2
        handlers = {
            "GetFeastServingInfo": grpc.unary_unary_rpc_method_handler(
                self.GetFeastServingInfo,
                request_deserializer=pb.GetFeastServingInfoRequest.FromString,
                response_serializer=pb.GetFeastServingInfoResponse.SerializeToString,
            ),
            "GetOnlineFeatures": grpc.unary_unary_rpc_method_handler(
                self.GetOnlineFeatures,
                request_deserializer=pb.GetOnlineFeaturesRequest.FromString,
                response_serializer=bytes,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _registry_file(store: FeatureStore) -> Path | None:
    """The registry's local file, or None when it lives elsewhere (SQL, S3, remote)."""
    config = store.config.registry
    path = getattr(config, "path", config)
    if getattr(config, "registry_type", "file") != "file" or not isinstance(path, str):
        return None
    if "://" in path:
        if not path.startswith("file://"):
            return None
        path = path[len("file://") :]
    file = Path(path)
    return file if file.is_absolute() else Path(store.repo_path) / file


class FeatureServer:
    """The gRPC server, run in-process: ``start()``, ``port``, ``stop(grace)``.

    Args:
        repo: the feature repo folder (default: ``featurepipe.config.find_repo()``).
        host, port: where to listen; port 0 picks a free port (see ``.port``).
        max_workers: request threads.
        max_rows: the most entity rows one request may ask for.
        registry_refresh_seconds: how often to check the registry for changes.
        redis_timeout: seconds to connect to Redis and to wait for a reply.
        health_interval: seconds between the Redis PINGs behind the health status.
        store: an already opened FeatureStore (instead of ``repo``).
    """

    def __init__(
        self,
        repo: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_workers: int = 8,
        max_rows: int = DEFAULT_MAX_ROWS,
        registry_refresh_seconds: float = 5.0,
        redis_timeout: float = 1.0,
        health_interval: float = 1.0,
        store: FeatureStore | None = None,
    ) -> None:
        if max_rows < 1:
            raise InvalidInput(f"max_rows must be at least 1, got {max_rows}")
        self.repo = repo
        self.host = host
        self.requested_port = port
        self.max_workers = max_workers
        self.max_rows = max_rows
        self.registry_refresh_seconds = registry_refresh_seconds
        self.redis_timeout = redis_timeout
        self.health_interval = health_interval
        self.store = store
        self.port = 0
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
        except BaseException:
            assert self._reader is not None
            self._reader.client.close()
            raise
        self._check_health()
        assert self._grpc is not None
        self._grpc.start()
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)
        self._monitor.start()
        logger.info("serving %s on %s", SERVICE_NAME, self.address)
        return self

    def _open_backends(self) -> None:
        if self.store is None:
            from featurepipe.config import load_store

            self.store = load_store(self.repo)
        online = self.store.config.online_store
        if getattr(online, "type", None) != "redis":
            raise InvalidInput(
                f"online_store type {getattr(online, 'type', online)!r} in feature_store.yaml is "
                "not supported; featurepipe serve reads the redis online store"
            )
        redis_type = getattr(online, "redis_type", "redis")
        if getattr(redis_type, "value", redis_type) != "redis":
            raise InvalidInput(
                f"online_store redis_type {online.redis_type!r} is not supported by featurepipe "
                "serve yet; use a single Redis server (redis_type: redis)"
            )
        try:
            self.refresh(force=True)
        except FeaturepipeError:
            raise
        except Exception as exc:
            raise BackendUnavailable(
                f"cannot read the registry of {self.store.repo_path} ({type(exc).__name__}: "
                f"{exc}); check `registry:` in feature_store.yaml and run `featurepipe apply`"
            ) from exc
        client = backend.connect(
            online.connection_string, timeout=self.redis_timeout, max_connections=self.max_workers + 4
        )
        self._reader = OnlineReader(client, max_rows=self.max_rows)

    def _bind(self) -> None:
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="serve"),
            options=[("grpc.so_reuseport", 0)],
        )
        _ServingServicer(self).add_to(self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        try:
            self.port = self._grpc.add_insecure_port(f"{self.host}:{self.requested_port}")
        except RuntimeError as exc:
            raise InvalidInput(
                f"cannot listen on {self.host}:{self.requested_port} ({exc}); is another server "
                "using the port? Pick another with --port (0 = any free port)"
            ) from exc

    def get_online_features(
        self, request: ServingService_pb2.GetOnlineFeaturesRequest
    ) -> ServingService_pb2.GetOnlineFeaturesResponse:
        """Answer one request in-process (raises featurepipe errors)."""
        return ServingService_pb2.GetOnlineFeaturesResponse.FromString(
            self.get_online_features_serialized(request)
        )

    def get_online_features_serialized(
        self, request: ServingService_pb2.GetOnlineFeaturesRequest
    ) -> bytes:
        """The serialized response to one request (raises featurepipe errors)."""
        assert self._reader is not None, "start() the server first"
        catalog = self.catalog
        kind = request.WhichOneof("kind")
        if kind == "feature_service" and request.feature_service:
            plan = catalog.plan_for_service(request.feature_service, request.full_feature_names)
        elif kind == "features":
            plan = catalog.plan_for_refs(list(request.features.val), request.full_feature_names)
        else:
            raise InvalidInput(
                "the request names no features; set feature_service to a feature service name "
                "or features to a list of 'view:feature' references"
            )
        try:
            return self._reader.read(plan, request.entities, request.request_context)
        except FeaturepipeError as exc:
            if status_for(exc) == grpc.StatusCode.UNAVAILABLE:
                self._set_serving(False)
            raise

    def refresh(self, force: bool = False) -> bool:
        """Reload the registry into a new catalog if it changed; True when reloaded."""
        assert self.store is not None
        file = _registry_file(self.store)
        signature = None
        if file is not None:
            try:
                st = file.stat()
                signature = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                signature = (0, 0)
            if not force and signature == self._registry_signature:
                return False
        if signature != (0, 0):
            self.store.refresh_registry()
        catalog = Catalog.load(self.store)
        if not catalog.services and not catalog.views:
            logger.warning("the registry holds no feature views; run `featurepipe apply`")
        self._catalog = catalog
        self._registry_signature = signature
        return True

    def _check_health(self) -> None:
        assert self._reader is not None
        self._set_serving(self._reader.ping())

    def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
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
        """Stop serving; in-flight requests get ``grace`` seconds to finish."""
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
    **options: Any,
) -> None:
    """Run the feature server until ``stop`` is set, or SIGINT / SIGTERM arrives.

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
            announce(
                f"serving {SERVICE_NAME} on {server.address} (project "
                f"{server.catalog.project!r}, {len(server.catalog.services)} feature services); "
                "Ctrl-C to stop"
            )
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
