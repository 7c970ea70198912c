"""
Moving a hub from its SQLite file to PostgreSQL (`fieldsync hub migrate`).

Everything is copied as it is: records, versions, history, conflicts, receipts, the
offices' tokens (hashes), cursors and scopes, the audit log, every schema version,
the hub's identity (epoch) and its seq and clock. So offices sync on without noticing
anything but, at most, a new address: none pulls a record twice, a batch re-sent is
still a replay, and none takes the move for a restore.

The file's write lock is held throughout (nothing written meanwhile is left behind),
and the target is written in one transaction (a failed move leaves it empty), checked
before it commits: each table holds as many rows as the source's, with the same
content (a SHA-256 of every row, added up, so the order rows come in does not
matter); the lag counts are made again by the target's own triggers and compared
too. The source is then marked as moved (``moved_to`` in its ``_fieldsync_meta``),
and no hub command opens it again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from hub.engine import SQLITE, Conn
from hub.pg.engine import POSTGRES, PgConn, PgEngine
from hub.store import SqliteHubStore
from shared.backup import in_use
from shared.errors import FieldsyncError
from shared.schema import Schema, quote

#: Rows sent to the server at a time.
CHUNK = 5000
#: Kept by the target's own triggers as the records are copied: compared, not copied.
DERIVED = ("_fieldsync_seq_counts",)
MOVED_TO = "moved_to"


@dataclass
class Moved:
    """What a move copied: rows per table, and the hub's highest seq."""

    target: str
    tables: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rows = sum(self.tables.values())
        return [
            f"Moved the hub to {self.target}: {rows:,} rows in {len(self.tables)} tables, "
            f"checked (counts and SHA-256), up to seq {self.seq:,}, in {self.seconds:.1f} s.",
            "Serve it with `fieldsync hub serve --db URL`; offices sync on as they are "
            "(give them the new address with `fieldsync node set` if it changed).",
        ]


def migrate(source: Path, url: str) -> Moved:
    """Copy the hub at ``source`` into the empty PostgreSQL database ``url``."""
    began = datetime.now(UTC)
    if not source.exists():
        raise FieldsyncError(f"{source} does not exist")
    if in_use(source):
        raise FieldsyncError(f"{source} is in use (a hub serves it?): stop it, then move it")
    # Opening brings its layout up to date (and refuses what is not a hub).
    with SqliteHubStore(source, create=False, serving=False) as store:
        schema = store.database.schema
    target = PgEngine(url, create=True)
    # The file's write lock is held from the first row read to the mark: nothing
    # written meanwhile could be left behind.
    src = sqlite3.connect(source, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        src.execute("BEGIN IMMEDIATE")
        with target.write() as dst:
            if POSTGRES.table_names(dst):
                raise FieldsyncError(
                    f"{target.where} is not empty: give the hub a new database of its own"
                )
            done = Moved(target.where)
            target.upgrade(dst)
            target.create_tables(dst, schema)
            for table in _hub_tables(src):
                try:
                    done.tables[table] = _copy(src, dst, table, schema)
                except psycopg.Error as exc:
                    raise FieldsyncError(
                        f"cannot copy {table} to PostgreSQL ({POSTGRES.describe(exc)}); "
                        "nothing was moved"
                    ) from None
            _set_identities(dst)
            _check(src, dst, [*done.tables, *DERIVED])
            done.seq = int(_meta(src, "seq") or 0)
        _mark_moved(src, done.target)
        src.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        raise FieldsyncError(f"cannot move {source}: {exc}") from None
    finally:
        if src.in_transaction:
            src.execute("ROLLBACK")
        src.close()
        target.close()
    done.seconds = (datetime.now(UTC) - began).total_seconds()
    return done


def _meta(conn: Conn, key: str) -> str | None:
    row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def _hub_tables(src: sqlite3.Connection) -> list[str]:
    """The source's tables to copy: the hub's own, then the mirrored ones."""
    names = [
        row[0]
        for row in src.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_fieldsync\\_%' "
            "ESCAPE '\\' ORDER BY name"
        )
    ]
    newest = src.execute(
        "SELECT source FROM _fieldsync_schemas ORDER BY version DESC LIMIT 1"
    ).fetchone()[0]
    mirrored = list(Schema.from_toml(newest, "the hub's schema").tables)
    return [n for n in names if n not in DERIVED] + mirrored


def _copy(src: sqlite3.Connection, dst: Conn, table: str, schema: Schema) -> int:
    """COPY every row of ``table`` into the target; the number of rows."""
    assert isinstance(dst, PgConn)
    spec = schema.tables.get(table)
    columns = spec.column_names if spec is not None else SQLITE.columns(src, table)
    names = ", ".join(quote(c) for c in columns)
    rows = src.execute(f"SELECT {names} FROM {quote(table)}")
    count = 0
    with dst.raw.cursor().copy(f"COPY {quote(table)} ({names}) FROM STDIN") as copy:
        for chunk in _chunks(rows):
            for row in chunk:
                copy.write_row(POSTGRES.mirror_row(spec, list(row)) if spec else row)
            count += len(chunk)
    return count


def _chunks(cursor: Iterable[Any]) -> Iterator[list[Any]]:
    it = iter(cursor)
    while True:
        chunk = [row for _, row in zip(range(CHUNK), it, strict=False)]
        if not chunk:
            return
        yield chunk


def _set_identities(dst: Conn) -> None:
    """Identity columns go on from the highest id copied (explicit ids do not move them)."""
    found = dst.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table, column in found:
        dst.execute(
            f"SELECT setval(pg_get_serial_sequence(?, ?), "
            f"coalesce((SELECT max({quote(column)}) FROM {quote(table)}), 0) + 1, false)",
            [table, column],
        )


def _fingerprint(conn: Conn, table: str, columns: list[str]) -> tuple[int, str]:
    """Rows and the sum of their SHA-256 digests (each row as JSON of its values)."""
    names = ", ".join(quote(c) for c in columns)
    where = " WHERE key <> 'layout'" if table == "_fieldsync_meta" else ""
    total = count = 0
    for row in conn.execute(f"SELECT {names} FROM {quote(table)}{where}"):
        digest = hashlib.sha256(_row_bytes(row))
        total = (total + int.from_bytes(digest.digest(), "big")) % (1 << 256)
        count += 1
    return count, f"{total:064x}"


def _row_bytes(row: Any) -> bytes:
    """A row as JSON; past what orjson writes (an integer beyond 64 bits, a Decimal
    from a jsonb number) as the json module writes it."""
    try:
        return orjson.dumps(list(row))
    except TypeError:
        return json.dumps(list(row), default=str).encode()


def _check(src: sqlite3.Connection, dst: Conn, tables: list[str]) -> None:
    """Refuse (the caller rolls back) unless every table holds the same rows on both."""
    wrong = []
    for table in tables:
        columns = SQLITE.columns(src, table)
        mine, theirs = _fingerprint(src, table, columns), _fingerprint(dst, table, columns)
        if mine != theirs:
            wrong.append(f"{table} ({mine[0]} rows here, {theirs[0]} copied)")
    if wrong:
        raise FieldsyncError(
            "the copy differs from the hub in " + ", ".join(wrong) + "; nothing was moved"
        )


def _mark_moved(src: sqlite3.Connection, target: str) -> None:
    """The source names where the hub went (hub commands refuse to open it)."""
    src.execute(
        "INSERT INTO _fieldsync_meta (key, value) VALUES (?, ?), ('moved_at', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [MOVED_TO, target, datetime.now(UTC).isoformat(timespec="seconds")],
    )
