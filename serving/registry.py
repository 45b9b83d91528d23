"""The feature repo's registry as the server needs it, read without the Feast SDK.

A file registry is parsed straight into Feast's ``Registry`` message with the protos of
:mod:`serving.protos`. The result is a :class:`Definitions`: small immutable descriptions
of the project's feature views, on-demand feature views and feature services. Only
registries that are not a local file (SQL, S3, GCS, remote) go through Feast's SDK, which
then is imported on first use. Names end in ``Def`` (and the type enum is
:data:`ServedValueType`) so that none shadows Feast's ``Field`` or ``ValueType``.

:class:`RegistryWatcher` tells the server when the registry changed, as cheaply as its kind
allows; unchanged bytes are never parsed again (no new catalog, no plans rebuilt):

* file: ``stat()`` (modification time and size); when they moved, the file is read and its
  SHA-256 compared with that of the last parse.
* SQL (``registry_type: sql``): one query for the project's ``last_updated_timestamp`` in
  Feast's ``feast_metadata`` table, which every apply and delete stamps; when it moved, the
  registry is built (Feast's ``SqlRegistry.proto()``: one query per object table) and its
  digest compared. Feast stamps whole seconds, so a stamp younger than
  :data:`RACY_SECONDS` is always followed by the digest check (a second apply within the
  same second keeps the stamp). With ``purge_feast_metadata`` there is no stamp: digest only.
* S3, GCS, remote and any other kind: Feast's registry stores offer no ETag or
  last-modified, so every check fetches the registry (one object download, or the remote
  registry's ``Proto`` call) and compares the digest; only the parse is saved.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featurepipe.errors import BackendUnavailable, InvalidInput
from serving import protos
from serving.repo_config import ServingRepoConfig

if TYPE_CHECKING:
    class ServedValueType(enum.IntEnum):
        """What the type checker sees of the enum built below from the installed Feast's
        protos: Feast 0.67's members (tests/test_serving.py checks that the two agree)."""

        INVALID = 0
        BYTES = 1
        STRING = 2
        INT32 = 3
        INT64 = 4
        DOUBLE = 5
        FLOAT = 6
        BOOL = 7
        UNIX_TIMESTAMP = 8
        BYTES_LIST = 11
        STRING_LIST = 12
        INT32_LIST = 13
        INT64_LIST = 14
        DOUBLE_LIST = 15
        FLOAT_LIST = 16
        BOOL_LIST = 17
        UNIX_TIMESTAMP_LIST = 18
        NULL = 19
        MAP = 20
        MAP_LIST = 21
        BYTES_SET = 22
        STRING_SET = 23
        INT32_SET = 24
        INT64_SET = 25
        DOUBLE_SET = 26
        FLOAT_SET = 27
        BOOL_SET = 28
        UNIX_TIMESTAMP_SET = 29
        JSON = 32
        JSON_LIST = 33
        STRUCT = 34
        STRUCT_LIST = 35
        UUID = 36
        TIME_UUID = 37
        UUID_LIST = 38
        TIME_UUID_LIST = 39
        UUID_SET = 40
        TIME_UUID_SET = 41
        VALUE_LIST = 42
        VALUE_SET = 43
        DECIMAL = 44
        DECIMAL_LIST = 45
        DECIMAL_SET = 46
        SCALAR_MAP = 47
        ZONED_TIMESTAMP = 48
else:
    ServedValueType = enum.IntEnum("ServedValueType", protos.VALUE_TYPES)
    """Feast's ``feast.types.ValueType.Enum`` (INT64, STRING, DOUBLE, ...), same numbers and names,
    built from the installed Feast's protos (not Feast's ``ValueType`` class, which needs its SDK)."""

_REGISTRY = "feast/core/Registry.proto"


@dataclass(frozen=True)
class FieldDef:
    """A named, typed column of a view or request schema."""

    name: str
    value_type: ServedValueType


