"""
The hub's database, opened once and shared by the parts of the store.

:class:`HubDatabase` holds what every part needs and nothing else: the engine
(hub/sqlite_engine.py for a file, hub/pg/engine.py for a ``postgresql://`` URL) with
its transactions, the schema stored in the database, and the hub's clock. Writes go
through :meth:`HubDatabase.write`, one at a time; long reads open a snapshot of their
own (:meth:`HubDatabase.snapshot`) so that they neither wait for a writer nor hold
one up. Each part (hub/auth.py, hub/ingest.py, hub/pull.py, ...) is handed it
explicitly; none reaches into another part.

Opening checks that the database is a hub's (or may become one), brings its layout
up to date and reads or stores its schema.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from hub.engine import Conn, Dialect, Engine, open_engine
from hub.epoch import open_epoch
from hub.records import complete_values
from hub.sqlite_engine import SqliteEngine
from shared.clock import HybridClock
from shared.errors import FieldsyncError
from shared.merge import CustomMerge
from shared.schema import Schema, load_custom


class HubDatabase:
    """The hub's database, on either engine: schema, clock, and transactions.

    Writes run one at a time (SQLite: one writer's connection under a lock;
    PostgreSQL: a transaction-scoped advisory lock held to commit), so records'
    ``seq`` numbers commit in order and a pull's cursor never passes one still to
    come (hub/pull.py).
    """

    def __init__(
        self,
        db: str | Path,
        schema: Schema | None,
        *,
        now: Callable[[], int],
        create: bool,
    ) -> None:
        self.engine: Engine = open_engine(db, create=create)
        self.now = now
        self.clock = HybridClock("hub", now)
        #: Called in every write transaction just before it commits (tests widen the
        #: window between handing out seq numbers and committing them).
        self.before_commit: Callable[[], None] | None = None
        # The schema in use, its version and its merge functions, replaced as one
        # when `hub schema apply` (in this process or another) stores a newer one.
        self._loaded: tuple[int, Schema, dict[str, CustomMerge]]
        self._taking = threading.Lock()  # see refresh
        try:
            with self.engine.write() as conn:
                self.engine.upgrade(conn)
                _refuse_moved(conn, self.engine.where)
                found = _stored_schema(conn, schema, self.engine.where)
                # In the opening transaction: a function that cannot be loaded leaves a
                # new database as empty as it was, so the schema can be corrected.
                self._loaded = (_version(conn), found, custom_merges(found))
                self.engine.create_tables(conn, self.schema)
                complete_values(conn, self.schema, self._loaded[0])
                self._observe(conn)
                self.engine.changed(conn)
            #: Whether the hub is served (a new identity when its database is put back
            #: under it; hub/epoch.py): SqlHubStore says.
            self.serving = True
            #: The hub's identity (hub/epoch.py), as SqlHubStore took it on opening.
            self.epoch = ""
            self._anchor = self.engine.anchor  # the store takes the identity on opening
        except BaseException:
            self.engine.close()
            raise

    @property
    def dialect(self) -> Dialect:
        return self.engine.dialect

    @property
    def where(self) -> str:
        """The database, as messages name it (a file, or a URL without its password)."""
        return self.engine.where

    @property
    def path(self) -> Path:
        """The database file (SQLite only: a backup copies it)."""
        return self._sqlite("this").path

    @property
    def db(self) -> sqlite_utils.Database:
        """The writer's connection (SQLite only; guarded by its lock)."""
        return self._sqlite("this").db

    def _sqlite(self, what: str) -> SqliteEngine:
        if not isinstance(self.engine, SqliteEngine):
            raise FieldsyncError(f"{what} needs a SQLite hub; {self.where} is PostgreSQL")
        return self.engine

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
    def write(self) -> Iterator[Conn]:
        """A connection in a write transaction, one writer at a time.

        Each one first looks whether another program (or worker) may have committed
        since (SQLite: ``PRAGMA data_version``; PostgreSQL: always) and, only then,
        whether the schema's version changed (`hub schema apply` while the hub
        serves): the schema is then read again, before anything is written under the
        old one; and the hub's clock is moved past any stamp another one made.
        """
        with self.engine.write() as conn:
            if self.engine.changed(conn):
                self._observe(conn)
            anchor, renewed = self.engine.anchor, None
            if self._put_back():
                # The database was put back under the running hub (PostgreSQL: a
                # point-in-time recovery, pg_restore): a new identity, as at a start.
                renewed = open_epoch(conn)
            yield conn
            if self.before_commit is not None:
                self.before_commit()
        self._anchor = anchor
        if renewed is not None:
            self.epoch = renewed

    def after_write(self) -> None:
        """A push or a compaction committed (SQLite: the WAL back into the file)."""
        self.engine.after_write()

    def exclusive(self, name: str) -> AbstractContextManager[bool]:
        """Whether this process holds the lock ``name`` for the block, across every
        process serving the database (False at once if another holds it)."""
        return self.engine.exclusive(name)

    def current_version(self) -> int:
        """The newest schema version, taken if another program stored it.

        Read on a connection of its own, never waiting for a writer, and on SQLite
        only when something was committed since it last looked.
        """
        with self.engine.probe() as conn:
            if conn is not None:
                # Taken only if no other thread took a version meanwhile (a write
                # may have read a newer one after this read began).
                self.refresh(conn, latest=True, unless_since=self._loaded)
            return self._loaded[0]

    def refresh(
        self,
        conn: Conn,
        *,
        latest: bool = False,
        unless_since: tuple[int, Schema, dict[str, CustomMerge]] | None = None,
        version: int | None = None,
    ) -> None:
        """Take the newest schema version stored on ``conn``, if it is newer than the
        one in use (replaced as one tuple: readers see the old or the new).

        ``latest``: ``conn`` sees the newest state (not an older snapshot), so a
        version lower than the one in use is taken too (a restored database).
        ``unless_since``: the version in use when ``conn`` began reading; if another
        thread replaced it since, what ``conn`` read may be older: nothing is taken.
        ``version``: the newest version, if just read on ``conn``.
        """
        if version is None:
            version = _version(conn)
        self.engine.seen_version(conn, version)
        if version == self._loaded[0]:
            return
        source = conn.execute(
            "SELECT source FROM _fieldsync_schemas WHERE version = ?", [version]
        ).fetchone()[0]
        with self._taking:  # compared and replaced as one
            if unless_since is not None and self._loaded is not unless_since:
                return  # another thread took a version since ``conn`` was read
            if version > self._loaded[0] or version < self._loaded[0] and latest:
                found = Schema.from_toml(source, f"schema version {version} of {self.where}")
                self._loaded = (version, found, custom_merges(found))

    def _observe(self, conn: Conn) -> None:
        """Take what another program (or worker) may have committed: the newest schema
        version, and the newest stamp stored, which the hub's clock is moved past (one
        statement: every write begins with it on PostgreSQL)."""
        version, stamp = conn.execute(
            "SELECT (SELECT max(version) FROM _fieldsync_schemas), "
            "(SELECT value FROM _fieldsync_meta WHERE key = 'hlc')"
        ).fetchone()
        self.refresh(conn, latest=True, version=int(version or 1))
        if stamp is not None:
            self.clock.observe(int(stamp))

    @contextmanager
    def read(self) -> Iterator[Conn]:
        """A connection for short reads of the newest state."""
        with self.engine.read() as conn:
            if not self._put_back():
                yield conn
                return
        self._renew()
        with self.engine.read() as conn:
            yield conn

    def _put_back(self) -> bool:
        """Whether the newest connection found another database than the hub's: one
        put back under the running hub (see write)."""
        return self.serving and self.engine.anchor != self._anchor

    def _renew(self) -> None:
        """Take the new identity before anything is read there: a read would answer with
        the old one, and an office would push on past what the copy lacks."""
        with self.write():
            pass

    @contextmanager
    def snapshot(self, *, long: bool = False) -> Iterator[Conn]:
        """A read-only connection of its own holding one snapshot: for long reads.

        ``long``: it may last as long as someone downloads (PostgreSQL: a connection
        outside the pool, which pushes and pulls need). A snapshot that sees a newer
        schema version than the one in use takes it first (what it reads may hold the
        new tables and columns).
        """
        with self.engine.snapshot(long=long) as conn:
            if not self._put_back():  # PostgreSQL takes the snapshot at the first read
                self.refresh(conn)
                yield conn
                return
        self._renew()
        with self.engine.snapshot(long=long) as conn:
            self.refresh(conn)
            yield conn

    def close(self) -> None:
        self.engine.close()


def _stored_schema(conn: Conn, schema: Schema | None, path: str) -> Schema:
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
        "INSERT INTO _fieldsync_schemas (version, source, applied_at, applied_by) "
        "VALUES (1, ?, ?, 'hub') ON CONFLICT (version) DO NOTHING",
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


def _refuse_moved(conn: Conn, where: str) -> None:
    """A hub moved elsewhere (`hub migrate`) is not opened again: offices would sync
    with two hubs."""
    row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'moved_to'").fetchone()
    if row is not None:
        raise FieldsyncError(
            f"the hub in {where} was moved to {row[0]} (`fieldsync hub migrate`): use --db {row[0]}"
        )


def _version(conn: Conn) -> int:
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
