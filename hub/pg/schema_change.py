"""
`hub schema apply` on PostgreSQL: a plan (shared/schema_change.py) carried out there.

The plan is the same on both engines; what it asks is said in PostgreSQL's words
(hub/pg/ddl.py), inside the caller's write transaction. PostgreSQL's DDL is
transactional: a step that fails leaves nothing of any step.

- a new table: ``create_table_sql``; an added column: ``add_column_sql``; an index
  the schema declares (new or changed): ``index_sql``.
- a rebuild (a CHECK list that gains values; with ``--allow-loss``, a column dropped,
  a type changed, ...): the common columns' rows are set aside in a temporary table,
  the table is dropped and created anew under its own name (so its constraints and
  their indexes keep their usual names), the rows are copied back (a column whose
  type changed is cast), and the table's other indexes made again (one that names a
  column no longer there is left out). A row the new table refuses aborts the whole
  change with one line naming the table and the constraint (never a value).
- the backup before a lossy change (SQLite: a copy of the file): each table that
  loses data is copied, in the same transaction, to ``_fieldsync_backup_v{N}_{table}``
  (``CREATE TABLE … AS TABLE …``), dropped by hand once no longer needed.
"""

from __future__ import annotations

import itertools

import psycopg

from hub.engine import Conn
from hub.pg.ddl import JSONB, add_column_sql, create_table_sql, index_sql, pg_type
from hub.pg.engine import POSTGRES
from shared.errors import FieldsyncError, SchemaError
from shared.schema import Table, quote
from shared.schema_change import ADD, NEW, REBUILD, Plan

#: PostgreSQL cuts longer names to this many bytes.
NAME_BYTES = 63

_HOLDS = itertools.count(1)


#: How long the changes wait for a table a long read has open (a download, a report):
#: every push and pull waits behind them meanwhile, so not long.
LOCK_WAIT = "5s"


def migrate(conn: Conn, steps: Plan) -> None:
    """Carry ``steps`` out on ``conn``'s tables (in the caller's transaction), as
    shared.schema_change.migrate does on SQLite. Dropped tables are left in the
    database, no longer synced. A table held by a long read for more than LOCK_WAIT
    stops it with one line (the caller rolls back): try again."""
    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
    try:
        _migrate(conn, steps)
    except psycopg.errors.LockNotAvailable:
        raise FieldsyncError(
            f"a table to change was in use for more than {LOCK_WAIT} (a download or a "
            "report reading it?); nothing was changed: apply the schema again"
        ) from None


def _migrate(conn: Conn, steps: Plan) -> None:
    for table in steps.tables:
        spec = steps.new.tables[table.name]
        if table.action == NEW:
            if spec.name not in POSTGRES.table_names(conn):
                conn.execute(create_table_sql(spec))
        elif table.action == ADD:
            have = set(POSTGRES.columns(conn, spec.name))
            for column in table.added_columns:
                if column not in have:  # added by hand already: adopted as it is
                    conn.execute(add_column_sql(spec, column))
        elif table.action == REBUILD:
            rebuild(conn, spec, table.common)
        for name in table.dropped_indexes:
            conn.execute(f"DROP INDEX IF EXISTS {quote(name)}")
        translated = dict(zip((name for name, _ in spec.indexes), index_sql(spec), strict=True))
        for name, _ in table.indexes:
            conn.execute(f"DROP INDEX IF EXISTS {quote(name)}")
            conn.execute(translated[name])


def rebuild(conn: Conn, spec: Table, common: tuple[str, ...]) -> None:
    """Make ``spec.name`` as ``spec.create`` declares, keeping the ``common`` columns'
    values: rows set aside, table dropped and created anew, rows back; then the
    table's other indexes again."""
    table = quote(spec.name)
    create = create_table_sql(spec)  # refused here, before anything, if it cannot be said
    old_types = _types(conn, spec.name)
    indexes = [
        str(sql)
        for name, sql in conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes AS i "
            "WHERE i.schemaname = current_schema() AND i.tablename = ? "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c "
            "WHERE c.conrelid = to_regclass(quote_ident(i.tablename)) "
            "AND c.conname = i.indexname) ORDER BY i.indexname",
            [spec.name],
        )
        if not str(name).startswith("_fieldsync_")
    ]
    hold = f"_fieldsync_hold_{next(_HOLDS)}"
    columns = ", ".join(quote(c) for c in common)
    conn.execute(f"CREATE TEMP TABLE {quote(hold)} ON COMMIT DROP AS SELECT {columns} FROM {table}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(create)
    values = ", ".join(
        _cast(quote(c), old_types.get(c, ""), pg_type(spec.column(c).type)) for c in common
    )
    try:
        conn.execute(f"INSERT INTO {table} ({columns}) SELECT {values} FROM {quote(hold)}")
    except (psycopg.IntegrityError, psycopg.DataError) as exc:
        raise SchemaError(
            f"rows of {spec.name} break the new schema ({_reason(exc)}); nothing was "
            "changed: correct those rows, or the schema, and apply again"
        ) from None
    conn.execute(f"DROP TABLE {quote(hold)}")
    for sql in indexes:
        conn.execute("SAVEPOINT fs_index")
        try:
            conn.execute(sql)
        except psycopg.errors.UndefinedColumn:  # of a column no longer there
            conn.execute("ROLLBACK TO SAVEPOINT fs_index")
        conn.execute("RELEASE SAVEPOINT fs_index")


def _types(conn: Conn, table: str) -> dict[str, str]:
    """Each column of ``table`` with PostgreSQL's own name of its type."""
    return {
        str(name): str(kind)
        for name, kind in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            [table],
        )
    }


def _cast(column: str, old: str, new: str) -> str:
    """``column`` (of PostgreSQL type ``old``) as the new column's type ``new`` takes it
    (``new`` as hub/pg/ddl.py writes it; SQLite converts such values on its own)."""
    target = new.split(" COLLATE ")[0]
    if old == target:
        return column
    if target == JSONB:
        return f"to_jsonb({column})"
    if old == "jsonb":  # a number or a text inside: its text, then the type
        return f"CAST({column} #>> '{{}}' AS {target})"
    return f"CAST({column} AS {target})"


def _reason(exc: psycopg.Error) -> str:
    """What broke, without the row (its values are case data)."""
    if isinstance(exc, psycopg.DataError):
        return "a value cannot take its column's new type"
    primary = exc.diag.message_primary or type(exc).__name__
    return primary.splitlines()[0]


def backup_name(version: int, table: str) -> str:
    """The table keeping ``table``'s rows from before version ``version`` (cut to what
    PostgreSQL keeps of a name, at a character's edge)."""
    name = f"_fieldsync_backup_v{version}_{table}".encode()[:NAME_BYTES]
    return name.decode("utf-8", "ignore")


def backup_tables(conn: Conn, steps: Plan, version: int) -> list[str]:
    """Copy each table that ``steps`` may lose data of, in ``conn``'s transaction (the
    backup SQLite makes as a copy of the file); return the copies' names."""
    existing = POSTGRES.table_names(conn)
    made: list[str] = []
    for table in steps.tables:
        if not table.losses or table.name not in existing:
            continue
        name = backup_name(version, table.name)
        if name in existing:
            raise FieldsyncError(
                f"table {name} exists already (a backup of an earlier try?); drop it "
                f"(DROP TABLE {quote(name)}) or rename it, and apply again"
            )
        conn.execute(f"CREATE TABLE {quote(name)} AS TABLE {quote(table.name)}")
        made.append(name)
    return made
