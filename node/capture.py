"""
Capture: the SQLite triggers that log every write to a synced table.

Capture is done by SQLite triggers, so every committed write to a synced table is
logged in the same transaction whichever program made it (fieldsync, the ``sqlite3``
shell, sqlite-utils, Datasette), and a rolled-back write leaves nothing. The triggers
use only built-in SQL functions, and stamp each change with the hybrid logical clock
of ``shared/clock.py`` computed in SQL::

    hlc = max(last + 1, floor + 1, (now_ms + offset_ms) << 16)

where ``last`` is the stamp of the newest change in the log, ``floor`` the clock kept
in the state row (raised by what the log does not show: stamps pulled from other
offices, the newest change once it leaves the log; set back by a re-stamp), and
``offset_ms`` what the node learned of its clock error from the hub. A write only
reads the state row, so capturing it costs one INSERT.

This module holds the trigger SQL (with the guard that refuses writes the hub could
never take), the clock's SQL twin, and the Python that logs rows outside a trigger:
a table adopted by ``node init`` (:func:`start_capture`) and a record logged again
(:func:`log_rows`). The triggers are the hot path of every office write: they stay
plain SQL, with no Python called from them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from shared.errors import InvalidChangeError, StoreError
from shared.schema import Schema, Table, quote

# The stamp of the newest change in the log (0 if it is empty).
_LAST = "coalesce((SELECT hlc FROM _fieldsync_changes ORDER BY seq DESC LIMIT 1), 0)"
# The hybrid logical clock, in SQL (see shared/clock.py and the module docstring):
# the next stamp, after the newest change's and after the state row's floor. It is
# worked out from the log rather than kept up to date in the state row: an UPDATE of
# that row on every captured write cost more than the INSERT into the log.
_STAMP = (
    f"(SELECT MAX(s.hlc + 1, {_LAST} + 1, "
    "(CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) + s.offset_ms) << 16) "
    "FROM _fieldsync_state AS s)"
)
# hlc may be re-stamped later (a wrong clock); the stamp a change was captured with
# names it in the hub's receipts. captured is 0 while that stamp is hlc (so the
# trigger works it out once); a re-stamp first copies it there. An insert logs no
# values: they are read from the record when the change is pushed (see
# Outbox.pending in node/outbox.py), which halves the cost of capturing it. VALUES,
# not INSERT … SELECT: a SELECT that reads the table it inserts into goes through a
# temporary table.
_LOG = (
    "INSERT INTO _fieldsync_changes (tbl, pk, op, hlc, captured, vals) "
    "VALUES ({table}, json_array({pk}), '{op}', " + _STAMP + ", 0, {vals});"
)
_TRIGGER = (
    "CREATE TRIGGER {name} AFTER {event} ON {table} "
    "WHEN (SELECT applying FROM _fieldsync_state) = 0{when} BEGIN {body} END"
)


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_value(table: Table, prefix: str, column: str) -> str:
    ref = f"{prefix}.{quote(column)}"
    # || '' drops the JSON subtype a value made by json_set() & co. carries inside a
    # trigger, so that text travels as text.
    if table.column(column).type == "TEXT":
        return f"({ref} || '')"  # TEXT affinity stores no REAL values
    # json_object() prints REAL values with 15 digits; 21 round-trip exactly even on
    # SQLite versions whose printf is not correctly rounded (before 3.43).
    return (
        f"CASE typeof({ref}) WHEN 'real' THEN json(printf('%!.20e', {ref})) "
        f"WHEN 'text' THEN {ref} || '' ELSE {ref} END"
    )


def _json_object(table: Table, prefix: str, columns: Iterable[str]) -> str:
    pairs = ", ".join(f"{_lit(c)}, {_json_value(table, prefix, c)}" for c in columns)
    return f"json_object({pairs})"


# A value, or a record, this large might not fit in one push request (hub.app allows
# 16 MiB as sent and 128 MiB inflated; JSON escaping can grow text up to 6 times).
MAX_VALUE_BYTES = 4 * 2**20
MAX_ROW_BYTES = 8 * 2**20

_KINDS = {
    "TEXT": ("text",),
    "INTEGER": ("integer",),
    "INT": ("integer",),
    "REAL": ("real", "integer"),
    "FLOAT": ("real", "integer"),
    "DOUBLE": ("real", "integer"),
    "NUMERIC": ("real", "integer"),
}


def _guard(table: Table, strict: bool) -> str:
    """A statement that aborts a write the hub could never take.

    Such a change would otherwise wait at the head of the office's queue forever:
    a NULL key, a value of another type than the column's (tables that are not
    STRICT let those in), a BLOB, an infinite number (JSON cannot carry it), a
    value or record too large to send. Cheap checks come first; the size of each
    value is only looked at when the record as a whole is large.
    """
    cases: list[str] = []

    def refuse(condition: str, problem: str) -> None:
        message = _lit(f"fieldsync: {table.name}.{col.name} {problem}")
        cases.append(f"WHEN {condition} THEN RAISE(ABORT, {message})")

    for col in table.columns:
        ref = f"NEW.{quote(col.name)}"
        if col.name in table.primary_key:
            refuse(f"{ref} IS NULL", "is part of the key and cannot be NULL")
        kinds = _KINDS.get(col.type)
        if kinds is None:
            refuse(f"typeof({ref}) = 'blob'", "cannot hold a BLOB")
        elif not strict:  # a STRICT table refuses values of other types itself
            allowed = ", ".join(_lit(k) for k in (*kinds, "null"))
            refuse(f"typeof({ref}) NOT IN ({allowed})", f"takes {col.type} values")
        if kinds is None or "real" in kinds:  # the type checks keep inf out of the others
            refuse(f"{ref} IN (9e999, -9e999)", "cannot hold an infinite number")
    # Numbers are small; only text (and untyped values) can be large.
    large = [c for c in table.columns if _KINDS.get(c.type) in (None, ("text",))]
    sizes = " + ".join(f"coalesce(length(CAST(NEW.{quote(c.name)} AS BLOB)), 0)" for c in large)
    sizes = sizes or "0"
    cases.append(f"WHEN {sizes} <= {MAX_VALUE_BYTES} THEN NULL")
    for col in large:
        limit = MAX_VALUE_BYTES
        refuse(
            f"length(CAST(NEW.{quote(col.name)} AS BLOB)) > {limit}",
            f"holds more than {limit // 2**20} MiB; keep files and scans outside the database",
        )
    message = _lit(
        f"fieldsync: a {table.name} record holds more than {MAX_ROW_BYTES // 2**20} MiB; "
        "keep files and scans outside the database"
    )
    cases.append(f"WHEN {sizes} > {MAX_ROW_BYTES} THEN RAISE(ABORT, {message})")
    return f"SELECT CASE {' '.join(cases)} END;"


def trigger_sql(table: Table, strict: bool = False) -> dict[str, str]:
    """The CREATE TRIGGER statements that capture writes to ``table``, by trigger name.

    ``strict``: the table is STRICT, so SQLite itself refuses values of other types.
    """
    t = quote(table.name)
    name = table.name.replace('"', "")
    pk_new = ", ".join(f"NEW.{quote(c)}" for c in table.primary_key)
    pk_old = ", ".join(f"OLD.{quote(c)}" for c in table.primary_key)
    full_new = _json_object(table, "NEW", table.column_names)
    # A delete logs the record as it was: the values of its insert, if that is still
    # queued (an insert logs none, see _LOG).
    full_old = _json_object(table, "OLD", table.column_names)
    guard = _guard(table, strict)
    others = [c for c in table.column_names if c not in table.primary_key]
    # COLLATE BINARY: under NOCASE, 'ivanov' -> 'Ivanov' would not count as a change.
    same_pk = " AND ".join(
        f"NEW.{quote(c)} IS OLD.{quote(c)} COLLATE BINARY" for c in table.primary_key
    )
    some_changed = (
        " OR ".join(f"NEW.{quote(c)} IS NOT OLD.{quote(c)} COLLATE BINARY" for c in others) or "0"
    )
    if table.policy == "record" or not others:
        changed_vals = full_new
    else:
        # Only the columns the UPDATE changed, so edits to other fields merge.
        removals = ", ".join(
            f"CASE WHEN NEW.{quote(c)} IS OLD.{quote(c)} COLLATE BINARY "
            f"THEN {_lit('$.' + json.dumps(c, ensure_ascii=False))} "
            "ELSE '$.__fieldsync_unchanged' END"
            for c in others
        )
        changed_vals = f"json_remove({_json_object(table, 'NEW', others)}, {removals})"
    log = dict(table=_lit(table.name))
    bodies = {
        "insert": ("INSERT", "", guard + _LOG.format(**log, pk=pk_new, op="insert", vals="NULL")),
        "update": (
            "UPDATE",
            f" AND {same_pk} AND ({some_changed})",
            guard + _LOG.format(**log, pk=pk_new, op="update", vals=changed_vals),
        ),
        "rekey": (
            "UPDATE",
            f" AND NOT ({same_pk})",
            guard
            + _LOG.format(**log, pk=pk_old, op="delete", vals=full_old)
            + _LOG.format(**log, pk=pk_new, op="insert", vals="NULL"),
        ),
        "delete": ("DELETE", "", _LOG.format(**log, pk=pk_old, op="delete", vals=full_old)),
    }
    return {
        f"_fieldsync_{name}_{kind}": _TRIGGER.format(
            name=quote(f"_fieldsync_{name}_{kind}"), event=event, table=t, when=when, body=body
        )
        for kind, (event, when, body) in bodies.items()
    }


def _is_strict(conn: sqlite3.Connection, name: str) -> bool:
    # PRAGMA table_list, not sqlite-utils' Table.strict, which reads the CREATE
    # statement's text (a comment after its closing parenthesis fools it).
    for row in conn.execute("PRAGMA table_list"):
        if row[1] == name and row[0] == "main":
            return bool(row[5])
    return False


def stale_triggers(conn: sqlite3.Connection, schema: Schema) -> dict[str, str]:
    """This version's capture triggers that the database lacks or has in another form."""
    have = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    return {
        name: sql
        for table in schema.tables.values()
        for name, sql in trigger_sql(table, _is_strict(conn, table.name)).items()
        if have.get(name) != sql
    }


