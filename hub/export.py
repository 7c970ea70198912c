"""
Export the hub's consolidated records of one table as CSV or JSON, streamed.

The export reads the real table the hub mirrors live records into (see
:mod:`hub.store`), ordered by primary key, on a snapshot of its own: on SQLite a
read-only connection to the file (``mode=ro``; in WAL mode a reader never blocks the
serving hub's writes, and the export never writes), on PostgreSQL a REPEATABLE READ
READ ONLY transaction (:meth:`hub.database.HubDatabase.snapshot`). Rows are fetched in
chunks and written as they come (``Dialect.stream``: SQLite's stepping cursor,
PostgreSQL's named server-side cursor, hub/pg/stream.py), so a table of millions of
rows takes the memory of one chunk. The whole export reads one snapshot: records the
hub commits meanwhile are not in it. :func:`stream_export` gives
the same bytes as an iterator of chunks, for a download served by the dashboard.

CSV: a header row of the synced columns in table order, then one row per record
(``csv`` module defaults: comma, ``"`` quoting where needed, CRLF line ends), UTF-8;
NULL is an empty field (so is an empty text: JSON keeps them apart); a text starting
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a ``'`` in front, so
that a spreadsheet shows it rather than running it as a formula (numbers stored as
numbers, negative ones too, are written as they are). JSON: an array
written incrementally, one object per line, UTF-8 (``ensure_ascii=False``); numbers are
numbers, REAL values exactly as Python's ``repr`` writes them, NULL is ``null``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

from hub.database import HubDatabase
from hub.engine import SQLITE, Conn, Dialect, dialect_of, is_url
from hub.store import SqlHubStore, open_store
from shared.errors import FieldsyncError
from shared.schema import Schema, Table, quote
from shared.sqlite import read_snapshot

FORMATS = ("csv", "json")
CHUNK_ROWS = 1000

#: A hub database: a SQLite file's path, a ``postgresql://`` URL, an open store (either
#: engine) or its HubDatabase, or an open ``sqlite3`` connection.
HubSource = str | os.PathLike[str] | sqlite3.Connection | SqlHubStore | HubDatabase


def export_rows(
    source: HubSource,
    table: str,
    fmt: str,
    out: BinaryIO | TextIO,
    office: str | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Write the live records of ``table`` to ``out`` as ``fmt`` (csv or json); return
    how many records were written.

    ``source`` is the hub database: a path (opened read-only), a ``postgresql://`` URL
    (opened as a store), a store of either engine or its :class:`HubDatabase` (read on
    a snapshot of its own), or an open ``sqlite3`` connection (used as it is, never
    written). ``out`` is a binary stream (UTF-8 is written) or a text stream.

    ``office`` keeps only the records that belong to that office: the record's scope
    key (``_fieldsync_records.scope``: its scope column's value, or, for a table that
    follows a parent, its parent's key; hub/scopes.py), the same key headquarters'
    per-office figures count by (hub/report.py), so a download has as many rows as its
    figure. A table without a scope is held by every office: it has no per-office
    download. The filter joins the mirrored table with ``_fieldsync_records`` through
    the latter's primary-key index, row by row in key order: no sort, no temporary
    table, no scan of ``_fieldsync_records``.

    Everything is checked before the first byte is written: an unknown table, office
    or format raises :class:`FieldsyncError` naming the ones there are.
    """
    if fmt not in FORMATS:
        raise FieldsyncError(f"unknown export format {fmt!r}; use csv or json")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    with _reading(source) as conn:
        schema = _hub_schema(conn, source)
        spec = schema.table(table)
        if office is not None:
            _check_office(conn, spec, office)
        # closed before the snapshot ends (PostgreSQL: its named cursor goes with it)
        with contextlib.closing(_rows(conn, spec, office, chunk_rows)) as chunks:
            return _write(_pieces(spec, fmt, chunks), _Sink(out))


