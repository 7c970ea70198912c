"""
The hub on one SQLite file: one writer's connection behind a lock, snapshots of their own.

What :class:`hub.database.HubDatabase` asks of an engine (see hub/engine.py), done the
way SQLite does it: ``BEGIN IMMEDIATE`` on the writer's connection under a
``threading.Lock``; long reads on a read-only connection holding one WAL snapshot
(:func:`shared.sqlite.read_snapshot`), so they neither wait for the writer nor hold
it up; ``PRAGMA data_version`` to notice that another program (`hub schema apply`)
committed; the checkpointer moving the WAL back into the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from filelock import FileLock, Timeout

from hub.engine import SQLITE, Conn
from hub.migrations import migrate
from shared.errors import FieldsyncError
from shared.schema import Schema
from shared.sqlite import Checkpointer, connect, create_tables, read_snapshot, write


class SqliteEngine:
    """One hub database file (WAL, synchronous=FULL: an answered push is durable)."""

    dialect = SQLITE
    anchor = None  # a file is not put back under a hub serving it (`hub restore` refuses)

    def __init__(self, path: str | Path, *, create: bool) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FieldsyncError(
                f"{path} does not exist; create the hub database by registering an office: "
                f"`fieldsync hub add-node NAME --db {path}`"
            )
        if self.path.exists():
            _check_hub_file(self.path, create)
        else:
            _make_private(self.path)
        self.db = connect(self.path, synchronous="FULL")
        self.checkpointer = Checkpointer(self.db, self.path, synchronous="FULL")
        self.lock = threading.Lock()
        self._data_version = -1
        self._probe: sqlite3.Connection | None = None  # see probe
        self._probe_seen = -1
        self._probe_lock = threading.Lock()

    @property
    def where(self) -> str:
        """The database, as messages name it."""
        return str(self.path)

    def upgrade(self, conn: Conn) -> None:
        """Bring the hub's own tables up to date (hub/migrations.py), in ``conn``'s
        transaction (the writer's)."""
        migrate(self.db)

    def create_tables(self, conn: Conn, schema: Schema) -> None:
        """Create each mirrored table of ``schema`` that does not exist yet."""
        create_tables(conn, schema)  # type: ignore[arg-type]

    @contextmanager
    def write(self) -> Iterator[Conn]:
        """The writer's connection in a write transaction, under the lock."""
        with self.lock, write(self.db) as conn:
            yield conn

    def changed(self, conn: Conn) -> bool:
        """Whether another program committed since the last call (``PRAGMA data_version``,
        a counter in memory): only then may the schema have changed."""
        seen = conn.execute("PRAGMA data_version").fetchone()[0]
        if seen == self._data_version:
            return False
        self._data_version = seen
        return True

    @contextmanager
    def read(self) -> Iterator[Conn]:
        """The writer's connection, under the lock: for short reads."""
        with self.lock:
            yield self.db.conn

    @contextmanager
    def snapshot(self, *, long: bool = False) -> Iterator[Conn]:
        """A read-only connection of its own holding one snapshot: for long reads
        (``long`` or not: each opens its own connection)."""
        with read_snapshot(self.path) as conn:
            yield conn

    @contextmanager
    def probe(self) -> Iterator[Conn | None]:
        """A connection of its own (never waiting for the writer's lock) when something
        was committed since it last looked (``data_version``); None when nothing was."""
        with self._probe_lock:
            if self._probe is None:
                self._probe = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._probe.execute("PRAGMA busy_timeout = 10000")
            seen = self._probe.execute("PRAGMA data_version").fetchone()[0]
            if seen == self._probe_seen:
                yield None
            else:
                self._probe_seen = seen
                yield self._probe

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A lock file beside the database, taken without waiting."""
        lock = FileLock(f"{self.path}-{name}.lock", mode=0o600)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def seen_version(self, conn: Conn, version: int) -> None:
        pass  # sqlite3 prepares anew what a schema change touched

    def after_write(self) -> None:
        """A push committed: let the checkpointer move the WAL back into the file."""
        self.checkpointer.poke()

    def close(self) -> None:
        self.checkpointer.close()
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
        with self.lock:
            self.db.conn.close()


def _make_private(path: Path) -> None:
    """Create ``path`` empty, readable by its owner only (0600, whatever the umask):
    SQLite then makes the -wal and -shm files with the same mode."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:  # made meanwhile by another program: checked as it is
        _check_hub_file(path, create=True)
    except OSError as exc:
        raise FieldsyncError(f"cannot create {path}: {exc.strerror or exc}") from None


def _check_hub_file(path: Path, create: bool) -> None:
    """Refuse to turn a database that is not a hub into one (read-only look first)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = set(
                sqlite_utils.Database(
                    conn, recursive_triggers=False, execute_plugins=False
                ).table_names()
            )
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:  # unreadable, or no room for its -shm file
        raise FieldsyncError(f"cannot open {path} ({exc})") from None
    except sqlite3.Error as exc:
        raise FieldsyncError(f"{path} is not a fieldsync hub database ({exc})") from None
    if "_fieldsync_meta" in tables:
        return
    if "_fieldsync_state" in tables:
        raise FieldsyncError(f"{path} is an office database, not a hub database")
    if tables or not create:
        raise FieldsyncError(f"{path} is not a fieldsync hub database")
