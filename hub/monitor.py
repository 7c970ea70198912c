"""
What admins see of every office: sync status, health, history; and who may look.

The hub learns about an office in two ways: what it sees itself (each push and pull,
each request it refuses) and what the office reports after every sync (``POST
/v1/status``: pending changes, the age of the oldest, its last error, clock offset,
version, and one event per sync). :func:`health` turns both into one word.

:class:`MonitorStore` is the SQLite side of it, mixed into
:class:`hub.store.SqliteHubStore`; admin tokens and dashboard sessions live here too.
Tokens and session cookies are stored only as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils

from shared.clock import Timestamp, check_node_name
from shared.errors import ADVICE, AuthError, FieldsyncError
from shared.protocol import StatusReport
from shared.sqlite import read_snapshot, write

# How long the hub keeps each office's sync events, and a dashboard session.
EVENTS_KEPT = 200
SESSION_HOURS = 12
# Without an interval reported by the office: the agent's usual one.
DEFAULT_INTERVAL_SECONDS = 60.0
STALE_INTERVALS = 3

# Record history, one row per version the hub took (see _HISTORY_UPGRADE).
_HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS _fieldsync_history (
    seq INTEGER PRIMARY KEY,
    prev INTEGER,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    actor TEXT NOT NULL,
    ts TEXT NOT NULL,
    op TEXT NOT NULL,
    vals TEXT,
    at TEXT NOT NULL
)"""

MONITOR_TABLES = (
    """
CREATE TABLE IF NOT EXISTS _fieldsync_admins (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_sessions (
    token_hash TEXT PRIMARY KEY,
    admin TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_office_stats (
    node TEXT PRIMARY KEY,
    pushed INTEGER NOT NULL DEFAULT 0,
    pulled INTEGER NOT NULL DEFAULT 0,
    pulled_seq INTEGER NOT NULL DEFAULT 0,
    reported_at TEXT,
    pending INTEGER,
    oldest_pending_at TEXT,
    rejected INTEGER,
    clock_offset_ms INTEGER,
    version TEXT,
    interval_seconds REAL,
    last_error TEXT,
    last_error_code TEXT,
    last_error_at TEXT,
    hub_error TEXT,
    hub_error_code TEXT,
    hub_error_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_sync_events (
    node TEXT NOT NULL,
    id INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    seconds REAL NOT NULL,
    outcome TEXT NOT NULL,
    pushed INTEGER NOT NULL,
    pulled INTEGER NOT NULL,
    conflicts INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    error TEXT,
    error_code TEXT,
    PRIMARY KEY (node, id)
);
"""
    + _HISTORY_TABLE
    + ";"
)
# Record history is keyed by hub seq, each version naming the one before it (prev), so
# that a version is appended at the end of one b-tree: an index by record, over keys
# as random as UUIDs, cost a page write per change on a large hub. Earlier hubs
# keep it as (id, tbl, pk, seq, ...) with that index; upgrade_history converts them.
_HISTORY_UPGRADE = f"""
ALTER TABLE _fieldsync_history RENAME TO _fieldsync_history_old;
DROP INDEX IF EXISTS _fieldsync_history_record;
{_HISTORY_TABLE};
INSERT INTO _fieldsync_history (seq, prev, tbl, pk, actor, ts, op, vals, at)
    SELECT seq, lag(seq) OVER (PARTITION BY tbl, pk ORDER BY id), tbl, pk, actor, ts, op,
        vals, at
    FROM _fieldsync_history_old;
DROP TABLE _fieldsync_history_old
"""


def upgrade_history(conn: sqlite3.Connection) -> None:
    """Convert a record history kept by an index (earlier hubs) to the chain by seq."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(_fieldsync_history)")}
    if "id" in columns:
        for statement in _HISTORY_UPGRADE.split(";"):
            conn.execute(statement)


HEALTH_STATES = ("ok", "stale", "failing", "never synced")


def hash_token(token: str) -> str:
    """The form a token is stored in: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stamp_time(version: str | None) -> str | None:
    """The wall time of a version stamp, as ISO 8601 UTC."""
    if not version:
        return None
    ms = Timestamp.parse(version).wall_ms
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _later(a: str | None, b: str | None) -> bool:
    """Is time ``a`` later than time ``b`` (None is earliest)?"""
    ta, tb = _time(a), _time(b)
    return ta is not None and (tb is None or ta > tb)


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
        success = _time(self.last_success_at)
        if success is None:
            return None
        return max(0.0, ((now or datetime.now(UTC)) - success).total_seconds())


