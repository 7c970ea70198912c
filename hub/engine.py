"""
What differs between the hub's two database engines, SQLite and PostgreSQL.

The hub's parts (hub/auth.py, hub/ingest.py, hub/pull.py, ...) write their SQL once,
in the form both engines take: ``?`` placeholders, ``INSERT ... ON CONFLICT``, ``CASE``
rather than boolean arithmetic, an alias on every subquery in ``FROM``. They are
handed a connection (:class:`Conn`): SQLite's own, or PostgreSQL's behind an adapter
that speaks the same way (hub/pg/engine.py). The few things that cannot be written
once are asked of the connection's :class:`Dialect` (:func:`dialect_of`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol


class Cursor(Protocol):
    """What the hub reads from a statement: rows, and how many rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int = ...) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection in a transaction: SQLite's, or PostgreSQL's adapter."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


class Dialect:
    """SQLite's way of saying what is said differently on PostgreSQL."""

    name = "sqlite"
    #: Whether each statement is a round trip to a server (PostgreSQL), rather than a
    #: call into the process's own library: then fewer, larger statements pay.
    remote = False
    #: What a broken constraint (primary key, CHECK, NOT NULL) raises.
    integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def describe(self, exc: Exception) -> str:
        """What a broken constraint says, without the row's values (PostgreSQL's
        message goes on with "DETAIL: Failing row contains (...)": left out)."""
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    def among(
        self, column: str, values: Sequence[Any], size: int = 500
    ) -> Iterator[tuple[str, list[Any]]]:
        """SQL true when ``column`` is one of ``values``, with its parameters, in as
        many pieces as the engine needs: ``column IN (?, …)`` by ``size`` on SQLite;
        PostgreSQL: one ``column = ANY(?)`` with an array, whose prepared (generic)
        plan still reads the index, where a long IN list's generic plan took 150 ms
        per 500 keys on a table of 15,000 records."""
        for start in range(0, len(values), size):
            chunk = list(values[start : start + size])
            yield f"{column} IN ({', '.join('?' * len(chunk))})", chunk

    def stages(self, conn: Conn, count: int) -> bool:
        """Whether ``count`` rows are written on ``conn`` set-based, by :meth:`put_staged`
        and :meth:`copy_rows` (PostgreSQL, from hub/pg/bulk.py's ``BULK`` rows, on a
        connection with its staging table; SQLite never: in process, ``executemany``
        costs no round trips)."""
        return False

    def put_staged(self, conn: Conn, rows: Sequence[Sequence[Any]], tables: Iterable[Any]) -> None:
        """Store hub/records.py's record rows and mirror the live ones into ``tables``."""
        raise NotImplementedError

    def copy_rows(
        self, conn: Conn, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Append ``rows`` to ``columns`` of ``table`` in one go."""
        raise NotImplementedError

    def object_length(self, column: str) -> str:
        """SQL for how many members the JSON object in ``column`` has."""
        return f"(SELECT count(*) FROM json_each({column}))"

    def json_field(self, column: str, key: str) -> str:
        """SQL for the text of member ``key`` of the JSON object in ``column``."""
        return f"json_extract({column}, '$.{key}')"

    def key_text(self, columns: Sequence[str]) -> str:
        """SQL for a record's key text (shared.schema.pk_key) from its key columns."""
        return f"json_array({', '.join(columns)})"

    def columns(self, conn: Conn, table: str) -> list[str]:
        """The columns of ``table`` as the database holds them, in order."""
        found = conn.execute("SELECT name FROM pragma_table_info(?) ORDER BY cid", [table])
        return [row[0] for row in found]

    def column_types(self, conn: Conn, table: str) -> dict[str, str]:
        """Each column of ``table`` with its declared type, upper case ("" if none)
        (PostgreSQL: information_schema.columns' types named back as the schema does)."""
        found = conn.execute("SELECT name, type FROM pragma_table_info(?)", [table])
        return {str(name): str(kind).upper() for name, kind in found}

    def table_names(self, conn: Conn) -> set[str]:
        """Every table in the database."""
        return {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }

    def anchor(self, conn: Conn) -> str | None:
        """What changes when the database is put back from a copy the hub did not
        mark (None: nothing; SQLite's copies are marked by `hub backup`). PostgreSQL:
        the cluster's system identifier, its timeline (a point-in-time recovery starts
        a new one) and the database's OID (pg_restore makes a new database)."""
        return None

    def mirror_row(self, table: Any, row: list[Any]) -> list[Any]:
        """A mirrored table's row (shared.schema.Table.row) as the database takes it
        (PostgreSQL: the values of columns kept as jsonb wrapped as JSON)."""
        return row

    #: Appended to a SELECT of rows the transaction goes on to change, to lock them
    #: first (PostgreSQL: `` FOR UPDATE``; SQLite's writer holds the whole file).
    for_update = ""

    def fold_for_search(self, conn: Conn, text: str) -> None:
        """Make :meth:`contains` ready on ``conn`` for ``text`` (PostgreSQL: nothing)."""
        if not text.isascii():
            conn.create_function(  # type: ignore[attr-defined]
                "fs_lower", 1, _lower, deterministic=True
            )

    def contains(self, column: str, text: str) -> str:
        """SQL true when ``column`` matches the LIKE pattern ``?`` (escaped by ``\\``),
        case folded: SQLite's LIKE folds ASCII, Python folds other letters (PostgreSQL:
        ``lower(column COLLATE "und-x-icu") LIKE lower(?)``)."""
        cell = f"CAST({column} AS TEXT)"
        if not text.isascii():
            cell = f"fs_lower({cell})"
        return f"{cell} LIKE ? ESCAPE '\\'"

    def storage_bytes(self, conn: Conn) -> int:
        """What the database takes on disk: the file and its WAL (PostgreSQL:
        ``pg_database_size``)."""
        path = Path(
            next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")
        )
        wal = path.with_name(path.name + "-wal")
        return sum(p.stat().st_size for p in (path, wal) if p.exists())

    def free_bytes(self, conn: Conn) -> int:
        """Bytes freed inside the database, not yet given back to the disk (PostgreSQL:
        0, its free space stays with each table)."""
        pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages * size)

    def vacuum(self, conn: Conn) -> None:
        """Give every freed byte back to the disk, on a connection in no transaction,
        leaving the file in incremental auto-vacuum (PostgreSQL: ``VACUUM``)."""
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        self.checkpoint(conn)

    def reclaims_in_steps(self, conn: Conn) -> bool:
        """Whether :meth:`reclaim_step` gives freed bytes back (PostgreSQL: False,
        autovacuum does it)."""
        return bool(conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2)

    def reclaim_step(self, conn: Conn) -> int:
        """Give some freed pages back to the disk, in a write transaction; return how
        many are left (PostgreSQL: never called)."""
        conn.execute("PRAGMA incremental_vacuum(2000)").fetchall()
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])

    def checkpoint(self, conn: Conn) -> None:
        """Copy the WAL into the file and empty it, a few tries: the background
        checkpointer may hold it for a moment (PostgreSQL: nothing, the server does)."""
        for _ in range(20):
            if conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                return
            time.sleep(0.05)

    def stream(
        self, conn: Conn, sql: str, parameters: Sequence[Any], size: int
    ) -> Generator[list[Any], None, None]:
        """The rows of ``sql``, ``size`` at a time, read from the database as they are
        taken: a table of millions of rows costs the memory of one chunk. Close the
        iterator (or read it to the end) before ``conn``'s transaction ends.

        SQLite steps its cursor (``fetchmany``). PostgreSQL's twin, hub/pg/stream.py,
        reads through a named (server-side) cursor in ``conn``'s transaction: a plain
        cursor there would fetch every row at once.
        """
        return _fetched(conn.execute(sql, parameters), size)


