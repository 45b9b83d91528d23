"""Back up a repo's Feast registry to a file, and restore it into a repo's registry.

A backup is Feast's own ``RegistryProto`` serialised (the bytes a ``file`` registry keeps in
``registry.db``), taken through Feast's registry API whatever the registry kind (``file`` on
a disk or an object store, ``sql``, ...), with a JSON sidecar beside it (``<file>.json``):
project, Feast and featurepipe versions, UTC time, SHA-256 of the file and what it holds.

A restore checks the file against its sidecar (same SHA-256, same project as the target
repo's ``feature_store.yaml``) and refuses to overwrite a registry that holds definitions
unless forced; forced, it first backs up what it replaces. A ``file`` registry gets the
proto whole through Feast's registry store (S3, GCS and local paths alike); any other kind
gets every object through the registry's ``apply_*`` calls.

Feast itself is imported when a backup or restore runs, so the CLI that lists these
commands stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import featurepipe
from featurepipe.config import data_dir, find_repo, load_store
from featurepipe.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from feast.infra.registry.base_registry import BaseRegistry
    from feast.infra.registry.registry_store import RegistryStore
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
    from feast.repo_config import RepoConfig

SIDECAR_SUFFIX = ".json"
FORMAT = "featurepipe registry backup"
DUMMY_ENTITY = "__dummy"  # `feast apply` adds it to every project: not a definition
# RegistryProto's repeated fields that hold definitions (not its project bookkeeping), and their names
OBJECT_KINDS = {"entities": "entity", "data_sources": "data source", "feature_views": "feature view",
                "stream_feature_views": "stream feature view", "on_demand_feature_views": "on-demand feature view",
                "feature_services": "feature service", "saved_datasets": "saved dataset",
                "validation_references": "validation reference", "permissions": "permission",
                "feature_tables": "feature table", "label_views": "label view"}


@dataclass(frozen=True)
class RegistryBackup:
    """A backup file, its sidecar and what it holds."""

    path: Path
    sidecar: Path
    project: str
    sha256: str
    size: int
    objects: dict[str, int]

    def describe(self) -> str:
        """``3 entities, 11 data sources, ...`` (kinds it holds none of are left out)."""
        return describe_objects(self.objects)


@dataclass(frozen=True)
class RegistryRestore:
    """What a restore wrote, where, and the backup of the registry it replaced (if any)."""

    backup: RegistryBackup
    target: str
    replaced: RegistryBackup | None


def object_counts(proto: RegistryProto) -> dict[str, int]:
    """How many definitions of each kind a registry proto holds (``feast apply``'s dummy
    entity left out)."""
    counts = {kind: len(getattr(proto, kind)) for kind in OBJECT_KINDS if hasattr(proto, kind)}
    counts["entities"] = sum(1 for e in proto.entities if e.spec.name != DUMMY_ENTITY)
    return counts


def describe_objects(counts: dict[str, int]) -> str:
    """``3 entities, 11 data sources`` from :func:`object_counts`; ``no definitions`` when empty."""
    def noun(kind: str, n: int) -> str:
        name = OBJECT_KINDS.get(kind, kind)
        return name if n == 1 else name[:-1] + "ies" if name.endswith("y") else name + "s"

    parts = [f"{n} {noun(kind, n)}" for kind, n in counts.items() if n]
    return ", ".join(parts) or "no definitions"


def backup_registry(repo: str | os.PathLike[str] | None = None, out: Path | None = None,
                    now: datetime | None = None) -> RegistryBackup:
    """Write the registry of ``repo`` to ``out`` (default:
    ``<data>/backups/registry-<UTC time>.pb``) and its sidecar beside it.

    Refuses to overwrite an existing file. The registry is read fresh from its store (not
    from a cache), through ``BaseRegistry.proto()``, so any registry kind works.
    """
    store = load_store(repo)
    registry = store.registry
    registry.refresh(store.project)
    now = now or datetime.now(timezone.utc)
    target = out or _default_path(data_dir(Path(store.repo_path)), now)
    return write_backup(registry.proto(), target, store.project, store.config, now)


def _default_path(data: Path, now: datetime, note: str = "") -> Path:
    stem = f"registry-{now:%Y%m%dT%H%M%SZ}{note}"
    folder = data / "backups"
    path, n = folder / f"{stem}.pb", 1
    while path.exists() or _sidecar(path).exists():  # two backups in one second
        n += 1
        path = folder / f"{stem}-{n}.pb"
    return path


def redacted(location: str) -> str:
    """A registry's path or database URL without its password (sidecars and messages are
    shared; ``postgresql://feast:s3cret@db/feast`` becomes ``postgresql://feast:***@db/feast``).

    >>> redacted("postgresql://feast:s3cret@db:5432/feast")
    'postgresql://feast:***@db:5432/feast'
    """
    parts = urlsplit(location)
    if not parts.password:
        return location
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_backup(proto: RegistryProto, path: Path, project: str, config: RepoConfig,
                 now: datetime) -> RegistryBackup:
    """Write ``proto`` to ``path`` and its sidecar (each written whole, then renamed in place)."""
    import feast

    path = Path(path)
    if path.exists():
        raise InvalidInput(f"{path} already exists; pass another --out (a backup never overwrites one)")
    payload = proto.SerializeToString()
    digest = hashlib.sha256(payload).hexdigest()
    counts = object_counts(proto)
    registry = config.registry
    sidecar = {
        "format": FORMAT,
        "project": project,
        "projects": sorted({p.spec.name for p in proto.projects} | {project}),
        "feast_version": feast.__version__,
        "featurepipe_version": featurepipe.__version__,
        "created": now.isoformat(),
        "sha256": digest,
        "bytes": len(payload),
        "registry": {"type": registry.registry_type, "path": redacted(str(registry.path))},
        "objects": counts,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, payload)
    _write_atomic(_sidecar(path), (json.dumps(sidecar, indent=2) + "\n").encode())
    return RegistryBackup(path, _sidecar(path), project, digest, len(payload), counts)


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_backup(path: Path) -> tuple[RegistryBackup, RegistryProto]:
    """A backup and its proto, checked against its sidecar (exists, same SHA-256)."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    path = Path(path)
    sidecar = _sidecar(path)
    if not path.is_file():
        raise NotFound(f"no backup file at {path}")
    if not sidecar.is_file():
        raise NotFound(f"{path} has no sidecar (looked for {sidecar}); restore only reads backups written by "
                       "`featurepipe registry backup`, whose sidecar names the project they belong to")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        project, expected = str(meta["project"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{sidecar} is not a registry backup's sidecar ({exc}); it needs project and sha256") from exc
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected:
        raise InvalidInput(f"{path} does not match its sidecar: SHA-256 {digest[:16]}..., the sidecar says "
                           f"{expected[:16]}... (a truncated copy or an edited file); restore from an intact copy")
    proto = RegistryProto()
    proto.ParseFromString(payload)
    return RegistryBackup(path, sidecar, project, digest, len(payload), object_counts(proto)), proto


def restore_registry(backup: Path, repo: str | os.PathLike[str] | None = None, force: bool = False,
                     now: datetime | None = None) -> RegistryRestore:
    """Write the registry in ``backup`` into the registry that ``repo``'s
    ``feature_store.yaml`` configures.

    The backup's project must be the repo's. A registry that already holds definitions is
    only overwritten with ``force``, and then backed up first (``<data>/backups/...-replaced.pb``).
    """
    from feast.repo_config import load_repo_config

    info, proto = read_backup(backup)
    root = find_repo(repo)
    config = load_repo_config(root, root / "feature_store.yaml")
    if config.project != info.project:
        raise InvalidInput(f"{backup} is a registry of project {info.project!r}, but {root} is project "
                           f"{config.project!r}; restore it into a repo of project {info.project!r}")
    now = now or datetime.now(timezone.utc)
    registry_config = config.registry
    if registry_config.registry_type == "file":
        store = _registry_store(config, root)
        try:
            current = store.get_registry_proto()
        except FileNotFoundError:
            current = None
        replaced = _check_replace(current, root, config, force, now)
        store.update_registry_proto(proto)
    else:
        registry = load_store(root).registry
        current = registry.proto()
        replaced = _check_replace(current, root, config, force, now)
        _apply_objects(registry, proto, config.project)
        _delete_others(registry, current, proto)
    return RegistryRestore(info, f"{registry_config.registry_type} registry {redacted(registry_config.path)}",
                           replaced)


def _registry_store(config: RepoConfig, root: Path) -> RegistryStore:
    """The registry store a ``file`` registry of ``config`` keeps its proto in (Feast's choice
    by the path's scheme, or ``registry_store_type``)."""
    from feast.infra.registry.registry import (
        get_registry_store_class_from_scheme,
        get_registry_store_class_from_type,
    )

    registry_config = config.registry
    if registry_config.registry_store_type:
        cls = get_registry_store_class_from_type(str(registry_config.registry_store_type))
    else:
        cls = get_registry_store_class_from_scheme(registry_config.path)
    store: RegistryStore = cls(registry_config, root)
    return store


def _check_replace(current: RegistryProto | None, root: Path, config: RepoConfig, force: bool,
                   now: datetime) -> RegistryBackup | None:
    """Refuse to replace a registry with definitions unless ``force``; forced, back it up."""
    if current is None or not any(object_counts(current).values()):
        return None
    held = describe_objects(object_counts(current))
    if not force:
        raise InvalidInput(f"the registry of {root} ({redacted(config.registry.path)}) is not empty ({held}); restoring "
                           "would replace it. Pass --force to replace it (it is backed up first), or restore "
                           "into a repo whose registry is empty")
    return write_backup(current, _default_path(data_dir(root), now, "-replaced"), config.project, config, now)


def _apply_objects(registry: BaseRegistry, proto: RegistryProto, project: str) -> None:
    """Write every definition of ``proto`` through the registry's ``apply_*`` calls (for
    registries that keep no single proto: ``sql``, ``snowflake.registry``, ``remote``)."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView, StreamFeatureView
    from feast.data_source import DataSource
    from feast.infra.infra_object import Infra
    from feast.permissions.permission import Permission
    from feast.project import Project
    from feast.saved_dataset import SavedDataset, ValidationReference

    unsupported = [k for k in ("feature_tables", "label_views") if len(getattr(proto, k, ()))]
    if unsupported:
        raise InvalidInput(f"the backup holds {', '.join(unsupported)}, which featurepipe restores only into a "
                           "`file` registry; restore it into one, then `feast apply` into this registry")
    appliers: list[tuple[str, Any, Any]] = [
        ("data_sources", DataSource.from_proto, registry.apply_data_source),
        ("entities", Entity.from_proto, registry.apply_entity),
        ("feature_views", FeatureView.from_proto, registry.apply_feature_view),
        ("stream_feature_views", StreamFeatureView.from_proto, registry.apply_feature_view),
        ("on_demand_feature_views", OnDemandFeatureView.from_proto, registry.apply_feature_view),
        ("feature_services", FeatureService.from_proto, registry.apply_feature_service),
        ("saved_datasets", SavedDataset.from_proto, registry.apply_saved_dataset),
        ("validation_references", ValidationReference.from_proto, registry.apply_validation_reference),
        ("permissions", Permission.from_proto, registry.apply_permission),
    ]
    for item in proto.projects:
        registry.apply_project(Project.from_proto(item), commit=False)
    for kind, parse, apply in appliers:
        for item in getattr(proto, kind):
            apply(parse(item), _project(item) or project, commit=False)
    registry.update_infra(Infra.from_proto(proto.infra), project, commit=False)
    registry.commit()


def _delete_others(registry: BaseRegistry, current: RegistryProto, proto: RegistryProto) -> None:
    """Delete what ``current`` held and the backup ``proto`` does not (a forced restore into a
    registry kept as objects replaces them all, as a ``file`` registry's does)."""
    deleters = [("feature_services", registry.delete_feature_service),
                ("on_demand_feature_views", registry.delete_feature_view),
                ("stream_feature_views", registry.delete_feature_view),
                ("feature_views", registry.delete_feature_view), ("entities", registry.delete_entity),
                ("data_sources", registry.delete_data_source), ("saved_datasets", registry.delete_saved_dataset),
                ("validation_references", registry.delete_validation_reference),
                ("permissions", registry.delete_permission)]
    for kind, delete in deleters:
        keep = {(_project(item), _name(item)) for item in getattr(proto, kind)}
        for item in getattr(current, kind):
            if (_project(item), _name(item)) not in keep and _name(item) != DUMMY_ENTITY:
                delete(_name(item), _project(item), commit=False)
    registry.commit()


def _project(item: Any) -> str:
    """The project of a registry proto's object (data sources and validation references carry
    it at the top, the others in their spec)."""
    return str(item.spec.project if item.DESCRIPTOR.fields_by_name.get("spec") else item.project)


def _name(item: Any) -> str:
    return str(item.spec.name if item.DESCRIPTOR.fields_by_name.get("spec") else item.name)
