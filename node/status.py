"""
Sync status: what the office shows of itself, and tells the hub.

The state row keeps the outcome of the last sync (for ``fieldsync node status``);
``_fieldsync_sync_log`` keeps one row per sync, the newest ``SYNC_LOG_KEPT``, sent to
the hub with the next status report and then marked reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import sqlite_utils

from node._times import stamp_time, utcnow
from node.conflicts import LostCounts, count_lost
from node.link import is_unencrypted
from node.outbox import PENDING
from node.rejected import count_rejected
from shared import __version__
from shared.reports import MAX_EVENTS_PER_REPORT, StatusReport, SyncEvent
from shared.sqlite import write

SYNC_LOG_KEPT = 200

# The status report is sent after a sync only when something in it changed since the
# last one the hub accepted (an event that is not an idle success counts as a change),
# or when REPORT_EVERY_S passed since then, or when REPORT_EVENTS_DUE syncs wait to
# be told: an office syncing idle every minute reports every 10 minutes, and the
# hub sees each of its pulls meanwhile (its last sync, its health).
REPORT_EVERY_S = 600.0
REPORT_EVENTS_DUE = MAX_EVENTS_PER_REPORT // 2


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What `fieldsync node status` shows."""

    node: str
    hub_url: str
    pending: int
    oldest_pending_at: str | None
    last_sync_at: str | None
    last_success_at: str | None
    last_error: str | None
    last_error_at: str | None
    cursor: int
    clock_offset_ms: int
    rejected: int = 0
    ca_file: str | None = None  # the private CA the hub is verified with, if any
    allow_http: bool = False  # plain http:// to another machine allowed on purpose
    next_try_at: str | None = None  # a running agent backing off tries again then
    conflicts: LostCounts = LostCounts()  # this office's edits that lost at the hub

    @property
    def unencrypted(self) -> bool:
        """Whether the token and case data cross a network in clear (http://, not to
        this machine)."""
        return is_unencrypted(self.hub_url)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "hub_url": self.hub_url,
            "pending": self.pending,
            "oldest_pending_at": self.oldest_pending_at,
            "last_sync_at": self.last_sync_at,
            "last_success_at": self.last_success_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "cursor": self.cursor,
            "clock_offset_ms": self.clock_offset_ms,
            "rejected": self.rejected,
            "unencrypted": self.unencrypted,
            "ca_file": self.ca_file,
            "allow_http": self.allow_http,
            "next_try_at": self.next_try_at,
            "conflicts": self.conflicts.to_json(),
        }


def read_status(db: sqlite_utils.Database) -> NodeStatus:
    """The office's sync state, as `fieldsync node status` shows it."""
    conn = db.conn
    state = conn.execute(
        "SELECT node, hub_url, last_sync_at, last_success_at, last_error, last_error_at, "
        "cursor, offset_ms, ca_file, allow_http, next_try_at FROM _fieldsync_state"
    ).fetchone()
    count, oldest = conn.execute(
        f"SELECT count(*), min(hlc) FROM _fieldsync_changes WHERE {PENDING}"
    ).fetchone()
    return NodeStatus(
        node=state[0],
        hub_url=state[1],
        pending=count,
        oldest_pending_at=stamp_time(oldest) if oldest is not None else None,
        last_sync_at=state[2],
        last_success_at=state[3],
        last_error=state[4],
        last_error_at=state[5],
        cursor=state[6],
        clock_offset_ms=state[7],
        rejected=count_rejected(conn),
        ca_file=state[8],
        allow_http=bool(state[9]),
        next_try_at=state[10],
        conflicts=count_lost(db),
    )