def stream_export(
    source: HubSource,
    table: str,
    fmt: str,
    office: str | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[str, Generator[bytes, None, None]]:
    """:func:`export_rows` as a download: the file name (``TABLE.FORMAT``) and an iterator
    of UTF-8 chunks, byte for byte what :func:`export_rows` writes.

    Everything is checked before this returns (unknown table, office or format raise
    :class:`FieldsyncError`), so a web handler can still answer with an error. The
    iterator holds one read-only connection and its snapshot, one chunk of rows at a
    time; it may be advanced from any thread (one at a time), and closing it (or
    reading it to the end) closes the connection.
    """
    if fmt not in FORMATS:
        raise FieldsyncError(f"unknown export format {fmt!r}; use csv or json")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    stack = contextlib.ExitStack()
    try:
        conn = stack.enter_context(_reading(source, check_same_thread=False))
        spec = _hub_schema(conn, source).table(table)
        if office is not None:
            _check_office(conn, spec, office)
        rows = _rows(conn, spec, office, chunk_rows)
        stack.callback(rows.close)  # before the snapshot ends: it is closed after
    except BaseException:
        stack.close()
        raise
    chunks = _encoded(_pieces(spec, fmt, rows), stack)
    next(chunks)  # started: closing it unread now closes the connection too
    return download_name(spec.name, fmt, office), chunks


def download_name(table: str, fmt: str, office: str | None = None, day: date | None = None) -> str:
    """A download's file name: table, office (if one) and the day (UTC), e.g.
    ``cases-astana-2026-12-03.csv``; characters unsafe in a file name become ``_``."""
    parts = [table] if office is None else [table, office]
    when = (day or datetime.now(UTC).date()).isoformat()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join([*parts, when])) + f".{fmt}"


def export_query(
    table: Table, office: str | None = None, dialect: Dialect = SQLITE
) -> tuple[str, list[Any]]:
    """The SELECT (and its parameters) that reads ``table``'s records in key order, in
    ``dialect``."""
    columns = ", ".join(f"t.{quote(c)}" for c in table.column_names)
    order = ", ".join(f"t.{quote(c)}" for c in table.primary_key)
    if office is None:
        return f"SELECT {columns} FROM {quote(table.name)} AS t ORDER BY {order}", []
    if table.scope is None:
        raise FieldsyncError(_no_scope(table))
    # The mirrored table is read through its key index in key order; each record's
    # state is one lookup in the (tbl, pk) key of _fieldsync_records (pk is the key
    # columns' key text, pk_key), a scalar subquery per row on both engines: no sort,
    # no scan of _fieldsync_records, whatever PostgreSQL's statistics say (a join there
    # may be planned as a nested loop over all its rows, or a hash and a sort).
    key = dialect.key_text([f"t.{quote(c)}" for c in table.primary_key])
    return (
        f"SELECT {columns} FROM {quote(table.name)} AS t "
        "WHERE (SELECT COALESCE(r.scope, '') FROM _fieldsync_records AS r "
        f"WHERE r.tbl = ? AND r.pk = {key} AND r.deleted = 0) = ? ORDER BY {order}",
        [table.name, office],
    )


def _no_scope(table: Table) -> str:
    return (
        f"table {table.name} has no scope: every office holds all its records, so it has "
        "no per-office export; export the whole table (leave out the office)"
    )


