"""
The schema's versions at the hub: what `hub schema show` reads and `hub schema apply`
changes.

Every version is a row of ``_fieldsync_schemas`` (its TOML source, when and by whom);
the hub's first schema is version 1, and the newest is the one in use. ``_fieldsync_meta``
key ``schema`` holds the newest source too (exports and older tools read it there).

:func:`apply` plans the change (shared/schema_change.py) and, in ONE write
transaction, changes the mirrored tables (new tables, ``ADD COLUMN``, rebuilds), stores
the new version, recomputes every record's scope key when a scope changed (marking
every office to pull its scope again, and noting where moved records left, as a move
does), and writes the audit entry. A serving hub in another process takes the new
version at its next write or snapshot (see hub/database.py). A change that may lose
data is refused unless ``allow_loss``; then a backup of the whole file is made before
anything changes (PostgreSQL: a copy of each table that loses data, in the same
transaction; hub/pg/schema_change.py, which carries plans out there).

Columns found in the hub's tables that the schema does not declare (added by hand with
sqlite3) are named by :func:`undeclared`; `hub serve` refuses to start with one.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec

from hub import audit
from hub.audit import Actor
from hub.database import HubDatabase, custom_merges
from hub.engine import Conn, dialect_of
from hub.epoch import count_hub, mark_backup
from hub.records import complete_values, last_seq
from hub.scopes import Locator
from hub.times import utcnow
from shared.backup import backup as copy_verified
from shared.errors import FieldsyncError, SchemaError
from shared.protocol import Change, dumps_text, loads
from shared.schema import EXISTS, Schema, quote
from shared.schema_change import ADD, Plan, migrate, plan


@dataclass(frozen=True, slots=True)
class Applied:
    """What :func:`apply` did: the version now in use, and the plan (None: the source
    was already the newest version)."""

    version: int
    plan: Plan | None
    backup: Path | None = None  # SQLite: the copy of the file made first
    #: PostgreSQL: the tables holding a copy of each table that lost data, made first
    backup_tables: tuple[str, ...] = ()


def current(conn: Conn) -> tuple[int, str]:
    """The newest version and its source."""
    row = conn.execute(
        "SELECT version, source FROM _fieldsync_schemas ORDER BY version DESC LIMIT 1"
    ).fetchone()
    return int(row[0]), str(row[1])


def versions(hub: HubDatabase) -> list[dict[str, Any]]:
    """Every version, oldest first: number, when, by whom."""
    with hub.read() as conn:
        rows = conn.execute(
            "SELECT version, applied_at, applied_by FROM _fieldsync_schemas ORDER BY version"
        ).fetchall()
    return [{"version": v, "applied_at": at, "applied_by": by} for v, at, by in rows]


def undeclared(conn: Conn, schema: Schema) -> list[tuple[str, str]]:
    """(table, column) of every column a synced table has and the schema lacks."""
    found = []
    for table in schema.tables.values():
        for name in dialect_of(conn).columns(conn, table.name):
            if name not in table.column_names:
                found.append((table.name, str(name)))
    return found


def check_declared(hub: HubDatabase) -> None:
    """Raise, naming the first, if a synced table has a column the schema lacks."""
    with hub.read() as conn:
        found = undeclared(conn, hub.schema)
    if found:
        table, column = found[0]
        raise FieldsyncError(
            f"the hub's table {table} has a column {column} that schema version "
            f"{hub.schema_version} does not declare (added by hand?): add it to the schema "
            f"with `fieldsync hub schema apply FILE --db {hub.where}`, or drop it"
        )


def apply(hub: HubDatabase, new: Schema, actor: Actor, *, allow_loss: bool = False) -> Applied:
    """Make ``new`` the hub's schema (see the module's text); SchemaError if refused."""
    with hub.read() as conn:
        version, source = current(conn)
    if source == new.source:
        return Applied(version, None)
    steps = plan(Schema.from_toml(source, f"schema version {version}"), new)
    if steps.losses and not allow_loss:
        raise SchemaError(steps.refusal(version + 1))
    custom_merges(new)  # a merge function that cannot be loaded stops it here
    backup = None
    if steps.losses and hub.dialect.name == "sqlite":
        backup = Path(f"{hub.path}.before-schema-v{version + 1}")
        backup_file(hub, backup)
    with hub.write() as conn:
        if current(conn)[0] != version:
            raise FieldsyncError("the hub's schema changed meanwhile; look and apply again")
        _adopt_check(conn, steps)
        kept = carry_out(hub, conn, steps, version + 1)
        for name in steps.dropped:
            conn.execute("DELETE FROM _fieldsync_records WHERE tbl = ?", [name])
        dropped: dict[str, set[str]] = {}
        for name, column in steps.dropped_columns():
            dropped.setdefault(name, set()).add(column)
        for name, columns in dropped.items():
            drop_values(conn, name, columns)
        conn.execute(
            "INSERT INTO _fieldsync_schemas (version, source, applied_at, applied_by) "
            "VALUES (?, ?, ?, ?)",
            [version + 1, new.source, utcnow(), actor.name],
        )
        conn.execute("UPDATE _fieldsync_meta SET value = ? WHERE key = 'schema'", [new.source])
        complete_values(conn, new, version + 1)  # the columns added: null in each record
        if steps.rescope:
            note_exits(conn, rescope(conn, new))
            conn.execute("UPDATE _fieldsync_nodes SET rescope = 1")
        audit.record(
            conn,
            "schema_apply",
            actor,
            f"version {version + 1}",
            changes=steps.lines(),
            allow_loss=bool(steps.losses),
        )
        hub.refresh(conn)
    return Applied(version + 1, steps, backup, kept)


def carry_out(hub: HubDatabase, conn: Conn, steps: Plan, version: int) -> tuple[str, ...]:
    """Change the mirrored tables as ``steps`` say, in ``conn``'s write transaction, the
    way of the hub's engine; return the tables a backup was copied to (PostgreSQL,
    for a plan that loses data; SQLite copies the file before, in :func:`apply`)."""
    if hub.dialect.name == "sqlite":
        migrate(cast(sqlite3.Connection, conn), steps)
        return ()
    from hub.pg.schema_change import backup_tables, migrate as migrate_pg

    kept = backup_tables(conn, steps, version) if steps.losses else []
    migrate_pg(conn, steps)
    return tuple(kept)


def _adopt_check(conn: Conn, steps: Plan) -> None:
    """A column the plan adds that a table already has (added by hand) is adopted if
    it has the declared type and holds nothing; anything else is refused."""
    for table in steps.tables:
        if table.action != ADD:
            continue
        have = dialect_of(conn).column_types(conn, table.name)
        spec = steps.new.tables[table.name]
        for column in table.added_columns:
            if column not in have:
                continue
            want = spec.column(column).type
            used = conn.execute(
                f"SELECT 1 FROM {quote(table.name)} WHERE {quote(column)} IS NOT NULL LIMIT 1"
            ).fetchone()
            if have[column] != want or used:
                raise SchemaError(
                    f"the hub's table {table.name} already has a column {column} "
                    f"({have[column] or 'no type'}, {'with' if used else 'without'} values), "
                    f"added by hand: to adopt it, it must be {want or 'untyped'} and empty; "
                    "copy its values elsewhere, drop it, and apply again"
                )


# Records read, changed and written back at a time, by rescope and drop_values.
CHUNK = 1000

# A record a new scope rule moved: table, key text, the key it left, the key it has now
# (None: its table has no scope any more).
Moved = tuple[str, str, str, str | None]


def _records(conn: Conn, table: str, columns: str) -> Iterator[list[Any]]:
    """``table``'s records, ``pk`` then ``columns``, a chunk at a time in key order (a
    chunk may be written back before the next is read)."""
    after = ""  # before every key text (a JSON array)
    while True:
        rows = conn.execute(
            f"SELECT pk, {columns} FROM _fieldsync_records WHERE tbl = ? AND pk > ? "
            "ORDER BY pk LIMIT ?",
            [table, after, CHUNK],
        ).fetchall()
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def drop_values(conn: Conn, table: str, columns: set[str]) -> None:
    """Take dropped ``columns`` out of the stored values and versions of ``table``'s
    records (versions packed into one stamp have none to take out)."""
    for rows in _records(conn, table, "vals, vers"):
        changed = []
        for pk, vals, vers in rows:
            values, versions = loads(vals), loads(vers)
            per_column = isinstance(versions, dict)
            if columns.isdisjoint(values) and (not per_column or columns.isdisjoint(versions)):
                continue
            for column in columns:
                values.pop(column, None)
                if per_column:
                    versions.pop(column, None)
            changed.append(
                (dumps_text(values), dumps_text(versions) if per_column else vers, table, pk)
            )
        conn.executemany(
            "UPDATE _fieldsync_records SET vals = ?, vers = ? WHERE tbl = ? AND pk = ?", changed
        )


def rescope(conn: Conn, schema: Schema) -> list[Moved]:
    """Every record's scope key (and parent) again, under ``schema``'s scopes, by the
    rule a push uses (hub/scopes.py, ``Locator.place``); return the live records that
    had a key and now have another, in hub seq order.

    Parents first: tables are taken in declaration order, and a follower's parent is
    declared before it (shared/schema.py checks so), so a follower takes its parent's
    new key.
    """
    moved: list[tuple[int, Moved]] = []
    for table in schema.tables.values():
        for rows in _records(conn, table.name, "vals, scope, parent, deleted, seq"):
            locator = Locator(conn, schema)  # the parents' keys as now written
            states = [(row, loads(row[1]) if row[1] is not None else {}) for row in rows]
            locator.prefetch((table, values) for _, values in states)
            changed = []
            for (pk, _, scope, parent, deleted, seq), values in states:
                new_scope, new_parent = locator.place(table, values)
                if (new_scope, new_parent) != (scope, parent):
                    changed.append((new_scope, new_parent, table.name, pk))
                if not deleted and scope and new_scope != scope:
                    moved.append((int(seq), (table.name, pk, scope, new_scope)))
            conn.executemany(
                "UPDATE _fieldsync_records SET scope = ?, parent = ? WHERE tbl = ? AND pk = ?",
                changed,
            )
    moved.sort(key=lambda entry: entry[0])
    return [entry for _, entry in moved]


def note_exits(conn: Conn, moved: Sequence[Moved]) -> None:
    """Note where records the new scopes ``moved`` left (``_fieldsync_exits``, each under a
    new seq), as an admin's move does: an office's edit made offline to a record that
    left its scopes is then merged, not refused (hub/scopes.py, ``Gate.refuse``)."""
    if not moved:
        return
    top = last_seq(conn)
    conn.executemany(
        "INSERT INTO _fieldsync_exits (tbl, pk, scope, seq) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (tbl, pk, scope) DO UPDATE SET seq = excluded.seq",
        [(tbl, pk, old, top + i) for i, (tbl, pk, old, _) in enumerate(moved, 1)],
    )
    # A record back in a scope it once left: that exit is over.
    conn.executemany(
        "DELETE FROM _fieldsync_exits WHERE tbl = ? AND pk = ? AND scope = ?",
        [(tbl, pk, new) for tbl, pk, _, new in moved if new],
    )
    conn.execute("UPDATE _fieldsync_meta SET value = ? WHERE key = 'seq'", [str(top + len(moved))])


def without_dropped(conn: Conn, schema: Schema, change: Change) -> Change:
    """``change`` without the columns of its table that an earlier schema version
    declared and ``schema`` dropped (`hub schema apply --allow-loss`): a change an
    office made before it took that version is taken without them. Any other column
    the table lacks is left in, for the change to be refused."""
    table = schema.tables.get(change.table)
    if table is None:
        return change
    named = set(change.values or ()) | {name for name in change.base if name != EXISTS}
    unknown = named - set(table.column_names)
    if not unknown:
        return change
    dropped: set[str] = set()
    for version, source in conn.execute("SELECT version, source FROM _fieldsync_schemas"):
        old = _parsed(int(version), str(source)).tables.get(change.table)
        if old is not None:
            dropped |= unknown & set(old.column_names)
    if dropped != unknown:
        return change
    values = None
    if change.values is not None:
        values = {k: v for k, v in change.values.items() if k not in dropped}
    base = {k: v for k, v in change.base.items() if k not in dropped}
    return msgspec.structs.replace(change, values=values, base=base)


@functools.lru_cache(maxsize=16)
def _parsed(version: int, source: str) -> Schema:
    return Schema.from_toml(source, f"schema version {version}")


def backup_file(hub: HubDatabase, out: Path) -> None:
    """A verified copy of the hub's file at ``out``, as `hub backup` makes (marked as a
    backup: restored, it gets a new epoch), taken before a change that may lose data."""
    if out.exists():
        raise FieldsyncError(f"{out} exists already; move it away and apply again")
    copy_verified(hub.path, out, count=count_hub, mark=mark_backup)
