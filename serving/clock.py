"""The clock a request is answered at: what "now" is for request-time windows.

A windowed-aggregate feature asked at ``t`` covers the events before ``t``; online, ``t`` is
the server's clock when the request arrives. For tests only, the clock can be pinned to an
instant (``ServerOptions(clock=...)``, ``--clock``, or ``$FEATUREPIPE_CLOCK``), so that a test
asks the server about an hour, a day or a week after its data without waiting for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

from featurepipe.errors import InvalidInput

CLOCK_ENV = "FEATUREPIPE_CLOCK"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _now_us() -> int:
    return time.time_ns() // 1000


def request_clock(pinned: str | None = None) -> Callable[[], int]:
    """Microseconds since the epoch, now: the real clock, or the instant ``pinned`` (else
    ``$FEATUREPIPE_CLOCK``) names in ISO 8601 (without a zone: UTC). Test use only."""
    text = pinned if pinned is not None else os.environ.get(CLOCK_ENV) or None
    if text is None:
        return _now_us
    try:
        instant = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(
            f"clock {text!r} is not an ISO 8601 instant (e.g. 2026-12-07T10:00:00+00:00); fix --clock or "
            f"${CLOCK_ENV}, or unset it to serve at the real clock"
        ) from exc
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=timezone.utc)
    delta = instant - _EPOCH
    pinned_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return lambda: pinned_us
