"""
The inbox: records pulled from the hub, applied to the office's tables (the pull side).

A page of pulled records is checked whole, then applied with the pull ``cursor`` in
transactions of at most ROWS_PER_WRITE records, with the state row's ``applying`` flag
set so that the capture triggers do not log them again. A record with unpushed local
changes is left alone: the local edit is kept and pushed next, and the hub decides.

Applying is on the pull's hot path: plain ``sqlite3`` with ``executemany``, and per
record only the checks a record from the network needs.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from node.outbox import ROWS_PER_WRITE, pending_keys
from node.versions import SAVE_VERSIONS
from shared.clock import are_stamps
from shared.errors import ProtocolError
from shared.protocol import PullPage, PullRow
from shared.schema import Schema, Table
from shared.sqlite import put_rows, write


def _drop_unbrought(conn: Any, schema: Schema, pending: set[tuple[str, str]]) -> None:
    """End of a resync: drop the records the office held that its scope no longer
    brings (unless they have queued changes: those are pushed, and the hub decides)."""
    left = conn.execute("SELECT tbl, pk FROM _fieldsync_resync").fetchall()
    drop = [(t, k) for t, k in left if (t, k) not in pending and t in schema.tables]
    by_table: dict[str, list[tuple[dict[str, Any], None]]] = {}
    for name, key in drop:
        by_table.setdefault(name, []).append((schema.tables[name].pk_dict(key), None))
    for name, rows in by_table.items():
        put_rows(conn, schema.tables[name], rows)
    conn.executemany("DELETE FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", drop)
    conn.execute("DELETE FROM _fieldsync_resync")


def cursor(db: sqlite_utils.Database) -> int:
    """How far the office has pulled: the hub's ``seq`` to pull after."""
    return int(db.conn.execute("SELECT cursor FROM _fieldsync_state").fetchone()[0])


def repulling(db: sqlite_utils.Database) -> bool:
    """True while the office rebuilds its copy from the hub, its own records included."""
    return bool(db.conn.execute("SELECT repull FROM _fieldsync_state").fetchone()[0])


def start_resync(db: sqlite_utils.Database) -> None:
    """Pull the office's whole scope again, from the start, its own records included;
    at the end, drop the records held now that this did not bring (the hub says when:
    the office's scope changed)."""
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET repull = 1, cursor = 0")
        conn.execute(
            "INSERT OR IGNORE INTO _fieldsync_resync (tbl, pk) "
            "SELECT tbl, pk FROM _fieldsync_versions"
        )


# A pulled record to write: its table, key, row, versions as stored, newest stamp.
_Plan = tuple[Table, str, PullRow, str, str]


def apply_page(db: sqlite_utils.Database, schema: Schema, page: PullPage) -> int:
    """Apply pulled records and save the next cursor.

    The page is checked whole first, then applied in transactions of at most
    ROWS_PER_WRITE records, in the hub's ``seq`` order (so that other programs wait
    less for the write lock): each saves, with its records, the cursor just before the
    next record of the page, the last one the page's own cursor. An interrupted page is
    pulled again from where it stopped.

    A record with unpushed local changes is left alone: the local edit is kept
    and pushed next, and the hub decides. A record that left the office's scope
    (``gone``) is dropped, and no delete is captured. Returns how many records
    were applied.
    """
    plans: list[_Plan] = []
    for row in sorted(page.rows, key=lambda row: row.seq):
        try:
            table = schema.table(row.table)
            key = table.pk_key(table.check_pk(row.pk))
            if row.gone:
                plans.append((table, key, row, "", ""))
                continue
            if row.values is not None:
                table.check_values(row.values)
            given = row.versions
            if isinstance(given, str):  # packed: every column has this one
                stamps: set[Any] = {given}
            else:
                try:
                    stamps = set(given.values())  # mostly one: an insert's
                except TypeError:  # not text: refused just below
                    stamps = {None}
            if not are_stamps(stamps):
                raise ValueError("a version is not a stamp")
        except (ValueError, KeyError) as exc:
            raise ProtocolError(f"the hub sent a record this office cannot take: {exc}") from exc
        # Stored as Table.pack_versions would; a stamp needs no JSON escapes.
        packed = f'"{given}"' if isinstance(given, str) else table.pack_versions(given, stamps)
        plans.append((table, key, row, packed, max(stamps) if stamps else ""))
    applied = 0
    for start in range(0, max(len(plans), 1), ROWS_PER_WRITE):
        chunk = plans[start : start + ROWS_PER_WRITE]
        last = start + ROWS_PER_WRITE >= len(plans)
        upto = page.cursor if last else plans[start + ROWS_PER_WRITE][2].seq - 1
        applied += _apply(db, schema, chunk, upto, page.more if last else True)
    return applied


def _apply(
    db: sqlite_utils.Database,
    schema: Schema,
    plans: list[_Plan],
    cursor: int,
    more: bool,
) -> int:
    """One transaction of :func:`apply_page`: ``plans``, then the cursor after them
    (``more``: the pull goes on after it)."""
    applied = 0
    top = max((newest for *_, newest in plans), default="")  # text sorts as stamps do
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET applying = 1")
        pending = pending_keys(conn)
        versions: list[tuple[str, str, str]] = []
        records: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
        gone: list[tuple[str, str]] = []
        for table, key, row, packed, _ in plans:
            if pending and (table.name, key) in pending:
                continue
            records.setdefault(table.name, []).append((row.pk, row.values))
            if row.gone:
                gone.append((table.name, key))
            else:
                versions.append((table.name, key, packed))
            applied += 1
        for name, rows in records.items():  # a page holds each record once
            put_rows(conn, schema.table(name), rows)
        conn.executemany(SAVE_VERSIONS, versions)
        if gone:
            conn.executemany("DELETE FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", gone)
        if conn.execute("SELECT repull FROM _fieldsync_state").fetchone()[0]:
            brought = [(t.name, k) for t, k, row, *_ in plans if not row.gone]
            conn.executemany("DELETE FROM _fieldsync_resync WHERE tbl = ? AND pk = ?", brought)
            if not more:
                _drop_unbrought(conn, schema, pending)
        conn.execute(
            "UPDATE _fieldsync_state SET applying = 0, cursor = ?, hlc = MAX(hlc, ?), "
            "repull = repull AND ?",
            [cursor, int(top[:16], 16) if top else 0, more],
        )
    return applied
