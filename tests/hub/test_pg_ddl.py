"""Mirrored tables on PostgreSQL (hub/pg/ddl.py): the text of the DDL, its refusals, and
every table of the default schema and of the tests' schemas created on a real server,
its values read back as written."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import errors
from psycopg.sql import SQL, Identifier

from hub.pg.ddl import JSONB, TEXT, add_column_sql, create_table_sql, index_sql, pg_type
from shared.errors import FieldsyncError, SchemaError
from shared.schema import Schema, Table

TESTS = Path(__file__).parents[1]


def table(create: str) -> Table:
    name = create.split()[2]
    return Schema.from_toml(f'[tables.{name}]\ncreate = """{create}"""').tables[name]


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("INTEGER", "bigint"),
        ("INT", "bigint"),
        ("BIGINT", "bigint"),
        ("TEXT", TEXT),
        ("VARCHAR(20)", TEXT),
        ("CLOB", TEXT),
        ("REAL", "double precision"),
        ("FLOAT", "double precision"),
        ("DOUBLE PRECISION", "double precision"),
        ("NUMERIC", JSONB),
        ("DECIMAL(10,2)", JSONB),
        ("DATE", JSONB),
        ("", JSONB),
        ("MEDIUMBLOB", JSONB),
    ],
)
def test_types_follow_sqlite_affinity(declared: str, expected: str) -> None:
    assert pg_type(declared) == expected


def test_constraints_kept_and_dropped() -> None:
    sql = create_table_sql(
        table(
            "CREATE TABLE visits (Site TEXT NOT NULL ON CONFLICT ABORT COLLATE BINARY, "
            "n INT DEFAULT -5 CHECK (n == 0 OR length(n) < 4), note TEXT DEFAULT 'it''s', "
            "at TEXT DEFAULT CURRENT_TIMESTAMP, x DEFAULT 'a', "
            "case_id TEXT REFERENCES cases (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED, "
            "CONSTRAINT key PRIMARY KEY (site, n), CONSTRAINT ok CHECK (ifnull(note, '') != 'x'), "
            "FOREIGN KEY (note) REFERENCES notes (id)) WITHOUT ROWID"
        )
    )
    assert sql == (
        'CREATE TABLE "visits" (\n'
        '    "Site" text COLLATE "C" NOT NULL,\n'
        '    "n" bigint DEFAULT -5 CHECK ("n" = 0 OR length(("n")::text) < 4),\n'
        "    \"note\" text COLLATE \"C\" DEFAULT 'it''s',\n"
        '    "at" text COLLATE "C" DEFAULT (to_char(now() AT TIME ZONE \'UTC\', '
        "'YYYY-MM-DD HH24:MI:SS')),\n"
        '    "x" jsonb DEFAULT \'"a"\'::jsonb,\n'
        '    "case_id" text COLLATE "C",\n'
        '    PRIMARY KEY ("Site", "n"),\n'
        "    CONSTRAINT \"ok\" CHECK (coalesce(\"note\", '') != 'x')\n"
        ")"
    )


def test_add_column_is_the_columns_definition() -> None:
    cases = Schema.load().tables["cases"]
    assert add_column_sql(cases, "status") == (
        'ALTER TABLE "cases" ADD COLUMN "status" text COLLATE "C" '
        "CHECK (\"status\" IN ('asylum_seeker', 'refugee', 'rejected', 'closed'))"
    )


INDEXED = Schema.from_toml(
    '[tables.t]\ncreate = "CREATE TABLE t (id TEXT PRIMARY KEY, Name TEXT, '
    'n INT CHECK (n IS NOT 0x10 OR n IS NULL))"\n'
    'indexes = ["CREATE INDEX IF NOT EXISTS t_name ON t (name COLLATE BINARY DESC, '
    'lower(name), n) WHERE n > 0", "CREATE INDEX t_n ON t(n)"]'
).tables["t"]


def test_is_compares_any_values_and_indexes_are_kept() -> None:
    assert '"n" bigint CHECK ("n" IS DISTINCT FROM 16 OR "n" IS NULL)' in create_table_sql(INDEXED)
    assert index_sql(INDEXED) == [
        'CREATE INDEX "t_name" ON "t" ("Name" DESC, (lower("Name")), "n") WHERE "n" > 0',
        'CREATE INDEX "t_n" ON "t" ("n")',
    ]


def test_an_index_with_another_collation_is_refused() -> None:
    spec = Schema.from_toml(
        '[tables.t]\ncreate = "CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)"\n'
        'indexes = ["CREATE INDEX t_v ON t (v COLLATE NOCASE)"]'
    ).tables["t"]
    with pytest.raises(SchemaError, match=r"^table t: COLLATE NOCASE in the index t_v cannot"):
        index_sql(spec)


@pytest.mark.parametrize(
    ("column", "clause", "instead"),
    [
        ("v TEXT COLLATE NOCASE", "COLLATE NOCASE on column v", "drop the COLLATE"),
        ("v TEXT DEFAULT (datetime('now'))", "the DEFAULT of column v", "write a literal"),
        ("v TEXT DEFAULT (lower('A'))", "the DEFAULT of column v", "write a literal"),
        ("v TEXT CHECK (v GLOB 'A*')", "the CHECK of column v", "GLOB is SQLite's own"),
        ("v TEXT CHECK (typeof(v) = 'text')", "the CHECK of column v", "declare the column"),
        ("v TEXT CHECK (v LIKE 'A%')", "the CHECK of column v", "ignores ASCII case"),
        ("v TEXT CHECK (instr(v, 'a') > 0)", "the CHECK of column v", "use abs()"),
        ("v CHECK (v > 0)", "the CHECK of column v", "declare its type"),
        ('v TEXT CHECK (v != "none")', "the CHECK of column v", "write '…' for text"),
        ("v INT AS (1)", "the generated column v", "writes every column"),
    ],
)
def test_refusals_name_table_and_clause(column: str, clause: str, instead: str) -> None:
    with pytest.raises(SchemaError) as refused:
        create_table_sql(table(f"CREATE TABLE t (id TEXT PRIMARY KEY, {column})"))
    message = str(refused.value)
    assert isinstance(refused.value, FieldsyncError)
    assert message.startswith(f"table t: {clause} cannot be kept on PostgreSQL (")
    assert instead in message
    assert "\n" not in message


def declared_schemas() -> dict[str, Schema]:
    """The default schema and every schema the tests declare (TOML text in a test
    module's constants or module-level values), by where found."""
    found: dict[str, Schema] = {"default": Schema.load()}
    for path in sorted(TESTS.rglob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        if "[tables." not in source or path == Path(__file__):
            continue
        texts = [
            node.value
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        module = importlib.import_module(
            ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)
        )
        texts += [
            v.source if isinstance(v, Schema) else v
            for v in vars(module).values()
            if isinstance(v, (str, Schema))
        ]
        for text in texts:
            if "[tables." not in text:
                continue
            try:
                schema = Schema.from_toml(text)
            except SchemaError:  # a fragment, or a schema the test expects refused
                continue
            if all(s.source != schema.source for s in found.values()):
                found[f"{path.relative_to(TESTS)}#{len(found)}"] = schema
    return found


# Tables of the tests' schemas that PostgreSQL cannot take, and why (one each).
REFUSED = {"people": "COLLATE NOCASE on column name"}

BIG = 2**63 - 1
TYPICAL: dict[str, list[Any]] = {  # per type, a value for each of the rows written
    TEXT: ['it\'s "quoted" ü 😀 \\ \n', "", "plain"],
    "bigint": [BIG, -(2**63), 0],
    "double precision": [0.1 + 0.2, -1e300, 2.5],
    JSONB: ["ü 'x' 😀", BIG, 2.5],
}
MILD = {TEXT: "a", "bigint": 1, "double precision": 1.0, JSONB: 1}  # under a CHECK


def _checks(spec: Table) -> str:
    """The text of ``spec``'s CHECK constraints, roughly: what follows the first CHECK."""
    return spec.create.split("CHECK", 1)[1] if "CHECK" in spec.create else ""


def rows(spec: Table) -> list[dict[str, Any]]:
    """Rows of typical values (one with every nullable column NULL), distinct keys."""
    out: list[dict[str, Any]] = []
    for index in range(4):
        row: dict[str, Any] = {}
        for col in spec.columns:
            kind = pg_type(col.type)
            choices = spec.choices(col.name)
            if index == 3 and not col.notnull and col.name not in spec.primary_key:
                row[col.name] = None
            elif choices:
                row[col.name] = choices[index % len(choices)]
            elif re.search(rf"\b{re.escape(col.name)}\b", _checks(spec)):
                # a value its CHECK takes: NULL where it may be (any CHECK passes it)
                row[col.name] = MILD[kind] if col.notnull else None
            else:
                row[col.name] = TYPICAL[kind][index % 3]
            if col.name in spec.primary_key:
                row[col.name] = f"{row[col.name]}{index}" if kind == TEXT else index - 2**62
        out.append(row)
    return out


def test_every_declared_table_is_made_and_keeps_its_values(pg_url: str) -> None:
    schemas = declared_schemas()
    assert len(schemas) > 10  # the default one, and the tests' own
    schemas["indexed"] = Schema({"t": INDEXED}, "indexed")
    refused: dict[str, str] = {}
    made = 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for number, schema in enumerate(schemas.values()):
            conn.execute(
                SQL("CREATE SCHEMA {0}; SET search_path TO {0}").format(Identifier(f"s{number}")),
                prepare=False,
            )
            for spec in schema.tables.values():
                try:
                    ddl = create_table_sql(spec)
                except SchemaError as exc:
                    refused[spec.name] = str(exc).split(" cannot be kept")[0].split(": ", 1)[1]
                    continue
                conn.execute(ddl.encode())
                for sql in index_sql(spec):
                    conn.execute(sql.encode())
                made += 1
                written = rows(spec)
                for row in written:  # as the hub will write them: from the record's JSON
                    conn.execute(
                        SQL(
                            "INSERT INTO {0} "
                            "SELECT * FROM json_populate_record(NULL::{0}, %s::json)"
                        ).format(Identifier(f"s{number}", spec.name)),
                        [orjson.dumps(row).decode()],
                    )
                keys = SQL(", ").join(map(Identifier, spec.primary_key))
                cursor = conn.execute(
                    SQL("SELECT * FROM {} ORDER BY {}").format(
                        Identifier(f"s{number}", spec.name), keys
                    )
                )
                names = [d.name for d in cursor.description or []]
                assert names == list(spec.column_names)
                got = [dict(zip(names, row, strict=True)) for row in cursor]
                order = sorted(written, key=lambda r: [r[k] for k in spec.primary_key])
                assert got == order, spec.name
                kinds = [[type(v) for v in row.values()] for row in got]
                assert kinds == [[type(v) for v in row.values()] for row in order]
    assert refused == REFUSED
    assert made > 20


def test_check_violation_is_an_integrity_error(pg_url: str) -> None:
    cases = Schema.load().tables["cases"]
    with psycopg.connect(pg_url) as conn:
        conn.execute(create_table_sql(cases).encode())
        conn.execute("INSERT INTO cases (id, status) VALUES ('a', 'refugee')")
        with pytest.raises(errors.CheckViolation) as broken:
            conn.execute("INSERT INTO cases (id, status) VALUES ('b', 'Refugee')")
        assert isinstance(broken.value, psycopg.IntegrityError)


def test_added_column_takes_its_check(pg_url: str) -> None:
    before = table("CREATE TABLE notes (id TEXT PRIMARY KEY)")
    after = table(
        "CREATE TABLE notes (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 3 CHECK (n < 5))"
    )
    with psycopg.connect(pg_url) as conn:
        conn.execute(create_table_sql(before).encode())
        conn.execute("INSERT INTO notes VALUES ('a')")
        conn.execute(add_column_sql(after, "n").encode())
        assert conn.execute("SELECT id, n FROM notes").fetchall() == [("a", 3)]
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE notes SET n = 7")
