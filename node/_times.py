"""How the office writes times: ISO 8601, UTC, to the second."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.clock import wall_ms


def utcnow() -> str:
    """Now, by this office's clock."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def stamp_time(hlc: int) -> str:
    """The wall-clock time of a stamp."""
    return datetime.fromtimestamp(wall_ms(hlc) / 1000, UTC).isoformat(timespec="seconds")