def export_to_path(
    source: HubSource,
    table: str,
    fmt: str,
    path: str | os.PathLike[str],
    office: str | None = None,
) -> int:
    """:func:`export_rows` into the file ``path``, whole or not at all.

    The rows go to a temporary file beside ``path`` (readable by its owner only: it
    holds case data), which is synced and renamed over ``path`` once complete; if the
    export fails, the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    if fmt not in FORMATS:  # before any file is made
        raise FieldsyncError(f"unknown export format {fmt!r}; use csv or json")
    _refuse_database(source, target)
    directory = target.parent
    if not directory.is_dir():
        raise FieldsyncError(f"cannot write {target}: directory {directory} does not exist")
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            count = export_rows(source, table, fmt, out, office)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where possible
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return count


# -- reading --------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(source: HubSource, *, check_same_thread: bool = True) -> Iterator[Conn]:
    """A connection holding one read transaction (a snapshot) for the export.

    ``check_same_thread=False`` lets a stream be read on by other threads (one at a time).
    """
    if isinstance(source, sqlite3.Connection):
        began = not source.in_transaction
        if began:
            source.execute("BEGIN")
        try:
            yield source
        finally:
            if began and source.in_transaction:
                source.execute("ROLLBACK")  # a read: nothing to keep
        return
    if isinstance(source, str) and is_url(source):
        with open_store(source, create=False, serving=False) as store:
            with store.database.snapshot() as conn:
                yield conn
        return
    if isinstance(source, (SqlHubStore, HubDatabase)):
        database = source.database if isinstance(source, SqlHubStore) else source
        if database.dialect.name != "sqlite":
            # A connection of its own, not one of the pool's: a download lasts as long
            # as its reader takes, and pushes and pulls must not wait for it.
            with database.snapshot(long=True) as conn:
                yield conn
            return
        source = database.path  # its snapshot, opened for reading from any thread
    path = Path(source)
    if not path.is_file():
        raise FieldsyncError(f"hub database {path} does not exist")
    with read_snapshot(path, check_same_thread=check_same_thread) as conn:
        yield conn


def _name(source: HubSource) -> str:
    """The hub database as messages name it."""
    if isinstance(source, sqlite3.Connection):
        return "the database"
    if isinstance(source, (SqlHubStore, HubDatabase)):
        return source.where
    return str(source) if is_url(str(source)) else str(Path(source))


def _hub_schema(conn: Conn, source: HubSource) -> Schema:
    """The schema stored in the hub database; raise if it is not a hub database."""
    name = _name(source)
    try:
        tables = dialect_of(conn).table_names(conn)
        row = (
            conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'schema'").fetchone()
            if "_fieldsync_meta" in tables
            else None
        )
    except sqlite3.OperationalError as exc:  # unreadable, or no room for its -shm file
        raise FieldsyncError(f"cannot open {name} ({exc})") from None
    except sqlite3.Error as exc:
        raise FieldsyncError(f"{name} is not a fieldsync hub database ({exc})") from None
    if row is None:
        if "_fieldsync_state" in tables:
            raise FieldsyncError(f"{name} is an office database, not a hub database")
        raise FieldsyncError(f"{name} is not a fieldsync hub database")
    return Schema.from_toml(row[0], f"the schema stored in {name}")


def _check_office(conn: Conn, table: Table, office: str) -> None:
    """An office to export ``table`` for: a registered office, or a scope key records of
    ``table`` have (a case may name an office not registered yet)."""
    if table.scope is None:
        raise FieldsyncError(_no_scope(table))
    offices = [row[0] for row in conn.execute("SELECT name FROM _fieldsync_nodes ORDER BY name")]
    if office in offices:
        return
    held = conn.execute(
        "SELECT 1 FROM _fieldsync_records WHERE tbl = ? AND scope = ? AND deleted = 0 LIMIT 1",
        [table.name, office],
    ).fetchone()
    if office and held is not None:
        return
    known = ", ".join(offices) if offices else "none registered"
    raise FieldsyncError(f"unknown office {office!r}; offices are {known}")


def _rows(
    conn: Conn, table: Table, office: str | None, size: int
) -> Generator[list[Any], None, None]:
    """The records to export, ``size`` at a time, read as they are written."""
    dialect = dialect_of(conn)
    sql, parameters = export_query(table, office, dialect)
    return dialect.stream(conn, sql, parameters, size)


def _path(source: HubSource) -> Path | None:
    """The hub's file (None: PostgreSQL, or a connection)."""
    if isinstance(source, sqlite3.Connection):
        return None
    if isinstance(source, (SqlHubStore, HubDatabase)):
        database = source.database if isinstance(source, SqlHubStore) else source
        return database.path if database.dialect.name == "sqlite" else None
    return None if is_url(str(source)) else Path(source)


