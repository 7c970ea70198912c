"""
What the hub keeps about each office's syncing, and reads back as :class:`OfficeStatus`.

``_fieldsync_office_stats`` holds, per office, what the hub counts itself (changes
pushed and pulled, how far it was served, the last request it refused) and the
office's last report; ``_fieldsync_sync_events`` the office's recent syncs, as it
reported them (the last ``EVENTS_KEPT``). hub/health.py turns them into one word.

A transaction that writes both an office's ``_fieldsync_nodes`` row and its stats row
writes the nodes row first (a push, hub/ingest.py; the note of a pull, hub/pull.py):
on PostgreSQL, which locks rows, the opposite orders deadlock. The counts are added in
the statement (``pushed = _fieldsync_office_stats.pushed + excluded.pushed``: PostgreSQL
wants the table named there).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hub.database import HubDatabase
from hub.engine import Conn, dialect_of
from hub.health import OfficeStatus, office_status
from hub.migrations import LAG_BUCKET
from hub.times import utcnow
from shared.errors import FieldsyncError
from shared.reports import StatusReport

# How many sync events the hub keeps per office.
EVENTS_KEPT = 200


# -- what offices report, and what the hub sees ----------------------------------------


def record_status(hub: HubDatabase, node: str, report: StatusReport) -> None:
    """Keep an office's report: its state now, and its sync events (idempotent)."""
    now = utcnow()
    with hub.write() as conn:
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
            "INSERT INTO _fieldsync_sync_events (node, id, started_at, seconds, "
            "outcome, pushed, pulled, conflicts, rejected, bytes_sent, bytes_received, "
            "error, error_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (node, id) DO NOTHING",
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


def note_error(hub: HubDatabase, node: str, code: str, detail: str) -> None:
    """Remember a request of ``node`` the hub refused (shown until it syncs again)."""
    with hub.write() as conn:
        _ensure_stats(conn, node)
        conn.execute(
            "UPDATE _fieldsync_office_stats SET hub_error = ?, hub_error_code = ?, "
            "hub_error_at = ? WHERE node = ?",
            [detail[:1000], code, utcnow(), node],
        )


def _ensure_stats(conn: Conn, node: str) -> None:
    conn.execute(
        "INSERT INTO _fieldsync_office_stats (node) VALUES (?) ON CONFLICT (node) DO NOTHING",
        [node],
    )


def count_push(conn: Conn, node: str, applied: int) -> None:
    """Add to an office's pushed count, and forget the hub's last refusal of it."""
    conn.execute(
        "INSERT INTO _fieldsync_office_stats (node, pushed) VALUES (?, ?) "
        "ON CONFLICT (node) DO UPDATE SET "
        "pushed = _fieldsync_office_stats.pushed + excluded.pushed, "
        "hub_error = NULL, hub_error_code = NULL, hub_error_at = NULL",
        [node, applied],
    )


def count_pull(conn: Conn, node: str, rows: int, served_seq: int) -> None:
    """Add to an office's pulled count, note how far it has been served, and forget the
    hub's last refusal of it."""
    conn.execute(
        "INSERT INTO _fieldsync_office_stats (node, pulled, pulled_seq) VALUES (?, ?, ?) "
        "ON CONFLICT (node) DO UPDATE SET "
        "pulled = _fieldsync_office_stats.pulled + excluded.pulled, "
        "pulled_seq = excluded.pulled_seq, "
        "hub_error = NULL, hub_error_code = NULL, hub_error_at = NULL",
        [node, rows, served_seq],
    )


# -- reading it back -------------------------------------------------------------------


def offices(
    hub: HubDatabase,
    name: str | None = None,
    *,
    stale_after: timedelta | None = None,
    now: datetime | None = None,
    events: int = 0,
) -> list[OfficeStatus]:
    """Every office by name (or only office ``name``), with its ``events`` most recent
    sync events, newest first, and its health (see :func:`hub.health.health`)."""
    now = now or datetime.now(UTC)
    # A snapshot of its own, not the store's connection: the hub's writes need not wait.
    with hub.snapshot() as conn:
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
        behind = lags(conn, {row[0]: row[8] or 0 for row in rows})
        found = []
        for row in rows:
            office = row[0]
            history = _events(conn, office, events) if events else []
            found.append(
                office_status(
                    row,
                    behind[office],
                    conflicts,
                    rejected.get(office, 0),
                    history,
                    now,
                    stale_after,
                )
            )
    return found


_OFFICES_PER_READ = 250  # two parameters each: well within SQLite's limit


