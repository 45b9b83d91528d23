"""Event time in integer microseconds, and the watermarks of a stream job's partitions.

Each partition's watermark is its greatest event time so far minus the allowed lateness;
an event older than the watermark of its partition *when it arrives* is late. The job's
watermark is the least over its partitions (a partition that has delivered nothing yet
holds it back): rows older than it can no longer change and become final.

Times are kept as microseconds since the epoch (UTC) so that comparisons run on NumPy
arrays; :data:`NEG_INF` and :data:`POS_INF` stand for "before everything" (nothing seen
yet) and "after everything" (the input is complete).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone

import numpy as np

from featurepipe.core.sql import ts_literal

US = 1_000_000
NEG_INF = -(2**62)
POS_INF = 2**62


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_us(value: datetime | None) -> int:
    """Microseconds since the epoch of ``value`` (naive: UTC), exactly (no float on the
    way: a change point is one microsecond after its event); None is :data:`NEG_INF`."""
    if value is None:
        return NEG_INF
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime | None:
    """The UTC datetime of ``us`` microseconds since the epoch, exactly; None for the infinities."""
    if us <= NEG_INF or us >= POS_INF:
        return None
    return _EPOCH + timedelta(microseconds=us)


def duration_us(value: timedelta) -> int:
    """A duration in whole microseconds."""
    return int(value / timedelta(microseconds=1))


def ts_sql(us: int) -> str:
    """A DuckDB TIMESTAMPTZ literal for ``us`` microseconds since the epoch."""
    return ts_literal(_EPOCH + timedelta(microseconds=us))


def job_watermark(partition_max: Mapping[str, int], assigned: Iterable[str] | None, lateness_us: int) -> int:
    """The least partition watermark over the partitions seen and ``assigned`` (the
    source's partitions for this worker, None when unknown): :data:`NEG_INF` while any of
    them has delivered nothing."""
    partitions = set(assigned or ()) | set(partition_max)
    if not partitions or any(p not in partition_max for p in partitions):
        return NEG_INF
    return min(partition_max[p] for p in partitions) - lateness_us


def arrival_watermarks(ts_us: np.ndarray, partitions: np.ndarray, partition_names: list[str],
                       partition_max: Mapping[str, int], lateness_us: int) -> tuple[np.ndarray, dict[str, int]]:
    """Each event's partition watermark when it arrives, and every partition's newest
    event time after the events.

    ``ts_us`` are the events' times in arrival order and ``partitions`` the index of each
    one's partition in ``partition_names``; ``partition_max`` (not changed) is each
    partition's newest event time before them. An event's watermark is the newest event
    time of its partition *before* it, minus ``lateness_us``, so it does not depend on how
    the events were cut into micro-batches.
    """
    bound = np.empty(len(ts_us), dtype=np.int64)
    newest = dict(partition_max)
    for p in np.unique(partitions):
        name = partition_names[int(p)]
        sel = np.nonzero(partitions == p)[0]
        prev = newest.get(name, NEG_INF)
        run_max = np.maximum.accumulate(np.concatenate([[prev], ts_us[sel]]))
        bound[sel] = run_max[:-1] - lateness_us
        newest[name] = int(run_max[-1])
    return bound, newest
