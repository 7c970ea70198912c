"""
The office's record versions (``_fieldsync_versions``).

Per record, the version of each column as the hub last told us (or as our own
acknowledged changes set it, see :func:`shared.merge.effect`). A change's *base* is
computed from it at push time: while a record has unpushed changes, pulls leave the
record alone, so these versions are still those the office saw when it made the
change. A record is named by ``(table, key)``, its key the JSON text of its primary
key values, as the capture triggers write it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from shared.schema import RecordKey, Schema, Versions

SAVE_VERSIONS = (
    "INSERT INTO _fieldsync_versions (tbl, pk, vers) VALUES (?, ?, ?) "
    "ON CONFLICT (tbl, pk) DO UPDATE SET vers = excluded.vers"
)


def load_versions(
    conn: sqlite3.Connection, schema: Schema, keys: Iterable[RecordKey]
) -> dict[RecordKey, Versions]:
    """The stored versions of each record named by (table, key), in a few queries."""
    wanted: dict[str, set[str]] = {}
    for tbl, key in keys:
        wanted.setdefault(tbl, set()).add(key)
    found: dict[RecordKey, Versions] = {}
    for tbl, names in wanted.items():
        listed = sorted(names)
        for start in range(0, len(listed), 500):
            chunk = listed[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            unpack = schema.table(tbl).unpack_versions
            for key, vers in conn.execute(
                f"SELECT pk, vers FROM _fieldsync_versions WHERE tbl = ? AND pk IN ({marks})",
                [tbl, *chunk],
            ):
                found[(tbl, key)] = unpack(vers)
    return found


def save_versions(
    conn: sqlite3.Connection, schema: Schema, versions: dict[RecordKey, Versions]
) -> None:
    """Store the versions of each record named by (table, key)."""
    conn.executemany(
        SAVE_VERSIONS,
        [
            (tbl, key, schema.table(tbl).pack_versions(vers))
            for (tbl, key), vers in versions.items()
        ],
    )


def forget_versions(conn: sqlite3.Connection, key: RecordKey) -> None:
    """Forget a record's versions (the hub holds no such record)."""
    conn.execute("DELETE FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", list(key))
