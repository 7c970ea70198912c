"""
Keeping an office's database small.

What an office keeps grows with its records, not with time, except the versions of
records deleted there (``_fieldsync_versions`` keeps a deleted record's versions, so
that a later insert of the same key names the delete it saw). Those are dropped once
the delete is acknowledged (no queued change to the record) and older than ``days``
(by the newest version's stamp): by then the hub has purged the tombstone too
(hub/compact.py), and an insert of that key is a new record there.

The agent does it (without VACUUM) after every COMPACT_EVERY_SYNCS-th sync, and
``fieldsync node compact`` at any time. The sync log is kept to its newest rows as each
sync is logged (node/status.py); the
change log's acknowledged changes, rejected changes and lost edits are not touched
here (rejected changes and lost edits stay until an admin drops them).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from node.outbox import pending_keys
from shared.clock import COUNTER_BITS
from shared.schema import EXISTS, Schema, quote
from shared.sqlite import write

log = logging.getLogger("fieldsync.agent")

DEFAULT_DELETED_DAYS = 90
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class NodeCompacted:
    """What compacting an office database removed."""

    versions: int
    bytes_before: int
    bytes_after: int


def compact_node(
    db: sqlite_utils.Database,
    schema: Schema,
    path: Path,
    *,
    days: int = DEFAULT_DELETED_DAYS,
    vacuum: bool = False,
    now_ms: int | None = None,
) -> NodeCompacted:
    """Drop the versions of records deleted at the office, acknowledged, older than
    ``days``; ``vacuum``: give the space back to the disk."""
    before = _size(path)
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    cutoff = (now_ms - days * 86_400_000) << COUNTER_BITS
    dropped = 0
    for table in schema.tables.values():
        # A record deleted, or inserted again after a delete, versions its existence.
        rows = db.conn.execute(
            "SELECT pk, vers FROM _fieldsync_versions WHERE tbl = ? AND instr(vers, ?) > 0",
            [table.name, json.dumps(EXISTS)],
        ).fetchall()
        old = [
            pk
            for pk, vers in rows
            if max(int(v[:16], 16) for v in table.unpack_versions(vers).values()) < cutoff
        ]
        where = " AND ".join(f"{quote(c)} IS ?" for c in table.primary_key)
        for start in range(0, len(old), _CHUNK):
            with write(db) as conn:
                pending = pending_keys(conn)
                gone: list[tuple[Any, ...]] = []
                for pk in old[start : start + _CHUNK]:
                    if (table.name, pk) in pending:
                        continue
                    values = json.loads(pk)
                    if conn.execute(
                        f"SELECT 1 FROM {quote(table.name)} WHERE {where}", values
                    ).fetchone():
                        continue  # live: its versions are its base
                    gone.append((table.name, pk))
                conn.executemany("DELETE FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", gone)
                dropped += len(gone)
    if vacuum:
        db.conn.execute("VACUUM")
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return NodeCompacted(dropped, before, _size(path))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


COMPACT_EVERY_SYNCS = 1000  # about once a day at `node run`'s usual interval


def compact_if_due(db: sqlite_utils.Database, schema: Schema, path: Path) -> NodeCompacted | None:
    """After a sync: compact (no VACUUM) every COMPACT_EVERY_SYNCS-th sync logged.

    The sync log's numbers keep rising as old rows go (node/status.py), so this needs
    nothing stored of its own."""
    row = db.conn.execute("SELECT max(id) FROM _fieldsync_sync_log").fetchone()
    if not row[0] or row[0] % COMPACT_EVERY_SYNCS:
        return None
    try:
        return compact_node(db, schema, path)
    except sqlite3.Error as exc:  # the sync itself went well: say so, try again later
        log.warning("compacting %s failed: %s", path, exc)
        return None