def refresh_triggers(conn: sqlite3.Connection, schema: Schema) -> None:
    """Replace the capture triggers the database lacks or has in another form.

    Triggers of older versions kept the clock in the state row, updated on every
    write; that row's clock is where the new ones start from (see _STAMP).
    """
    for name, sql in stale_triggers(conn, schema).items():
        conn.execute(f"DROP TRIGGER IF EXISTS {quote(name)}")
        conn.execute(sql)


def start_capture(conn: sqlite3.Connection, table: Table) -> None:
    """Create the capture triggers of ``table`` and log the rows it already holds."""
    for sql in trigger_sql(table, _is_strict(conn, table.name)).values():
        conn.execute(sql)
    _backfill(conn, table)


def hold_clock(conn: sqlite3.Connection) -> None:
    """Before changes leave the log: raise the clock's floor to the newest change's stamp,
    so that new stamps still follow it (see _STAMP)."""
    conn.execute(f"UPDATE _fieldsync_state SET hlc = MAX(hlc, {_LAST})")


def log_rows(
    conn: sqlite3.Connection, table: Table, op: str, where: str = "", params: Sequence[Any] = ()
) -> None:
    """Log rows of ``table`` as they are now, whole (as the insert trigger would).

    They all get the same stamp, the clock's next.
    """
    stamp = conn.execute(f"SELECT {_STAMP}").fetchone()[0]
    pk = ", ".join(f"t.{quote(c)}" for c in table.primary_key)
    conn.execute(
        "INSERT INTO _fieldsync_changes (tbl, pk, op, hlc, captured, vals) "
        f"SELECT ?, json_array({pk}), ?, ?, 0, "
        f"{_json_object(table, 't', table.column_names)} FROM {quote(table.name)} AS t "
        + where.format(pk=pk),
        [table.name, op, stamp, *params],
    )


