"""
The hub database's layout, as one ordered list of steps keyed by ``PRAGMA user_version``.

A hub database at version ``n`` has had the first ``n`` steps of :data:`MIGRATIONS`
applied; opening it applies the rest, in the store's first write transaction, and
sets ``user_version`` to the length of the list. A database made by a later
fieldsync (a version past the list) is refused rather than half understood.

Step 1 is the layout as it stood before the list existed. Hubs of that time kept no
``user_version`` (0), and their tables differ only in what the step brings up to date
(every ``CREATE`` is ``IF NOT EXISTS``, and :func:`upgrade_history` converts the older
record history), so it takes any of them, or an empty file, to the same place.
Receipts kept a row per change (``_fieldsync_receipts``, before batches) stay where
they are and are still read (see hub/ingest.py).

A new step goes at the end and never changes once released. Table introspection goes
through sqlite-utils (``Table.columns_dict``); the store's own reads and writes are
plain ``sqlite3``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils

from shared.errors import FieldsyncError

_TABLES = """
CREATE TABLE IF NOT EXISTS _fieldsync_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_nodes (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    last_seen_at TEXT,
    last_push_at TEXT,
    last_pull_at TEXT,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_records (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    seq INTEGER NOT NULL UNIQUE,
    origin TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    vals TEXT NOT NULL,
    vers TEXT NOT NULL,
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE IF NOT EXISTS _fieldsync_receipts (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    PRIMARY KEY (node, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _fieldsync_receipt_batches (
    node TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    receipts TEXT NOT NULL,
    PRIMARY KEY (node, last_seq)
);
CREATE TABLE IF NOT EXISTS _fieldsync_conflicts (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    kind TEXT NOT NULL,
    col TEXT,
    kept_value TEXT,
    kept_version TEXT,
    kept_node TEXT,
    other_value TEXT,
    other_version TEXT NOT NULL,
    other_node TEXT NOT NULL,
    status TEXT NOT NULL,
    resolved_by TEXT,
    resolved_at TEXT,
    resolution TEXT,
    merged TEXT,
    state_after TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_rejected (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    op TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS _fieldsync_conflicts_status ON _fieldsync_conflicts (status);
CREATE TABLE IF NOT EXISTS _fieldsync_admins (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_sessions (
    token_hash TEXT PRIMARY KEY,
    admin TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_office_stats (
    node TEXT PRIMARY KEY,
    pushed INTEGER NOT NULL DEFAULT 0,
    pulled INTEGER NOT NULL DEFAULT 0,
    pulled_seq INTEGER NOT NULL DEFAULT 0,
    reported_at TEXT,
    pending INTEGER,
    oldest_pending_at TEXT,
    rejected INTEGER,
    clock_offset_ms INTEGER,
    version TEXT,
    interval_seconds REAL,
    last_error TEXT,
    last_error_code TEXT,
    last_error_at TEXT,
    hub_error TEXT,
    hub_error_code TEXT,
    hub_error_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_sync_events (
    node TEXT NOT NULL,
    id INTEGER NOT NULL,
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
    PRIMARY KEY (node, id)
);
"""

# Record history, one row per version the hub took (see hub/history.py).
_HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS _fieldsync_history (
    seq INTEGER PRIMARY KEY,
    prev INTEGER,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    actor TEXT NOT NULL,
    ts TEXT NOT NULL,
    op TEXT NOT NULL,
    vals TEXT,
    at TEXT NOT NULL
)"""

# Record history is keyed by hub seq, each version naming the one before it (prev), so
# that a version is appended at the end of one b-tree: an index by record, over keys
# as random as UUIDs, cost a page write per change on a large hub. Earlier hubs
# keep it as (id, tbl, pk, seq, ...) with that index; upgrade_history converts them.
_HISTORY_UPGRADE = f"""
ALTER TABLE _fieldsync_history RENAME TO _fieldsync_history_old;
DROP INDEX IF EXISTS _fieldsync_history_record;
{_HISTORY_TABLE};
INSERT INTO _fieldsync_history (seq, prev, tbl, pk, actor, ts, op, vals, at)
    SELECT seq, lag(seq) OVER (PARTITION BY tbl, pk ORDER BY id), tbl, pk, actor, ts, op,
        vals, at
    FROM _fieldsync_history_old;
DROP TABLE _fieldsync_history_old
"""


def upgrade_history(db: sqlite_utils.Database) -> None:
    """Convert a record history kept by an index (earlier hubs) to the chain by seq."""
    if "id" in db["_fieldsync_history"].columns_dict:
        _run(db.conn, _HISTORY_UPGRADE)


def _baseline(db: sqlite_utils.Database) -> None:
    """Step 1: the layout of hubs before user_version, from any of them or from nothing."""
    upgrade_history(db)
    _run(db.conn, _TABLES + _HISTORY_TABLE)


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Statement by statement, not executescript(): that would commit the transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


# Sync scopes (hub/scopes.py): each record's scope key and, for a record that follows
# a parent, the parent's key; where records left a scope (exits); each office's scopes,
# how far it has pulled, and whether its scopes changed since.
_SCOPE_COLUMNS = {
    "_fieldsync_records": {"scope": "TEXT", "parent": "TEXT"},
    "_fieldsync_nodes": {
        "scopes": "TEXT",
        "pulled_seq": "INTEGER NOT NULL DEFAULT 0",
        "rescope": "INTEGER NOT NULL DEFAULT 0",
    },
}
_SCOPES = """
CREATE INDEX IF NOT EXISTS _fieldsync_records_parent ON _fieldsync_records (parent)
    WHERE parent IS NOT NULL;
CREATE TABLE IF NOT EXISTS _fieldsync_exits (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    scope TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tbl, pk, scope)
);
CREATE INDEX IF NOT EXISTS _fieldsync_exits_scope ON _fieldsync_exits (scope, seq)
"""


def _scopes(db: sqlite_utils.Database) -> None:
    """Step 2: sync scopes. (Hubs whose number was reset may have taken it already.)"""
    for table, columns in _SCOPE_COLUMNS.items():
        have = db[table].columns_dict
        for name, kind in columns.items():
            if name not in have:
                db.conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    _run(db.conn, _SCOPES)


_AUDIT_TABLES = """
CREATE TABLE IF NOT EXISTS _fieldsync_audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_retired_tokens (
    token_hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    why TEXT NOT NULL,
    at TEXT NOT NULL
)
"""


def _roles_and_audit(db: sqlite_utils.Database) -> None:
    """Step 3: admin roles (admins made before roles keep every right: owner), the audit log
    (hub/audit.py) and the hashes of tokens revoked or replaced (hub/auth.py)."""
    if "role" not in db["_fieldsync_admins"].columns_dict:
        db.conn.execute(
            "ALTER TABLE _fieldsync_admins ADD COLUMN role TEXT NOT NULL DEFAULT 'owner'"
        )
    _run(db.conn, _AUDIT_TABLES)


_CONFLICT_CHANGES = """
CREATE INDEX IF NOT EXISTS _fieldsync_conflicts_office
    ON _fieldsync_conflicts (other_node, changed);
CREATE INDEX IF NOT EXISTS _fieldsync_conflicts_changed ON _fieldsync_conflicts (changed);
CREATE INDEX IF NOT EXISTS _fieldsync_conflicts_overridden
    ON _fieldsync_conflicts (kept_node, changed)
    WHERE status = 'resolved' AND json_extract(resolution, '$.keep') != 'kept'
"""


def _conflict_changes(db: sqlite_utils.Database) -> None:
    """Step 4: each conflict's last change (logged, then resolved), a number rising over
    the whole log, so that an office learns what changed in its own (hub/conflicts.py)."""
    if "changed" not in db["_fieldsync_conflicts"].columns_dict:
        db.conn.execute(
            "ALTER TABLE _fieldsync_conflicts ADD COLUMN changed INTEGER NOT NULL DEFAULT 0"
        )
        db.conn.execute("UPDATE _fieldsync_conflicts SET changed = id")
    _run(db.conn, _CONFLICT_CHANGES)


_SCHEMAS = """
CREATE TABLE IF NOT EXISTS _fieldsync_schemas (
    version INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    applied_by TEXT NOT NULL
)
"""


def _schema_versions(db: sqlite_utils.Database) -> None:
    """Step 5: the schema's versions (hub/schemas.py); the stored schema is version 1."""
    _run(db.conn, _SCHEMAS)
    db.conn.execute(
        "INSERT OR IGNORE INTO _fieldsync_schemas (version, source, applied_at, applied_by) "
        "SELECT 1, value, strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now'), 'hub' "
        "FROM _fieldsync_meta WHERE key = 'schema'"
    )


# Each office's lag (hub/status.py: ``lags``) read from counts kept up to date by
# triggers, whatever writes a record (a push, a resolution, a move, a purge, a schema
# change): how many records have their seq in each run of LAG_BUCKET seqs, per office
# of origin ('' for none). An office's lag is then the runs after its cursor's, less
# its own, plus its cursor's run read from the records: never as many rows as it is
# behind. One upsert per record written (two when a record is written again).
LAG_BUCKET = 128

_SEQ_COUNTS = [
    """CREATE TABLE IF NOT EXISTS _fieldsync_seq_counts (
    bucket INTEGER NOT NULL,
    origin TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (bucket, origin)
) WITHOUT ROWID""",
    f"""CREATE TRIGGER IF NOT EXISTS _fieldsync_seq_counts_insert
AFTER INSERT ON _fieldsync_records BEGIN
    INSERT INTO _fieldsync_seq_counts VALUES (new.seq / {LAG_BUCKET}, coalesce(new.origin, ''), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END""",
    f"""CREATE TRIGGER IF NOT EXISTS _fieldsync_seq_counts_update
AFTER UPDATE OF seq, origin ON _fieldsync_records
WHEN old.seq != new.seq OR old.origin IS NOT new.origin BEGIN
    UPDATE _fieldsync_seq_counts SET n = n - 1
        WHERE bucket = old.seq / {LAG_BUCKET} AND origin = coalesce(old.origin, '');
    INSERT INTO _fieldsync_seq_counts VALUES (new.seq / {LAG_BUCKET}, coalesce(new.origin, ''), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END""",
    f"""CREATE TRIGGER IF NOT EXISTS _fieldsync_seq_counts_delete
AFTER DELETE ON _fieldsync_records BEGIN
    UPDATE _fieldsync_seq_counts SET n = n - 1
        WHERE bucket = old.seq / {LAG_BUCKET} AND origin = coalesce(old.origin, '');
END""",
]


def _seq_counts(db: sqlite_utils.Database) -> None:
    """Step 6: records counted per run of seqs and office of origin, kept by triggers
    (see LAG_BUCKET), and counted once for the records already there."""
    for statement in _SEQ_COUNTS:
        db.conn.execute(statement)
    db.conn.execute("DELETE FROM _fieldsync_seq_counts")
    db.conn.execute(
        "INSERT INTO _fieldsync_seq_counts SELECT seq / ?, coalesce(origin, ''), count(*) "
        "FROM _fieldsync_records GROUP BY 1, 2",
        [LAG_BUCKET],
    )


# In order; step n brings a database from user_version n - 1 to n.
def _scope_index(db: sqlite_utils.Database) -> None:
    """Step 7: records by scope key and seq, so that an office's pull reads the
    records in its scopes, not every record changed since its cursor."""
    db.conn.execute(SCOPE_INDEX)


SCOPE_INDEX = (
    "CREATE INDEX IF NOT EXISTS _fieldsync_records_scope ON _fieldsync_records (scope, seq)"
)

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _baseline,
    _scopes,
    _roles_and_audit,
    _conflict_changes,
    _schema_versions,
    _seq_counts,
    _scope_index,
]


def migrate(db: sqlite_utils.Database) -> None:
    """Apply the steps ``db`` lacks; call inside a write transaction."""
    version = db.conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise FieldsyncError(
            f"this hub database has layout version {version}, newer than this fieldsync "
            f"knows ({len(MIGRATIONS)}); open it with the fieldsync that wrote it"
        )
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        step(db)
        db.conn.execute(f"PRAGMA user_version = {number}")
