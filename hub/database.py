"""
The hub's SQLite file, opened once and shared by the parts of the store.

:class:`HubDatabase` holds what every part needs and nothing else: the writer's
connection and the lock that guards it, the schema stored in the file, the hub's
clock, and the path, from which long reads open a snapshot of their own
(:meth:`HubDatabase.snapshot`) so that they neither wait for the writer nor hold it
up. Each part (hub/auth.py, hub/ingest.py, hub/pull.py, ...) is handed it
explicitly; none reaches into another part.

Opening checks that the file is a hub database (or may become one), brings its
layout up to date (hub/migrations.py) and reads or stores its schema.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import sqlite_utils

from hub.migrations import migrate
from shared.clock import HybridClock
from shared.errors import FieldsyncError
from shared.merge import CustomMerge
from shared.schema import Schema, load_custom
from shared.sqlite import Checkpointer, connect, create_tables, read_snapshot, write


class HubDatabase:
    """One hub database file: the writer's connection, its lock, schema and clock.

    WAL, synchronous=FULL: an answered push is durable.
    """

    def __init__(
        self,
        path: str | Path,
        schema: Schema | None,
        *,
        now: Callable[[], int],
        create: bool,
    ) -> None:
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
        self.now = now
        self.clock = HybridClock("hub", now)
        with self.write() as conn:
            migrate(self.db)
            self.schema = _stored_schema(conn, schema, path)
            # In the opening transaction: a function that cannot be loaded leaves a
            # new file as empty as it was, so the schema can be corrected and tried again.
            self.custom: dict[str, CustomMerge] = {
                t.name: load_custom(t.policy)
                for t in self.schema.tables.values()
                if t.policy.startswith("custom:")
            }
            create_tables(conn, self.schema)
            row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'hlc'").fetchone()
            if row is not None:
                self.clock.observe(int(row[0]))

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The writer's connection in a write transaction, under the lock."""
        with self.lock, write(self.db) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The writer's connection, under the lock: for short reads."""
        with self.lock:
            yield self.db.conn

    def snapshot(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read-only connection of its own holding one snapshot: for long reads."""
        return read_snapshot(self.path)

    def close(self) -> None:
        self.checkpointer.close()
        with self.lock:
            self.db.conn.close()


def _stored_schema(conn: sqlite3.Connection, schema: Schema | None, path: str | Path) -> Schema:
    """The schema stored in the file; ``schema`` (or the default) is stored if none is."""
    stored = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'schema'").fetchone()
    if stored is None:
        schema = schema or Schema.load()
        conn.execute(
            "INSERT INTO _fieldsync_meta (key, value) VALUES ('schema', ?)", [schema.source]
        )
        return schema
    found = Schema.from_toml(stored[0], f"the schema stored in {path}")
    if schema is not None and schema.source != stored[0]:
        raise FieldsyncError(
            f"hub database {path} already uses another schema; omit --schema to use the stored one"
        )
    return found


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
