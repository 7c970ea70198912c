"""
NodeStore: an office's SQLite database, its change log and its sync state.

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

Tables fieldsync owns (all prefixed ``_fieldsync_``):

- ``_fieldsync_state``: one row: office name, hub URL and token, clock floor, pull cursor,
  the ``applying`` flag that silences the triggers while pulled changes are applied
  (so they are not captured again), and the outcome of the last sync;
- ``_fieldsync_changes``: the change log; a change leaves it once the hub has
  acknowledged committing it;
- ``_fieldsync_versions``: per record, the version of each column as the hub last
  told us (or as our own acknowledged changes set it). A change's *base* is computed
  from it at push time: while a record has unpushed changes, pulls leave the record
  alone, so these versions are still those the office saw when it made the change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared import __version__
from shared.clock import Timestamp, are_stamps, check_node_name, wall_ms
from shared.errors import InvalidChangeError, ProtocolError, StoreError
from shared.merge import effect
from shared.protocol import (
    MAX_EVENTS_PER_REPORT,
    Change,
    PullPage,
    Rejection,
    StatusReport,
    SyncEvent,
    check_hub_url,
    check_token,
    loads,
)
from shared.schema import Schema, Table, quote
from shared.sqlite import Checkpointer, connect, create_tables, put_rows, table_rows, write

_STATE_TABLES = """
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
    last_conflicts INTEGER
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
_SYNC_LOG = """
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
SYNC_LOG_KEPT = 200

_SAVE_VERSIONS = (
    "INSERT INTO _fieldsync_versions (tbl, pk, vers) VALUES (?, ?, ?) "
    "ON CONFLICT (tbl, pk) DO UPDATE SET vers = excluded.vers"
)

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
# NodeStore.pending), which halves the cost of capturing it. VALUES, not INSERT …
# SELECT: a SELECT that reads the table it inserts into goes through a temporary table.
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
    for row in conn.execute("PRAGMA table_list"):
        if row[1] == name and row[0] == "main":
            return bool(row[5])
    return False


def _stale_triggers(conn: sqlite3.Connection, schema: Schema) -> dict[str, str]:
    """This version's capture triggers that the database lacks or has in another form."""
    have = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    return {
        name: sql
        for table in schema.tables.values()
        for name, sql in trigger_sql(table, _is_strict(conn, table.name)).items()
        if have.get(name) != sql
    }


def _needs_upgrade(conn: sqlite3.Connection, schema: Schema) -> bool:
    have = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE name IN "
            "('_fieldsync_rejected', '_fieldsync_sync_log')"
        )
    }
    return len(have) < 2 or bool(_stale_triggers(conn, schema)) or not _has_sent_seq(conn)


def _has_sent_seq(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "sent_seq" for row in conn.execute("PRAGMA table_info(_fieldsync_state)"))


def _upgrade(conn: sqlite3.Connection, schema: Schema) -> None:
    """Bring a database made by an older fieldsync up to date (same data, new triggers)."""
    have = conn.execute("SELECT 1 FROM sqlite_master WHERE name = '_fieldsync_rejected'").fetchone()
    if not have:  # made by fieldsync 0.1
        for statement in _STATE_TABLES.split(";"):
            conn.execute(statement)
        # The schema moves out of the state row (which 0.1 updated on every write).
        conn.execute(
            "INSERT OR IGNORE INTO _fieldsync_schema (id, source) VALUES (1, ?)", [schema.source]
        )
        conn.execute("UPDATE _fieldsync_state SET schema = ''")
    conn.execute(_SYNC_LOG)
    if not _has_sent_seq(conn):
        # Older versions did not keep it: whatever is queued may have been sent.
        conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN sent_seq INTEGER NOT NULL DEFAULT 0")
        conn.execute(
            "UPDATE _fieldsync_state SET sent_seq = "
            "(SELECT max(seq) FROM _fieldsync_changes WHERE seq > acked_seq)"
            " WHERE EXISTS (SELECT 1 FROM _fieldsync_changes WHERE seq > acked_seq)"
        )
    # Triggers of older versions kept the clock in the state row, updated on every
    # write; that row's clock is where the new ones start from (see _STAMP).
    for name, sql in _stale_triggers(conn, schema).items():
        conn.execute(f"DROP TRIGGER IF EXISTS {quote(name)}")
        conn.execute(sql)


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What `fieldsync node status` shows."""

    node: str
    hub_url: str
    pending: int
    oldest_pending_at: str | None
    last_sync_at: str | None
    last_success_at: str | None
    last_error: str | None
    last_error_at: str | None
    cursor: int
    clock_offset_ms: int
    rejected: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "hub_url": self.hub_url,
            "pending": self.pending,
            "oldest_pending_at": self.oldest_pending_at,
            "last_sync_at": self.last_sync_at,
            "last_success_at": self.last_success_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "cursor": self.cursor,
            "clock_offset_ms": self.clock_offset_ms,
            "rejected": self.rejected,
        }


class Pending(list[Change]):
    """A batch of pending changes, and each record's versions once they are applied."""

    def __init__(
        self, changes: list[Change], versions: dict[tuple[str, str], dict[str, str]]
    ) -> None:
        super().__init__(changes)
        self.versions = versions


