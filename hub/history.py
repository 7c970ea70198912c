"""
The record history: every version of a record the hub took, who made it and when.

``_fieldsync_history`` has one row per version, keyed by the hub ``seq`` that version
got, each naming the seq of the record's version before it (``prev``): a push appends
at the end of one b-tree, and a record's history is read back along that chain from
its current version. The table and the conversion of older hubs' layout are steps of
hub/migrations.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from hub.database import HubDatabase
from hub.times import stamp_time
from shared.errors import InvalidChangeError

# A version of a record for its history: hub seq, the seq of the record's version before
# (None: the first), table, key, who, stamp, op, the values the change set, time received.
Version = tuple[int, int | None, str, str, str, str, str, str | None, str]


def write_history(conn: sqlite3.Connection, rows: Sequence[Version]) -> None:
    """Keep each version a record went through (see Version)."""
    conn.executemany(
        "INSERT INTO _fieldsync_history (seq, prev, tbl, pk, actor, ts, op, vals, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def record_history(hub: HubDatabase, table: str, pk: Sequence[Any]) -> list[dict[str, Any]]:
    """Every version of one record the hub took, oldest first: who, when, what."""
    found = hub.schema.table(table)
    if len(pk) != len(found.primary_key):
        raise InvalidChangeError(
            f"the key of {table} has {len(found.primary_key)} part(s): "
            f"{', '.join(found.primary_key)}"
        )
    key = found.pk_key(dict(zip(found.primary_key, pk, strict=True)))
    # On a snapshot of its own: a long history holds up no push.
    with hub.snapshot() as conn:
        # From the record's current version back along the chain.
        rows = conn.execute(
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
