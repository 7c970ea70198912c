"""
The conflict log: concurrent writes the merge rule settled or left open, and their
resolution by an admin.

A push logs each :class:`shared.merge.Conflict` its merge found
(:func:`conflict_row`, :func:`write_conflicts`) with a fingerprint of the record
right after, ``state_after``. An admin settles one with :func:`resolve`: the decision
is made by :func:`shared.merge.resolve` and written as a new hub change, and it is
refused if the record changed since the conflict was logged, unless forced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hub import records
from hub.database import HubDatabase
from hub.engine import Conn, Dialect, dialect_of
from hub.scopes import office_scopes, write_hub_change
from hub.times import stamp_time, utcnow
from shared.clock import Timestamp
from shared.errors import FieldsyncError, InvalidChangeError
from shared.merge import Conflict, RecordState, resolution_writes, resolve as decide
from shared.protocol import ConflictPage, LostEdit
from shared.schema import Table, key_values


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """One entry of the hub's conflict log, as admins see it."""

    id: int
    created_at: str
    table: str
    pk: dict[str, Any]
    kind: str  # field, record or delete
    column: str | None
    kept_value: Any
    kept_version: str | None
    kept_node: str | None
    other_value: Any
    other_version: str
    other_node: str
    status: str  # logged (settled by policy), open (waits for an admin), resolved
    resolved_by: str | None
    resolved_at: str | None
    resolution: Any
    merged: Any = None  # kind custom: what the custom function chose
    state_after: str = ""  # the record's versions right after; a changed record is stale

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "table": self.table,
            "pk": self.pk,
            "kind": self.kind,
            "column": self.column,
            "kept": {
                "value": self.kept_value,
                "office": self.kept_node,
                "version": self.kept_version,
                "time": stamp_time(self.kept_version),
            },
            "other": {
                "value": self.other_value,
                "office": self.other_node,
                "version": self.other_version,
                "time": stamp_time(self.other_version),
            },
            **({"merged": self.merged} if self.kind == "custom" else {}),
            "status": self.status,
            "resolved_by": self.resolved_by,
            "resolved_at": self.resolved_at,
            "resolution": self.resolution,
        }


# -- logging, on the push path ---------------------------------------------------------


def fingerprint(state: RecordState, column: str | None) -> str:
    """What must not change for a conflict's resolution to be safe to write."""
    if column is not None:
        return json.dumps([state.deleted, state.versions.get(column)])
    return json.dumps([state.deleted, state.versions], sort_keys=True)


def conflict_row(table: str, key: str, conflict: Conflict, state: RecordState) -> list[Any]:
    """The log's row of ``conflict``, found on record ``key`` whose state is now ``state``."""
    return [
        utcnow(),
        table,
        key,
        conflict.kind,
        conflict.column,
        json.dumps(conflict.kept_value, ensure_ascii=False),
        conflict.kept_version,
        Timestamp.parse(conflict.kept_version).node if conflict.kept_version else None,
        json.dumps(conflict.other_value, ensure_ascii=False),
        conflict.other_version,
        Timestamp.parse(conflict.other_version).node,
        "open" if conflict.open else "logged",
        json.dumps(conflict.merged, ensure_ascii=False) if conflict.kind == "custom" else None,
        fingerprint(state, conflict.column),
    ]


# The next number of the log's changes (column ``changed``): a new entry or a resolution.
_NEXT_CHANGE = "(SELECT coalesce(max(changed), 0) + 1 FROM _fieldsync_conflicts)"


def write_conflicts(conn: Conn, rows: Sequence[list[Any]]) -> None:
    conn.executemany(
        "INSERT INTO _fieldsync_conflicts (created_at, tbl, pk, kind, col, kept_value, "
        "kept_version, kept_node, other_value, other_version, other_node, status, "
        f"merged, state_after, changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        f"{_NEXT_CHANGE})",
        rows,
    )


# -- reading the log -------------------------------------------------------------------


# The log's columns, in the order _conflict reads them.
_COLUMNS = (
    "id, created_at, tbl, pk, kind, col, kept_value, kept_version, kept_node, other_value, "
    "other_version, other_node, status, resolved_by, resolved_at, resolution, merged, "
    "state_after"
)


def conflicts(
    hub: HubDatabase, status: str | Sequence[str] | None = None, limit: int | None = None
) -> list[ConflictRecord]:
    """The conflict log, newest first; ``status`` filters (logged, open, resolved;
    one or several), ``limit`` keeps the newest ones."""
    sql = f"SELECT {_COLUMNS} FROM _fieldsync_conflicts"
    params: list[Any] = []
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
        params.extend(statuses)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    with hub.read() as conn:
        rows = conn.execute(sql, params).fetchall()
    return [_conflict(hub, row) for row in rows]


def conflict_counts(hub: HubDatabase) -> dict[str, int]:
    """How many conflicts the log holds, by status (open, logged, resolved)."""
    with hub.read() as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM _fieldsync_conflicts GROUP BY status"
        ).fetchall()
    return {"open": 0, "logged": 0, "resolved": 0, **dict(rows)}


