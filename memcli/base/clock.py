"""The one timestamp format of memcli's files and JSON: ISO 8601 in UTC with a "Z",
to the millisecond (`2026-12-01T10:19:58.123Z`)."""

from __future__ import annotations

from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_z(value: str | None) -> str | None:
    """`value` (any ISO 8601 time, as older pools wrote them) in the one format; None stays None,
    and a value that is no time is returned as it is (it is data, not ours to drop)."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_from_epoch(seconds: float | None) -> str | None:
    """A Unix time (time.time()) in the one format; None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
