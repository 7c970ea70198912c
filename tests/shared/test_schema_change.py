"""The plan of a schema change (shared/schema_change.py): additive or refused, and why."""

from __future__ import annotations

import re
import sqlite3

import pytest
from hypothesis import given, strategies as st

from shared.errors import SchemaError
from shared.schema import Schema
from shared.schema_change import ADD, NEW, REBUILD, SAME, migrate, normalise, plan, split_create

BASE = """
[tables.cases]
policy = "merge"
create = '''
CREATE TABLE cases (
    id TEXT PRIMARY KEY NOT NULL,  -- a UUID, (with a comma)
    name TEXT,
    status TEXT CHECK (status IN ('open', 'closed')),
    size INTEGER,
    office TEXT
) STRICT
'''
"""


def schema(text: str = BASE) -> Schema:
    return Schema.from_toml(text)


def changed(old: str, new: str) -> Schema:
    assert old in BASE
    return schema(BASE.replace(old, new))


def test_split_respects_parentheses_quotes_and_comments() -> None:
    found = split_create(
        "CREATE TABLE t (a TEXT DEFAULT 'x, y', -- c, d\n b INTEGER CHECK (b IN (1, 2)), "
        '"c, d" TEXT /* e, f */) STRICT'
    )
    assert found.parts == ("a TEXT DEFAULT 'x, y'", "b INTEGER CHECK (b IN (1, 2))", '"c, d" TEXT')
    assert found.head == "CREATE TABLE t" and found.options.strip() == "STRICT"


def test_normalise_ignores_case_and_spaces_outside_quotes() -> None:
    assert normalise("name  text\n DEFAULT 'Ab'") == normalise("NAME TEXT default 'Ab'")
    assert normalise("name TEXT DEFAULT 'Ab'") != normalise("name TEXT DEFAULT 'ab'")


def test_the_same_schema_plans_nothing() -> None:
    steps = plan(schema(), schema())
    assert steps.empty and not steps.losses and steps.tables[0].action == SAME


def test_new_columns_are_added() -> None:
    new = changed(
        "    office TEXT\n",
        "    office TEXT,\n    phone TEXT,\n    visits INTEGER NOT NULL DEFAULT 0\n",
    )
    steps = plan(schema(), new)
    table = steps.tables[0]
    assert table.action == ADD and not steps.losses
    assert table.added_columns == ("phone", "visits")
    assert table.added == ("phone TEXT", "visits INTEGER NOT NULL DEFAULT 0")
    assert steps.lines() == ["new column cases.phone", "new column cases.visits"]


def test_a_new_table_an_index_a_policy_and_a_scope_are_additive() -> None:
    text = BASE.replace('policy = "merge"', 'policy = "record"\nscope = { column = "office" }')
    text = text.replace(
        'policy = "record"',
        'policy = "record"\nindexes = ["CREATE INDEX cases_name ON cases (name)"]',
    )
    text += "\n[tables.notes]\ncreate = 'CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)'\n"
    steps = plan(schema(), schema(text))
    assert not steps.losses and steps.rescope
    assert [t.action for t in steps.tables] == [SAME, NEW]
    assert steps.tables[0].indexes == (("cases_name", "CREATE INDEX cases_name ON cases (name)"),)
    assert "cases: policy merge -> record" in steps.lines()
    assert "new table notes" in steps.lines()


