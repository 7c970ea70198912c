"""
Changes the hub set aside: a value the schema refuses, a broken constraint.

A push does not stop at a change the hub cannot take: the change is acknowledged,
kept here by office and number with its record key and the reason, and reported
back to its office (see hub/ingest.py). The values stay at the office that made
them; only the key and the reason are kept here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from hub.database import HubDatabase
from shared.errors import FieldsyncError
from shared.protocol import Change
from shared.schema import key_values, pk_key


def write_rejected(
    conn: sqlite3.Connection, node: str, rejected: Sequence[tuple[Change, str]], now: str
) -> None:
    """Keep each (change, reason) of ``node`` the hub set aside (once per change)."""
    conn.executemany(
        "INSERT OR IGNORE INTO _fieldsync_rejected (node, seq, tbl, pk, op, reason, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (node, c.seq, c.table, pk_key(list(c.pk.values())), c.op, reason, now)
            for c, reason in rejected
        ],
    )


def rejected(hub: HubDatabase, node: str | None = None) -> list[dict[str, Any]]:
    """Changes the hub set aside, newest first: office, number, record key, reason.

    ``node``: only that office's (FieldsyncError if there is no such office).
    """
    sql = (
        "SELECT node, seq, tbl, pk, op, reason, created_at FROM _fieldsync_rejected"
        + (" WHERE node = ?" if node else "")
        + " ORDER BY created_at DESC, node, seq DESC"
    )
    with hub.read() as conn:
        if (
            node
            and not conn.execute("SELECT 1 FROM _fieldsync_nodes WHERE name = ?", [node]).fetchone()
        ):
            raise FieldsyncError(f"there is no office {node!r}")
        rows = conn.execute(sql, [node] if node else []).fetchall()
    found = []
    for office, seq, tbl, pk, op, reason, created_at in rows:
        table = hub.schema.tables.get(tbl)
        keys = table.primary_key if table else ()
        values = key_values(pk)
        found.append(
            {
                "node": office,
                "seq": seq,
                "table": tbl,
                "pk": dict(zip(keys, values, strict=False)) if keys else values,
                "op": op,
                "reason": reason,
                "created_at": created_at,
            }
        )
    return found
