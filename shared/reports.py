"""
What an office tells the hub about itself: ``POST /v1/status`` takes a
:class:`StatusReport` (its pending changes, last error, clock offset, version) with
one :class:`SyncEvent` per sync the hub has not heard of yet. Never case data.

A wire type like those of shared/protocol.py (which names the protocol's version and
reads every message the same way), kept apart because it is about offices' health,
not about moving records.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta, Struct

from shared.errors import ProtocolError
from shared.protocol import PROTOCOL_VERSION, Count, Int64, IsoTime, read_message

MAX_EVENTS_PER_REPORT = 100
MAX_ERROR_CHARS = 1000
MAX_VERSION_CHARS = 40
Outcome = Literal["ok", "error"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
_SECONDS = Meta(ge=0, lt=10**7)


@dataclasses.dataclass(frozen=True, slots=True)
class SyncEvent:
    """One sync as the office saw it: when, how long, how much, and how it ended.

    A dataclass (msgspec reads one as it reads a Struct), since the office shifts its
    events' times with ``dataclasses.replace``.
    """

    id: Count  # the office's own number for it: reports are idempotent
    started_at: IsoTime
    seconds: Annotated[float, _SECONDS]
    outcome: Outcome
    pushed: Count = 0
    pulled: Count = 0
    conflicts: Count = 0
    rejected: Count = 0
    bytes_sent: Count = 0
    bytes_received: Count = 0
    error: str | None = None  # cut to MAX_ERROR_CHARS when the hub reads it
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, data: Any) -> SyncEvent:
        return _checked_event(read_message(cls, data, "a sync event"))


class StatusReport(Struct, frozen=True, tag_field="protocol", tag=PROTOCOL_VERSION):
    """What an office tells the hub about itself after each sync (never case data)."""

    pending: Count  # changes waiting to be pushed
    oldest_pending_at: IsoTime | None  # when the oldest of them was made
    rejected: Count  # changes the hub rejected, kept aside at the office
    clock_offset_ms: Int64  # how far the office clock is behind the hub's
    version: str  # the office's fieldsync version (the hub keeps MAX_VERSION_CHARS)
    # its sync interval, when it runs the agent
    interval_seconds: Annotated[float, Meta(gt=0, lt=10**7)] | None = None
    last_error: str | None = None  # cut to MAX_ERROR_CHARS when the hub reads it
    last_error_code: str | None = None
    last_error_at: IsoTime | None = None
    events: Annotated[list[SyncEvent], Meta(max_length=MAX_EVENTS_PER_REPORT)] = msgspec.field(
        default_factory=list
    )

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, data: Any) -> StatusReport:
        """Read a report (parsed JSON, or its bytes); ProtocolError if malformed."""
        what = "the status report"
        report = read_message(cls, data, what)
        _check_time(report.oldest_pending_at, "oldest_pending_at", what)
        _check_time(report.last_error_at, "last_error_at", what)
        return msgspec.structs.replace(
            report,
            version=report.version[:MAX_VERSION_CHARS],
            last_error=_error_text(report.last_error),
            events=[_checked_event(e) for e in report.events],
        )


def _checked_event(event: SyncEvent) -> SyncEvent:
    _check_time(event.started_at, "started_at", "a sync event")
    if event.error is None or len(event.error) <= MAX_ERROR_CHARS:
        return event
    return dataclasses.replace(event, error=_error_text(event.error))


def _check_time(value: str | None, name: str, what: str) -> None:
    if value is not None:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ProtocolError(f"{what}: field {name!r} is not an ISO 8601 time") from None


def _error_text(value: str | None) -> str | None:
    return None if value is None else value[:MAX_ERROR_CHARS]
