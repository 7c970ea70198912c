"""
The inbox: records pulled from the hub, applied to the office's tables (the pull side).

A page of pulled records is checked whole, then applied with the pull ``cursor`` in
one transaction, with the state row's ``applying`` flag set so that the capture
triggers do not log them again. A record with unpushed local changes is left alone:
the local edit is kept and pushed next, and the hub decides.

Applying is on the pull's hot path: plain ``sqlite3`` with ``executemany``, and per
record only the checks a record from the network needs.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from node.outbox import pending_keys
from node.versions import SAVE_VERSIONS
from shared.clock import are_stamps
from shared.errors import ProtocolError
from shared.protocol import PullPage
from shared.schema import Schema
from shared.sqlite import put_rows, write


def cursor(db: sqlite_utils.Database) -> int:
    """How far the office has pulled: the hub's ``seq`` to pull after."""
    return int(db.conn.execute("SELECT cursor FROM _fieldsync_state").fetchone()[0])


def repulling(db: sqlite_utils.Database) -> bool:
    """True while the office rebuilds its copy from the hub, its own records included."""
    return bool(db.conn.execute("SELECT repull FROM _fieldsync_state").fetchone()[0])


def apply_page(db: sqlite_utils.Database, schema: Schema, page: PullPage) -> int:
    """Apply pulled records and save the next cursor, in one transaction.

    A record with unpushed local changes is left alone: the local edit is kept
    and pushed next, and the hub decides. Returns how many records were applied.
    """
    plans = []
    top = ""  # the newest stamp in the page (text sorts as stamps do)
    for row in page.rows:
        try:
            table = schema.table(row.table)
            key = table.pk_key(table.check_pk(row.pk))
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
        if stamps:
            newest = max(stamps)
            if newest > top:
                top = newest
        # Stored as Table.pack_versions would; a stamp needs no JSON escapes.
        packed = f'"{given}"' if isinstance(given, str) else table.pack_versions(given, stamps)
        plans.append((table, key, row, packed))
    applied = 0
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET applying = 1")
        pending = pending_keys(conn)
        versions: list[tuple[str, str, str]] = []
        records: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
        for table, key, row, packed in plans:
            if pending and (table.name, key) in pending:
                continue
            records.setdefault(table.name, []).append((row.pk, row.values))
            versions.append((table.name, key, packed))
            applied += 1
        for name, rows in records.items():  # a page holds each record once
            put_rows(conn, schema.table(name), rows)
        conn.executemany(SAVE_VERSIONS, versions)
        conn.execute(
            "UPDATE _fieldsync_state SET applying = 0, cursor = ?, hlc = MAX(hlc, ?), "
            "repull = repull AND ?",
            [page.cursor, int(top[:16], 16) if top else 0, page.more],
        )
    return applied