def _fetched(cursor: Cursor, size: int) -> Generator[list[Any], None, None]:
    while rows := cursor.fetchmany(size):
        yield rows


def _lower(value: str | None) -> str | None:
    return None if value is None else value.lower()


SQLITE = Dialect()


def dialect_of(conn: Any) -> Dialect:
    """The dialect of ``conn``: PostgreSQL's adapter carries its own, SQLite's is the default."""
    found: Dialect = getattr(conn, "dialect", SQLITE)
    return found


class Engine(Protocol):
    """What :class:`hub.database.HubDatabase` asks of a database engine."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def where(self) -> str:
        """The database, as messages name it (never a password)."""
        ...

    @property
    def anchor(self) -> str | None:
        """What the newest connection found the database to be (Dialect.anchor; None on
        SQLite): another than before means it was put back under the running hub."""
        ...

    def upgrade(self, conn: Conn) -> None:
        """Bring the hub's own tables up to date, in ``conn``'s write transaction."""

    def create_tables(self, conn: Conn, schema: Any) -> None:
        """Create each mirrored table of ``schema`` that does not exist yet."""

    def write(self) -> AbstractContextManager[Conn]:
        """A write transaction, one at a time across every process on the database."""
        ...

    def changed(self, conn: Conn) -> bool:
        """Whether another process may have committed since this one last wrote."""
        ...

    def read(self) -> AbstractContextManager[Conn]:
        """A connection for short reads of the newest state."""
        ...

    def snapshot(self, *, long: bool = False) -> AbstractContextManager[Conn]:
        """A read-only transaction holding one snapshot, for long reads (``long``:
        it may last minutes, as a download does)."""
        ...

    def probe(self) -> AbstractContextManager[Conn | None]:
        """A connection for a quick look at the newest state (None: nothing changed)."""
        ...

    def after_write(self) -> None:
        """Called after a push or a compaction committed."""

    def seen_version(self, conn: Conn, version: int) -> None:
        """``conn`` read the schema's newest ``version`` (PostgreSQL: a connection that
        saw another one before forgets the statements it prepared, whose tables may
        have changed since)."""

    def exclusive(self, name: str) -> AbstractContextManager[bool]:
        """Whether this process got the lock ``name`` for the database, held for the
        block (every process and machine serving it: one compaction at a time)."""
        ...

    def close(self) -> None: ...


def is_url(db: str | Path) -> bool:
    """Whether ``db`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_engine(db: str | Path, *, create: bool) -> Engine:
    """The engine for ``db``: a ``postgresql://`` URL or a SQLite file's path."""
    if is_url(db):
        from hub.pg.engine import PgEngine

        return PgEngine(str(db), create=create)
    from hub.sqlite_engine import SqliteEngine

    return SqliteEngine(db, create=create)
