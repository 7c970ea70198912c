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