def test_a_wider_check_list_rebuilds_without_loss() -> None:
    steps = plan(schema(), changed("('open', 'closed')", "('open', 'closed', 'moved')"))
    assert steps.tables[0].action == REBUILD and not steps.losses


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "    size INTEGER,\n",
            "",
            r"cases\.size is dropped or renamed .*add the new column and copy",
        ),
        ("    size INTEGER,", "    people INTEGER,", r"cases\.size is dropped or renamed"),
        ("    size INTEGER,", "    size TEXT,", r"cases\.size changes type INTEGER -> TEXT"),
        ("    name TEXT,", "    name TEXT NOT NULL,", r"cases\.name becomes NOT NULL"),
        ("('open', 'closed')", "('open')", r"cases\.status lose closed"),
        (
            "    office TEXT\n",
            "    office TEXT,\n    phone TEXT NOT NULL\n",
            r"NOT NULL without a DEFAULT",
        ),
        ("    name TEXT,", "    name TEXT DEFAULT 'x',", r"changes beyond added columns"),
        (") STRICT", ")", r"changes beyond added columns"),
    ],
)
def test_a_change_that_may_lose_data_names_it_and_what_to_do(
    old: str, new: str, message: str
) -> None:
    steps = plan(schema(), changed(old, new))
    assert steps.losses
    assert re.search(message, steps.refusal(2)), steps.refusal(2)
    assert "--allow-loss" in steps.refusal(2)


def test_a_dropped_table_is_a_loss() -> None:
    two = BASE + "\n[tables.notes]\ncreate = 'CREATE TABLE notes (id TEXT PRIMARY KEY)'\n"
    steps = plan(schema(two), schema())
    assert steps.dropped == ("notes",)
    assert "table notes is dropped" in steps.refusal(2)


def test_migrate_adds_columns_and_rebuilds_keeping_rows() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(schema().tables["cases"].create)
    conn.execute("INSERT INTO cases (id, name, status, size) VALUES ('a', 'x', 'open', 2)")
    conn.execute("CREATE INDEX mine ON cases (name)")  # the application's own
    conn.execute("CREATE VIEW open_cases AS SELECT id FROM cases WHERE status = 'open'")
    conn.execute("CREATE TRIGGER app AFTER UPDATE ON cases BEGIN SELECT 1; END")
    wider = changed("('open', 'closed')", "('open', 'closed', 'moved')")
    migrate(conn, plan(schema(), wider))
    conn.execute("UPDATE cases SET status = 'moved'")
    assert conn.execute(
        "SELECT type, name FROM sqlite_master WHERE type IN ('index', 'trigger') ORDER BY name"
    ).fetchall() == [("trigger", "app"), ("index", "mine"), ("index", "sqlite_autoindex_cases_1")]
    assert conn.execute("SELECT * FROM open_cases").fetchall() == []
    phone = changed("    office TEXT\n", "    office TEXT,\n    phone TEXT\n")
    migrate(conn, plan(schema(), phone))
    assert conn.execute("SELECT id, size, phone FROM cases").fetchall() == [("a", 2, None)]


def test_rows_that_break_a_rebuild_are_named() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(schema().tables["cases"].create)
    conn.execute("INSERT INTO cases (id, status) VALUES ('a', 'closed')")
    narrower = changed("('open', 'closed')", "('open')")
    with pytest.raises(SchemaError, match="rows of cases break the new schema"):
        migrate(conn, plan(schema(), narrower))


_NAMES = st.text(alphabet="abcdefghij", min_size=1, max_size=6).map(lambda s: "c_" + s)


@given(
    st.lists(_NAMES, min_size=1, max_size=5, unique=True),
    st.sampled_from(["TEXT", "INTEGER", "REAL", "TEXT DEFAULT 'a, (b)'"]),
)
def test_any_set_of_new_nullable_columns_is_additive(names: list[str], kind: str) -> None:
    added = "".join(f", -- new, (really)\n    {n} {kind} /* a, (b) */" for n in names)
    new = changed("    office TEXT\n", f"    office TEXT{added}\n")
    steps = plan(schema(), new)
    assert not steps.losses and steps.tables[0].action == ADD
    assert steps.tables[0].added_columns == tuple(names)
    conn = sqlite3.connect(":memory:")
    conn.execute(schema().tables["cases"].create)
    migrate(conn, steps)
    have = [row[1] for row in conn.execute("PRAGMA table_info(cases)")]
    assert have == list(new.tables["cases"].column_names)
