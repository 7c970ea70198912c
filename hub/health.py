"""
How an office syncs, in one word: :func:`health`, and :class:`OfficeStatus`, one office
as admins see it.

The hub learns about an office in two ways: what it sees itself (each push and pull,
each request it refuses) and what the office reports after every sync (``POST
/v1/status``: pending changes, the age of the oldest, its last error, clock offset,
version, and one event per sync). hub/status.py keeps both; this module judges them.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hub.times import ago, later, parse_time
from shared.errors import ADVICE

# Without an interval reported by the office: the agent's usual one.
DEFAULT_INTERVAL_SECONDS = 60.0
STALE_INTERVALS = 3

HEALTH_STATES = ("ok", "stale", "failing", "never synced")


@dataclass(frozen=True, slots=True)
class OfficeStatus:
    """One office as admins see it (no case data)."""

    name: str
    created_at: str
    revoked: bool
    health: str  # one of HEALTH_STATES
    health_reason: str  # why, in words
    last_seen_at: str | None
    last_push_at: str | None
    last_pull_at: str | None
    last_success_at: str | None
    pushed: int
    pulled: int
    lag: int  # hub changes the office has not pulled yet
    open_conflicts: int  # conflicts of its records no admin has settled
    waiting_conflicts: int  # of those, the ones a policy could not settle
    rejected: int  # its changes the hub rejected
    pending: int | None  # as last reported by the office
    oldest_pending_at: str | None
    clock_offset_ms: int | None
    version: str | None
    interval_seconds: float | None
    reported_at: str | None
    last_error: str | None
    last_error_code: str | None
    last_error_at: str | None
    advice: str | None  # what to do about the last error or the health
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at,
            "revoked": self.revoked,
            "health": self.health,
            "health_reason": self.health_reason,
            "last_seen_at": self.last_seen_at,
            "last_push_at": self.last_push_at,
            "last_pull_at": self.last_pull_at,
            "last_success_at": self.last_success_at,
            "pushed": self.pushed,
            "pulled": self.pulled,
            "lag": self.lag,
            "open_conflicts": self.open_conflicts,
            "waiting_conflicts": self.waiting_conflicts,
            "rejected": self.rejected,
            "pending": self.pending,
            "oldest_pending_at": self.oldest_pending_at,
            "clock_offset_ms": self.clock_offset_ms,
            "version": self.version,
            "interval_seconds": self.interval_seconds,
            "reported_at": self.reported_at,
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "last_error_at": self.last_error_at,
            "advice": self.advice,
            "events": self.events,
        }

    def seconds_since_success(self, now: datetime | None = None) -> float | None:
        success = parse_time(self.last_success_at)
        if success is None:
            return None
        return max(0.0, ((now or datetime.now(UTC)) - success).total_seconds())


def health(
    *,
    now: datetime,
    stale_after: timedelta,
    last_success_at: str | None,
    last_error_at: str | None,
    last_error: str | None,
    pending: int | None,
    oldest_pending_at: str | None,
) -> tuple[str, str]:
    """One word for how an office syncs, and why.

    - never synced: no successful sync yet, and no error either;
    - failing: an error since the last successful sync; or a stall: changes wait at
      the office for longer than ``stale_after`` although it syncs;
    - stale: no successful sync for longer than ``stale_after``;
    - ok otherwise.
    """
    success = parse_time(last_success_at)
    error_at = parse_time(last_error_at)
    # Times have whole seconds: an error in the second of the last success counts.
    if error_at is not None and (success is None or error_at >= success):
        return "failing", f"failed {ago(last_error_at, now)}: {last_error or 'unknown error'}"
    if success is None:
        return "never synced", "has not synced yet"
    oldest = parse_time(oldest_pending_at)
    if pending and oldest is not None and now - oldest > stale_after:
        return "failing", (
            f"stalled: {pending} change{'' if pending == 1 else 's'} waiting since "
            f"{ago(oldest_pending_at, now)} although it syncs"
        )
    if now - success > stale_after:
        return "stale", f"no successful sync since {ago(last_success_at, now)}"
    return "ok", f"synced {ago(last_success_at, now)}"


def office_status(
    row: Sequence[Any],
    lag: int,
    conflicts: dict[str, tuple[int, int]],
    rejected: int,
    events: list[dict[str, Any]],
    now: datetime,
    stale_after: timedelta | None,
) -> OfficeStatus:
    """One office's status from its row of the overview (see hub/status.py), its lag,
    the conflict counts of every office, its rejected changes and its recent events."""
    (
        name,
        created_at,
        revoked_at,
        last_seen_at,
        last_push_at,
        last_pull_at,
        pushed,
        pulled,
        _pulled_seq,
        reported_at,
        pending,
        oldest_pending_at,
        node_rejected,
        clock_offset_ms,
        version,
        interval_seconds,
        last_error,
        last_error_code,
        last_error_at,
        hub_error,
        hub_error_code,
        hub_error_at,
        last_ok_event_at,
    ) = row
    # A sync ends with a pull: the hub's own view of the last success, unless the
    # office's report of a later successful sync says more.
    last_success_at = last_pull_at
    if later(last_ok_event_at, last_pull_at):
        last_success_at = last_ok_event_at
    # The most recent error, whoever saw it.
    if later(hub_error_at, last_error_at):
        last_error, last_error_code, last_error_at = hub_error, hub_error_code, hub_error_at
    interval = interval_seconds or DEFAULT_INTERVAL_SECONDS
    limit = stale_after or timedelta(seconds=STALE_INTERVALS * interval)
    state, reason = health(
        now=now,
        stale_after=limit,
        last_success_at=last_success_at,
        last_error_at=last_error_at,
        last_error=last_error,
        pending=pending,
        oldest_pending_at=oldest_pending_at,
    )
    if revoked_at:
        state, reason = "failing", f"its token was revoked {ago(revoked_at, now)}"
    advice = None
    if state == "failing" and reason.startswith("stalled"):
        advice = ADVICE["stalled"]
    elif state == "failing":
        advice = ADVICE.get(last_error_code or "")
    elif state == "stale":
        advice = ADVICE["stale"]
    open_conflicts, waiting = conflicts.get(name, (0, 0))
    return OfficeStatus(
        name=name,
        created_at=created_at,
        revoked=revoked_at is not None,
        health=state,
        health_reason=reason,
        last_seen_at=last_seen_at,
        last_push_at=last_push_at,
        last_pull_at=last_pull_at,
        last_success_at=last_success_at,
        pushed=pushed or 0,
        pulled=pulled or 0,
        lag=lag,
        open_conflicts=open_conflicts,
        waiting_conflicts=waiting,
        rejected=rejected,
        pending=pending,
        oldest_pending_at=oldest_pending_at,
        clock_offset_ms=clock_offset_ms,
        version=version,
        interval_seconds=interval_seconds,
        reported_at=reported_at,
        last_error=last_error,
        last_error_code=last_error_code,
        last_error_at=last_error_at,
        advice=advice,
        events=events,
    )