def _refuse_database(source: HubSource, target: Path) -> None:
    """Refuse to write the export over the hub database (or its WAL files)."""
    path = _path(source)
    if path is None:
        return
    db = path.resolve()
    resolved = target.resolve()
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        if resolved == name or (
            resolved.exists() and name.exists() and os.path.samefile(resolved, name)
        ):
            raise FieldsyncError(f"cannot write the export to {target}: it is the hub database")


# -- writing --------------------------------------------------------------------------


class _Sink:
    """Writes text to a binary (as UTF-8) or text stream."""

    def __init__(self, out: BinaryIO | TextIO) -> None:
        self._text = isinstance(out, io.TextIOBase)
        self._out = out

    def write(self, text: str) -> None:
        if not text:
            return
        if self._text:
            cast(TextIO, self._out).write(text)
        else:
            cast(BinaryIO, self._out).write(text.encode("utf-8"))


class _Parts:
    """What ``csv.writer`` writes to: collects text until it is taken."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.write = self.parts.append

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


# Each writer yields its text one piece per chunk of rows and returns how many records.
_Pieces = Generator[str, None, int]


def _pieces(table: Table, fmt: str, chunks: Iterator[list[Any]]) -> _Pieces:
    return _csv_pieces(table, chunks) if fmt == "csv" else _json_pieces(table, chunks)


def _write(pieces: _Pieces, sink: _Sink) -> int:
    """Write every piece to ``sink``; return the writer's count of records."""
    while True:
        try:
            sink.write(next(pieces))
        except StopIteration as done:
            return int(done.value)


def _encoded(pieces: _Pieces, stack: contextlib.ExitStack) -> Generator[bytes, None, None]:
    """The pieces as UTF-8; ``stack`` (the connection) is closed when they end or stop."""
    with stack:
        yield b""  # where stream_export starts it
        for text in pieces:
            if text:
                yield text.encode("utf-8")


def _csv_pieces(table: Table, chunks: Iterator[list[Any]]) -> _Pieces:
    parts = _Parts()
    writer = csv.writer(parts)
    writer.writerow(table.column_names)
    yield parts.take()
    count = 0
    for rows in chunks:
        writer.writerows([[_cell(value) for value in row] for row in rows])  # None: empty
        yield parts.take()
        count += len(rows)
    return count


# A text starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell: a text a spreadsheet would run as a formula gets a ``'`` in front
    (OWASP's advice); numbers, held as INTEGER or REAL, are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _json_pieces(table: Table, chunks: Iterator[list[Any]]) -> _Pieces:
    encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_no_blob).encode
    names = table.column_names
    opening = "["
    count = 0
    for rows in chunks:
        try:
            text = ",\n".join([encode(dict(zip(names, row, strict=True))) for row in rows])
        except ValueError:
            raise FieldsyncError(_not_finite(table, rows, count)) from None
        yield opening + (",\n" if count else "\n") + text
        opening = ""
        count += len(rows)
    yield opening + "\n]\n"
    return count


def _no_blob(value: Any) -> Any:
    # The hub stores no BLOBs (schemas refuse them); another program wrote this one.
    raise FieldsyncError(f"a record holds a {type(value).__name__} value, which JSON cannot hold")


def _not_finite(table: Table, rows: Sequence[Sequence[Any]], before: int) -> str:
    """Why a chunk cannot be JSON; names columns, never values (they are case data)."""
    for number, row in enumerate(rows, before + 1):
        bad = [
            name
            for name, value in zip(table.column_names, row, strict=True)
            if isinstance(value, float) and not math.isfinite(value)
        ]
        if bad:
            return (
                f"record {number} of table {table.name} holds an infinite number in "
                f"{', '.join(bad)}, which JSON cannot write (CSV can); the hub never "
                "stores one, so another program wrote it"
            )
    return f"table {table.name} holds a value JSON cannot write"
