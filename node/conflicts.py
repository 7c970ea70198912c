"""
The office's own edits that lost at the hub, as the hub's conflict log tells them.

The hub logs every conflict its merge settles or leaves open; an entry whose losing
side (``other``) is this office's write is one of *its* lost edits. The agent learns
them (``GET /v1/conflicts``) when a pull page's ``conflicts`` mark is past the one
kept here, the newest ``change`` stored, and stores each entry again when an admin
resolves it, so ``fieldsync node conflicts`` and ``node status`` work offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from node._times import stamp_time, utcnow
from shared.clock import Timestamp
from shared.protocol import LostEdit
from shared.sqlite import write

LOST_EDITS = """
CREATE TABLE IF NOT EXISTS _fieldsync_conflicts (
    id INTEGER PRIMARY KEY,
    change INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    kind TEXT NOT NULL,
    col TEXT,
    value TEXT,
    version TEXT NOT NULL,
    status TEXT NOT NULL,
    winner_value TEXT,
    winner_office TEXT,
    winner_version TEXT,
    hidden INTEGER NOT NULL DEFAULT 0,
    resolved_by TEXT,
    resolved_at TEXT,
    resolution TEXT,
    side TEXT NOT NULL DEFAULT 'other',
    learned_at TEXT NOT NULL
)
"""

_COLUMNS = (
    "id, change, created_at, tbl, pk, kind, col, value, version, status, winner_value, "
    "winner_office, winner_version, hidden, resolved_by, resolved_at, resolution, side"
)


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def mark(db: sqlite_utils.Database) -> int:
    """The newest change of the hub's log this office has stored (0: none)."""
    row = db.conn.execute("SELECT max(change) FROM _fieldsync_conflicts").fetchone()
    return int(row[0] or 0)


def store_lost(db: sqlite_utils.Database, edits: list[LostEdit]) -> tuple[int, int]:
    """Store ``edits`` (new ones, or new states of stored ones); returns how many were
    new, and how many stored ones an admin has resolved since."""
    now = utcnow()
    with write(db) as conn:
        known = dict(
            conn.execute(
                "SELECT id, status FROM _fieldsync_conflicts "
                f"WHERE id IN ({', '.join('?' * len(edits))})",
                [e.id for e in edits],
            ).fetchall()
        )
        conn.executemany(
            f"INSERT OR REPLACE INTO _fieldsync_conflicts ({_COLUMNS}, learned_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [
                    e.id,
                    e.change,
                    e.created_at,
                    e.table,
                    _text(e.pk),
                    e.kind,
                    e.column,
                    _text(e.value),
                    e.version,
                    e.status,
                    None if e.hidden else _text(e.winner_value),
                    e.winner_office,
                    e.winner_version,
                    int(e.hidden),
                    e.resolved_by,
                    e.resolved_at,
                    None if e.resolution is None else _text(e.resolution),
                    e.side,
                    now,
                ]
                for e in edits
            ],
        )
    new = sum(1 for e in edits if e.id not in known)
    settled = sum(
        1 for e in edits if e.status == "resolved" and known.get(e.id, "resolved") != "resolved"
    )
    return new, settled


@dataclass(frozen=True, slots=True)
class LostCounts:
    """How many of this office's edits lost, by the state of their conflict."""

    lost: int = 0
    open: int = 0  # an admin has yet to decide
    logged: int = 0  # settled by the merge rule
    resolved: int = 0  # an admin decided

    def to_json(self) -> dict[str, int]:
        return {
            "lost": self.lost,
            "open": self.open,
            "logged": self.logged,
            "resolved": self.resolved,
        }


def count_lost(db: sqlite_utils.Database) -> LostCounts:
    by_status = dict(
        db.conn.execute("SELECT status, count(*) FROM _fieldsync_conflicts GROUP BY status")
    )
    return LostCounts(
        lost=sum(by_status.values()),
        open=by_status.get("open", 0),
        logged=by_status.get("logged", 0),
        resolved=by_status.get("resolved", 0),
    )


def lost_edits(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """The stored lost edits, newest first, as `node conflicts --json` shows them."""
    rows = db.conn.execute(
        f"SELECT {_COLUMNS} FROM _fieldsync_conflicts ORDER BY id DESC"
    ).fetchall()
    found = []
    for row in rows:
        hidden = bool(row[13])
        found.append(
            {
                "id": row[0],
                "logged_at": row[2],
                "table": row[3],
                "pk": json.loads(row[4]),
                "kind": row[5],
                "column": row[6],
                "your_value": json.loads(row[7]) if row[7] is not None else None,
                "your_time": stamp_time_of(row[8]),
                "winning_value": json.loads(row[10]) if row[10] is not None else None,
                "winning_office": row[11],
                "winning_time": stamp_time_of(row[12]),
                "hidden": hidden,
                "status": row[9],
                "resolved_by": row[14],
                "resolved_at": row[15],
                "resolution": json.loads(row[16]) if row[16] is not None else None,
                "overridden": row[17] == "kept",  # it won, until an admin decided otherwise
            }
        )
    return found


def stamp_time_of(version: str | None) -> str | None:
    """The wall-clock time of a version stamp, or None."""
    if not version:
        return None
    try:
        return stamp_time(Timestamp.parse(version).hlc)
    except ValueError:
        return None
