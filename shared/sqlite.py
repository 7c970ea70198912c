"""SQLite plumbing shared by the node and hub stores: connections and transactions."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from shared.errors import StoreError
from shared.schema import Schema, Table, quote, unique_constraints

log = logging.getLogger("fieldsync.sqlite")


def connect(path: str | Path, *, synchronous: str = "NORMAL") -> sqlite_utils.Database:
    """Open ``path`` in WAL mode with explicit transactions (see :func:`write`)."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA cache_size = -32768")  # KiB: 32 MiB, for large syncs
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)


# Pages the WAL may reach before a committing writer copies it into the database
# itself; normally a Checkpointer thread does it first, off the write path.
WAL_AUTOCHECKPOINT_PAGES = 8000


class Checkpointer:
    """Copies the WAL of ``db`` into the database file in a thread of its own.

    Large syncs :meth:`poke` it after each commit. A PASSIVE checkpoint takes no lock
    a writer needs, so the next batch commits while it runs; it syncs as the
    writer's connection does. The thread starts with the first poke, so short-lived
    uses (the CLI) never start one; ``db``'s own connection checkpoints by itself
    only past WAL_AUTOCHECKPOINT_PAGES, should the thread fall behind.
    """

    def __init__(self, db: sqlite_utils.Database, path: Path, *, synchronous: str) -> None:
        db.conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        self._path = path
        self._synchronous = synchronous
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def poke(self) -> None:
        with self._start_lock:
            if self._stopping:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fieldsync-checkpoint", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as exc:
            log.warning("no background checkpoints of %s: %s", self._path, exc)
            return
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer checkpoints by itself then
                    log.debug("background checkpoint of %s failed: %s", self._path, exc)
        finally:
            conn.close()

    def close(self) -> None:
        with self._start_lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=60)


@contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on error.

    IMMEDIATE takes the write lock up front, so a transaction never fails half-way
    because another program started writing first.
    """
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def read_snapshot(
    path: str | Path, *, check_same_thread: bool = True
) -> Iterator[sqlite3.Connection]:
    """A read-only connection to ``path`` holding one read transaction (a snapshot).

    In WAL mode a reader never blocks the writer, nor the writer it: long reads (an
    export, counting an office's lag) run beside a serving hub's commits.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"database {path} does not exist")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path} to read: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA query_only = 1")
        conn.execute("BEGIN")
        yield conn
    finally:
        conn.close()


def create_tables(conn: sqlite3.Connection, schema: Schema) -> None:
    """Create each synced table of ``schema`` that does not exist yet."""
    existing = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    for table in schema.tables.values():
        if table.name not in existing:
            conn.execute(table.create)
        else:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({quote(table.name)})")}
            missing = [c for c in table.column_names if c not in have]
            if missing:
                raise StoreError(
                    f"table {table.name} exists but lacks column(s) {', '.join(missing)} "
                    "that the schema declares"
                )
            unique = unique_constraints(conn, table.name)
            if unique:
                raise StoreError(
                    f"table {table.name} has unique index(es) {', '.join(unique)} besides its "
                    "primary key; offices working offline could clash on them, so drop them"
                )
        for name, sql in table.indexes:  # declared in the schema (`indexes = [...]`)
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [name]).fetchone():
                conn.execute(sql)


@functools.lru_cache(maxsize=256)
def upsert_sql(table: Table) -> str:
    """INSERT … ON CONFLICT DO UPDATE of a whole record, columns in table order."""
    cols = ", ".join(quote(c) for c in table.column_names)
    marks = ", ".join("?" for _ in table.column_names)
    updates = ", ".join(
        f"{quote(c)} = excluded.{quote(c)}"
        for c in table.column_names
        if c not in table.primary_key
    )
    target = ", ".join(quote(c) for c in table.primary_key)
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {quote(table.name)} ({cols}) VALUES ({marks}) ON CONFLICT ({target}) {action}"
    )


@functools.lru_cache(maxsize=256)
def delete_sql(table: Table) -> str:
    """DELETE of one record, key columns in primary-key order."""
    where = " AND ".join(f"{quote(c)} = ?" for c in table.primary_key)
    return f"DELETE FROM {quote(table.name)} WHERE {where}"


def put_rows(
    conn: sqlite3.Connection,
    table: Table,
    records: Iterable[tuple[dict[str, Any], dict[str, Any] | None]],
) -> None:
    """Make ``table`` hold each ``(pk, values)`` record (values None deletes it)."""
    live: list[list[Any]] = []
    gone: list[list[Any]] = []
    for pk, values in records:
        if values is None:
            gone.append([pk[c] for c in table.primary_key])
        else:
            live.append(table.row(pk, values))
    if gone:
        conn.executemany(delete_sql(table), gone)
    if live:
        conn.executemany(upsert_sql(table), live)


class Executes(Protocol):
    """A connection that runs SQL as written here (``?`` placeholders): SQLite's, or
    the hub's PostgreSQL adapter (hub/pg/engine.py)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


def table_rows(conn: Executes, table: Table) -> list[dict[str, Any]]:
    """Every row of ``table`` (the columns it declares, in order), ordered by primary key.

    ``conn``: any DB-API connection taking the SQL as it is (SQLite's, or the hub's
    PostgreSQL adapter). The columns are named, never ``*``: a new schema version
    gives a new statement, where PostgreSQL would refuse one it prepared before with
    a different result ("cached plan must not change result type").
    """
    order = ", ".join(quote(c) for c in table.primary_key)
    columns = ", ".join(quote(c) for c in table.column_names)
    cursor = conn.execute(f"SELECT {columns} FROM {quote(table.name)} ORDER BY {order}")
    names = table.column_names
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
