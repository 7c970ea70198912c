"""
Rejected changes (``_fieldsync_rejected``): changes the hub refused, kept aside.

A change the hub rejects (its rules refuse the record) leaves the queue with the
hub's reason, so it never blocks the changes behind it, and the record is put back
as the hub holds it. An admin at the office reads them (:func:`rejected_changes`),
then writes one again once its cause is gone (:func:`retry_rejected`) or drops it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

from node._times import stamp_time, utcnow
from node.versions import forget_versions, save_versions
from shared.errors import StoreError
from shared.protocol import Change, Rejection
from shared.schema import RecordKey, Schema, Table, quote
from shared.sqlite import put_rows, write


def keep_rejected(
    conn: sqlite3.Connection,
    schema: Schema,
    changes: list[Change],
    refused: dict[int, Rejection],
    pending: set[RecordKey],
) -> None:
    """Set ``changes`` aside with the hub's reasons (``refused``, by seq), and put each
    record back as the hub holds it, unless it has queued changes (``pending``)."""
    now = utcnow()
    conn.executemany(
        "INSERT OR REPLACE INTO _fieldsync_rejected "
        "(seq, tbl, pk, op, hlc, vals, reason, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                c.seq,
                c.table,
                schema.table(c.table).pk_key(c.pk),
                c.op,
                c.ts.hlc,
                json.dumps(c.values, ensure_ascii=False) if c.values is not None else None,
                refused[c.seq].reason,
                now,
            )
            for c in changes
        ],
    )
    latest: dict[RecordKey, tuple[Table, dict[str, Any], Rejection]] = {}
    for change in changes:
        table = schema.table(change.table)
        latest[(table.name, table.pk_key(change.pk))] = (table, change.pk, refused[change.seq])
    conn.execute("UPDATE _fieldsync_state SET applying = 1")
    for (name, key), (table, pk, rejection) in latest.items():
        if (name, key) in pending:
            continue
        record = rejection.record
        put_rows(conn, table, [(pk, record.values if record else None)])
        if record is None:
            forget_versions(conn, (name, key))
        else:
            save_versions(conn, schema, {(name, key): table.expand_versions(record.versions)})
    conn.execute("UPDATE _fieldsync_state SET applying = 0")


def forget_rejected(conn: sqlite3.Connection, seq: int) -> bool:
    """Forget rejected change ``seq``; False if there is none."""
    return bool(conn.execute("DELETE FROM _fieldsync_rejected WHERE seq = ?", [seq]).rowcount)


def rejected_changes(conn: sqlite3.Connection, schema: Schema) -> list[dict[str, Any]]:
    """Changes the hub rejected, oldest first, with their values and the reason."""
    rows = conn.execute(
        "SELECT seq, tbl, pk, op, hlc, vals, reason, rejected_at "
        "FROM _fieldsync_rejected ORDER BY seq"
    ).fetchall()
    found = []
    for seq, tbl, key, op, hlc, vals, reason, rejected_at in rows:
        table = schema.table(tbl)
        found.append(
            {
                "seq": seq,
                "table": tbl,
                "pk": dict(zip(table.primary_key, json.loads(key), strict=True)),
                "op": op,
                "made_at": stamp_time(hlc),
                "values": json.loads(vals) if vals is not None else None,
                "reason": reason,
                "rejected_at": rejected_at,
            }
        )
    return found


def count_rejected(conn: sqlite3.Connection) -> int:
    """How many changes are set aside."""
    return int(conn.execute("SELECT count(*) FROM _fieldsync_rejected").fetchone()[0])


def retry_rejected(db: sqlite_utils.Database, schema: Schema, path: Path, seq: int) -> None:
    """Write a rejected change again, as a new local change, and forget the rejection.

    Do this once the cause is gone (the record or the hub's rules were fixed);
    otherwise the hub rejects it again.
    """
    with write(db) as conn:
        row = (
            conn.execute(
                "SELECT tbl, pk, op, vals FROM _fieldsync_rejected WHERE seq = ?", [seq]
            ).fetchone()
            if 0 < seq < 2**63
            else None
        )
        if row is None:
            raise StoreError(f"there is no rejected change {seq} in {path}")
        table = schema.table(row[0])
        pk = dict(zip(table.primary_key, json.loads(row[1]), strict=True))
        values = json.loads(row[3]) if row[3] is not None else None
        if row[2] == "delete" or values is None:
            put_rows(conn, table, [(pk, None)])
        else:
            where = " AND ".join(f"{quote(c)} = ?" for c in table.primary_key)
            exists = conn.execute(
                f"SELECT 1 FROM {quote(table.name)} WHERE {where}",
                [pk[c] for c in table.primary_key],
            ).fetchone()
            if exists:
                sets = ", ".join(f"{quote(c)} = ?" for c in values)
                conn.execute(
                    f"UPDATE {quote(table.name)} SET {sets} WHERE {where}",
                    [*values.values(), *(pk[c] for c in table.primary_key)],
                )
            else:
                record = {**values, **pk}
                cols = ", ".join(quote(c) for c in record)
                marks = ", ".join("?" for _ in record)
                conn.execute(
                    f"INSERT INTO {quote(table.name)} ({cols}) VALUES ({marks})",
                    list(record.values()),
                )
        forget_rejected(conn, seq)
