"""The run log: one JSON line per pipeline run under ``<data>/runs/runs.jsonl``.

A record says what a run read (files), what it wrote (partitions), with which definitions
(hash of the Feast specs and of ``contracts.yaml``) and code (package version, git sha),
how many rows went in, on and into quarantine, how long each stage took and every check
result. ``featurepipe status`` and ``featurepipe lineage`` read it back.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feast import FeatureStore

RUNS_FILE = "runs.jsonl"


def runs_path(data: Path) -> Path:
    """Where the run log of a data folder lives."""
    return Path(data) / "runs" / RUNS_FILE


def append_run(data: Path, record: dict[str, Any]) -> Path:
    """Append one run record (one line, written with a single call)."""
    path = runs_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
    return path


def read_runs(data: Path) -> list[dict[str, Any]]:
    """Every run record, oldest first (a torn last line from a crashed writer is skipped)."""
    path = runs_path(data)
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


@lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """featurepipe's package version and, when run from a git checkout, the commit."""
    import featurepipe

    sha = None
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(featurepipe.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
        sha = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"featurepipe": featurepipe.__version__, "git_sha": sha}


def view_definition_hashes(store: FeatureStore, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 per feature view of its Feast spec and its input source's spec (what a user
    declares; not registry timestamps or materialisation intervals)."""
    from featurepipe.definitions import TAG_INPUT

    hashes = {}
    for name in sorted(names):
        fv = store.get_feature_view(name)
        source = fv.tags.get(TAG_INPUT)
        hashes[name] = feature_view_hash(fv, store.get_data_source(source) if source else None)
    return hashes


def feature_view_hash(fv: Any, input_source: Any = None) -> str:
    """SHA-256 of a Feast feature view's spec and, for a windowed-aggregate view, the spec of
    the raw source it is computed from (what a user declares)."""
    digest = hashlib.sha256(fv.to_proto().spec.SerializeToString(deterministic=True))
    if input_source is not None:
        proto = input_source.to_proto()
        if proto.HasField("meta"):
            proto.ClearField("meta")
        digest.update(proto.SerializeToString(deterministic=True))
    return digest.hexdigest()


def definitions_hash(view_hashes: dict[str, str], contracts_digest: str) -> str:
    """One hash over the views' definitions and the contracts."""
    digest = hashlib.sha256(contracts_digest.encode())
    for name in sorted(view_hashes):
        digest.update(f"{name}={view_hashes[name]}".encode())
    return digest.hexdigest()


def record_head(run_id: str, kind: str, error: BaseException | None, started: datetime, t0: float,
                view_hashes: dict[str, str], contracts_digest: str) -> dict[str, Any]:
    """The fields every gate's run record starts with: identity, status, times, versions.

    ``t0`` is the run's ``time.perf_counter()`` at its start. A run that a quality gate
    stopped is ``blocked``, one that failed otherwise ``failed``.
    """
    from featurepipe.errors import InvalidInput

    status = "ok" if error is None else (
        "blocked" if isinstance(error, InvalidInput) and "quality gate" in str(error) else "failed")
    return {
        "run_id": run_id,
        "kind": kind,
        "status": status,
        "error": str(error) if error is not None else None,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.perf_counter() - t0, 4),
        "code_version": code_version(),
        "definitions_hash": definitions_hash(view_hashes, contracts_digest),
        "contracts_hash": contracts_digest or None,
    }
