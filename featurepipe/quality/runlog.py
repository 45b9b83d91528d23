"""The run log: one JSON line per pipeline run under ``<data>/runs/runs.jsonl``.

A record says what a run read (files), what it wrote (partitions), with which definitions
(hash of the Feast specs and of ``contracts.yaml``) and code (package version, git sha),
how many rows went in, on and into quarantine, how long each stage took and every check
result. ``featurepipe status`` and ``featurepipe lineage`` read it back.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurepipe.quality.records import BadRunRecord, RunRecord

if TYPE_CHECKING:
    from feast import FeatureStore

RUNS_FILE = "runs.jsonl"
log = logging.getLogger(__name__)


def runs_path(data: Path) -> Path:
    """Where the run log of a data folder lives."""
    return Path(data) / "runs" / RUNS_FILE


def append_run(data: Path, record: RunRecord) -> Path:
    """Append one run record (one line, written with a single call)."""
    if not isinstance(record, RunRecord):  # a producer's bug, caught where it is made
        raise TypeError(f"append_run takes a RunRecord, got {type(record).__name__}")
    path = runs_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = record.to_json() + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
    return path


def read_runs(data: Path) -> list[RunRecord]:
    """Every run record, oldest first.

    Records of earlier versions load as well (see :mod:`featurepipe.quality.records`). A line
    that is not a run record (a torn last line from a crashed writer, a hand edit) is skipped
    with a warning that names the file and the line; it never stops a command.
    """
    path = runs_path(data)
    if not path.is_file():
        return []
    runs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                runs.append(RunRecord.from_json(line))
            except BadRunRecord as exc:
                log.warning("%s line %d is not a run record and was skipped: %s", path, number, exc)
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


def run_status(error: BaseException | None) -> str:
    """``ok``; ``blocked`` when a quality gate stopped the run; else ``failed``."""
    from featurepipe.errors import GateBlocked

    if error is None:
        return "ok"
    return "blocked" if isinstance(error, GateBlocked) else "failed"


def record_head(run_id: str, kind: str, error: BaseException | None, started: datetime, t0: float,
                view_hashes: dict[str, str], contracts_digest: str) -> dict[str, Any]:
    """The fields every gate's :class:`RunRecord` starts with (keyword arguments): identity,
    status, times, versions. ``t0`` is the run's ``time.perf_counter()`` at its start."""
    return {
        "run_id": run_id,
        "kind": kind,
        "status": run_status(error),
        "error": str(error) if error is not None else None,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.perf_counter() - t0, 4),
        "code_version": code_version(),
        "definitions_hash": definitions_hash(view_hashes, contracts_digest),
        "contracts_hash": contracts_digest or None,
    }