class NodeStore:
    """An office's database: synced tables, change log and sync state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist; create it with `fieldsync node init`")
        self.db = connect(self.path)
        conn = self.db.conn
        row = source = None
        with contextlib.suppress(sqlite3.Error):
            row = conn.execute("SELECT node, hub_url, token FROM _fieldsync_state").fetchone()
        if row is not None:
            try:  # kept apart from the state row, which older versions updated on every write
                source = conn.execute("SELECT source FROM _fieldsync_schema").fetchone()
            except sqlite3.Error:  # made by fieldsync 0.1
                source = conn.execute("SELECT schema FROM _fieldsync_state").fetchone()
        if row is None or source is None:
            self.db.conn.close()
            raise StoreError(
                f"{self.path} is not a fieldsync office database; "
                "create one with `fieldsync node init`"
            )
        self.node, self.hub_url, self.token = str(row[0]), str(row[1]), str(row[2])
        self._checkpointer = Checkpointer(self.db, self.path, synchronous="NORMAL")
        self.schema = Schema.from_toml(source[0], f"the schema stored in {self.path}")
        if _needs_upgrade(self.db.conn, self.schema):
            with write(self.db) as conn:
                _upgrade(conn, self.schema)

    @classmethod
    def init(
        cls,
        path: str | Path,
        node: str,
        hub_url: str,
        token: str,
        schema: Schema | None = None,
    ) -> NodeStore:
        """Create (or adopt) an office database: tables, capture triggers, state.

        Rows already in a synced table are logged as inserts, so they reach the hub.
        """
        check_node_name(node)
        hub_url = check_hub_url(hub_url)
        check_token(token)
        schema = schema or Schema.load()
        try:  # claimed here, or made by someone else: only a file made here is removed
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            made = True
        except FileExistsError:
            made = False
        db = connect(path)
        try:
            with write(db) as conn:
                names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
                if "_fieldsync_state" in names:
                    raise StoreError(f"{path} is already a fieldsync office database")
                if "_fieldsync_meta" in names or "_fieldsync_nodes" in names:
                    raise StoreError(f"{path} is a hub database, not an office database")
                for statement in _STATE_TABLES.split(";"):
                    conn.execute(statement)
                conn.execute(_SYNC_LOG)
                create_tables(conn, schema)
                conn.execute(
                    "INSERT INTO _fieldsync_state (id, node, hub_url, token, created_at) "
                    "VALUES (1, ?, ?, ?, ?)",
                    [node, hub_url, token, _utcnow()],
                )
                conn.execute(
                    "INSERT INTO _fieldsync_schema (id, source) VALUES (1, ?)", [schema.source]
                )
                for table in schema.tables.values():
                    for sql in trigger_sql(table, _is_strict(conn, table.name)).values():
                        conn.execute(sql)
                    _backfill(conn, table)
        except BaseException:
            try:  # what others committed meanwhile, this one's transaction rolled back
                empty = not db.conn.execute("SELECT 1 FROM sqlite_master").fetchone()
            except sqlite3.Error:
                empty = False
            db.conn.close()
            if made and empty:  # nothing of a failed init is left behind
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{path}{suffix}")
            raise
        db.conn.close()
        return cls(path)

    def close(self) -> None:
        self._checkpointer.close()
        self.db.conn.close()

    def set_hub(self, hub_url: str | None = None, token: str | None = None) -> None:
        """Point the office at another hub URL or token."""
        if hub_url:
            hub_url = check_hub_url(hub_url)
        if token:
            check_token(token)
        with write(self.db) as conn:
            if hub_url:
                conn.execute("UPDATE _fieldsync_state SET hub_url = ?", [hub_url])
                self.hub_url = hub_url
            if token:
                conn.execute("UPDATE _fieldsync_state SET token = ?", [token])
                self.token = token

    # -- push side --------------------------------------------------------------

    # The change log keeps its last acknowledged entry (or a marker standing for it)
    # so that new changes are numbered after every change the hub has committed:
    # pending changes are those numbered above ``acked_seq``.
    _PENDING = "seq > (SELECT acked_seq FROM _fieldsync_state)"

    def pending_count(self) -> int:
        return int(
            self.db.conn.execute(
                f"SELECT count(*) FROM _fieldsync_changes WHERE {self._PENDING}"
            ).fetchone()[0]
        )

    def pending(self, limit: int, after: Pending | None = None) -> Pending:
        """The oldest ``limit`` unacknowledged changes, each with its base versions.

        An insert is sent with the record's values as they are now (the trigger
        logs none), or, for a record deleted since, as the delete logged them.

        ``after``: the batch before, still on its way to the hub; this one follows it
        and its bases take the effects of that batch into account.
        """
        # Text as SQLite gives it; only where some is not UTF-8 (a CSV imported in
        # another encoding) as bytes, decoded here, so that the message names the
        # change, never its contents.
        sql = (
            "SELECT seq, tbl, {pk}, op, hlc, captured, {vals} FROM _fieldsync_changes "
            f"WHERE {self._PENDING} AND seq > ? ORDER BY seq LIMIT ?"
        )
        params = [after[-1].seq if after else 0, limit]
        rows: list[Any]
        try:
            rows = self.db.conn.execute(sql.format(pk="pk", vals="vals"), params).fetchall()
            if not rows:
                return Pending([], {})
            inserted = self._inserted_values(rows[0][0], rows[-1][0], as_bytes=False)
        except sqlite3.OperationalError:  # text that is not UTF-8
            rows = self.db.conn.execute(
                sql.format(pk="CAST(pk AS BLOB)", vals="CAST(vals AS BLOB)"), params
            ).fetchall()
            if not rows:
                return Pending([], {})
            inserted = self._inserted_values(rows[0][0], rows[-1][0])
        keys = {
            (tbl, raw_key if type(raw_key) is str else raw_key.decode("utf-8", "replace"))
            for _, tbl, raw_key, *_ in rows
        }
        carried = after.versions if after else {}
        versions = self._versions_many(k for k in keys if k not in carried)
        versions.update({k: dict(carried[k]) for k in keys if k in carried})
        changes = Pending([], versions)
        for seq, tbl, raw_key, op, hlc, captured, raw in rows:
            table = self.schema.table(tbl)
            try:
                key = raw_key if type(raw_key) is str else raw_key.decode("utf-8")
                if op == "delete":
                    values = None
                elif raw is not None:
                    values = loads(raw)
                elif seq in inserted:
                    values = inserted[seq]
                else:  # deleted since: as it was when deleted
                    values = self._deleted_values(tbl, key.encode("utf-8"), seq)
                    if values is None:
                        op = "delete"
            except UnicodeDecodeError:
                raise self._not_utf8(seq, tbl) from None
            base = versions.get((tbl, key), {})
            ts = Timestamp(hlc, self.node)
            pk = dict(zip(table.primary_key, _key_values(key), strict=True))
            changes.append(Change(seq, tbl, pk, op, ts, values, base, captured or hlc))
            # A new dict: the change keeps ``base`` as it is.
            versions[(tbl, key)] = effect(base, op, values, str(ts))
        return changes

    def _deleted_values(self, tbl: str, raw_key: bytes, seq: int) -> dict[str, Any] | None:
        """The record as the first delete after change ``seq`` logged it (None: none)."""
        row = self.db.conn.execute(
            "SELECT CAST(vals AS BLOB) FROM _fieldsync_changes WHERE seq > ? AND tbl = ? "
            "AND CAST(pk AS BLOB) = ? AND op = 'delete' ORDER BY seq LIMIT 1",
            [seq, tbl, raw_key],
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return dict(json.loads(row[0].decode("utf-8")))

    def _inserted_values(
        self, first: int, last: int, *, as_bytes: bool = True
    ) -> dict[int, dict[str, Any]]:
        """The current values of records logged as inserts without values, by seq.

        ``as_bytes``: text is read as bytes and decoded here (see pending); otherwise
        text that is not UTF-8 raises sqlite3.OperationalError.
        """
        found: dict[int, dict[str, Any]] = {}
        for table in self.schema.tables.values():
            join = " AND ".join(
                f"t.{quote(c)} = json_extract(c.pk, '$[{i}]')"
                for i, c in enumerate(table.primary_key)
            )
            cols = ", ".join(
                f"CASE typeof(t.{quote(c)}) WHEN 'text' THEN CAST(t.{quote(c)} AS BLOB) "
                f"ELSE t.{quote(c)} END"
                if as_bytes
                else f"t.{quote(c)}"
                for c in table.column_names
            )
            cursor = self.db.conn.execute(
                f"SELECT c.seq, {cols} FROM _fieldsync_changes AS c "
                f"JOIN {quote(table.name)} AS t ON {join} "
                "WHERE c.seq BETWEEN ? AND ? AND c.tbl = ? AND c.op = 'insert' "
                "AND c.vals IS NULL",
                [first, last, table.name],
            ).fetchall()
            names = table.column_names
            if not as_bytes:
                for seq, *values in cursor:
                    found[seq] = dict(zip(names, values, strict=True))
                continue
            for seq, *values in cursor:
                try:
                    found[seq] = {
                        name: value.decode("utf-8") if type(value) is bytes else value
                        for name, value in zip(names, values, strict=True)
                    }
                except UnicodeDecodeError:
                    raise self._not_utf8(seq, table.name) from None
        return found

    def _not_utf8(self, seq: int, tbl: str) -> StoreError:
        return StoreError(
            f"change {seq} to table {tbl} holds text that is not UTF-8 (imported in "
            "another encoding?); re-enter that record's text as UTF-8, then run "
            f"`fieldsync node drop-change {self.path} {seq}` to discard the bad change"
        )

    def rejected(self) -> list[dict[str, Any]]:
        """Changes the hub rejected, oldest first, with their values and the reason."""
        rows = self.db.conn.execute(
            "SELECT seq, tbl, pk, op, hlc, vals, reason, rejected_at "
            "FROM _fieldsync_rejected ORDER BY seq"
        ).fetchall()
        found = []
        for seq, tbl, key, op, hlc, vals, reason, rejected_at in rows:
            table = self.schema.table(tbl)
            found.append(
                {
                    "seq": seq,
                    "table": tbl,
                    "pk": dict(zip(table.primary_key, json.loads(key), strict=True)),
                    "op": op,
                    "made_at": datetime.fromtimestamp(wall_ms(hlc) / 1000, UTC).isoformat(
                        timespec="seconds"
                    ),
                    "values": json.loads(vals) if vals is not None else None,
                    "reason": reason,
                    "rejected_at": rejected_at,
                }
            )
        return found

    def retry_rejected(self, seq: int) -> None:
        """Write a rejected change again, as a new local change, and forget the rejection.

        Do this once the cause is gone (the record or the hub's rules were fixed);
        otherwise the hub rejects it again.
        """
        with write(self.db) as conn:
            row = (
                conn.execute(
                    "SELECT tbl, pk, op, vals FROM _fieldsync_rejected WHERE seq = ?", [seq]
                ).fetchone()
                if 0 < seq < 2**63
                else None
            )
            if row is None:
                raise StoreError(f"there is no rejected change {seq} in {self.path}")
            table = self.schema.table(row[0])
            pk = dict(zip(table.primary_key, json.loads(row[1]), strict=True))
            values = json.loads(row[3]) if row[3] is not None else None
            if row[2] == "delete" or values is None:
                put_rows(conn, table, [(pk, None)])
            else:
                where = " AND ".join(f"{quote(c)} = ?" for c in table.primary_key)
                exists = conn.execute(
                    f"SELECT 1 FROM {quote(table.name)} WHERE {where}",
                    [pk[c] for c in table.primary_key],
                ).fetchone()
                if exists:
                    sets = ", ".join(f"{quote(c)} = ?" for c in values)
                    conn.execute(
                        f"UPDATE {quote(table.name)} SET {sets} WHERE {where}",
                        [*values.values(), *(pk[c] for c in table.primary_key)],
                    )
                else:
                    record = {**values, **pk}
                    cols = ", ".join(quote(c) for c in record)
                    marks = ", ".join("?" for _ in record)
                    conn.execute(
                        f"INSERT INTO {quote(table.name)} ({cols}) VALUES ({marks})",
                        list(record.values()),
                    )
            conn.execute("DELETE FROM _fieldsync_rejected WHERE seq = ?", [seq])

    def drop_change(self, seq: int) -> bool:
        """Discard one queued change that can never be pushed, or one the hub rejected.

        A queued change's record is then logged again as it is now, whole, so the
        hub still gets every column the dropped change carried (once fixed). Returns
        True for a queued change, False for a rejected one.
        """
        if not 0 < seq < 2**63:
            raise StoreError(f"there is no queued change {seq} in {self.path}")
        with write(self.db) as conn:
            if conn.execute("DELETE FROM _fieldsync_rejected WHERE seq = ?", [seq]).rowcount:
                return False
            row = conn.execute(
                "SELECT tbl, CAST(pk AS BLOB) FROM _fieldsync_changes "
                f"WHERE seq = ? AND {self._PENDING}",
                [seq],
            ).fetchone()
            if row is None:
                raise StoreError(f"there is no queued change {seq} in {self.path}")
            _hold_clock(conn)
            conn.execute("DELETE FROM _fieldsync_changes WHERE seq = ?", [seq])
            table = self.schema.table(row[0])
            # The record as it is now (if it still exists), whole.
            last = conn.execute("SELECT max(seq) FROM _fieldsync_changes").fetchone()[0]
            _log_rows(conn, table, "update", "WHERE CAST(json_array({pk}) AS BLOB) = ?", [row[1]])
            # Numbered after every change sent, not with the number just dropped (the
            # log numbers from its end): a number sent may be the hub's already.
            conn.execute(
                "UPDATE _fieldsync_changes SET seq = (SELECT sent_seq + 1 FROM _fieldsync_state) "
                "WHERE seq > ? AND seq <= (SELECT sent_seq FROM _fieldsync_state)",
                [last or 0],
            )
            return True

    def mark_acked(
        self, acked: int, changes: Sequence[Change], rejected: Sequence[Rejection] = ()
    ) -> None:
        """Forget the changes of ``changes`` the hub has dealt with (seq <= ``acked``).

        Only changes that were sent are forgotten: a hub that has acknowledged more
        (from an older copy of this database) says nothing about the rest. Changes
        the hub ``rejected`` are kept aside with the hub's reason (see
        :meth:`rejected`), and each such record, unless edited again since, is put
        back as the hub holds it, so the office stays in step with the hub.
        """
        if not changes:
            return
        acked = min(acked, changes[-1].seq)
        refused = {r.seq: r for r in rejected if r.seq <= acked}
        with write(self.db) as conn:
            done = [c for c in changes if c.seq <= acked]
            set_aside = [c for c in done if c.seq in refused]
            if isinstance(changes, Pending) and len(done) == len(changes) and not set_aside:
                versions = changes.versions  # worked out when the batch was read
            else:
                versions = self._versions_many(
                    (c.table, self.schema.table(c.table).pk_key(c.pk)) for c in done
                )
                for change in done:
                    if change.seq in refused:
                        continue
                    key = (change.table, self.schema.table(change.table).pk_key(change.pk))
                    versions[key] = effect(
                        versions.get(key, {}), change.op, change.values, str(change.ts)
                    )
            self._save_versions(conn, versions)
            conn.execute("UPDATE _fieldsync_state SET acked_seq = MAX(acked_seq, ?)", [acked])
            _forget_acked(conn)
            if set_aside:
                self._set_aside(conn, set_aside, refused)
        self._checkpointer.poke()

    def _set_aside(
        self, conn: sqlite3.Connection, changes: list[Change], refused: dict[int, Rejection]
    ) -> None:
        now = _utcnow()
        conn.executemany(
            "INSERT OR REPLACE INTO _fieldsync_rejected "
            "(seq, tbl, pk, op, hlc, vals, reason, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    c.seq,
                    c.table,
                    self.schema.table(c.table).pk_key(c.pk),
                    c.op,
                    c.ts.hlc,
                    json.dumps(c.values, ensure_ascii=False) if c.values is not None else None,
                    refused[c.seq].reason,
                    now,
                )
                for c in changes
            ],
        )
        # Put each record back as the hub holds it, unless it has queued changes.
        pending = self._pending_keys(conn)
        latest: dict[tuple[str, str], tuple[Table, dict[str, Any], Rejection]] = {}
        for change in changes:
            table = self.schema.table(change.table)
            latest[(table.name, table.pk_key(change.pk))] = (table, change.pk, refused[change.seq])
        conn.execute("UPDATE _fieldsync_state SET applying = 1")
        for (name, key), (table, pk, rejection) in latest.items():
            if (name, key) in pending:
                continue
            record = rejection.record
            put_rows(conn, table, [(pk, record.values if record else None)])
            if record is None:
                conn.execute(
                    "DELETE FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", [name, key]
                )
            else:
                self._save_versions(conn, {(name, key): table.expand_versions(record.versions)})
        conn.execute("UPDATE _fieldsync_state SET applying = 0")

    def _pending_keys(self, conn: sqlite3.Connection) -> set[tuple[str, str]]:
        return {
            (tbl, key)
            for tbl, key in conn.execute(
                f"SELECT DISTINCT tbl, pk FROM _fieldsync_changes WHERE {self._PENDING}"
            )
        }

    def _versions_many(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str]]:
        """The stored versions of each record named by (table, key), in a few queries."""
        wanted: dict[str, set[str]] = {}
        for tbl, key in keys:
            wanted.setdefault(tbl, set()).add(key)
        found: dict[tuple[str, str], dict[str, str]] = {}
        for tbl, names in wanted.items():
            listed = sorted(names)
            for start in range(0, len(listed), 500):
                chunk = listed[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                unpack = self.schema.table(tbl).unpack_versions
                for key, vers in self.db.conn.execute(
                    f"SELECT pk, vers FROM _fieldsync_versions WHERE tbl = ? AND pk IN ({marks})",
                    [tbl, *chunk],
                ):
                    found[(tbl, key)] = unpack(vers)
        return found

    def _save_versions(
        self, conn: sqlite3.Connection, versions: dict[tuple[str, str], dict[str, str]]
    ) -> None:
        conn.executemany(
            _SAVE_VERSIONS,
            [
                (tbl, key, self.schema.table(tbl).pack_versions(vers))
                for (tbl, key), vers in versions.items()
            ],
        )

    def last_seq(self) -> int:
        """The highest change-log number this database has given out (or had acknowledged)."""
        row = self.db.conn.execute(
            "SELECT max((SELECT max(seq) FROM _fieldsync_changes), acked_seq) FROM _fieldsync_state"
        ).fetchone()
        return int(row[0] or 0)

    def renumber_after(self, acked: int) -> int:
        """Give pending changes numbers above ``acked``; return how many.

        The hub holds other changes under numbers this database uses: it is a copy
        restored from an older backup, and its newer changes reuse numbers the hub
        already committed. Renumbered, they are sent as new.
        """
        with write(self.db) as conn:
            rows = conn.execute(
                f"SELECT seq FROM _fieldsync_changes WHERE {self._PENDING} ORDER BY seq"
            ).fetchall()
            _hold_clock(conn)
            conn.execute(f"DELETE FROM _fieldsync_changes WHERE NOT {self._PENDING}")
            # Above every number in use, so no renumbered change collides with another.
            start = max(acked, rows[-1][0] if rows else 0)
            conn.executemany(
                "UPDATE _fieldsync_changes SET seq = ? WHERE seq = ?",
                [(start + i + 1, seq) for i, (seq,) in enumerate(rows)],
            )
            # Records this office sent since that copy was made are on the hub but no
            # longer here: pull everything again, its own records included.
            conn.execute(
                "UPDATE _fieldsync_state SET acked_seq = ?, sent_seq = ?, cursor = 0, repull = 1",
                [acked, acked],
            )
            _forget_acked(conn)
            return len(rows)

    def note_sent(self, seq: int) -> None:
        """Remember that changes up to ``seq`` go to the hub now.

        Called before each push request. Whether the hub commits them is known only
        from its answer, which may be lost: until the hub says otherwise, they keep
        the stamps they were sent with (see :meth:`restamp`).
        """
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET sent_seq = MAX(sent_seq, ?)", [seq])

    def not_committed_after(self, acked: int) -> None:
        """The hub has said it committed none of this office's changes after ``acked``
        (nothing of it is on its way): they may be re-stamped again."""
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET sent_seq = MIN(sent_seq, ?)", [acked])

    def restamp(self, hub_now_ms: int, shift_ms: int, *, every: bool = False) -> int:
        """Move queued changes not yet sent by ``shift_ms``, the error of the office's clock.

        A wrong clock stamps changes wrongly: too far ahead and the hub refuses them;
        a little ahead and they would win conflicts they should lose; behind and they
        would lose ones they should win. Once the office knows how wrong its clock
        was (``shift_ms``, the change in its learned offset), the changes it has not
        yet sent get the stamps they should have had: their real time, kept in
        order, later than every stamp seen from other offices, and never past the
        hub's time. Only changes in the hub's future are moved, unless ``every``.
        The office's clock is set back too, so that it stamps the right time again.
        Returns how many changes were moved.

        Changes already sent (see :meth:`note_sent`) keep their stamps: the hub may
        have committed them with those, and the office's record versions must name
        the stamps the hub holds.
        """
        with write(self.db) as conn:
            return self._restamp(conn, hub_now_ms, shift_ms, every)

    def _restamp(
        self, conn: sqlite3.Connection, hub_now_ms: int, shift_ms: int, every: bool
    ) -> int:
        limit = hub_now_ms << 16
        after_seq = conn.execute("SELECT sent_seq FROM _fieldsync_state").fetchone()[0]
        bad = conn.execute(
            "SELECT seq, hlc FROM _fieldsync_changes "
            f"WHERE (hlc > ? OR ?) AND seq > ? AND {self._PENDING} ORDER BY seq",
            [limit, every, after_seq],
        ).fetchall()
        if not bad and not every:
            return 0
        seen = conn.execute(
            "SELECT max(substr(j.value, 1, 16)) FROM _fieldsync_versions AS v, "
            "json_each(v.vers) AS j WHERE substr(j.value, 18) != ?",
            [self.node],
        ).fetchone()[0]
        kept = conn.execute(
            "SELECT max(hlc) FROM _fieldsync_changes WHERE hlc <= ? AND NOT (seq > ? AND "
            f"{self._PENDING} AND (hlc > ? OR ?))",
            [limit, after_seq, limit, every],
        ).fetchone()[0]
        floor = max(kept or 0, int(seen, 16) if seen else 0)
        stamps = []
        for seq, hlc in bad:
            floor = max(floor + 1, min(hlc + (shift_ms << 16), limit))
            stamps.append((floor, seq))
        conn.executemany(
            "UPDATE _fieldsync_changes SET captured = CASE captured WHEN 0 THEN hlc "
            "ELSE captured END, hlc = ? WHERE seq = ?",
            stamps,
        )
        conn.execute("UPDATE _fieldsync_state SET hlc = ?", [floor])
        return len(bad)

    # -- pull side --------------------------------------------------------------

    @property
    def cursor(self) -> int:
        return int(self.db.conn.execute("SELECT cursor FROM _fieldsync_state").fetchone()[0])

    @property
    def repull(self) -> bool:
        """True while the office rebuilds its copy from the hub, its own records included."""
        return bool(self.db.conn.execute("SELECT repull FROM _fieldsync_state").fetchone()[0])

    def apply_page(self, page: PullPage) -> int:
        """Apply pulled records and save the next cursor, in one transaction.

        A record with unpushed local changes is left alone: the local edit is kept
        and pushed next, and the hub decides. Returns how many records were applied.
        """
        plans = []
        top = ""  # the newest stamp in the page (text sorts as stamps do)
        for row in page.rows:
            try:
                table = self.schema.table(row.table)
                key = table.pk_key(table.check_pk(row.pk))
                if row.values is not None:
                    table.check_values(row.values)
                given = row.versions
                if isinstance(given, str):  # packed: every column has this one
                    stamps: set[Any] = {given}
                else:
                    try:
                        stamps = set(given.values())  # mostly one: an insert's
                    except TypeError:  # not text: refused just below
                        stamps = {None}
                if not are_stamps(stamps):
                    raise ValueError("a version is not a stamp")
            except (ValueError, KeyError) as exc:
                raise ProtocolError(
                    f"the hub sent a record this office cannot take: {exc}"
                ) from exc
            if stamps:
                newest = max(stamps)
                if newest > top:
                    top = newest
            # Stored as Table.pack_versions would; a stamp needs no JSON escapes.
            packed = f'"{given}"' if isinstance(given, str) else table.pack_versions(given, stamps)
            plans.append((table, key, row, packed))
        applied = 0
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET applying = 1")
            pending = self._pending_keys(conn)
            versions: list[tuple[str, str, str]] = []
            records: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
            for table, key, row, packed in plans:
                if pending and (table.name, key) in pending:
                    continue
                records.setdefault(table.name, []).append((row.pk, row.values))
                versions.append((table.name, key, packed))
                applied += 1
            for name, rows in records.items():  # a page holds each record once
                put_rows(conn, self.schema.table(name), rows)
            conn.executemany(_SAVE_VERSIONS, versions)
            conn.execute(
                "UPDATE _fieldsync_state SET applying = 0, cursor = ?, hlc = MAX(hlc, ?), "
                "repull = repull AND ?",
                [page.cursor, int(top[:16], 16) if top else 0, page.more],
            )
        self._checkpointer.poke()
        return applied

    # -- clock and status -------------------------------------------------------

    @property
    def clock_offset_ms(self) -> int:
        return int(self.db.conn.execute("SELECT offset_ms FROM _fieldsync_state").fetchone()[0])

    def set_clock_offset(self, offset_ms: int, hub_now_ms: int | None = None) -> int:
        """Remember how far the local clock is behind the hub's (negative: ahead).

        With ``hub_now_ms`` (the hub's time when the offset was learned), the queued
        changes not yet sent, stamped under the offset known before, are moved by
        the difference in the same transaction (see :meth:`restamp`); returns how
        many were moved.
        """
        with write(self.db) as conn:
            before = conn.execute("SELECT offset_ms FROM _fieldsync_state").fetchone()[0]
            conn.execute("UPDATE _fieldsync_state SET offset_ms = ?", [offset_ms])
            if hub_now_ms is None or offset_ms == before:
                return 0
            return self._restamp(conn, hub_now_ms, offset_ms - before, every=True)

    def record_sync(
        self,
        *,
        pushed: int,
        pulled: int,
        conflicts: int,
        error: str | None = None,
        error_code: str | None = None,
        rejected: int = 0,
        started_at: str | None = None,
        seconds: float = 0.0,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        """Remember the outcome of a sync for `node status` and the hub's history."""
        now = _utcnow()
        with write(self.db) as conn:
            if error is None:
                conn.execute(
                    "UPDATE _fieldsync_state SET last_sync_at = ?, last_success_at = ?, "
                    "last_error = NULL, last_pushed = ?, last_pulled = ?, last_conflicts = ?",
                    [now, now, pushed, pulled, conflicts],
                )
            else:
                conn.execute(
                    "UPDATE _fieldsync_state SET last_sync_at = ?, last_error = ?, "
                    "last_error_at = ?",
                    [now, error, now],
                )
            conn.execute(
                "INSERT INTO _fieldsync_sync_log (started_at, seconds, outcome, pushed, pulled, "
                "conflicts, rejected, bytes_sent, bytes_received, error, error_code) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    started_at or now,
                    seconds,
                    "ok" if error is None else "error",
                    pushed,
                    pulled,
                    conflicts,
                    rejected,
                    bytes_sent,
                    bytes_received,
                    error,
                    error_code,
                ],
            )
            conn.execute(
                "DELETE FROM _fieldsync_sync_log WHERE id <= (SELECT max(id) FROM "
                "_fieldsync_sync_log) - ?",
                [SYNC_LOG_KEPT],
            )

    def status_report(self, interval_seconds: float | None = None) -> StatusReport:
        """What to tell the hub about this office: its state and unreported syncs."""
        status = self.status()
        events = [
            SyncEvent(*row)
            for row in self.db.conn.execute(
                "SELECT id, started_at, seconds, outcome, pushed, pulled, conflicts, rejected, "
                "bytes_sent, bytes_received, error, error_code FROM ("
                "SELECT * FROM _fieldsync_sync_log WHERE reported = 0 ORDER BY id DESC LIMIT ?"
                ") ORDER BY id",
                [MAX_EVENTS_PER_REPORT],
            )
        ]
        last_code = None
        if status.last_error is not None:
            row = self.db.conn.execute(
                "SELECT error_code FROM _fieldsync_sync_log WHERE outcome = 'error' "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
            last_code = row[0] if row else None
        # Times in the hub's clock: this office's may be wrong by hours or years.
        offset = status.clock_offset_ms
        events = [dataclasses.replace(e, started_at=_shifted(e.started_at, offset)) for e in events]
        return StatusReport(
            pending=status.pending,
            oldest_pending_at=status.oldest_pending_at,
            rejected=status.rejected,
            clock_offset_ms=status.clock_offset_ms,
            version=__version__,
            interval_seconds=interval_seconds,
            last_error=status.last_error,
            last_error_code=last_code,
            last_error_at=(
                _shifted(status.last_error_at, offset)
                if status.last_error is not None and status.last_error_at
                else None
            ),
            events=events,
        )

    def mark_reported(self, last_id: int) -> None:
        """The hub has the sync events up to ``last_id``."""
        with write(self.db) as conn:
            conn.execute(
                "UPDATE _fieldsync_sync_log SET reported = 1 WHERE id <= ? AND reported = 0",
                [last_id],
            )

    def status(self) -> NodeStatus:
        conn = self.db.conn
        state = conn.execute(
            "SELECT node, hub_url, last_sync_at, last_success_at, last_error, last_error_at, "
            "cursor, offset_ms FROM _fieldsync_state"
        ).fetchone()
        count, oldest = conn.execute(
            f"SELECT count(*), min(hlc) FROM _fieldsync_changes WHERE {self._PENDING}"
        ).fetchone()
        oldest_at = None
        if oldest is not None:
            oldest_at = datetime.fromtimestamp(wall_ms(oldest) / 1000, UTC).isoformat(
                timespec="seconds"
            )
        return NodeStatus(
            node=state[0],
            hub_url=state[1],
            pending=count,
            oldest_pending_at=oldest_at,
            last_sync_at=state[2],
            last_success_at=state[3],
            last_error=state[4],
            last_error_at=state[5],
            cursor=state[6],
            clock_offset_ms=state[7],
            rejected=conn.execute("SELECT count(*) FROM _fieldsync_rejected").fetchone()[0],
        )

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of a synced table, ordered by primary key."""
        return table_rows(self.db.conn, self.schema.table(table))


def _key_values(key: str) -> list[Any]:
    """The values of a key text (a JSON array, as SQLite's json_array() writes it)."""
    try:
        return list(loads(key))
    except ValueError:  # beyond what orjson reads (an integer past 64 bits)
        return list(json.loads(key))


def _shifted(text: str, offset_ms: int) -> str:
    """An ISO time of this office's clock, as the hub's clock read it."""
    moved = datetime.fromisoformat(text) + timedelta(milliseconds=offset_ms)
    return moved.isoformat(timespec="seconds")


def _hold_clock(conn: sqlite3.Connection) -> None:
    """Before changes leave the log: raise the clock's floor to the newest change's stamp,
    so that new stamps still follow it (see _STAMP)."""
    conn.execute(f"UPDATE _fieldsync_state SET hlc = MAX(hlc, {_LAST})")


def _forget_acked(conn: sqlite3.Connection) -> None:
    """Delete acknowledged changes, keeping a marker numbered ``acked_seq`` when the log
    would otherwise end below it (so the next change is numbered after it)."""
    _hold_clock(conn)
    acked = conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
    conn.execute("DELETE FROM _fieldsync_changes WHERE seq <= ?", [acked])
    conn.execute(
        "INSERT INTO _fieldsync_changes (seq, tbl, pk, op, hlc, captured) "
        "SELECT ?, '', '[]', 'acked', 0, 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM _fieldsync_changes WHERE seq > ?)",
        [acked, acked],
    )


def _log_rows(
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
    _log_rows(conn, table, "insert")
