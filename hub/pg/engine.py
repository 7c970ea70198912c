"""
The hub on PostgreSQL: a pool of connections, and the hub's SQL spoken through them.

The hub's parts write their SQL once (hub/engine.py); :class:`PgConn` takes it as it
is: ``?`` placeholders become ``%s`` and every ``%`` is doubled (cached per
statement), a Python ``bool`` is sent as the integer the hub's columns hold.

One writer at a time, as on SQLite: every write transaction first takes one
transaction-scoped advisory lock (``pg_advisory_xact_lock``), held until it commits.
PostgreSQL makes a commit visible before it lets its locks go, so records' ``seq``
numbers commit in the order they were handed out, and any snapshot sees every
``seq`` up to the newest it sees: a pull's cursor can never pass a record that
commits later, however many processes write (the trap of a bare sequence, where a
higher number commits first and a cursor moves past a lower one for ever). Reads run
in REPEATABLE READ READ ONLY transactions: one snapshot each, never waiting for a
writer.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import weakref
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import TransactionStatus
from psycopg.types.array import ListBinaryDumper
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from hub.engine import Conn, Dialect
from hub.pg import bulk
from hub.pg.ddl import create_table_sql, index_sql, pg_type
from hub.pg.layout import upgrade_layout
from shared.errors import FieldsyncError, StoreError
from shared.schema import Schema, Table

#: The advisory lock every write transaction holds to its commit (any fixed number;
#: advisory locks belong to one database, so two hubs on one server do not meet).
SEQUENCER = 0x6669656C6473  # "fields"

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


@functools.lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """The hub's SQL (``?`` placeholders) as psycopg takes it (``%s``; ``%`` doubled)."""

    def one(match: re.Match[str]) -> str:
        token = match[0]
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        return token.replace("%", "%%")  # a literal: psycopg reads % there too

    return _TOKEN.sub(one, sql)


class PgDialect(Dialect):
    """PostgreSQL's way of saying what is said differently on SQLite."""

    name = "postgres"
    remote = True
    # DataError: a value the column's type cannot hold (out of range, not a number):
    # set aside like a broken constraint, never a failed push that stalls the office.
    integrity_errors: tuple[type[Exception], ...] = (psycopg.IntegrityError, psycopg.DataError)
    for_update = " FOR UPDATE"

    def among(
        self, column: str, values: Sequence[Any], size: int = 500
    ) -> Iterator[tuple[str, list[Any]]]:
        if values:
            yield f"{column} = ANY(?)", [_Texts(values)]

    def stages(self, conn: Conn, count: int) -> bool:
        return count >= bulk.BULK and isinstance(conn, PgConn) and conn.raw in bulk.STAGED

    def put_staged(self, conn: Conn, rows: Sequence[Sequence[Any]], tables: Iterable[Any]) -> None:
        assert isinstance(conn, PgConn)
        bulk.put_records(conn.raw, rows, tables)

    def copy_rows(
        self, conn: Conn, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        assert isinstance(conn, PgConn)
        bulk.copy_rows(conn.raw, table, columns, rows)

    def object_length(self, column: str) -> str:
        return f"(SELECT count(*) FROM json_object_keys({column}::json))"

    def json_field(self, column: str, key: str) -> str:
        return f"({column}::json ->> '{key}')"

    def key_text(self, columns: Sequence[str]) -> str:
        # Byte-identical to shared.schema.pk_key (json_build_array puts spaces in).
        parts = ", ".join(f"to_json({c})::text" for c in columns)
        return f"('[' || array_to_string(ARRAY[{parts}], ',') || ']')"

    def columns(self, conn: Conn, table: str) -> list[str]:
        return [
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ? "
                "ORDER BY ordinal_position",
                [table],
            )
        ]

    def anchor(self, conn: Conn) -> str | None:
        # The timeline of the WAL being written now: pg_control_checkpoint() says the
        # last checkpoint's, which after a promotion stays the old one until the next
        # checkpoint ends, minutes later. (During recovery this fails: no hub there.)
        row = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()), "
            "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        return f"{row[0]}/{int(row[1], 16)}/{row[2]}"

    def mirror_row(self, table: Table, row: list[Any]) -> list[Any]:
        wrap = _jsonb_columns(table)
        if not wrap:
            return row
        return [Jsonb(v) if i in wrap and v is not None else v for i, v in enumerate(row)]

    def stream(
        self, conn: Conn, sql: str, parameters: Sequence[Any], size: int
    ) -> Generator[list[Any], None, None]:
        from hub.pg.stream import stream  # it builds on PgConn, below

        return stream(conn, sql, parameters, size)

    def column_types(self, conn: Conn, table: str) -> dict[str, str]:
        found = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            [table],
        )
        return {str(name): _DECLARED.get(str(kind), str(kind).upper()) for name, kind in found}

    def table_names(self, conn: Conn) -> set[str]:
        return {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }

    def fold_for_search(self, conn: Conn, text: str) -> None:
        pass

    def contains(self, column: str, text: str) -> str:
        # Text columns sort as "C", which folds ASCII only: fold under ICU's root
        # locale, which folds every letter as Python's str.lower does.
        return f"lower(CAST({column} AS TEXT) COLLATE \"und-x-icu\") LIKE lower(?) ESCAPE '\\'"

    def storage_bytes(self, conn: Conn) -> int:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])

    def free_bytes(self, conn: Conn) -> int:
        return 0

    def vacuum(self, conn: Conn) -> None:
        # VACUUM runs outside a transaction: end the read one it is handed, and
        # open another for the caller to end.
        conn.execute("COMMIT")
        try:
            conn.execute("VACUUM (ANALYZE)")
        finally:
            conn.execute("BEGIN")

    def reclaims_in_steps(self, conn: Conn) -> bool:
        return False

    def reclaim_step(self, conn: Conn) -> int:
        return 0

    def checkpoint(self, conn: Conn) -> None:
        pass


