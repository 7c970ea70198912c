"""Turning what a person typed into a column's value: one reading for CLI and dashboard."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from shared.errors import InvalidChangeError, SchemaError
from shared.schema import Schema, Scope, key_values, pk_key

CASES = Schema.load().table("cases")


@pytest.mark.parametrize(
    ("column", "text", "value"),
    [
        pytest.param("household_size", "4", 4, id="whole-number"),
        pytest.param("household_size", "-2", -2, id="negative"),
        pytest.param("household_size", "null", None, id="null-is-null"),
        pytest.param("family_name", "null", None, id="null-text-column"),
        pytest.param("family_name", '"null"', "null", id="quoted-null-is-text"),
        pytest.param("family_name", "Karimov", "Karimov", id="text-as-typed"),
        pytest.param("family_name", '"Ivanov', '"Ivanov', id="unclosed-quote-as-typed"),
        pytest.param("family_name", "42", "42", id="digits-stay-text"),
    ],
)
def test_parse_value(column: str, text: str, value: Any) -> None:
    parsed = CASES.parse_value(column, text)
    assert parsed == value and type(parsed) is type(value)
    CASES.check_value(column, parsed)  # what is parsed is what the column takes


@pytest.mark.parametrize(
    ("column", "text", "message"),
    [
        pytest.param("household_size", "four", "household_size takes whole numbers", id="word"),
        pytest.param("household_size", "4.5", "household_size takes whole numbers", id="fraction"),
    ],
)
def test_parse_value_refuses(column: str, text: str, message: str) -> None:
    with pytest.raises(InvalidChangeError, match=message) as caught:
        CASES.parse_value(column, text)
    assert text not in str(caught.value)  # messages never quote what was typed


def test_parse_value_names_unknown_column() -> None:
    with pytest.raises(KeyError):
        CASES.parse_value("no_such_column", "1")


def test_parse_value_real_column() -> None:
    assistance = Schema.load().table("assistance")
    assert assistance.parse_value("quantity", "2.5") == 2.5
    assert assistance.parse_value("quantity", "3") == 3.0
    with pytest.raises(InvalidChangeError, match="quantity takes numbers"):
        assistance.parse_value("quantity", "lots")


@pytest.mark.parametrize(
    "pk",
    [
        pytest.param({"id": "c1"}, id="text"),
        pytest.param({"id": 'a "quoted" \\ key'}, id="escapes"),
        pytest.param({"id": "Сәбит"}, id="cyrillic"),
        pytest.param({"id": 7}, id="integer"),
        pytest.param({"id": 2**70}, id="past-64-bits"),
    ],
)
def test_key_text_round_trips(pk: dict[str, Any]) -> None:
    # One key, two forms: an object on the wire, a text in both sides' tables.
    key = CASES.pk_key(pk)
    assert CASES.pk_dict(key) == pk
    assert key == pk_key(list(pk.values()))  # the fast path spells it as the encoder does


@given(st.text(st.sampled_from('ab"\\\x00\x1f\x7f\xa0é ,[]') | st.characters()))
def test_key_text_of_one_text_value_is_read_as_json_reads_it(text: str) -> None:
    # pk_dict reads the common key without a JSON parser: what it makes of any text
    # between '["' and '"]' is what JSON makes of it, or it fails as JSON does.
    key = f'["{text}"]'
    try:
        expected: Any = json.loads(key)
    except ValueError:
        expected = ValueError
    try:
        got: Any = CASES.pk_dict(key)
    except ValueError:
        got = ValueError
    if expected is not ValueError:
        expected = {"id": expected[0]} if len(expected) == 1 else ValueError
    assert got == expected


def test_key_text_is_sqlites_json_array() -> None:
    import sqlite3

    conn = sqlite3.connect(":memory:")
    for value in ("c1", 'a "b"', "Сәбит", 42):
        [(text,)] = conn.execute("SELECT json_array(?)", [value])
        assert CASES.pk_key({"id": value}) == text
        assert key_values(text) == [value]


# -- sync scopes --------------------------------------------------------------------

_PARENT = 'create = "CREATE TABLE cases (id TEXT PRIMARY KEY, office TEXT, size INTEGER)"'
_CHILD = 'create = "CREATE TABLE aid (id TEXT PRIMARY KEY, case_id TEXT, kind TEXT)"'


def test_scopes_are_read_per_table() -> None:
    schema = Schema.from_toml(
        f'[tables.cases]\n{_PARENT}\nscope = {{ column = "office" }}\n'
        f'[tables.aid]\n{_CHILD}\nscope = {{ column = "case_id", parent = "cases" }}\n'
        '[tables.kinds]\ncreate = "CREATE TABLE kinds (name TEXT PRIMARY KEY)"\n'
    )
    assert schema.scoped
    assert schema.tables["cases"].scope == Scope("office")
    assert schema.tables["aid"].scope == Scope("case_id", "cases")
    assert schema.tables["kinds"].scope is None
    shipped = Schema.load()  # as shipped, each office holds only its own cases
    assert shipped.scoped
    assert shipped.tables["cases"].scope == Scope("office")
    assert shipped.tables["assistance"].scope == Scope("case_id", "cases")


@pytest.mark.parametrize(
    ("cases_scope", "aid_scope", "message"),
    [
        ('"office"', None, "must name a column"),
        ('{ column = "nope" }', None, "names no column of cases: 'nope'"),
        ('{ column = "id" }', None, "cannot be a primary key column"),
        ('{ column = "size" }', None, "must be TEXT"),
        ('{ column = "office", other = 1 }', None, "unknown key(s) other"),
        (None, '{ column = "case_id", parent = "cases" }', "which has no scope of its own"),
        ('{ column = "office" }', '{ column = "case_id", parent = "later" }', "not a table"),
        ('{ column = "office" }', '{ column = "case_id", parent = "aid" }', "not a table"),
    ],
)
def test_a_bad_scope_is_refused_with_what_is_wrong(
    cases_scope: str | None, aid_scope: str | None, message: str
) -> None:
    text = f"[tables.cases]\n{_PARENT}\n"
    if cases_scope:
        text += f"scope = {cases_scope}\n"
    text += f"[tables.aid]\n{_CHILD}\n"
    if aid_scope:
        text += f"scope = {aid_scope}\n"
    with pytest.raises(SchemaError) as caught:
        Schema.from_toml(text)
    assert message in str(caught.value)


# -- the values a CHECK (column IN (...)) allows -----------------------------------------


def choices_of(column_sql: str, column: str = "status") -> tuple[str, ...] | None:
    """The choices of ``column`` in a table made with ``column_sql`` after its key."""
    create = f"CREATE TABLE t (\n  id TEXT PRIMARY KEY NOT NULL,\n  {column_sql}\n)"
    text = f'[tables.t]\npolicy = "merge"\ncreate = """{create}"""\n'
    return Schema.from_toml(text).table("t").choices(column)


def test_the_shipped_status_column_lists_its_values() -> None:
    assert CASES.choices("status") == ("asylum_seeker", "refugee", "rejected", "closed")
    assert CASES.choices("family_name") is None


@pytest.mark.parametrize(
    ("column_sql", "expected"),
    [
        pytest.param("status TEXT CHECK (status IN ('a', 'b'))", ("a", "b"), id="plain"),
        pytest.param("status TEXT check(status in('a','b'))", ("a", "b"), id="lower-tight"),
        pytest.param(
            "status TEXT CHECK (\n    status\n    IN (\n 'a',\n 'b' )\n)", ("a", "b"), id="lines"
        ),
        pytest.param('"status" TEXT CHECK ("status" IN (\'a\'))', ("a",), id="double-quoted"),
        pytest.param("status TEXT CHECK (`status` IN ('a'))", ("a",), id="backquoted"),
        pytest.param("status TEXT CHECK ([status] IN ('a'))", ("a",), id="bracketed"),
        pytest.param("status TEXT CHECK (STATUS IN ('a'))", ("a",), id="any-case"),
        pytest.param(
            "status TEXT CHECK (status IN ('it''s', 'b,c'))", ("it's", "b,c"), id="quotes"
        ),
        pytest.param(
            "status TEXT CHECK (status IN ('a', 'b') OR status IS NULL)", ("a", "b"), id="or-null"
        ),
        pytest.param(
            "status TEXT,\n  CONSTRAINT known CHECK (status IN ('x', 'y'))",
            ("x", "y"),
            id="table-level",
        ),
        pytest.param(
            "status TEXT -- was CHECK (status IN ('old'))\n  CHECK (status IN ('new'))",
            ("new",),
            id="comment-ignored",
        ),
        pytest.param("status TEXT CHECK (status IN ('a -- b', 'c'))", ("a -- b", "c"), id="dashes"),
    ],
)
def test_choices_read_the_check_list(column_sql: str, expected: tuple[str, ...]) -> None:
    assert choices_of(column_sql) == expected


@pytest.mark.parametrize(
    "column_sql",
    [
        pytest.param("status TEXT", id="no-check"),
        pytest.param("status TEXT CHECK (status NOT IN ('a'))", id="not-in"),
        pytest.param("status TEXT CHECK (status IN ('a') AND length(status) < 3)", id="more"),
        pytest.param("status INTEGER CHECK (status IN (1, 2))", id="numbers"),
        pytest.param(
            "status TEXT, other_status TEXT CHECK (other_status IN ('a'))", id="another-column"
        ),
        pytest.param("status TEXT CHECK (length(status) IN ('a'))", id="an-expression"),
    ],
)
def test_choices_are_none_without_a_plain_list(column_sql: str) -> None:
    assert choices_of(column_sql) is None


def test_choices_of_an_unknown_column_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        CASES.choices("no_such_column")
