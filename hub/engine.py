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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from shared.schema import quote


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
    #: What a broken constraint (primary key, CHECK, NOT NULL) raises.
    integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def json_field(self, column: str, key: str) -> str:
        """SQL for the text of member ``key`` of the JSON object in ``column``."""
        return f"json_extract({column}, '$.{key}')"

    def key_text(self, columns: Sequence[str]) -> str:
        """SQL for a record's key text (shared.schema.pk_key) from its key columns."""
        return f"json_array({', '.join(columns)})"

    def columns(self, conn: Conn, table: str) -> list[str]:
        """The columns of ``table`` as the database holds them, in order."""
        return [row[1] for row in conn.execute(f"PRAGMA table_info({quote(table)})")]

    def table_names(self, conn: Conn) -> set[str]:
        """Every table in the database."""
        return {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }


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

    def snapshot(self) -> AbstractContextManager[Conn]:
        """A read-only transaction holding one snapshot, for long reads."""
        ...

    def probe(self) -> AbstractContextManager[Conn | None]:
        """A connection for a quick look at the newest state (None: nothing changed)."""
        ...

    def after_write(self) -> None:
        """Called after a push or a compaction committed."""

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
