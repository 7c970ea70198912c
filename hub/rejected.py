"""
Changes the hub set aside: a value the schema refuses, a broken constraint.

A push does not stop at a change the hub cannot take: the change is acknowledged,
kept here by office and number with its record key and the reason, and reported
back to its office (see hub/ingest.py). The values stay at the office that made
them; only the key and the reason are kept here.

The key is kept as pushed, a JSON object (column -> value): a change to a table the
hub does not have, or with a key of other columns, has no key in the table's form.
Rows kept before that hold a JSON array, read back by the table's key columns when
they fit, else as ``{"key": ...}``: a listing never fails on what an office sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hub.database import HubDatabase
from hub.engine import Conn
from shared.errors import FieldsyncError
from shared.protocol import Change
from shared.schema import Table


def write_rejected(conn: Conn, node: str, rejected: Sequence[tuple[Change, str]], now: str) -> None:
    """Keep each (change, reason) of ``node`` the hub set aside (once per change)."""
    conn.executemany(
        "INSERT INTO _fieldsync_rejected (node, seq, tbl, pk, op, reason, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, seq) DO NOTHING",
        [(node, c.seq, c.table, _key_text(c.pk), c.op, reason, now) for c, reason in rejected],
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
        found.append(
            {
                "node": office,
                "seq": seq,
                "table": tbl,
                "pk": _key(pk, hub.schema.tables.get(tbl)),
                "op": op,
                "reason": reason,
                "created_at": created_at,
            }
        )
    return found


def _key_text(pk: dict[str, Any]) -> str:
    # json, not orjson: a pushed key may hold an integer past 64 bits
    return json.dumps(pk, ensure_ascii=False, separators=(",", ":"))


def _key(text: str, table: Table | None) -> dict[str, Any]:
    """The key kept with a rejected change, as column -> value, whatever was kept."""
    try:
        key = json.loads(text)
    except (TypeError, ValueError):
        return {"key": text}
    if isinstance(key, dict):
        return {str(name): value for name, value in key.items()}
    if not isinstance(key, list):
        return {"key": key}
    if table is not None and len(key) == len(table.primary_key):
        return dict(zip(table.primary_key, key, strict=True))
    return {"key": key[0] if len(key) == 1 else key}