def ago(text: str | None, now: datetime | None = None) -> str:
    """'12 minutes ago' for an ISO time; 'never' for None."""
    when = _time(text)
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
    success = _time(last_success_at)
    error_at = _time(last_error_at)
    # Times have whole seconds: an error in the second of the last success counts.
    if error_at is not None and (success is None or error_at >= success):
        return "failing", f"failed {ago(last_error_at, now)}: {last_error or 'unknown error'}"
    if success is None:
        return "never synced", "has not synced yet"
    oldest = _time(oldest_pending_at)
    if pending and oldest is not None and now - oldest > stale_after:
        return "failing", (
            f"stalled: {pending} change{'' if pending == 1 else 's'} waiting since "
            f"{ago(oldest_pending_at, now)} although it syncs"
        )
    if now - success > stale_after:
        return "stale", f"no successful sync since {ago(last_success_at, now)}"
    return "ok", f"synced {ago(last_success_at, now)}"


class MonitorStore:
    """Office status, sync history, record history and admin access, in SQLite.

    A mixin: the class using it provides ``db`` (sqlite-utils Database), ``_lock`` and
    ``path`` (the database file).
    """

    db: sqlite_utils.Database
    _lock: threading.Lock
    path: Path

    # -- admins and sessions --------------------------------------------------

    def add_admin(self, name: str) -> str:
        """Register an admin and return a new token (only its hash is stored)."""
        check_node_name(name)
        with self._lock, write(self.db) as conn:
            return new_token(conn, "_fieldsync_admins", name, f"admin {name!r} already exists")

    def authenticate_admin(self, token: str) -> str:
        """Return the admin who owns ``token``; AuthError 401 (unknown) or 403 (an office's)."""
        digest = hash_token(token)
        with self._lock:
            conn = self.db.conn
            row = conn.execute(
                "SELECT name FROM _fieldsync_admins WHERE token_hash = ? AND revoked_at IS NULL",
                [digest],
            ).fetchone()
            office = (
                conn.execute(
                    "SELECT name FROM _fieldsync_nodes WHERE token_hash = ?", [digest]
                ).fetchone()
                if row is None
                else None
            )
        if row is not None:
            return str(row[0])
        if office is not None:
            raise AuthError(
                "an office token cannot open the admin pages; sign in with an admin token "
                "(`fieldsync hub add-admin NAME`)",
                "forbidden",
                403,
            )
        raise AuthError("unknown or revoked admin token", "unauthorized", 401)

    def is_admin_token(self, token: str) -> bool:
        with self._lock:
            return (
                self.db.conn.execute(
                    "SELECT 1 FROM _fieldsync_admins WHERE token_hash = ?", [hash_token(token)]
                ).fetchone()
                is not None
            )

    def start_session(self, admin: str) -> tuple[str, str]:
        """A new dashboard session for ``admin``: (cookie value, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._lock, write(self.db) as conn:
            conn.execute(
                "DELETE FROM _fieldsync_sessions WHERE expires_at < ?",
                [now.isoformat(timespec="seconds")],
            )
            conn.execute(
                "INSERT INTO _fieldsync_sessions (token_hash, admin, csrf, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                [
                    hash_token(token),
                    admin,
                    csrf,
                    now.isoformat(timespec="seconds"),
                    (now + timedelta(hours=SESSION_HOURS)).isoformat(timespec="seconds"),
                ],
            )
        return token, csrf

    def session(self, token: str) -> tuple[str, str] | None:
        """(admin, CSRF token) of a live session, or None (unknown, expired, admin revoked)."""
        with self._lock:
            row = self.db.conn.execute(
                "SELECT s.admin, s.csrf FROM _fieldsync_sessions AS s "
                "JOIN _fieldsync_admins AS a ON a.name = s.admin AND a.revoked_at IS NULL "
                "WHERE s.token_hash = ? AND s.expires_at > ?",
                [hash_token(token), utcnow()],
            ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def end_session(self, token: str) -> None:
        with self._lock, write(self.db) as conn:
            conn.execute(
                "DELETE FROM _fieldsync_sessions WHERE token_hash = ?", [hash_token(token)]
            )

    # -- what offices report, and what the hub sees ------------------------------

    def record_status(self, node: str, report: StatusReport) -> None:
        """Keep an office's report: its state now, and its sync events (idempotent)."""
        now = utcnow()
        with self._lock, write(self.db) as conn:
            _ensure_stats(conn, node)
            conn.execute(
                "UPDATE _fieldsync_office_stats SET reported_at = ?, pending = ?, "
                "oldest_pending_at = ?, rejected = ?, clock_offset_ms = ?, version = ?, "
                "interval_seconds = ?, last_error = ?, last_error_code = ?, last_error_at = ? "
                "WHERE node = ?",
                [
                    now,
                    report.pending,
                    report.oldest_pending_at,
                    report.rejected,
                    report.clock_offset_ms,
                    report.version,
                    report.interval_seconds,
                    report.last_error,
                    report.last_error_code,
                    report.last_error_at,
                    node,
                ],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO _fieldsync_sync_events (node, id, started_at, seconds, "
                "outcome, pushed, pulled, conflicts, rejected, bytes_sent, bytes_received, "
                "error, error_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        node,
                        e.id,
                        e.started_at,
                        e.seconds,
                        e.outcome,
                        e.pushed,
                        e.pulled,
                        e.conflicts,
                        e.rejected,
                        e.bytes_sent,
                        e.bytes_received,
                        e.error,
                        e.error_code,
                    )
                    for e in report.events
                ],
            )
            conn.execute(
                "DELETE FROM _fieldsync_sync_events WHERE node = ? AND id <= ("
                "SELECT id FROM _fieldsync_sync_events WHERE node = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                [node, node, EVENTS_KEPT],
            )

    def note_error(self, node: str, code: str, detail: str) -> None:
        """Remember a request of ``node`` the hub refused (shown until it syncs again)."""
        with self._lock, write(self.db) as conn:
            _ensure_stats(conn, node)
            conn.execute(
                "UPDATE _fieldsync_office_stats SET hub_error = ?, hub_error_code = ?, "
                "hub_error_at = ? WHERE node = ?",
                [detail[:1000], code, utcnow(), node],
            )

    def offices(
        self, *, stale_after: timedelta | None = None, now: datetime | None = None
    ) -> list[OfficeStatus]:
        """Every office, by name, with its health (see :func:`health`)."""
        return self._offices(None, stale_after, now, events=0)

    def office(
        self,
        name: str,
        *,
        stale_after: timedelta | None = None,
        now: datetime | None = None,
        events: int = 50,
    ) -> OfficeStatus:
        """One office with its most recent sync ``events``, newest first."""
        found = self._offices(name, stale_after, now, events=events)
        if not found:
            raise FieldsyncError(f"there is no office {name!r}")
        return found[0]

    def _offices(
        self, name: str | None, stale_after: timedelta | None, now: datetime | None, events: int
    ) -> list[OfficeStatus]:
        now = now or datetime.now(UTC)
        # A snapshot of its own, not the store's connection: counting each office's lag
        # reads as many records as it is behind, and the hub's writes need not wait.
        with read_snapshot(self.path) as conn:
            cursor = conn.execute(
                "SELECT n.name, n.created_at, n.revoked_at, n.last_seen_at, n.last_push_at, "
                "n.last_pull_at, s.pushed, s.pulled, s.pulled_seq, s.reported_at, s.pending, "
                "s.oldest_pending_at, s.rejected, s.clock_offset_ms, s.version, "
                "s.interval_seconds, s.last_error, s.last_error_code, s.last_error_at, "
                "s.hub_error, s.hub_error_code, s.hub_error_at, "
                "(SELECT max(started_at) FROM _fieldsync_sync_events AS e "
                " WHERE e.node = n.name AND e.outcome = 'ok') "
                "FROM _fieldsync_nodes AS n LEFT JOIN _fieldsync_office_stats AS s "
                "ON s.node = n.name" + (" WHERE n.name = ?" if name else "") + " ORDER BY n.name",
                [name] if name else [],
            )
            rows = cursor.fetchall()
            conflicts = _conflict_counts(conn)
            rejected = dict(
                conn.execute("SELECT node, count(*) FROM _fieldsync_rejected GROUP BY node")
            )
            found = []
            for row in rows:
                office = row[0]
                lag = conn.execute(
                    "SELECT count(*) FROM _fieldsync_records "
                    "WHERE seq > ? AND (origin IS NULL OR origin != ?)",
                    [row[8] or 0, office],
                ).fetchone()[0]
                history = _events(conn, office, events) if events else []
                found.append(
                    _status(row, lag, conflicts, rejected.get(office, 0), history, now, stale_after)
                )
        return found

    def sync_events(self, node: str, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return _events(self.db.conn, node, limit)

    # -- record history -------------------------------------------------------

    def _history(self, table: str, key: str) -> list[dict[str, Any]]:
        with self._lock:
            # From the record's current version back along the chain.
            rows = self.db.conn.execute(
                "WITH RECURSIVE chain (seq) AS ("
                " SELECT seq FROM _fieldsync_records WHERE tbl = ? AND pk = ?"
                " UNION ALL"
                " SELECT h.prev FROM _fieldsync_history AS h JOIN chain ON h.seq = chain.seq"
                " WHERE h.prev IS NOT NULL) "
                "SELECT h.seq, h.actor, h.ts, h.op, h.vals, h.at FROM chain "
                "JOIN _fieldsync_history AS h ON h.seq = chain.seq ORDER BY h.seq",
                [table, key],
            ).fetchall()
        return [
            {
                "seq": seq,
                "actor": actor,
                "stamp": ts,
                "time": stamp_time(ts),
                "op": op,
                "values": json.loads(vals) if vals is not None else None,
                "received_at": at,
            }
            for seq, actor, ts, op, vals, at in rows
        ]


def new_token(conn: sqlite3.Connection, table: str, name: str, taken: str) -> str:
    """Add ``name`` to ``table`` (offices or admins) with a new token; return the token.

    Only the token's hash is stored; ``taken`` is the error when the name is.
    """
    if conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", [name]).fetchone():
        raise FieldsyncError(taken)
    token = secrets.token_urlsafe(32)
    conn.execute(
        f"INSERT INTO {table} (name, token_hash, created_at) VALUES (?, ?, ?)",
        [name, hash_token(token), utcnow()],
    )
    return token


def _ensure_stats(conn: sqlite3.Connection, node: str) -> None:
    conn.execute("INSERT OR IGNORE INTO _fieldsync_office_stats (node) VALUES (?)", [node])


def count_push(conn: sqlite3.Connection, node: str, applied: int) -> None:
    """Add to an office's pushed count, and forget the hub's last refusal of it."""
    conn.execute(
        "INSERT INTO _fieldsync_office_stats (node, pushed) VALUES (?, ?) "
        "ON CONFLICT (node) DO UPDATE SET pushed = pushed + excluded.pushed, "
        "hub_error = NULL, hub_error_code = NULL, hub_error_at = NULL",
        [node, applied],
    )


def count_pull(conn: sqlite3.Connection, node: str, rows: int, served_seq: int) -> None:
    """Add to an office's pulled count, note how far it has been served, and forget the
    hub's last refusal of it."""
    conn.execute(
        "INSERT INTO _fieldsync_office_stats (node, pulled, pulled_seq) VALUES (?, ?, ?) "
        "ON CONFLICT (node) DO UPDATE SET pulled = pulled + excluded.pulled, "
        "pulled_seq = excluded.pulled_seq, "
        "hub_error = NULL, hub_error_code = NULL, hub_error_at = NULL",
        [node, rows, served_seq],
    )


def _conflict_counts(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Per office: (unsettled conflicts, of which waiting for a decision)."""
    counts: dict[str, list[int]] = {}
    for kept, other, status, n in conn.execute(
        "SELECT kept_node, other_node, status, count(*) FROM _fieldsync_conflicts "
        "WHERE status IN ('open', 'logged') GROUP BY kept_node, other_node, status"
    ):
        for office in {kept, other} - {None}:
            entry = counts.setdefault(office, [0, 0])
            entry[0] += n
            if status == "open":
                entry[1] += n
    return {k: (v[0], v[1]) for k, v in counts.items()}


def _events(conn: sqlite3.Connection, node: str, limit: int) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT id, started_at, seconds, outcome, pushed, pulled, conflicts, rejected, "
        "bytes_sent, bytes_received, error, error_code FROM _fieldsync_sync_events "
        "WHERE node = ? ORDER BY id DESC LIMIT ?",
        [node, limit],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _status(
    row: Sequence[Any],
    lag: int,
    conflicts: dict[str, tuple[int, int]],
    rejected: int,
    events: list[dict[str, Any]],
    now: datetime,
    stale_after: timedelta | None,
) -> OfficeStatus:
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
    if _later(last_ok_event_at, last_pull_at):
        last_success_at = last_ok_event_at
    # The most recent error, whoever saw it.
    if _later(hub_error_at, last_error_at):
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