def conflict(hub: HubDatabase, conflict_id: int) -> ConflictRecord:
    if not 0 < conflict_id < 2**63:  # past SQLite's integers: no such row either
        raise FieldsyncError(f"there is no conflict {conflict_id}")
    with hub.read() as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM _fieldsync_conflicts WHERE id = ?", [conflict_id]
        ).fetchone()
    if row is None:
        raise FieldsyncError(f"there is no conflict {conflict_id}")
    return _conflict(hub, row)


def _conflict(hub: HubDatabase, row: Sequence[Any]) -> ConflictRecord:
    table = hub.schema.tables.get(row[2])
    keys = table.primary_key if table else ("pk",)
    return ConflictRecord(
        id=row[0],
        created_at=row[1],
        table=row[2],
        pk=dict(zip(keys, key_values(row[3]), strict=False)),
        kind=row[4],
        column=row[5],
        kept_value=json.loads(row[6]) if row[6] is not None else None,
        kept_version=row[7],
        kept_node=row[8],
        other_value=json.loads(row[9]) if row[9] is not None else None,
        other_version=row[10],
        other_node=row[11],
        status=row[12],
        resolved_by=row[13],
        resolved_at=row[14],
        resolution=json.loads(row[15]) if row[15] is not None else None,
        merged=json.loads(row[16]) if row[16] is not None else None,
        state_after=row[17],
    )


# -- an office's own entries (GET /v1/conflicts) ----------------------------------------


def _overridden(dialect: Dialect) -> str:
    """SQL true for an entry in which an office's write won, until an admin decided for
    another value (on SQLite, the text of the partial index _fieldsync_conflicts_overridden's
    WHERE, so that the index is used)."""
    return f"status = 'resolved' AND {dialect.json_field('resolution', 'keep')} != 'kept'"


def office_mark(conn: Conn, node: str) -> int:
    """The last change to the entries in which ``node``'s write lost or was overridden
    by an admin (0: none)."""
    lost, overridden = conn.execute(  # one statement: read by every pull
        "SELECT (SELECT max(changed) FROM _fieldsync_conflicts WHERE other_node = ?), "
        "(SELECT max(changed) FROM _fieldsync_conflicts WHERE kept_node = ? AND "
        + _overridden(dialect_of(conn))
        + ")",
        [node, node],
    ).fetchone()
    return max(int(lost or 0), int(overridden or 0))


def lost_edits(hub: HubDatabase, node: str, after: int, limit: int) -> ConflictPage:
    """The entries in which ``node``'s write lost (its conflict's *other* side) or, once
    kept, was overridden by an admin's decision (``side`` kept), changed after
    ``after``; never another office's. With sync scopes, the winning value of a record
    no longer in the office's scopes is withheld (``hidden``): the office's own value is
    its own."""
    with hub.read() as conn:
        # Each side read along its own index, then merged in change order.
        overridden = _overridden(dialect_of(conn))
        rows = conn.execute(
            f"SELECT {', '.join('c.' + c for c in _COLUMNS.split(', '))}, c.changed, r.scope, "
            "CASE WHEN r.tbl IS NULL THEN 0 ELSE 1 END FROM ("
            "SELECT id FROM (SELECT id FROM _fieldsync_conflicts WHERE other_node = ? "
            "AND changed > ? ORDER BY changed LIMIT ?) AS lost UNION "
            "SELECT id FROM (SELECT id FROM _fieldsync_conflicts WHERE kept_node = ? "
            f"AND {overridden} AND changed > ? ORDER BY changed LIMIT ?) AS overridden) AS mine "
            "JOIN _fieldsync_conflicts AS c ON c.id = mine.id "
            "LEFT JOIN _fieldsync_records AS r ON r.tbl = c.tbl AND r.pk = c.pk "
            "ORDER BY c.changed LIMIT ?",
            [node, after, limit + 1, node, after, limit + 1, limit + 1],
        ).fetchall()
        scopes = office_scopes(conn, node)[0] if hub.schema.scoped else None
    more = len(rows) > limit
    found = []
    for row in rows[:limit]:
        record = _conflict(hub, row[:18])
        scope, exists = row[19], row[20]
        hidden = scopes is not None and (not exists or (scope is not None and scope not in scopes))
        found.append(_lost_edit(record, int(row[18]), node, hidden))
    cursor = found[-1].change if found else after
    return ConflictPage(found, cursor, more, node)


