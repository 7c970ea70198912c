"""
Pull: the records an office has not seen, in hub ``seq`` order, a page at a time.

A record holds its latest state only, so a page serves each record once, however
often it changed; records whose origin is the pulling office (it already has them
exactly) are left out. The page is read on a snapshot of its own; only the note of
the pull takes the writer's lock. This is on the benchmark's path: plain SQL (hub/engine.py),
one query per page.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

import orjson

from hub import records
from hub.compact import purged_seq
from hub.conflicts import office_mark
from hub.database import HubDatabase
from hub.engine import Conn
from hub.epoch import read_epoch
from hub.scopes import read_scopes
from hub.status import count_pull
from hub.times import utcnow
from shared.protocol import PullPage, PullRow
from shared.schema import Schema

log = logging.getLogger("fieldsync.hub")


def pull(
    hub: HubDatabase,
    node: str,
    cursor: int,
    limit: int,
    *,
    include_own: bool = False,
    count: bool = False,
    packed: bool = False,
    spliced: bool = False,
    admit: Callable[[int, Schema], None] | None = None,
) -> PullPage:
    """Records changed after ``cursor``, except those ``node`` already has.

    ``include_own`` sends those too: for an office rebuilding its copy. ``count``
    adds how many records the office has left to pull. ``packed``: a record whose
    columns all carry one version gets that version alone (see PullRow).
    ``spliced`` (with ``packed``; for the wire): a live record is its JSON made of the
    stored texts, undecoded (:class:`Spliced`; its ``values`` are None here).
    ``admit`` is shown the schema version (and its schema) the page was read under,
    before the pull is noted: it may refuse the page by raising (an office behind
    that version must migrate first). The page says that version.
    """
    # The page, and what is left after it (as many records as the office is behind),
    # are read on a snapshot of their own, so a long read holds up no push; only
    # the note of the pull waits for the store. An office with nothing to pull (an
    # idle sync) is answered from the writer's connection, a few short reads under
    # its lock: opening a snapshot would cost half of its pull.
    with hub.read() as conn:
        last = records.last_seq(conn)
        idle = cursor == last
        if idle:
            hub.refresh(conn)  # the version the page is read under (a snapshot takes it)
            found = _read(hub, conn, node, cursor, last, limit, include_own, count)
    if not idle:
        with hub.snapshot() as conn:
            found = _read(hub, conn, node, cursor, None, limit, include_own, count)
    version, schema = hub.version_and_schema()
    if admit is not None:
        admit(version, schema)
    cursor, last, acked, rescope, behind, resync, rows, remaining, lost, epoch = found
    more = len(rows) > limit or resync
    rows = rows[:limit]
    next_cursor = 0 if resync else rows[-1][2] if len(rows) == limit and more else last
    with hub.write() as conn:
        conn.execute(
            "UPDATE _fieldsync_nodes SET last_seen_at = ?, last_pull_at = ?, pulled_seq = ?, "
            "rescope = CASE WHEN ? = 1 OR (rescope <> 0 AND ? = 1) THEN 1 ELSE 0 END "
            "WHERE name = ?",
            # Cleared by the pull from 0 it asked for; a flag set since the snapshot stays.
            [utcnow(), utcnow(), cursor, int(behind and resync), int(resync or not rescope), node],
        )
        count_pull(conn, node, len(rows), next_cursor)
    page_rows: list[PullRow] = []
    splicers: dict[str, Callable[[str, int, str, str], bytes]] = {}
    for tbl, pk, seq, deleted, vals, vers, gone in rows:
        table = schema.table(tbl)
        if gone:
            page_rows.append(PullRow(seq, table.name, table.pk_dict(pk), None, {}, gone=True))
            continue
        if spliced and packed and not deleted:
            splice = splicers.get(tbl) or splicers.setdefault(tbl, records.splicer(table))
            page_rows.append(Spliced(seq, tbl, {}, body=splice(pk, seq, vals, vers)))
            continue
        page_rows.append(
            records.pull_row(table, table.pk_dict(pk), seq, deleted, vals, vers, packed)
        )
    return PullPage(
        page_rows,
        next_cursor,
        more,
        hub.now(),
        node,
        acked,
        remaining,
        resync,
        lost,
        epoch=epoch,
        schema_version=version,
    )


class Spliced(PullRow, frozen=True):
    """A pulled row already in its JSON form (hub/records.py's spliced_row)."""

    body: bytes = b""

    def to_json(self) -> Any:
        return orjson.Fragment(self.body)  # written as it is into the page


def _read(
    hub: HubDatabase,
    conn: Conn,
    node: str,
    cursor: int,
    last: int | None,
    limit: int,
    include_own: bool,
    count: bool,
) -> tuple[int, int, int, int, bool, bool, list[Any], int | None, int, str]:
    """What a pull page is made of, read on ``conn`` (``last``: the last seq, if read
    on it already)."""
    if last is None:
        last = records.last_seq(conn)
    if cursor > last:
        # A cursor from the future: this hub was restored from an older
        # backup. Serve everything again so the office converges.
        log.warning("office %s pulls from %d, past the last seq %d", node, cursor, last)
        cursor = 0
    acked, stored, rescope, pulled = conn.execute(
        "SELECT acked_seq, scopes, rescope, pulled_seq FROM _fieldsync_nodes WHERE name = ?",
        [node],
    ).fetchone()
    scopes = read_scopes(stored, node) if hub.schema.scoped else None
    lost = office_mark(conn, node)
    epoch = read_epoch(conn)  # the hub's identity (hub/epoch.py)
    # An office pulling from before where it stood, past a purge (its database was
    # restored from a copy, or a page it asked for ahead was never applied), may
    # hold records deleted and purged since: resync.
    behind = 0 < cursor < pulled and cursor < purged_seq(conn)
    resync = (bool(rescope) or behind) and not (cursor == 0 and include_own)
    remaining = None
    if resync or cursor == last:
        # Nothing after the last seq (an exit's seq is one of them): an idle pull
        # reads no record.
        rows = []
        remaining = 0 if count and not resync else None
    elif scopes is None:
        rows = conn.execute(
            "SELECT tbl, pk, seq, deleted, vals, vers, 0 FROM _fieldsync_records "
            "WHERE seq > ? AND (origin IS NULL OR origin != ?) ORDER BY seq LIMIT ?",
            [cursor, "" if include_own else node, limit + 1],
        ).fetchall()
        if count:
            remaining = conn.execute(
                "SELECT count(*) FROM _fieldsync_records "
                "WHERE seq > ? AND (origin IS NULL OR origin != ?)",
                [cursor, "" if include_own else node],
            ).fetchone()[0]
    else:
        rows, remaining = _scoped_rows(
            conn, sorted(scopes), node, cursor, limit, include_own, count
        )
    return cursor, last, acked, rescope, behind, resync, rows, remaining, lost, epoch


def _scoped_rows(
    conn: Conn,
    scopes: list[str],
    node: str,
    cursor: int,
    limit: int,
    include_own: bool,
    count: bool,
) -> tuple[list[Any], int | None]:
    """The page of an office holding ``scopes`` only: records in them (and in tables
    without scopes), and those that left them (gone), in seq order."""
    marks = ", ".join("?" * len(scopes))
    own = "" if include_own else node
    held = f"seq > ? AND (origin IS NULL OR origin != ?) AND (scope IS NULL OR scope IN ({marks}))"
    left = (
        f"e.seq > ? AND e.scope IN ({marks}) AND NOT EXISTS (SELECT 1 FROM _fieldsync_records AS r "
        f"WHERE r.tbl = e.tbl AND r.pk = e.pk AND r.scope IN ({marks}))"
    )
    rows = conn.execute(
        f"SELECT tbl, pk, seq, deleted, vals, vers, 0 FROM _fieldsync_records WHERE {held} "
        "ORDER BY seq LIMIT ?",
        [cursor, own, *scopes, limit + 1],
    ).fetchall()
    gone = conn.execute(
        f"SELECT e.tbl, e.pk, e.seq, 1, NULL, NULL, 1 FROM _fieldsync_exits AS e WHERE {left} "
        "ORDER BY e.seq LIMIT ?",
        [cursor, *scopes, *scopes, limit + 1],
    ).fetchall()
    if gone:
        rows = list(heapq.merge(rows, gone, key=lambda row: row[2]))[: limit + 1]
    remaining = None
    if count:
        remaining = (
            conn.execute(
                f"SELECT count(*) FROM _fieldsync_records WHERE {held}", [cursor, own, *scopes]
            ).fetchone()[0]
            + conn.execute(
                f"SELECT count(*) FROM _fieldsync_exits AS e WHERE {left}",
                [cursor, *scopes, *scopes],
            ).fetchone()[0]
        )
    return rows, remaining
