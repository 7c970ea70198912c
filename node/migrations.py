"""
Migrations: the office database's schema history, one ordered list.

``_fieldsync_version`` counts the steps of :data:`MIGRATIONS` a database has taken.
Opening a database (:func:`upgrade`) takes the steps it lacks, in order, in one write
transaction, then saves the number taken. Not ``PRAGMA user_version``, as the hub's
database does: an office database is the application's own (``node init`` adopts
existing ones), and many applications number their own schema there. A new database
(:func:`create`) is made as the last step leaves one, at the newest version.

Databases made before fieldsync kept this number (no ``_fieldsync_version``) may
have taken some steps already: each such step can tell (``present``, read with
sqlite-utils' introspection), and is skipped if so. That is how ``fieldsync node``
upgraded them before, and they are upgraded exactly as then. Steps added from now
on need no ``present``: a database that lacks one has a version below it.

The capture triggers are not steps: they follow from this version's code and the
stored schema, so every open compares them with the database's and replaces those
that differ (see :func:`node.capture.refresh_triggers`), as before.

Tables fieldsync owns (all prefixed ``_fieldsync_``):

- ``_fieldsync_state``: one row: office name, hub URL and token (and the link's
  settings: a private CA file, plain http allowed), clock floor, pull cursor,
  the ``applying`` flag that silences the triggers while pulled changes are applied
  (so they are not captured again), and the outcome of the last sync;
- ``_fieldsync_schema``: the synced tables' schema (TOML), apart from the state row,
  and the hub's schema version it is (0: not learned yet; see node/schema_sync.py);
- ``_fieldsync_changes``: the change log; a change leaves it once the hub has
  acknowledged committing it (see node/outbox.py);
- ``_fieldsync_versions``: per record, the version of each column as the hub last
  told us (see node/versions.py);
- ``_fieldsync_rejected``: changes the hub rejected (see node/rejected.py);
- ``_fieldsync_sync_log``: one row per sync (see node/status.py);
- ``_fieldsync_resync``: while the office pulls its whole scope again, the records it
  held that the pull has not brought yet (see node/inbox.py);
- ``_fieldsync_conflicts``: this office's edits that lost at the hub, as the hub's
  conflict log tells them (see node/conflicts.py);
- ``_fieldsync_sent``: acknowledged changes, each as it was sent, kept for a window
  (``keep_acked_s`` in the state row) to re-send to a hub restored from a backup (see
  node/restore.py; the state row also keeps the hub's identity, ``hub_epoch``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from node.capture import refresh_triggers, stale_triggers
from node.conflicts import LOST_EDITS
from shared.schema import Schema
from shared.sqlite import write

STATE_TABLES = """
CREATE TABLE IF NOT EXISTS _fieldsync_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    applying INTEGER NOT NULL DEFAULT 0,
    hlc INTEGER NOT NULL DEFAULT 0,
    offset_ms INTEGER NOT NULL DEFAULT 0,
    node TEXT NOT NULL,
    hub_url TEXT NOT NULL,
    token TEXT NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0,
    repull INTEGER NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    sent_seq INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    last_sync_at TEXT,
    last_success_at TEXT,
    last_error TEXT,
    last_error_at TEXT,
    last_pushed INTEGER,
    last_pulled INTEGER,
    last_conflicts INTEGER,
    ca_file TEXT,
    allow_http INTEGER NOT NULL DEFAULT 0,
    next_try_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_schema (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_changes (
    seq INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    op TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    captured INTEGER NOT NULL,
    vals TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_rejected (
    seq INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    op TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    vals TEXT,
    reason TEXT NOT NULL,
    rejected_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_versions (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    vers TEXT NOT NULL,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID
"""

# One row per sync, for the hub's history of this office (sent with the next report).
SYNC_LOG = """
CREATE TABLE IF NOT EXISTS _fieldsync_sync_log (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    seconds REAL NOT NULL,
    outcome TEXT NOT NULL,
    pushed INTEGER NOT NULL,
    pulled INTEGER NOT NULL,
    conflicts INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    error TEXT,
    error_code TEXT,
    reported INTEGER NOT NULL DEFAULT 0
)
"""


# While the office pulls its whole scope again (node/inbox.py), the records it held
# before that the pull has not brought yet; those left at its end are dropped.
RESYNC = """
CREATE TABLE IF NOT EXISTS _fieldsync_resync (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the office database's schema history."""

    name: str
    apply: Callable[[sqlite3.Connection, Schema], None]
    # For databases made before the number was kept: whether this step is taken.
    present: Callable[[sqlite_utils.Database], bool] | None = None


def _add_schema_and_rejected(conn: sqlite3.Connection, schema: Schema) -> None:
    # Made by fieldsync 0.1: the tables it lacked are made as they are now.
    for statement in STATE_TABLES.split(";"):
        conn.execute(statement)
    # The schema moves out of the state row (which 0.1 updated on every write).
    conn.execute(
        "INSERT OR IGNORE INTO _fieldsync_schema (id, source) VALUES (1, ?)", [schema.source]
    )
    conn.execute("UPDATE _fieldsync_state SET schema = ''")


def _add_sync_log(conn: sqlite3.Connection, schema: Schema) -> None:
    conn.execute(SYNC_LOG)


def _add_sent_seq(conn: sqlite3.Connection, schema: Schema) -> None:
    # Older versions did not keep it: whatever is queued may have been sent.
    conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN sent_seq INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "UPDATE _fieldsync_state SET sent_seq = "
        "(SELECT max(seq) FROM _fieldsync_changes WHERE seq > acked_seq)"
        " WHERE EXISTS (SELECT 1 FROM _fieldsync_changes WHERE seq > acked_seq)"
    )


def _add_resync(conn: sqlite3.Connection, schema: Schema) -> None:
    conn.execute(RESYNC)


def _add_link_settings(conn: sqlite3.Connection, schema: Schema) -> None:
    # The hub link's settings: a private CA to verify the hub with, and whether plain
    # http:// to another machine was allowed on purpose (see node/link.py).
    conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN ca_file TEXT")
    conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN allow_http INTEGER NOT NULL DEFAULT 0")
    # When a running agent, backing off after failures, tries next (for `node status`).
    conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN next_try_at TEXT")


def _add_lost_edits(conn: sqlite3.Connection, schema: Schema) -> None:
    conn.execute(LOST_EDITS)


# Acknowledged changes kept as sent, for a window: a hub restored from a backup is
# sent again those it lacks (node/restore.py). One row per write of node/outbox.py
# (``count`` changes, at most ROWS_PER_WRITE, numbered ``first`` to ``seq``): the changes as msgspec
# JSON, zlib-compressed; ``acked_at`` in seconds since the Unix epoch.
SENT = """
CREATE TABLE IF NOT EXISTS _fieldsync_sent (
    seq INTEGER PRIMARY KEY,
    first INTEGER NOT NULL,
    count INTEGER NOT NULL,
    changes BLOB NOT NULL,
    acked_at INTEGER NOT NULL
)
"""
# The hub's identity as last seen (node/restore.py), how long acknowledged changes are
# kept, the highest number dropped from those kept, and the last restore noticed.
SENT_STATE = (
    "ALTER TABLE _fieldsync_state ADD COLUMN hub_epoch TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE _fieldsync_state ADD COLUMN keep_acked_s INTEGER NOT NULL DEFAULT 2592000",
    "ALTER TABLE _fieldsync_state ADD COLUMN sent_pruned_seq INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE _fieldsync_state ADD COLUMN hub_restored TEXT",
)


def _add_sent(conn: sqlite3.Connection, schema: Schema) -> None:
    conn.execute(SENT)
    for statement in SENT_STATE:
        conn.execute(statement)
    # Changes acknowledged before this step were not kept.
    conn.execute("UPDATE _fieldsync_state SET sent_pruned_seq = acked_seq")


def _add_schema_version(conn: sqlite3.Connection, schema: Schema | None) -> None:
    # The hub's schema version this office's tables follow (node/schema_sync.py); 0:
    # not learned yet (the office asks the hub at its next sync).
    conn.execute("ALTER TABLE _fieldsync_schema ADD COLUMN version INTEGER NOT NULL DEFAULT 0")


def _has_table(name: str) -> Callable[[sqlite_utils.Database], bool]:
    return lambda db: name in db.table_names()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "schema table, rejected changes",
        _add_schema_and_rejected,
        _has_table("_fieldsync_rejected"),
    ),
    Migration("sync log", _add_sync_log, _has_table("_fieldsync_sync_log")),
    Migration(
        "sent mark",
        _add_sent_seq,
        lambda db: "sent_seq" in db.table("_fieldsync_state").columns_dict,
    ),
    Migration("resync", _add_resync, _has_table("_fieldsync_resync")),
    Migration(
        "hub link settings, next try",
        _add_link_settings,
        lambda db: "ca_file" in db.table("_fieldsync_state").columns_dict,
    ),
    Migration("lost edits", _add_lost_edits, _has_table("_fieldsync_conflicts")),
    Migration("acknowledged changes kept", _add_sent, _has_table("_fieldsync_sent")),
    Migration(
        "schema version",
        _add_schema_version,
        lambda db: "version" in db.table("_fieldsync_schema").columns_dict,
    ),
)
VERSION = len(MIGRATIONS)


def create(conn: sqlite3.Connection) -> None:
    """Make fieldsync's tables in a new office database, at the newest version."""
    for statement in STATE_TABLES.split(";"):
        conn.execute(statement)
    conn.execute(SYNC_LOG)
    conn.execute(RESYNC)
    conn.execute(LOST_EDITS)
    conn.execute(SENT)
    for statement in SENT_STATE:
        conn.execute(statement)
    _add_schema_version(conn, None)
    _save_version(conn, VERSION)


def schema_source(conn: sqlite3.Connection) -> str | None:
    """The stored schema's TOML, wherever the database's version keeps it."""
    try:  # kept apart from the state row, which older versions updated on every write
        row = conn.execute("SELECT source FROM _fieldsync_schema").fetchone()
    except sqlite3.Error:  # made by fieldsync 0.1
        row = conn.execute("SELECT schema FROM _fieldsync_state").fetchone()
    return None if row is None else str(row[0])


_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS _fieldsync_version "
    "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
)


def version(db: sqlite_utils.Database) -> int:
    """How many steps of :data:`MIGRATIONS` the database has taken (0: made before)."""
    if "_fieldsync_version" not in db.table_names():
        return 0
    row = db.conn.execute("SELECT version FROM _fieldsync_version").fetchone()
    return 0 if row is None else int(row[0])


def _save_version(conn: sqlite3.Connection, number: int) -> None:
    conn.execute(_VERSION_TABLE)
    conn.execute(
        "INSERT INTO _fieldsync_version (id, version) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        [number],
    )


def upgrade(db: sqlite_utils.Database, schema: Schema) -> None:
    """Bring a database made by an older fieldsync up to date (same data, new triggers).

    A database that is up to date is only read. A version above :data:`VERSION`
    (a newer fieldsync's) is left as it is.
    """
    if version(db) >= VERSION and not stale_triggers(db.conn, schema):
        return
    with write(db) as conn:  # looked at again: another program may have upgraded it
        taken = version(db)
        for migration in MIGRATIONS[taken:]:
            if migration.present is None or not migration.present(db):
                migration.apply(conn, schema)
        refresh_triggers(conn, schema)
        if taken < VERSION:
            _save_version(conn, VERSION)
