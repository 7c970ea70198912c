"""
Times as the hub writes and shows them: ISO 8601 UTC text, whole seconds when stored.

:func:`utcnow` is what every table's ``*_at`` column holds; :func:`stamp_time` reads
the wall time out of a version stamp; :func:`ago` says how long ago, in words.
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.clock import Timestamp


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stamp_time(version: str | None) -> str | None:
    """The wall time of a version stamp, as ISO 8601 UTC."""
    if not version:
        return None
    ms = Timestamp.parse(version).wall_ms
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def parse_time(text: str | None) -> datetime | None:
    """The time of an ISO 8601 text (UTC if it names no zone); None for None or ''."""
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def later(a: str | None, b: str | None) -> bool:
    """Is time ``a`` later than time ``b`` (None is earliest)?"""
    ta, tb = parse_time(a), parse_time(b)
    return ta is not None and (tb is None or ta > tb)


def ago(text: str | None, now: datetime | None = None) -> str:
    """'12 minutes ago' for an ISO time; 'never' for None."""
    when = parse_time(text)
    if when is None:
        return "never"
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "just now" if seconds > -60 else "in the future"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    return "just now" if seconds < 10 else f"{seconds} seconds ago"
