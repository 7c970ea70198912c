"""
The record history: every version of a record the hub took, who made it and when,
in stamp order, each marked as in the current record (winner) or not (loser).

``_fieldsync_history`` has one row per version, keyed by the hub ``seq`` that version
got, each naming the seq of the record's version before it (``prev``): a push appends
at the end of one b-tree, and a record's history is read back along that chain from
its current version. The table and the conversion of older hubs' layout are steps of
hub/migrations.py.

Compaction (hub/compact.py) deletes the oldest versions past the history kept (by age
or count; never a record's latest) and every version of a purged deleted record: a
chain then stops at the oldest version kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hub.database import HubDatabase
from hub.engine import Conn, dialect_of
from hub.times import stamp_time
from shared.errors import InvalidChangeError
from shared.schema import EXISTS

# A version of a record for its history: hub seq, the seq of the record's version before
# (None: the first), table, key, who, stamp, op, the values the change set, time received.
Version = tuple[int, int | None, str, str, str, str, str, str | None, str]


def write_history(conn: Conn, rows: Sequence[Version]) -> None:
    """Keep each version a record went through (see Version)."""
    dialect = dialect_of(conn)
    if dialect.stages(conn, len(rows)):
        columns = ("seq", "prev", "tbl", "pk", "actor", "ts", "op", "vals", "at")
        dialect.copy_rows(conn, "_fieldsync_history", columns, rows)
        return
    conn.executemany(
        "INSERT INTO _fieldsync_history (seq, prev, tbl, pk, actor, ts, op, vals, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def record_history(hub: HubDatabase, table: str, pk: Sequence[Any]) -> list[dict[str, Any]]:
    """Every version of one record the hub took, in stamp order (see record_versions)."""
    versions: list[dict[str, Any]] = record_versions(hub, table, pk)["versions"]
    return versions


def record_versions(hub: HubDatabase, table: str, pk: Sequence[Any]) -> dict[str, Any]:
    """One record's story, read on one snapshot::

        {"versions": [...], "current": {"values": {...} | None, "deleted": bool} | None}

    Versions are ordered by their stamp (the HLC stamp the change was made with), not
    by when the hub received them: an edit made offline yesterday and pushed today sits
    at yesterday. Each has who, when, what, and its ``outcome``: ``winner`` when some of
    its values are in the current record (``current_columns`` names them), ``loser``
    when none are, with the ``reason``: it lost a logged conflict; it arrived after a
    change with a later stamp had reached the hub (so its values never took); or a
    later change overrode it. A record that followed its parent to another office
    (op ``move`` with no values) has the outcome ``moved``. ``current``: the record as
    the hub holds it now (None: the hub has never seen it).
    """
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
        state = conn.execute(
            "SELECT vals, vers, deleted FROM _fieldsync_records WHERE tbl = ? AND pk = ?",
            [table, key],
        ).fetchone()
        lost = {
            str(row[0])
            for row in conn.execute(
                "SELECT other_version FROM _fieldsync_conflicts WHERE tbl = ? AND pk = ?",
                [table, key],
            )
        }
    current = None
    stamps: dict[str, list[str]] = {}  # stamp -> the columns it set that are current
    if state is not None:
        for column, stamp in found.unpack_versions(state[1]).items():
            stamps.setdefault(stamp, []).append(column)
        current = {"values": None if state[2] else json.loads(state[0]), "deleted": bool(state[2])}
    versions = []
    newest = ""  # the latest stamp among the versions received so far
    for seq, actor, ts, op, vals, at in rows:  # in the order the hub received them
        values = json.loads(vals) if vals is not None else None
        columns = [c for c in stamps.get(ts, []) if c != EXISTS]
        if op == "move" and values is None:
            outcome, reason = "moved", "followed its parent record"
        elif ts in stamps:
            outcome, reason = "winner", None
        elif ts in lost:
            outcome, reason = "loser", "lost a conflict"
        elif ts < newest:
            outcome, reason = "loser", "arrived after a later change: its values did not take"
        else:
            outcome, reason = "loser", "overridden by a later change"
        newest = max(newest, ts)
        versions.append(
            {
                "seq": seq,
                "actor": actor,
                "stamp": ts,
                "time": stamp_time(ts),
                "op": op,
                "values": values,
                "received_at": at,
                "outcome": outcome,
                "reason": reason,
                "current_columns": columns,
            }
        )
    versions.sort(key=lambda v: (v["stamp"], v["seq"]))
    return {"versions": versions, "current": current}
