"""
An office following the hub's schema versions (README: "Changing the schema").

At the start of each sync, before anything is pushed or pulled (node/agent.py):

1. :func:`check_columns`: a synced table with a column the schema does not declare
   (added by hand, ``ALTER TABLE cases ADD COLUMN phone TEXT``) stops the sync with one
   line: its values would never leave the office.
2. :func:`catch_up`, with the version the hub's health check named: the same as the
   office's, nothing; newer, the office fetches ``GET /v1/schema``, plans its tables'
   change (shared/schema_change.py) and migrates in ONE transaction: new tables,
   ``ADD COLUMN`` or rebuilds, capture triggers made again, the new source and version
   stored. Pulled rows may carry the new columns, so this comes before the pull;
   changes queued under the old version are pushed as they are (the hub takes them).
   Older than the office's (the hub restored from a backup taken before an apply), or
   the same number at a hub with another identity (restored, then applied again):
   :func:`realign` compares the schemas themselves; a hub lacking what the office has
   stops the sync with one line, every change kept queued.

An office that has never learned a version (0: made by `node init`, or before schema
versions) takes the hub's if its own schema is the same or a subset; if it has
columns or tables the hub lacks, it stops with one line naming them, its changes
queued and its records where they are, until the hub applies that schema.
"""

from __future__ import annotations

import logging
import sqlite3

from node.capture import log_columns, refresh_triggers, start_capture, trigger_sql
from node.client import HubClient
from node.outbox import Outbox
from node.store import NodeStore
from shared.errors import SchemaError
from shared.schema import Schema, quote
from shared.schema_change import ADD, NEW, Plan, migrate, plan
from shared.sqlite import write

log = logging.getLogger("fieldsync.schema")


def stored_version(conn: sqlite3.Connection) -> int:
    """The hub's schema version this office's tables follow (0: not learned yet)."""
    row = conn.execute("SELECT version FROM _fieldsync_schema").fetchone()
    return int(row[0]) if row is not None else 0


def undeclared(conn: sqlite3.Connection, schema: Schema) -> list[tuple[str, str]]:
    """(table, column) of each column a synced table has that ``schema`` lacks."""
    return [
        (table.name, str(row[1]))
        for table in schema.tables.values()
        for row in conn.execute(f"PRAGMA table_info({quote(table.name)})")
        if row[1] not in table.column_names
    ]


def check_columns(store: NodeStore, hub_schema: Schema | None = None) -> None:
    """Stop (SchemaError) if a synced table has a column the schema does not declare.

    A column the hub's newer schema (``hub_schema``) declares with the same type is
    not stopped for: the migration adopts it.
    """
    conn = store.db.conn
    for table, column in undeclared(conn, store.schema):
        spec = hub_schema.tables.get(table) if hub_schema is not None else None
        if spec is not None and column in spec.column_names:
            kind = next(
                str(row[2]).upper()
                for row in conn.execute(f"PRAGMA table_info({quote(table)})")
                if row[1] == column
            )
            if kind == spec.column(column).type:
                continue
            raise SchemaError(
                f"table {table} has a column {column} of type {kind or 'none'} added "
                f"outside fieldsync, but the hub's schema declares it "
                f"{spec.column(column).type or 'untyped'}: copy its values elsewhere and "
                f"drop it (ALTER TABLE {table} DROP COLUMN {column}), then sync again"
            )
        raise SchemaError(
            f"table {table} has a column {column} that the schema does not declare (added "
            "outside fieldsync?), so its values would not sync: add it to the schema at "
            f"the hub with `fieldsync hub schema apply FILE`, or drop it (ALTER TABLE "
            f"{table} DROP COLUMN {column})"
        )


def catch_up(store: NodeStore, client: HubClient, hub_version: int | None, epoch: str = "") -> bool:
    """Bring the office to the hub's schema version ``hub_version`` (None: a hub
    without versions; nothing to do). True if the office's tables changed.

    ``epoch``: the hub's identity in its health check. Another one than the office
    last saw (a hub restored from a backup) has its schema compared by its source,
    not only its number (see :func:`realign`)."""
    if hub_version is None:
        check_columns(store)
        return False
    mine = stored_version(store.db.conn)
    if mine > hub_version or (mine == hub_version and mine and _hub_replaced(store, epoch)):
        return realign(store, client, mine)
    if mine == hub_version:
        check_columns(store)
        client.use_schema_version(mine)
        return False
    info = client.schema()
    new = Schema.from_toml(info.source, f"the hub's schema version {info.version}")
    check_columns(store, new)
    steps = plan(store.schema, new)
    if steps.losses and mine == 0:
        if steps.dropped_columns() or steps.dropped:
            raise SchemaError(_mismatch(steps, info.version))
        # Other differences (a table not STRICT, another constraint): the office keeps
        # its tables, as before versions; the hub refuses what it cannot take, per
        # change. The next version the hub applies is taken as planned.
        with write(store.db) as conn:
            conn.execute("UPDATE _fieldsync_schema SET version = ?", [info.version])
        client.use_schema_version(info.version)
        return False
    changed = take(store, steps, mine, info.version)
    client.use_schema_version(info.version)
    return changed


