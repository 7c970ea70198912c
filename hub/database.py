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
from contextlib import contextmanager
from datetime import UTC, datetime
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
        # The schema in use, its version and its merge functions, replaced as one
        # when `hub schema apply` (in this process or another) stores a newer one.
        self._loaded: tuple[int, Schema, dict[str, CustomMerge]]
        self._data_version = -1
        self._probe: sqlite3.Connection | None = None  # see current_version
        self._probe_seen = -1
        self._probe_lock = threading.Lock()
        with self.lock, write(self.db) as conn:
            migrate(self.db)
            found = _stored_schema(conn, schema, path)
            # In the opening transaction: a function that cannot be loaded leaves a
            # new file as empty as it was, so the schema can be corrected and tried again.
            self._loaded = (_version(conn), found, custom_merges(found))
            create_tables(conn, self.schema)
            row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'hlc'").fetchone()
            if row is not None:
                self.clock.observe(int(row[0]))

    @property
    def schema(self) -> Schema:
        """The schema in use (the newest version stored, see :meth:`write`)."""
        return self._loaded[1]

    @property
    def custom(self) -> dict[str, CustomMerge]:
        """The merge function of each table with a ``custom:`` policy."""
        return self._loaded[2]

    @property
    def schema_version(self) -> int:
        return self._loaded[0]

    def version_and_schema(self) -> tuple[int, Schema]:
        """The version in use and its schema, read together."""
        version, schema, _ = self._loaded
        return version, schema

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The writer's connection in a write transaction, under the lock.

        Each one first looks whether another program committed since (``PRAGMA
        data_version``, a counter in memory) and, only then, whether the schema's
        version changed (`hub schema apply` while the hub serves): the schema is
        then read again, before anything is written under the old one.
        """
        with self.lock, write(self.db) as conn:
            seen = conn.execute("PRAGMA data_version").fetchone()[0]
            if seen != self._data_version:
                self._data_version = seen
                self.refresh(conn)
            yield conn

    def current_version(self) -> int:
        """The newest schema version, taken if another program stored it.

        Read on a connection of its own (never waiting for the writer's lock), and
        only when something was committed since it last looked (``data_version``).
        """
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
            if seen != self._probe_seen:
                self._probe_seen = seen
                self.refresh(self._probe)
            return self._loaded[0]

    def refresh(self, conn: sqlite3.Connection) -> None:
        """Take the newest schema version stored on ``conn``, if it is newer than the
        one in use (replaced as one tuple: readers see the old or the new)."""
        version = _version(conn)
        latest = conn is self.db.conn or conn is self._probe  # not an older snapshot
        if version > self._loaded[0] or version < self._loaded[0] and latest:
            source = conn.execute(
                "SELECT source FROM _fieldsync_schemas WHERE version = ?", [version]
            ).fetchone()[0]
            found = Schema.from_toml(source, f"schema version {version} of {self.path}")
            self._loaded = (version, found, custom_merges(found))

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The writer's connection, under the lock: for short reads."""
        with self.lock:
            yield self.db.conn

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of its own holding one snapshot: for long reads.

        A snapshot that sees a newer schema version than the one in use takes it
        first (what it reads may hold the new tables and columns).
        """
        with read_snapshot(self.path) as conn:
            self.refresh(conn)
            yield conn

    def close(self) -> None:
        self.checkpointer.close()
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
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
        conn.execute(
            "INSERT INTO _fieldsync_schemas (version, source, applied_at, applied_by) "
            "VALUES (1, ?, ?, 'hub')",
            [schema.source, datetime.now(UTC).isoformat(timespec="seconds")],
        )
        return schema
    conn.execute(
        "INSERT OR IGNORE INTO _fieldsync_schemas (version, source, applied_at, applied_by) "
        "VALUES (1, ?, ?, 'hub')",
        [stored[0], datetime.now(UTC).isoformat(timespec="seconds")],
    )
    newest = conn.execute(
        "SELECT source FROM _fieldsync_schemas ORDER BY version DESC LIMIT 1"
    ).fetchone()[0]
    found = Schema.from_toml(newest, f"the schema stored in {path}")
    if schema is not None and schema.source != newest:
        raise FieldsyncError(
            f"hub database {path} already uses another schema; omit --schema to use the "
            "stored one, or change it with `fieldsync hub schema apply FILE`"
        )
    return found


def _version(conn: sqlite3.Connection) -> int:
    """The newest schema version stored (1 for a hub whose schema never changed)."""
    row = conn.execute("SELECT max(version) FROM _fieldsync_schemas").fetchone()
    return int(row[0] or 1)


def custom_merges(schema: Schema) -> dict[str, CustomMerge]:
    """The merge function of each table of ``schema`` with a ``custom:`` policy."""
    return {
        t.name: load_custom(t.policy)
        for t in schema.tables.values()
        if t.policy.startswith("custom:")
    }


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