# The tags featurepipe.definitions.WindowedFeatures puts on a windowed-aggregate view (the
# server reads the registry without the Feast SDK, so without that module; a test checks
# that the names agree).
TAG_KIND, WINDOWED_KIND, TAG_AGGREGATIONS = "featurepipe.kind", "windowed_aggregates", "featurepipe.aggregations"


@dataclass(frozen=True)
class ViewDef:
    """A (batch or stream) feature view: what the server reads of it.

    ``functions``: for a windowed-aggregate view, each feature's aggregation function
    (``count``, ``sum``, ``mean``, ...), in ``features`` order; empty for any other view.
    Its values are read from the entity's window schedule at the request's clock.
    """

    name: str
    entity_columns: tuple[FieldDef, ...]
    features: tuple[FieldDef, ...]
    ttl_seconds: float  # 0: no TTL
    functions: tuple[str, ...] = ()

    @property
    def windowed(self) -> bool:
        """Whether the view is a windowed-aggregate view (served from its schedule)."""
        return bool(self.functions)


@dataclass(frozen=True)
class ProjectionDef:
    """A view as a feature service or on-demand view uses it (a subset, maybe renamed)."""

    name: str
    alias: str
    features: tuple[str, ...]
    join_key_map: tuple[tuple[str, str], ...]
    version_tag: int | None = None

    def name_to_use(self) -> str:
        base = self.alias or self.name
        return base if self.version_tag is None else f"{base}@v{self.version_tag}"