def _hub_replaced(store: NodeStore, epoch: str) -> bool:
    """Whether the hub's ``epoch`` is another one than the office last kept."""
    stored = store.db.conn.execute("SELECT hub_epoch FROM _fieldsync_state").fetchone()[0]
    return bool(stored and epoch and epoch != stored)


def realign(store: NodeStore, client: HubClient, mine: int) -> bool:
    """A hub restored from a backup taken before `hub schema apply`: its version
    numbers need not be the office's. The same schema under another number (applied
    again at the hub, perhaps after versions in between) is taken as that number; a
    schema with all the office's tables and columns, and more, is migrated to; one
    that lacks some stops the sync with one line, every change kept queued."""
    info = client.schema()
    if info.source == store.schema.source:
        if info.version != mine:
            with write(store.db) as conn:
                conn.execute("UPDATE _fieldsync_schema SET version = ?", [info.version])
            log.warning(
                "office %s: the hub numbers this schema version %d (was %d here)",
                store.node,
                info.version,
                mine,
            )
        check_columns(store)
        client.use_schema_version(info.version)
        return False
    new = Schema.from_toml(info.source, f"the hub's schema version {info.version}")
    steps = plan(store.schema, new)
    if steps.losses:
        said = (
            f"the hub has only version {info.version}"
            if info.version < mine
            else f"the hub's version {info.version} is another schema"
        )
        raise SchemaError(
            f"this office uses schema version {mine}, but {said} (restored from a backup "
            f"taken before `hub schema apply`?), which {_lacks(steps)}: apply that schema "
            "again at the hub with `fieldsync hub schema apply FILE`; every change stays "
            "queued here"
        )
    check_columns(store, new)
    changed = take(store, steps, mine, info.version)
    client.use_schema_version(info.version)
    return changed


def _lacks(steps: Plan) -> str:
    extra = [f"{t}.{c}" for t, c in steps.dropped_columns()] + list(steps.dropped)
    return f"lacks {', '.join(extra)}" if extra else "differs: " + "; ".join(steps.losses)


def _mismatch(steps: Plan, version: int) -> str:
    """The line of an office whose own schema has what the hub's lacks."""
    extra = [f"{t}.{c}" for t, c in steps.dropped_columns()] + list(steps.dropped)
    return (
        f"this office's schema has {', '.join(extra)}, which the hub's schema version "
        f"{version} lacks: apply this office's schema file at the hub with "
        "`fieldsync hub schema apply FILE`; every change stays queued here"
    )


def take(store: NodeStore, steps: Plan, mine: int, version: int) -> bool:
    """Migrate the office's tables by ``steps`` and store the new schema as
    ``version``, in one transaction (nothing changes if any of it fails)."""
    new = steps.new
    with write(store.db) as conn:
        if stored_version(conn) != mine:
            raise SchemaError("another program changed this office's schema meanwhile")
        adopted = {
            table.name: [
                c
                for c in table.added_columns
                if (table.name, c) in set(undeclared(conn, steps.old))
            ]
            for table in steps.tables
            if table.action == ADD
        }
        for table in steps.tables:  # their capture triggers name the old columns
            for name in trigger_sql(steps.old.tables.get(table.name) or new.tables[table.name]):
                conn.execute(f"DROP TRIGGER IF EXISTS {quote(name)}")
        try:
            migrate(conn, steps)
        except sqlite3.IntegrityError as exc:
            raise SchemaError(f"cannot take the hub's schema version {version}: {exc}") from None
        for table in steps.tables:
            if table.action == NEW:
                start_capture(conn, new.tables[table.name])
        refresh_triggers(conn, new)
        for name, columns in adopted.items():
            logged = log_columns(conn, new.tables[name], columns)
            if logged:
                log.info("%d %s records' values of %s captured", logged, name, columns)
        conn.execute("UPDATE _fieldsync_schema SET source = ?, version = ?", [new.source, version])
    store.schema = new
    store.outbox = Outbox(store.db, new, store.node, store.path)
    if not steps.empty:
        log.info("office %s took schema version %d: %s", store.node, version, steps.lines())
    return not steps.empty