def record_sync(
    db: sqlite_utils.Database,
    *,
    pushed: int,
    pulled: int,
    conflicts: int,
    error: str | None = None,
    error_code: str | None = None,
    rejected: int = 0,
    started_at: str | None = None,
    seconds: float = 0.0,
    bytes_sent: int = 0,
    bytes_received: int = 0,
) -> None:
    """Remember the outcome of a sync for `node status` and the hub's history."""
    now = utcnow()
    with write(db) as conn:
        if error is None:
            conn.execute(
                "UPDATE _fieldsync_state SET last_sync_at = ?, last_success_at = ?, "
                "last_error = NULL, last_pushed = ?, last_pulled = ?, last_conflicts = ?, "
                "next_try_at = NULL",
                [now, now, pushed, pulled, conflicts],
            )
        else:
            conn.execute(
                "UPDATE _fieldsync_state SET last_sync_at = ?, last_error = ?, last_error_at = ?, "
                "next_try_at = NULL",
                [now, error, now],
            )
        conn.execute(
            "INSERT INTO _fieldsync_sync_log (started_at, seconds, outcome, pushed, pulled, "
            "conflicts, rejected, bytes_sent, bytes_received, error, error_code) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                started_at or now,
                seconds,
                "ok" if error is None else "error",
                pushed,
                pulled,
                conflicts,
                rejected,
                bytes_sent,
                bytes_received,
                error,
                error_code,
            ],
        )
        conn.execute(
            "DELETE FROM _fieldsync_sync_log WHERE id <= (SELECT max(id) FROM "
            "_fieldsync_sync_log) - ?",
            [SYNC_LOG_KEPT],
        )


def note_next_try(db: sqlite_utils.Database, at: str | None) -> None:
    """A running agent backing off tries again at ``at`` (ISO time; None: no wait)."""
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET next_try_at = ?", [at])


def status_report(db: sqlite_utils.Database, interval_seconds: float | None = None) -> StatusReport:
    """What to tell the hub about this office: its state and unreported syncs."""
    status = read_status(db)
    events = [
        SyncEvent(*row)
        for row in db.conn.execute(
            "SELECT id, started_at, seconds, outcome, pushed, pulled, conflicts, rejected, "
            "bytes_sent, bytes_received, error, error_code FROM ("
            "SELECT * FROM _fieldsync_sync_log WHERE reported = 0 ORDER BY id DESC LIMIT ?"
            ") ORDER BY id",
            [MAX_EVENTS_PER_REPORT],
        )
    ]
    last_code = None
    if status.last_error is not None:
        row = db.conn.execute(
            "SELECT error_code FROM _fieldsync_sync_log WHERE outcome = 'error' "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
        last_code = row[0] if row else None
    # Times in the hub's clock: this office's may be wrong by hours or years.
    offset = status.clock_offset_ms
    events = [dataclasses.replace(e, started_at=_shifted(e.started_at, offset)) for e in events]
    return StatusReport(
        pending=status.pending,
        oldest_pending_at=status.oldest_pending_at,
        rejected=status.rejected,
        clock_offset_ms=status.clock_offset_ms,
        version=__version__,
        interval_seconds=interval_seconds,
        last_error=status.last_error,
        last_error_code=last_code,
        last_error_at=(
            _shifted(status.last_error_at, offset)
            if status.last_error is not None and status.last_error_at
            else None
        ),
        events=events,
    )


def last_sync_ok(db: sqlite_utils.Database) -> bool:
    """Whether the office has synced and its last sync succeeded."""
    ok, error = db.conn.execute(
        "SELECT last_success_at, last_error FROM _fieldsync_state"
    ).fetchone()
    return ok is not None and error is None


def report_due(report: StatusReport, last: StatusReport | None, seconds_since_last: float) -> bool:
    """Whether to send ``report``, given the ``last`` one the hub accepted (None: none
    since this agent started) ``seconds_since_last`` ago (see REPORT_EVERY_S)."""
    if last is None or seconds_since_last >= REPORT_EVERY_S:
        return True
    if len(report.events) >= REPORT_EVENTS_DUE:
        return True
    if any(not _idle(event) for event in report.events):
        return True
    return msgspec.structs.replace(report, events=[]) != msgspec.structs.replace(last, events=[])


def _idle(event: SyncEvent) -> bool:
    """A sync that succeeded and moved nothing."""
    return event.outcome == "ok" and not (
        event.pushed or event.pulled or event.conflicts or event.rejected
    )


def mark_reported(db: sqlite_utils.Database, last_id: int) -> None:
    """The hub has the sync events up to ``last_id``."""
    with write(db) as conn:
        conn.execute(
            "UPDATE _fieldsync_sync_log SET reported = 1 WHERE id <= ? AND reported = 0",
            [last_id],
        )


def _shifted(text: str, offset_ms: int) -> str:
    """An ISO time of this office's clock, as the hub's clock read it."""
    moved = datetime.fromisoformat(text) + timedelta(milliseconds=offset_ms)
    return moved.isoformat(timespec="seconds")
