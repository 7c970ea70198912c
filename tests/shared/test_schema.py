"""Turning what a person typed into a column's value: one reading for CLI and dashboard."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import InvalidChangeError
from shared.schema import Schema, key_values, pk_key

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