def _lost_edit(record: ConflictRecord, change: int, node: str, hidden: bool) -> LostEdit:
    """``record`` as ``node`` sees it: its own value, and what won over it."""
    resolution = record.resolution
    if hidden and isinstance(resolution, dict):
        resolution = {k: v for k, v in resolution.items() if k != "value"}
    version: str | None
    if record.other_node == node:
        side, value, version = "other", record.other_value, record.other_version
        won = record.merged if record.kind == "custom" else record.kept_value
        winner: tuple[str | None, str | None] = (record.kept_node, record.kept_version)
    else:  # kept at first, then an admin chose the other side or a value
        side, value, version = "kept", record.kept_value, record.kept_version
        chose_other = isinstance(record.resolution, dict) and record.resolution["keep"] == "other"
        if chose_other:
            won, winner = record.other_value, (record.other_node, record.other_version)
        else:
            won, winner = (record.resolution or {}).get("value"), (None, None)
    return LostEdit(
        id=record.id,
        change=change,
        created_at=record.created_at,
        table=record.table,
        pk=record.pk,
        kind=record.kind,
        column=record.column,
        value=value,
        version=version or "",
        status=record.status,
        winner_value=None if hidden else won,
        winner_office=winner[0],
        winner_version=winner[1],
        hidden=hidden,
        resolved_by=record.resolved_by,
        resolved_at=record.resolved_at,
        resolution=resolution,
        side=side,
    )


# -- an admin's decision ---------------------------------------------------------------


def resolve(
    hub: HubDatabase,
    conflict_id: int,
    keep: str,
    by: str,
    value: Any = None,
    *,
    force: bool = False,
) -> ConflictRecord:
    """Settle a conflict: keep the ``kept`` side, the ``other`` side, or a ``value``.

    The decision is written as a new hub change with a fresh stamp, so it reaches
    every office on its next pull. If the record changed since the conflict was
    logged, writing the decision would silently undo that newer change, so it is
    refused unless ``force`` is given.
    """
    if keep not in ("kept", "other", "value"):
        raise ValueError(f"keep must be 'kept', 'other' or 'value', not {keep!r}")
    record = conflict(hub, conflict_id)
    if record.status == "resolved":
        raise FieldsyncError(
            f"conflict {conflict_id} was already resolved by {record.resolved_by} "
            f"at {record.resolved_at}"
        )
    table = hub.schema.table(record.table)
    if keep == "value":
        if record.column is None:
            raise FieldsyncError(
                f"conflict {conflict_id} is about a whole record; keep 'kept' or 'other'"
            )
        table.check_value(record.column, value)
    write_resolution(hub, record, table, keep, by, value, force)
    return conflict(hub, conflict_id)


def write_resolution(
    hub: HubDatabase,
    record: ConflictRecord,
    table: Table,
    keep: str,
    by: str,
    value: Any,
    force: bool,
) -> None:
    """The write of :func:`resolve`, after its checks: refused if someone else resolved
    ``record`` since it was read, or if the value breaks a constraint of ``table``."""
    with hub.write() as conn:
        try:
            key = table.pk_key(record.pk)
            status = conn.execute(
                "SELECT status, resolved_by FROM _fieldsync_conflicts WHERE id = ?", [record.id]
            ).fetchone()
            if status[0] == "resolved":  # by someone else since we looked
                raise FieldsyncError(f"conflict {record.id} was just resolved by {status[1]}")
            found = records.load(conn, hub.schema, table.name, key)
            if found is None:
                raise FieldsyncError(f"the record of conflict {record.id} is gone")
            current, prev = found
            if resolution_writes(record.kind, keep) and not force:
                _check_unchanged(record, current)
            for version in current.versions.values():
                hub.clock.observe(Timestamp.parse(version).hlc)
            ts = str(hub.clock.tick())
            decided = decide(
                current,
                kind=record.kind,
                column=record.column,
                kept_value=record.kept_value,
                other_value=record.other_value,
                keep=keep,
                value=value,
                stamp=ts,
            )
            if decided.changed:
                state = decided.state
                change = {"deleted": True} if state.deleted else decided.chosen
                write_hub_change(
                    conn,
                    hub,
                    table,
                    record.pk,
                    state,
                    prev,
                    actor=f"admin {by}",
                    stamp=ts,
                    op="resolve",
                    change=change,
                )
            resolution = {"keep": keep, "value": value} if keep == "value" else {"keep": keep}
            conn.execute(
                "UPDATE _fieldsync_conflicts SET status = 'resolved', resolved_by = ?, "
                f"resolved_at = ?, resolution = ?, changed = {_NEXT_CHANGE} WHERE id = ?",
                [by, utcnow(), json.dumps(resolution, ensure_ascii=False), record.id],
            )
        except dialect_of(conn).integrity_errors as exc:
            raise InvalidChangeError(
                f"cannot resolve conflict {record.id} that way: the value breaks a "
                f"constraint of {table.name} ({dialect_of(conn).describe(exc)}); "
                "nothing was changed"
            ) from exc


def _check_unchanged(record: ConflictRecord, current: RecordState) -> None:
    """Raise unless the record is as it was right after the conflict was logged."""
    if fingerprint(current, record.column) == record.state_after:
        return
    since = "it was deleted since"
    if not current.deleted:
        latest = (
            current.versions.get(record.column)
            if record.column is not None
            else max(current.versions.values(), default=None)
        )
        stamp = Timestamp.parse(latest) if latest else None
        since = f"{stamp.node} changed it at {stamp_time(latest)}" if stamp else "it changed"
    raise FieldsyncError(
        f"conflict {record.id}: the record changed after the conflict was logged "
        f"({since}); check it, then resolve again with --force to apply anyway"
    )