def lags(conn: Conn, cursors: Mapping[str, int]) -> dict[str, int]:
    """Per office: the records after its pull cursor (in ``cursors``) whose latest
    state another office (or the hub) wrote, i.e.::

        SELECT count(*) FROM _fieldsync_records
        WHERE seq > cursor AND (origin IS NULL OR origin != office)

    read from the counts the triggers keep per run of LAG_BUCKET seqs and office of
    origin (hub/migrations.py): the runs after the cursor's, less the office's own,
    plus the cursor's run counted from the records. The runs are read once for every
    office, from the lowest cursor's up; per office, one short read of the records
    (at most LAG_BUCKET rows), however far behind it is.
    """
    if not cursors:
        return {}
    lowest = min(cursors.values()) // LAG_BUCKET
    # Per origin ('' for every record): the runs after the lowest cursor's, newest
    # first, and the records in each and every later one.
    starts: dict[str, list[int]] = {"": []}
    after: dict[str, list[int]] = {"": []}
    for bucket, origin, count in conn.execute(
        "SELECT bucket, origin, n FROM _fieldsync_seq_counts WHERE bucket > ? AND n != 0 "
        "ORDER BY bucket DESC",
        [lowest],
    ):
        for key in {"", origin}:
            runs, sums = starts.setdefault(key, []), after.setdefault(key, [])
            if runs and runs[-1] == bucket:
                sums[-1] += count
            else:
                runs.append(bucket)
                sums.append((sums[-1] if sums else 0) + count)

    for key, runs in starts.items():  # oldest first, each with its and later runs' records
        runs.reverse()
        after[key].reverse()

    def later(origin: str, bucket: int) -> int:
        """Records of ``origin`` in the runs after ``bucket``."""
        runs = starts.get(origin, [])
        at = bisect_right(runs, bucket)
        return after[origin][at] if at < len(runs) else 0

    # The cursor's run, counted from the records: on PostgreSQL one statement for many
    # offices (a statement per office cost 0.04-0.1 ms, 500 offices 20-60 ms), on
    # SQLite one per office (in process, no round trip: 3-4x faster than the join).
    first: dict[str, int] = {}
    listed = list(cursors.items())
    if not dialect_of(conn).remote:
        for office, cursor in listed:
            first[office] = conn.execute(
                "SELECT count(*) FROM _fieldsync_records WHERE seq > ? AND seq < ? "
                "AND (origin IS NULL OR origin != ?)",
                [cursor, (cursor // LAG_BUCKET + 1) * LAG_BUCKET, office],
            ).fetchone()[0]
        listed = []
    for start in range(0, len(listed), _OFFICES_PER_READ):
        chunk = listed[start : start + _OFFICES_PER_READ]
        offices = ", ".join("(?, CAST(? AS BIGINT))" for _ in chunk)
        first.update(
            conn.execute(
                f"WITH c (office, cursor) AS (VALUES {offices}) "
                "SELECT c.office, count(r.seq) FROM c LEFT JOIN _fieldsync_records AS r "
                f"ON r.seq > c.cursor AND r.seq < (c.cursor / {LAG_BUCKET} + 1) * {LAG_BUCKET} "
                "AND (r.origin IS NULL OR r.origin != c.office) GROUP BY c.office",
                [value for pair in chunk for value in pair],
            ).fetchall()
        )
    return {
        office: later("", cursor // LAG_BUCKET)
        - later(office, cursor // LAG_BUCKET)
        + first[office]
        for office, cursor in cursors.items()
    }


def office(
    hub: HubDatabase,
    name: str,
    *,
    stale_after: timedelta | None = None,
    now: datetime | None = None,
    events: int = 50,
) -> OfficeStatus:
    """One office with its most recent sync ``events``, newest first."""
    found = offices(hub, name, stale_after=stale_after, now=now, events=events)
    if not found:
        raise FieldsyncError(f"there is no office {name!r}")
    return found[0]


def sync_events(hub: HubDatabase, node: str, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent sync events ``node`` reported, newest first."""
    with hub.read() as conn:
        return _events(conn, node, limit)


def _conflict_counts(conn: Conn) -> dict[str, tuple[int, int]]:
    """Per office: (unsettled conflicts, of which waiting for a decision)."""
    counts: dict[str, list[int]] = {}
    for kept, other, status, n in conn.execute(
        "SELECT kept_node, other_node, status, count(*) FROM _fieldsync_conflicts "
        "WHERE status IN ('open', 'logged') GROUP BY kept_node, other_node, status"
    ):
        for name in {kept, other} - {None}:
            entry = counts.setdefault(name, [0, 0])
            entry[0] += n
            if status == "open":
                entry[1] += n
    return {k: (v[0], v[1]) for k, v in counts.items()}


def _events(conn: Conn, node: str, limit: int) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT id, started_at, seconds, outcome, pushed, pulled, conflicts, rejected, "
        "bytes_sent, bytes_received, error, error_code FROM _fieldsync_sync_events "
        "WHERE node = ? ORDER BY id DESC LIMIT ?",
        [node, limit],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
