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

import operator
from typing import Any

import sqlite_utils

from node.outbox import ROWS_PER_WRITE, pending_keys
from node.versions import SAVE_VERSIONS
from shared.clock import are_stamps
from shared.errors import ProtocolError
from shared.protocol import PullPage, PullRow
from shared.schema import Schema, Table
from shared.sqlite import delete_sql, put_rows, upsert_sql, write


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


# A pulled record to write: its table, key, row, versions as stored, newest stamp, and
# its cells as written (the row in column order; its key's values for a record gone).
_Plan = tuple[Table, str, PullRow, str, str, list[Any]]
_SEQ = operator.attrgetter("seq")


class Checked(list[_Plan]):
    """A pulled page checked whole against ``schema`` (:func:`check_page`), ready to
    apply: each record's plan, in ``seq`` order."""

    def __init__(self, plans: list[_Plan], page: PullPage, schema: Schema) -> None:
        super().__init__(plans)
        self.page = page
        self.schema = schema


def check_page(schema: Schema, page: PullPage) -> Checked:
    """Check every record of ``page``; raise ProtocolError naming the first one, in
    ``seq`` order, that this office cannot take.

    Pure (no database): the agent checks the next page in the thread that fetched it,
    while the one before is written.
    """
    rows = sorted(page.rows, key=_SEQ)
    plans = _quick_plans(schema, rows)
    if plans is None:  # something is wrong: found, and worded, one record at a time
        plans = [_plan(schema, row) for row in rows]
    return Checked(plans, page, schema)


def _quick_plans(schema: Schema, rows: list[PullRow]) -> list[_Plan] | None:
    """What :func:`_plan` gives for each of ``rows``, with the versions' stamps checked
    in one go for the page; None if any record fails a check (then :func:`_plan` says
    which, and how)."""
    tables = schema.tables
    stamps: set[Any] = set()
    plans: list[_Plan] = []
    try:
        for row in rows:
            table = tables.get(row.table)
            if table is None:
                return None
            pk = table.check_pk(row.pk)
            key = table.pk_key(pk)
            values = row.values
            if row.gone or values is None:
                cells = [pk[name] for name in table.primary_key]
                if row.gone:
                    plans.append((table, key, row, "", "", cells))
                    continue
            else:
                table.check_values(values)
                cells = table.row(pk, values)
            given = row.versions
            if isinstance(given, str):  # packed: every column has this one
                stamps.add(given)
                # Stored as Table.pack_versions would; a stamp needs no JSON escapes.
                plans.append((table, key, row, f'"{given}"', given, cells))
                continue
            found = set(given.values())
            stamps |= found
            newest = max(found) if found else ""
            plans.append((table, key, row, table.pack_versions(given, found), newest, cells))
    except Exception:  # whatever it is, _plan meets it again and words it
        return None
    return plans if are_stamps(stamps) else None


def _plan(schema: Schema, row: PullRow) -> _Plan:
    """The plan of one pulled record; ProtocolError if this office cannot take it."""
    try:
        table = schema.table(row.table)
        pk = table.check_pk(row.pk)
        key = table.pk_key(pk)
        cells = [pk[name] for name in table.primary_key]
        if row.gone:
            return (table, key, row, "", "", cells)
        if row.values is not None:
            table.check_values(row.values)
            cells = table.row(pk, row.values)
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
    return (table, key, row, packed, max(stamps) if stamps else "", cells)


def apply_page(
    db: sqlite_utils.Database, schema: Schema, page: PullPage, checked: Checked | None = None
) -> int:
    """Apply pulled records and save the next cursor.

    The page is checked whole first (``checked``: :func:`check_page` did it already),
    then applied in transactions of at most ROWS_PER_WRITE records, in the hub's ``seq``
    order (so that other programs wait less for the write lock): each saves, with its
    records, the cursor just before the next record of the page, the last one the
    page's own cursor. An interrupted page is pulled again from where it stopped.

    A record with unpushed local changes is left alone: the local edit is kept
    and pushed next, and the hub decides. A record that left the office's scope
    (``gone``) is dropped, and no delete is captured. Returns how many records
    were applied.
    """
    if checked is None or checked.page is not page or checked.schema is not schema:
        checked = check_page(schema, page)
    plans = checked
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
    top = max((plan[4] for plan in plans), default="")  # text sorts as stamps do
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET applying = 1")
        pending = pending_keys(conn)
        versions: list[tuple[str, str, str]] = []
        # Per table, in the order met: the records to delete and those to write.
        records: dict[str, tuple[Table, list[list[Any]], list[list[Any]]]] = {}
        gone: list[tuple[str, str]] = []
        for table, key, row, packed, _, cells in plans:
            if pending and (table.name, key) in pending:
                continue
            found = records.get(table.name)
            if found is None:
                found = records[table.name] = (table, [], [])
            (found[1] if row.values is None or row.gone else found[2]).append(cells)
            if row.gone:
                gone.append((table.name, key))
            else:
                versions.append((table.name, key, packed))
            applied += 1
        for table, dropped, written in records.values():  # a page holds each record once
            if dropped:
                conn.executemany(delete_sql(table), dropped)
            if written:
                conn.executemany(upsert_sql(table), written)
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