@functools.lru_cache(maxsize=256)
def _jsonb_columns(table: Table) -> frozenset[int]:
    """Positions of ``table``'s columns kept as jsonb (no type, or none of SQLite's)."""
    return frozenset(i for i, c in enumerate(table.columns) if pg_type(c.type) == "jsonb")


#: PostgreSQL's column types named as a schema declares them (hub/pg/ddl.py's map back).
_DECLARED = {"bigint": "INTEGER", "text": "TEXT", "double precision": "REAL", "jsonb": ""}


POSTGRES = PgDialect()


class PgConn:
    """A pooled connection speaking as the hub's parts expect (see :func:`translate`)."""

    dialect = POSTGRES
    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.raw.execute(translate(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), parameters)
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE


class _Texts(list[str]):
    """Texts sent as one binary array: psycopg's text form escapes each element
    (12 ms for 5,000 keys, against 1.7 ms)."""


class _BoolDumper(Dumper):
    """True/False as 1/0: the hub's flags are integers on both engines."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


def _configure(raw: psycopg.Connection[Any]) -> None:
    raw.adapters.register_dumper(bool, _BoolDumper)
    raw.adapters.register_dumper(_Texts, ListBinaryDumper)


class PgEngine:
    """A hub database on a PostgreSQL server, through a pool of connections."""

    dialect = POSTGRES

    def __init__(self, url: str, *, create: bool, min_size: int = 1, max_size: int = 8) -> None:
        self.url = url
        self._where = display_url(url)
        self._seen: weakref.WeakKeyDictionary[psycopg.Connection[Any], int] = (
            weakref.WeakKeyDictionary()
        )
        self._seen_lock = threading.Lock()
        self.anchor: str | None = None
        self._check(create)
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            # Statements run 5 times are prepared (a push costs half as much); see
            # seen_version for what a schema change in another process asks.
            kwargs={"autocommit": True},
            configure=self._configure,
            open=False,
            name="fieldsync",
            timeout=30,
        )
        try:
            self.pool.open(wait=True, timeout=30)
        except PoolTimeout:
            raise StoreError(f"cannot connect to {self._where}") from None

    @property
    def where(self) -> str:
        return self._where

    def _configure(self, raw: psycopg.Connection[Any]) -> None:
        """Each new pooled connection: the hub's types and stage, and what database it
        found (a server restarted by a point-in-time recovery, or a database dropped
        and restored, breaks the connections before: their successors find out)."""
        _configure(raw)
        bulk.make_stage(raw)
        self.anchor = POSTGRES.anchor(PgConn(raw))

    def _check(self, create: bool) -> None:
        """Refuse a server we cannot reach, or a database that is not a hub's (and
        not empty), with one line, before any pool retries in the background."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as raw:
                tables = POSTGRES.table_names(PgConn(raw))
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self._where}: {_reason(exc)}") from None
        if "_fieldsync_meta" in tables:
            return
        if "_fieldsync_state" in tables:
            raise FieldsyncError(f"{self._where} is an office database, not a hub database")
        if tables:
            raise FieldsyncError(
                f"{self._where} is not a fieldsync hub database (it holds other tables; "
                "give the hub a database of its own)"
            )
        if not create:
            raise FieldsyncError(
                f"{self._where} holds no hub yet; create it by registering an office: "
                f"`fieldsync hub add-node NAME --db {self._where}`"
            )

    def upgrade(self, conn: Conn) -> None:
        assert isinstance(conn, PgConn)
        upgrade_layout(conn.raw)

    def create_tables(self, conn: Conn, schema: Schema) -> None:
        existing = POSTGRES.table_names(conn)
        for table in schema.tables.values():
            if table.name not in existing:
                conn.execute(create_table_sql(table))
            else:
                have = set(POSTGRES.columns(conn, table.name))
                missing = [c for c in table.column_names if c not in have]
                if missing:
                    raise StoreError(
                        f"table {table.name} exists but lacks column(s) {', '.join(missing)} "
                        "that the schema declares"
                    )
            # declared in the schema (`indexes = [...]`), in PostgreSQL's words
            for (name, _), sql in zip(table.indexes, index_sql(table), strict=True):
                found = conn.execute(
                    "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "
                    "AND indexname = ?",
                    [name],
                ).fetchone()
                if found is None:
                    conn.execute(sql)

    @contextmanager
    def _transaction(self, begin: str, lock: bool = False) -> Iterator[PgConn]:
        try:
            with self.pool.connection() as raw:
                raw.execute(begin)
                try:
                    if lock:
                        raw.execute("SELECT pg_advisory_xact_lock(%s)", [SEQUENCER])
                    yield PgConn(raw)
                except BaseException:
                    if raw.info.transaction_status != TransactionStatus.IDLE:
                        raw.execute("ROLLBACK")
                    raise
                raw.execute("COMMIT")
        except PoolTimeout:
            raise StoreError(f"no connection to {self._where} came free in time") from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"{self._where}: {_reason(exc)}") from None

    def write(self) -> Any:
        """A write transaction (READ COMMITTED) holding the sequencer lock to commit."""
        return self._transaction("BEGIN", lock=True)

    def changed(self, conn: Conn) -> bool:
        return True  # another worker may have written: nothing in memory tells

    def read(self) -> Any:
        return self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def snapshot(self, *, long: bool = False) -> Any:
        if long:
            return self._own_snapshot()
        return self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    @contextmanager
    def _own_snapshot(self) -> Iterator[PgConn]:
        """A snapshot on a connection of its own, outside the pool (closed after)."""
        try:
            raw = psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, prepare_threshold=None
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self._where}: {_reason(exc)}") from None
        with raw:
            _configure(raw)
            raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield PgConn(raw)

    @contextmanager
    def probe(self) -> Iterator[Conn | None]:
        try:
            with self.pool.connection() as raw:
                yield PgConn(raw)
        except PoolTimeout:
            raise StoreError(f"no connection to {self._where} came free in time") from None

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A session advisory lock on a connection of its own, taken without waiting
        (released with the connection if the process dies)."""
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")
        with self.pool.connection() as raw:
            row = raw.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
            got = bool(row and row[0])
            try:
                yield got
            finally:
                if got:
                    raw.execute("SELECT pg_advisory_unlock(%s)", [key])

    def seen_version(self, conn: Conn, version: int) -> None:
        """A prepared read of a table another process changed since (`hub schema
        apply`) would fail ("cached plan must not change result type"): a connection
        that reads a newer schema version than it saw last forgets what it prepared
        (psycopg clears its own cache on DEALLOCATE ALL). Every write, snapshot and
        probe reads the version first."""
        assert isinstance(conn, PgConn)
        with self._seen_lock:
            before = self._seen.get(conn.raw)
            self._seen[conn.raw] = version
        if before is not None and before != version:
            conn.execute("DEALLOCATE ALL")

    def after_write(self) -> None:
        pass

    def close(self) -> None:
        self.pool.close()


def display_url(url: str) -> str:
    """``url`` without its password, as messages and logs may show it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}"))


def _reason(exc: Exception) -> str:
    """psycopg's message in one line (its first, and a hint after it if any)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = lines[0].removeprefix("connection is bad: ").removeprefix("connection failed: ")
    return f"{first} ({lines[1]})" if len(lines) > 1 else first