@dataclass(frozen=True)
class OnDemandDef:
    """A python-mode on-demand feature view: sources, request schema and its UDF."""

    name: str
    features: tuple[FieldDef, ...]
    sources: tuple[ProjectionDef, ...]
    request_schema: tuple[FieldDef, ...]
    mode: str
    write_to_online_store: bool
    has_aggregations: bool
    singleton: bool
    udf_body: bytes = field(repr=False)
    udf_text: str = field(repr=False)

    def load_udf(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The transformation, as Feast restores it (dill, else its source text)."""
        import dill

        if self.udf_body:
            try:
                udf = dill.loads(self.udf_body)
                if callable(udf):
                    return udf  # type: ignore[no-any-return]
            except Exception:  # a UDF pickled under another Python: try the source text
                pass
        return _udf_from_source(self.name, self.udf_text)


@dataclass(frozen=True)
class ServiceDef:
    name: str
    projections: tuple[ProjectionDef, ...]


@dataclass(frozen=True)
class Definitions:
    project: str
    views: tuple[ViewDef, ...]
    on_demand_views: tuple[OnDemandDef, ...]
    services: tuple[ServiceDef, ...]


def registry_bytes(config: ServingRepoConfig) -> bytes:
    """The serialized ``Registry`` message (empty when the registry file is missing)."""
    if config.registry_file is not None:
        try:
            return config.registry_file.read_bytes()
        except FileNotFoundError:
            return b""
    from feast import FeatureStore  # SQL / S3 / remote registries: Feast knows how

    store = FeatureStore(repo_path=str(config.repo))
    return bytes(store.registry.proto().SerializeToString())


RACY_SECONDS = 5.0
"""A change token younger than this (by the server's clock) is not trusted alone: the next
check compares digests too. It covers changes stamped within the same second (a SQL
registry's stamp has whole seconds) and a few seconds of clock skew between the host that
ran ``feast apply`` and the server (git's "racily clean" index entries, the same idea)."""


@dataclass(frozen=True)
class ChangeToken:
    """What a cheap look at the registry saw: ``value`` moves whenever the registry
    changes; ``at`` is when it last changed (epoch seconds, by the writer's clock)."""

    value: Hashable
    at: float


class RegistryWatcher:
    """The registry's definitions, read again only when the registry changed.

    ``check()`` takes the kind's change token first (see the module doc); an unchanged
    token older than :data:`RACY_SECONDS` ends the check there. Otherwise the serialized
    registry is fetched and its SHA-256 compared with that of the last parse: only new
    bytes are parsed. ``fetches`` and ``parses`` count the work done. Not thread-safe: the
    server calls it from its one registry thread (and once at start).

    Example::

        watcher = RegistryWatcher(read_repo_config(repo))
        definitions = watcher.check(force=True)  # the first read
        watcher.check()                          # None until the registry changes
    """

    def __init__(self, config: ServingRepoConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.fetches = 0
        self.parses = 0
        self._clock = clock
        self._token: ChangeToken | None = None
        self._settled = False  # whether self._token was old enough to be trusted alone
        self._digest: bytes | None = None
        self._feast_registry: Any = None  # Feast's registry object, kept (not a file)

    def check(self, force: bool = False) -> Definitions | None:
        """New definitions when the registry changed since the last parse (always when
        ``force``), else None. Raises what reading or parsing raises; the next check
        then tries again."""
        now = self._clock()
        token = self._change_token()  # before the fetch: a change in between is seen next time
        if not force and token is not None and token == self._token and self._settled:
            return None
        data = self._fetch()
        self.fetches += 1
        digest = hashlib.sha256(data).digest()
        definitions = None
        if force or digest != self._digest:
            definitions = parse_registry(data, self.config.project)
            self.parses += 1
        self._token, self._digest = token, digest
        self._settled = token is not None and now - token.at >= RACY_SECONDS
        return definitions

    def _change_token(self) -> ChangeToken | None:
        file = self.config.registry_file
        if file is not None:
            try:
                st = file.stat()
            except FileNotFoundError:
                return ChangeToken("missing", 0.0)
            return ChangeToken((st.st_mtime_ns, st.st_size), st.st_mtime)
        return _sql_change_token(self._registry(), self.config.project)

    def _fetch(self) -> bytes:
        if self.config.registry_file is not None:
            return registry_bytes(self.config)
        from feast.infra.registry.registry import Registry

        registry = self._registry()
        if isinstance(registry, Registry):  # object stores: proto() answers from its cache
            registry.refresh()
        # deterministic: map fields in key order, so equal registries give equal digests
        return bytes(registry.proto().SerializeToString(deterministic=True))

    def _registry(self) -> Any:
        """Feast's registry object for this repo, made once (a SQL registry's engine and
        connection pool are kept between checks)."""
        if self._feast_registry is None:
            from feast import FeatureStore

            self._feast_registry = FeatureStore(repo_path=str(self.config.repo)).registry
        return self._feast_registry


def _sql_change_token(registry: Any, project: str) -> ChangeToken | None:
    """The project's ``last_updated_timestamp`` in a SQL registry's ``feast_metadata``
    table; None for any other registry, or when Feast keeps no such row."""
    from feast.infra.registry.sql import FeastMetadataKeys, SqlRegistry, feast_metadata
    from sqlalchemy import select

    if not isinstance(registry, SqlRegistry) or registry.purge_feast_metadata:
        return None
    query = select(feast_metadata.c.last_updated_timestamp).where(
        feast_metadata.c.project_id == project,
        feast_metadata.c.metadata_key == FeastMetadataKeys.LAST_UPDATED_TIMESTAMP.value,
    )
    with registry.read_engine.connect() as connection:
        stamp = connection.execute(query).scalar()
    return None if stamp is None else ChangeToken(int(stamp), float(stamp))


def parse_registry(data: bytes, project: str) -> Definitions:
    """The definitions of ``project`` in a serialized Feast ``Registry``."""
    registry_cls = protos.message("feast.core.Registry", _REGISTRY)
    try:
        registry = registry_cls.FromString(data)
    except Exception as exc:
        raise BackendUnavailable(
            f"the registry is not a Feast registry ({type(exc).__name__}: {exc}); run "
            "`featurepipe apply` to rewrite it"
        ) from exc
    views: dict[str, ViewDef] = {}
    for proto in [*registry.feature_views, *registry.stream_feature_views]:
        if proto.spec.project == project:
            views.setdefault(proto.spec.name, _view(proto.spec))
    return Definitions(
        project=project,
        views=tuple(views.values()),
        on_demand_views=tuple(
            _on_demand(p.spec) for p in registry.on_demand_feature_views
            if p.spec.project == project
        ),
        services=tuple(
            ServiceDef(p.spec.name, tuple(_projection(f) for f in p.spec.features))
            for p in registry.feature_services
            if p.spec.project == project
        ),
    )


def _fields(specs: Any) -> tuple[FieldDef, ...]:
    return tuple(FieldDef(s.name, _value_type(s.value_type)) for s in specs)


def _value_type(number: int) -> ServedValueType:
    try:
        return ServedValueType(number)
    except ValueError:
        return ServedValueType.INVALID


def _view(spec: Any) -> ViewDef:
    ttl = spec.ttl.seconds + spec.ttl.nanos * 1e-9 if spec.HasField("ttl") else 0.0
    features = _fields(spec.features)
    functions: tuple[str, ...] = ()
    if spec.tags.get(TAG_KIND) == WINDOWED_KIND:
        try:
            by_name = {a["name"]: a["function"] for a in json.loads(spec.tags[TAG_AGGREGATIONS])}
            functions = tuple(by_name[f.name] for f in features)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(
                f"feature view {spec.name!r} has a broken {TAG_AGGREGATIONS!r} tag ({exc}); run `featurepipe apply`"
            ) from exc
    return ViewDef(spec.name, _fields(spec.entity_columns), features, ttl, functions)


def _projection(proto: Any) -> ProjectionDef:
    return ProjectionDef(
        name=proto.feature_view_name,
        alias=proto.feature_view_name_alias,
        features=tuple(f.name for f in proto.feature_columns),
        join_key_map=tuple(sorted(proto.join_key_map.items())),
        version_tag=proto.version_tag if proto.HasField("version_tag") else None,
    )


def _on_demand(spec: Any) -> OnDemandDef:
    sources: list[ProjectionDef] = []
    request: list[FieldDef] = []
    for source in spec.sources.values():
        kind = source.WhichOneof("source")
        if kind == "feature_view":
            view = source.feature_view.spec
            sources.append(ProjectionDef(view.name, "", tuple(f.name for f in view.features), ()))
        elif kind == "feature_view_projection":
            sources.append(_projection(source.feature_view_projection))
        elif kind == "request_data_source":
            options = source.request_data_source.request_data_options
            request += _fields(options.schema)
            request += [FieldDef(n, _value_type(t)) for n, t in options.deprecated_schema.items()]
    udf = spec.feature_transformation.user_defined_function
    if spec.feature_transformation.WhichOneof("transformation") != "user_defined_function":
        udf = spec.user_defined_function
    return OnDemandDef(
        name=spec.name,
        features=_fields(spec.features),
        sources=tuple(sources),
        request_schema=tuple(request),
        mode=spec.mode or "pandas",
        write_to_online_store=spec.write_to_online_store,
        has_aggregations=len(spec.aggregations) > 0,
        singleton=spec.singleton,
        udf_body=bytes(udf.body),
        udf_text=udf.body_text,
    )


def _udf_from_source(name: str, text: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Define the UDF from its source text (decorators dropped), as Feast's fallback does."""
    lines = text.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), None)
    if start is None:
        raise InvalidInput(
            f"on-demand feature view {name!r} has no usable transformation in the registry; "
            "re-run `featurepipe apply`"
        )
    namespace: dict[str, Any] = {}
    exec(compile("from typing import Any\n" + "\n".join(lines[start:]), f"<{name}>", "exec"),
         namespace)
    udf = next(v for k, v in namespace.items() if callable(v) and k not in ("Any",))
    return udf  # type: ignore[no-any-return]
