"""
Long reads on PostgreSQL in chunks: a named (server-side) cursor.

psycopg's ordinary cursor fetches a statement's whole result into the client before
the first row is taken; a named cursor (``DECLARE … CURSOR``) leaves it on the server
and fetches ``size`` rows per round trip, so an export of millions of records costs
the memory of one chunk, as SQLite's stepping cursor does (hub/engine.py,
``Dialect.stream``, whose PostgreSQL twin this is). The cursor lives in the
snapshot's transaction (REPEATABLE READ READ ONLY): every chunk reads the same
snapshot, and the cursor is closed with the iterator, before the transaction ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence
from typing import Any

from hub.engine import Conn
from hub.pg.engine import PgConn, translate

_NAMES = itertools.count(1)


def stream(
    conn: Conn, sql: str, parameters: Sequence[Any], size: int
) -> Generator[list[Any], None, None]:
    """The rows of ``sql`` (the hub's SQL, ``?`` placeholders), ``size`` at a time,
    through a named cursor in ``conn``'s transaction."""
    if not isinstance(conn, PgConn):
        raise TypeError("a PostgreSQL stream needs the hub's PostgreSQL connection")
    if not conn.in_transaction:
        raise ValueError("a named cursor lives in a transaction: open a snapshot first")
    with conn.raw.cursor(name=f"fs_stream_{next(_NAMES)}") as cursor:
        cursor.itersize = size
        cursor.execute(translate(sql), parameters)
        while rows := cursor.fetchmany(size):
            yield rows
