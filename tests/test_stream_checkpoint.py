"""A stream checkpoint's guards, without Redis: the kernel version in its fingerprint, and
event times converted to microseconds exactly (a change point is 1 us after its event)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from featurepipe.definitions import AggregateSpec, AggregateView


def _state() -> SimpleNamespace:
    view = AggregateView(
        name="v", join_keys=("k",), input_path="raw/*.parquet", timestamp_field="ts",
        aggregations=(AggregateSpec("n_1h", "count", "x", timedelta(hours=1)),),
        offline_path=Path("offline/v"), push_source="", ttl=None,
    )
    return SimpleNamespace(views=[SimpleNamespace(spec=view)])


def test_a_checkpoint_of_another_kernel_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of kernel 1 meant something else and its state reached back one window, not a
    horizon: a job's checkpoint written under another kernel is not resumed."""
    from featurepipe.core.errors import InvalidInput
    from featurepipe.stream import checkpoint

    types = {"k": "BIGINT", "ts": "TIMESTAMP WITH TIME ZONE", "x": "DOUBLE"}
    now = checkpoint.fingerprint(_state(), 1, timedelta(minutes=5), types)  # type: ignore[arg-type]
    monkeypatch.setattr(checkpoint, "KERNEL_VERSION", 1)
    old = checkpoint.fingerprint(_state(), 1, timedelta(minutes=5), types)  # type: ignore[arg-type]
    assert old != now
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({"fingerprint": old}))
    with pytest.raises(InvalidInput, match="kernel version.*start a new --job or delete that folder"):
        checkpoint.read_manifest(tmp_path, now, "job", 0)


@pytest.mark.parametrize("micro", [0, 1, 123_457, 999_999])
def test_event_times_convert_to_microseconds_exactly(micro: int) -> None:
    from featurepipe.stream.watermark import from_us, to_us

    for base in (datetime(2026, 11, 25, 23, 59, 59, tzinfo=timezone.utc), datetime(1969, 12, 31, tzinfo=timezone.utc)):
        t = base + timedelta(microseconds=micro)
        us = to_us(t)
        assert us == (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
        assert from_us(us) == t and from_us(us + 1) == t + timedelta(microseconds=1)
        assert to_us(t.replace(tzinfo=None)) == us  # naive: UTC