def _backfill(conn: sqlite3.Connection, table: Table) -> None:
    """Log every row already in ``table`` as an insert (refuse rows the hub cannot take)."""
    bad: dict[str, int] = {}
    cursor = conn.execute(f"SELECT * FROM {quote(table.name)}")
    names = [d[0] for d in cursor.description]
    for row in cursor:
        total = 0
        for name, value in zip(names, row, strict=True):
            if name not in table.column_names:
                continue
            size = len(str(value).encode("utf-8", "surrogatepass")) if value is not None else 0
            total += size
            try:
                if value is None and name in table.primary_key:
                    raise InvalidChangeError("null key")
                if size > MAX_VALUE_BYTES:
                    raise InvalidChangeError("too large")
                table.check_value(name, value)
            except InvalidChangeError:
                bad[name] = bad.get(name, 0) + 1
        if total > MAX_ROW_BYTES:
            bad["(whole record)"] = bad.get("(whole record)", 0) + 1
    if bad:
        where = ", ".join(f"{n} ({count} rows)" for n, count in bad.items())
        raise StoreError(
            f"cannot adopt table {table.name}: some rows hold values the hub cannot take, "
            f"in {where}; fix them (types, NULL keys, blobs, sizes), then run init again"
        )
    log_rows(conn, table, "insert")


def log_columns(conn: sqlite3.Connection, table: Table, columns: Sequence[str]) -> int:
    """Log, as updates of ``columns`` only, the rows of ``table`` where one of them is
    set: values written before capture knew the columns (added by hand, then adopted
    by a schema version), so that they reach the hub. Returns how many were logged."""
    if not columns:
        return 0
    stamp = conn.execute(f"SELECT {_STAMP}").fetchone()[0]
    pk = ", ".join(f"t.{quote(c)}" for c in table.primary_key)
    some = " OR ".join(f"t.{quote(c)} IS NOT NULL" for c in columns)
    cursor = conn.execute(
        "INSERT INTO _fieldsync_changes (tbl, pk, op, hlc, captured, vals) "
        f"SELECT ?, json_array({pk}), 'update', ?, 0, {_json_object(table, 't', columns)} "
        f"FROM {quote(table.name)} AS t WHERE {some}",
        [table.name, stamp],
    )
    return cursor.rowcount
