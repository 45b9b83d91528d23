"""Time helpers: every instant featurepipe handles is timezone-aware UTC."""

from __future__ import annotations

from datetime import datetime, timezone


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (a naive one is taken as UTC)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
