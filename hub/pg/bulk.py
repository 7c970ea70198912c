"""
Set-based writes of a pushed batch on PostgreSQL.

A batch of records goes to the server in one ``COPY`` into a staging table of the
connection's own (``pg_temp._fieldsync_stage``, made when the pool opens the connection), and
from there into ``_fieldsync_records`` and each mirrored table with one statement per
table: ``jsonb_populate_record`` turns the stored JSON values into the table's row
type on the server, so Python builds no row per record. History is append-only and
is copied straight into ``_fieldsync_history``.

A few records cost more round trips this way than they save, so below ``BULK`` rows
hub/records.py keeps its ``executemany``. The stage is emptied at the end of each
write, inside the caller's transaction and savepoint: a write that fails rolls back
with its staged rows, and the per-change retry of hub/ingest.py finds it empty.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import psycopg.errors

from hub.pg.ddl import pg_type
from shared.schema import Table, quote

log = logging.getLogger("fieldsync.hub")

#: Fewest rows worth a COPY and a statement per table (at 5 rows, executemany's
#: pipeline is cheaper; from about 50, the stage is).
BULK = 48

COLUMNS = ("tbl", "pk", "seq", "origin", "deleted", "vals", "vers", "scope", "parent")
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS _fieldsync_stage (tbl text NOT NULL, pk text NOT NULL, "
    "seq bigint NOT NULL, origin text, deleted bigint NOT NULL, vals text NOT NULL, "
    "vers text NOT NULL, scope text, parent text)"
)
_PUT = (
    f"INSERT INTO _fieldsync_records ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM pg_temp._fieldsync_stage "
    "ON CONFLICT (tbl, pk) DO UPDATE SET seq = excluded.seq, origin = excluded.origin, "
    "deleted = excluded.deleted, vals = excluded.vals, vers = excluded.vers, "
    "scope = excluded.scope, parent = excluded.parent"
)


#: The pooled connections that have their staging table (made when opened).
STAGED: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
_told: list[bool] = []  # the refusal, logged once per process


def make_stage(raw: psycopg.Connection[Any]) -> None:
    """Give a new pooled connection (in autocommit) its staging table, which lasts as long
    as the session; a role refused temporary tables writes every batch row by row."""
    try:
        raw.execute(_STAGE)
    except psycopg.errors.InsufficientPrivilege:
        if not _told:
            _told.append(True)
            log.warning(
                "the hub's database role may not create temporary tables: large pushes "
                "are written row by row (GRANT TEMPORARY ON DATABASE … to the role)"
            )
        return
    STAGED.add(raw)


def copy_rows(
    raw: psycopg.Connection[Any], table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """``COPY`` ``rows`` into ``columns`` of ``table``: one round trip for the lot."""
    with (
        raw.cursor() as cursor,
        cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)


def put_records(
    raw: psycopg.Connection[Any], rows: Sequence[Sequence[Any]], tables: Iterable[Table]
) -> None:
    """Store ``rows`` (hub/records.py's record rows, in :data:`COLUMNS` order) and mirror
    the live ones into ``tables`` (those of the rows)."""
    copy_rows(raw, "pg_temp._fieldsync_stage", COLUMNS, rows)
    raw.execute(_PUT)
    for table in tables:
        raw.execute(mirror_sql(table), [table.name])
    raw.execute("DELETE FROM pg_temp._fieldsync_stage")


@functools.lru_cache(maxsize=256)
def mirror_sql(table: Table) -> str:
    """Upsert of ``table``'s staged live records, their rows made by the server.

    Key columns come from the key text (a JSON array, shared.schema.pk_key), the others
    from the stored values, by name; a column the values lack is NULL, as
    shared.schema.Table.row makes it, and a JSON null is NULL whatever the type.
    """
    position = {name: i for i, name in enumerate(table.primary_key)}
    picked = []
    for column in table.columns:
        name = quote(column.name)
        kind = pg_type(column.type)
        if column.name not in position:
            if kind == "double precision":  # from the text: jsonb has no -0.0
                member = column.name.replace("'", "''")
                picked.append(f"(s.vals::json ->> '{member}')::double precision")
            else:
                picked.append(f"r.{name}")
            continue
        element = f"(s.pk::jsonb -> {position[column.name]})"
        if kind == "jsonb":
            picked.append(element)
        else:
            cast = "text" if kind.startswith("text") else kind
            picked.append(f"(s.pk::jsonb ->> {position[column.name]})::{cast}")
    columns = ", ".join(quote(c) for c in table.column_names)
    updates = ", ".join(
        f"{quote(c)} = excluded.{quote(c)}" for c in table.column_names if c not in position
    )
    target = ", ".join(quote(c) for c in table.primary_key)
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {quote(table.name)} ({columns}) SELECT {', '.join(picked)} "
        f"FROM pg_temp._fieldsync_stage AS s, jsonb_populate_record(NULL::{quote(table.name)}, "
        f"s.vals::jsonb) AS r WHERE s.tbl = %s AND s.deleted = 0 ON CONFLICT ({target}) {action}"
    )
