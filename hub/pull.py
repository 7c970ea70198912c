"""
Pull: the records an office has not seen, in hub ``seq`` order, a page at a time.

A record holds its latest state only, so a page serves each record once, however
often it changed; records whose origin is the pulling office (it already has them
exactly) are left out. The page is read on a snapshot of its own; only the note of
the pull takes the writer's lock. This is on the benchmark's path: plain ``sqlite3``,
one query per page.
"""

from __future__ import annotations

import logging

from hub import records
from hub.database import HubDatabase
from hub.status import count_pull
from hub.times import utcnow
from shared.protocol import PullPage

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
) -> PullPage:
    """Records changed after ``cursor``, except those ``node`` already has.

    ``include_own`` sends those too: for an office rebuilding its copy. ``count``
    adds how many records the office has left to pull. ``packed``: a record whose
    columns all carry one version gets that version alone (see PullRow).
    """
    # The page, and what is left after it (as many records as the office is behind),
    # are read on a snapshot of their own, so a long read holds up no push; only
    # the note of the pull waits for the store.
    with hub.snapshot() as conn:
        last = records.last_seq(conn)
        if cursor > last:
            # A cursor from the future: this hub was restored from an older
            # backup. Serve everything again so the office converges.
            log.warning("office %s pulls from %d, past the last seq %d", node, cursor, last)
            cursor = 0
        rows = conn.execute(
            "SELECT tbl, pk, seq, deleted, vals, vers FROM _fieldsync_records "
            "WHERE seq > ? AND (origin IS NULL OR origin != ?) ORDER BY seq LIMIT ?",
            [cursor, "" if include_own else node, limit + 1],
        ).fetchall()
        acked = conn.execute(
            "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
        ).fetchone()[0]
        remaining = None
        if count:
            remaining = conn.execute(
                "SELECT count(*) FROM _fieldsync_records "
                "WHERE seq > ? AND (origin IS NULL OR origin != ?)",
                [cursor, "" if include_own else node],
            ).fetchone()[0]
    more = len(rows) > limit
    rows = rows[:limit]
    with hub.write() as conn:
        conn.execute(
            "UPDATE _fieldsync_nodes SET last_seen_at = ?, last_pull_at = ? WHERE name = ?",
            [utcnow(), utcnow(), node],
        )
        count_pull(conn, node, len(rows), rows[-1][2] if more else last)
    page_rows = []
    schema = hub.schema
    for tbl, pk, seq, deleted, vals, vers in rows:
        table = schema.table(tbl)
        page_rows.append(
            records.pull_row(table, table.pk_dict(pk), seq, deleted, vals, vers, packed)
        )
    next_cursor = rows[-1][2] if more else last
    return PullPage(page_rows, next_cursor, more, hub.now(), node, acked, remaining)
