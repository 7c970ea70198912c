"""Turning what a person typed into a column's value: one reading for CLI and dashboard."""

from __future__ import annotations

from typing import Any

import pytest

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
