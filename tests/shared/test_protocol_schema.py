"""Wire types (shared/protocol.py) and schema declarations (shared/schema.py)."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from shared.clock import Timestamp
from shared.errors import InvalidChangeError, ProtocolError, SchemaError, VersionMismatchError
from shared.protocol import (
    PROTOCOL_VERSION,
    Change,
    PullPage,
    PullRow,
    PushedChange,
    PushResult,
    Rejection,
    check_version,
    dumps,
    read_push,
)
from shared.reports import MAX_ERROR_CHARS, StatusReport, SyncEvent
from shared.schema import EXISTS, Column, Schema, pk_key

TS = Timestamp(0x18F00000000001, "astana")
BASE = {"family_name": str(Timestamp(0x18E00000000000, "almaty"))}


def wire(obj: Any) -> Any:
    """What the other side reads: the JSON text parsed back."""
    return json.loads(json.dumps(obj))


def good_change() -> dict[str, Any]:
    return {
        "seq": 7,
        "table": "cases",
        "pk": {"id": "c1"},
        "op": "update",
        "ts": TS.hlc,
        "values": {"family_name": "Ali"},
        "base": dict(BASE),
    }


# -- Change -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            Change(1, "cases", {"id": "c1"}, "insert", TS, {"id": "c1", "household_size": 3}),
            id="insert",
        ),
        pytest.param(
            Change(2, "cases", {"id": "c1"}, "update", TS, {"notes": "ünïcode ✓"}, BASE),
            id="update-with-base",
        ),
        pytest.param(Change(3, "cases", {"id": "c1"}, "delete", TS, None, BASE), id="delete"),
        pytest.param(
            Change(4, "assistance", {"id": "a1"}, "update", TS, {"quantity": 2.5, "notes": None}),
            id="float-and-null",
        ),
    ],
)
def test_change_round_trips(change: Change) -> None:
    data = wire(change.to_json())
    assert Change.from_json(data, "astana") == change
    if change.values is None:
        assert "values" not in data


def test_change_json_carries_the_stamp_without_the_node() -> None:
    data = Change(1, "cases", {"id": "c1"}, "insert", TS, {"id": "c1"}).to_json()
    assert data["ts"] == TS.hlc
    assert "astana" not in json.dumps(data)


def test_change_node_comes_from_the_reader_not_the_body() -> None:
    data = good_change()
    data["node"] = "almaty"
    change = Change.from_json(data, "astana")
    assert change.ts == Timestamp(TS.hlc, "astana")


def test_delete_ignores_values() -> None:
    data = good_change() | {"op": "delete", "values": {"family_name": "x"}}
    assert Change.from_json(data, "astana").values is None


def test_base_defaults_to_empty() -> None:
    data = good_change()
    del data["base"]
    assert Change.from_json(data, "astana").base == {}


@settings(max_examples=100)
@given(
    seq=st.integers(1, 2**62),
    hlc=st.integers(1, 2**63 - 1),
    op=st.sampled_from(["insert", "update", "delete"]),
    values=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.none(), st.integers(-(2**53), 2**53), st.text(max_size=10)),
        min_size=1,
        max_size=4,
    ),
    base_hlcs=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 2**63 - 1)),
)
def test_change_round_trip_property(
    seq: int, hlc: int, op: str, values: dict[str, Any], base_hlcs: dict[str, int]
) -> None:
    base = {col: str(Timestamp(h, "almaty")) for col, h in base_hlcs.items()}
    change = Change(
        seq,
        "cases",
        {"id": "c1"},
        op,
        Timestamp(hlc, "hq"),
        None if op == "delete" else values,
        base,
    )
    assert Change.from_json(wire(change.to_json()), "hq") == change


def _without(key: str) -> dict[str, Any]:
    data = good_change()
    del data[key]
    return data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(["not", "an", "object"], id="list"),
        pytest.param(None, id="null"),
        pytest.param("change", id="string"),
        pytest.param(_without("seq"), id="missing-seq"),
        pytest.param(_without("table"), id="missing-table"),
        pytest.param(_without("pk"), id="missing-pk"),
        pytest.param(_without("op"), id="missing-op"),
        pytest.param(_without("ts"), id="missing-ts"),
        pytest.param(_without("values"), id="update-without-values"),
        pytest.param(good_change() | {"seq": "7"}, id="seq-string"),
        pytest.param(good_change() | {"seq": True}, id="seq-bool"),
        pytest.param(good_change() | {"seq": 7.0}, id="seq-float"),
        pytest.param(good_change() | {"ts": True}, id="ts-bool"),
        pytest.param(good_change() | {"ts": 0}, id="ts-zero"),
        pytest.param(good_change() | {"ts": -5}, id="ts-negative"),
        pytest.param(good_change() | {"ts": 2**63}, id="ts-too-big"),
        pytest.param(good_change() | {"ts": "0001"}, id="ts-string"),
        pytest.param(good_change() | {"table": 3}, id="table-int"),
        pytest.param(good_change() | {"pk": "c1"}, id="pk-string"),
        pytest.param(good_change() | {"op": "upsert"}, id="op-upsert"),
        pytest.param(good_change() | {"op": "DELETE"}, id="op-case"),
        pytest.param(good_change() | {"op": None}, id="op-null"),
        pytest.param(good_change() | {"values": {}}, id="values-empty"),
        pytest.param(good_change() | {"values": ["Ali"]}, id="values-list"),
        pytest.param(good_change() | {"op": "insert", "values": None}, id="insert-null-values"),
        pytest.param(good_change() | {"base": ["x"]}, id="base-list"),
        pytest.param(good_change() | {"base": {"family_name": 5}}, id="base-version-int"),
        pytest.param(good_change() | {"base": {"family_name": "yesterday"}}, id="base-garbage"),
        pytest.param(
            good_change() | {"base": {"family_name": "0000000000000001-"}}, id="base-no-node"
        ),
        pytest.param(
            good_change() | {"base": {"family_name": "000000000000zzzz-astana"}}, id="base-not-hex"
        ),
        pytest.param(good_change() | {"base": {1: str(TS)}}, id="base-key-int"),
    ],
)
def test_change_from_json_rejects_malformed(data: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        Change.from_json(data, "astana")
    assert type(info.value) is ProtocolError
    assert str(info.value)


def test_change_error_names_the_change_and_field() -> None:
    with pytest.raises(ProtocolError, match=r"change 7: field 'ts' is missing or not an integer"):
        Change.from_json(good_change() | {"ts": True}, "astana")
    with pytest.raises(ProtocolError, match=r"op must be one of insert, update, delete"):
        Change.from_json(good_change() | {"op": "upsert"}, "astana")


# -- PushResult and PullPage --------------------------------------------------------


def test_push_result_round_trips() -> None:
    result = PushResult(acked=42, applied=3, conflicts=1, hub_time_ms=1_700_000_000_000, node="a")
    data = wire(result.to_json())
    assert data["protocol"] == PROTOCOL_VERSION
    assert PushResult.from_json(data) == result


def _page() -> PullPage:
    versions = {"id": str(TS), "family_name": str(TS)}
    return PullPage(
        rows=[
            PullRow(5, "cases", {"id": "c1"}, {"id": "c1", "family_name": "Ali"}, versions),
            PullRow(9, "cases", {"id": "c2"}, None, {EXISTS: str(TS)}),
        ],
        cursor=9,
        more=True,
        hub_time_ms=1_700_000_000_000,
        node="almaty",
    )


def test_pull_page_round_trips() -> None:
    page = _page()
    data = wire(page.to_json())
    assert data["protocol"] == PROTOCOL_VERSION
    assert "values" not in data["rows"][1]
    assert PullPage.from_json(data) == page


def test_empty_pull_page_round_trips() -> None:
    page = PullPage([], 0, False, 1, "astana")
    assert PullPage.from_json(wire(page.to_json())) == page


def _push_json(**changes: Any) -> dict[str, Any]:
    return PushResult(1, 1, 0, 1, "a").to_json() | changes


def _page_json(**changes: Any) -> dict[str, Any]:
    return _page().to_json() | changes


def _row_json(**changes: Any) -> dict[str, Any]:
    data = _page().to_json()
    data["rows"][0] |= changes
    return data


@pytest.mark.parametrize(
    ("reader", "data"),
    [
        pytest.param(PushResult.from_json, _push_json(acked=True), id="push-acked-bool"),
        pytest.param(PushResult.from_json, _push_json(acked="1"), id="push-acked-string"),
        pytest.param(PushResult.from_json, _push_json(node=None), id="push-node-null"),
        pytest.param(PushResult.from_json, [], id="push-not-object"),
        pytest.param(PullPage.from_json, _page_json(rows={}), id="page-rows-object"),
        pytest.param(PullPage.from_json, _page_json(more=1), id="page-more-int"),
        pytest.param(PullPage.from_json, _page_json(cursor=False), id="page-cursor-bool"),
        pytest.param(PullPage.from_json, _page_json(cursor="9"), id="page-cursor-string"),
        pytest.param(PullPage.from_json, _row_json(values=["x"]), id="row-values-list"),
        pytest.param(PullPage.from_json, _row_json(versions=None), id="row-versions-null"),
        pytest.param(PullPage.from_json, _row_json(seq=True), id="row-seq-bool"),
        pytest.param(PullPage.from_json, _page_json(rows=["x"]), id="row-not-object"),
        pytest.param(PullPage.from_json, "page", id="page-not-object"),
    ],
)
def test_results_reject_malformed(reader: Any, data: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        reader(data)
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize(
    "version",
    [None, 0, 1, 3, "2", True, 2.0],
    ids=["missing", "zero", "one", "three", "string", "bool", "float"],
)
@pytest.mark.parametrize("reader", [PushResult.from_json, PullPage.from_json], ids=["push", "pull"])
def test_wrong_protocol_version_raises_version_mismatch(reader: Any, version: Any) -> None:
    data = (_push_json if reader is PushResult.from_json else _page_json)()
    if version is None:
        del data["protocol"]
    else:
        data["protocol"] = version
    with pytest.raises(VersionMismatchError, match="upgrade fieldsync"):
        reader(data)


def test_check_version() -> None:
    check_version({"protocol": PROTOCOL_VERSION}, "x")
    with pytest.raises(VersionMismatchError, match="speaks protocol 9"):
        check_version({"protocol": 9}, "the push")
    with pytest.raises(ProtocolError) as info:
        check_version([1], "the push")
    assert type(info.value) is ProtocolError


# -- the quick read and the long way -------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELD_VALUES = {
    "seq": st.sampled_from([0, -1, 1, 7, 2**63 - 1, 2**63, "7", True, 7.0, None]),
    "op": st.sampled_from(["insert", "update", "delete", "upsert", None, 1]),
    "ts": st.sampled_from([0, -5, 1, TS.hlc, 2**63 - 1, 2**63, "1", True, 1.5]),
    "values": st.sampled_from([{}, {"a": 1}, {"a": None}, ["x"], None, "x"]),
    "base": st.sampled_from([{}, BASE, {"a": "yesterday"}, {"a": 5}, ["x"], None, "x"]),
    "captured": st.sampled_from([None, 0, 1, TS.hlc, -1, 2**63, "1", True, 1.0]),
}


def _push_body(changes: list[Any], **top: Any) -> bytes:
    return json.dumps({"protocol": PROTOCOL_VERSION, "changes": changes, **top}).encode()


def _the_long_way(body: bytes) -> tuple[Any, list[Change]] | str:
    data = json.loads(body)
    check_version(data, "the push")
    try:
        return data.get("node"), [Change.from_json(c, "astana") for c in data["changes"]]
    except ProtocolError as exc:
        return str(exc)


@settings(max_examples=300)
@given(
    changes=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "table": st.sampled_from(["cases", 3]),
                "pk": st.sampled_from([{"id": "c1"}, "c1"]),
                **_FIELD_VALUES,
                "extra": _JSON_VALUES,
            },
        ).map(lambda faults: good_change() | faults),
        min_size=1,
        max_size=3,
    ),
)
def test_the_quick_read_takes_only_what_the_long_way_takes(changes: list[Any]) -> None:
    # msgspec reads pushes; the long way only words refusals. Whatever msgspec takes,
    # the long way must take too, as the same changes; else the hub's answer would
    # depend on which way a push happened to be read.
    body = _push_body(changes)
    quick = read_push(body, "astana")
    if quick is not None:
        assert _the_long_way(body) == quick


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            good_change() | {"ts": True},
            "change 7: field 'ts' is missing or not an integer",
            id="ts-bool",
        ),
        pytest.param(
            good_change() | {"seq": 0},
            "change 0: seq must be a positive 64-bit integer",
            id="seq-zero",
        ),
        pytest.param(
            good_change() | {"op": "upsert"},
            "change 7: op must be one of insert, update, delete, got 'upsert'",
            id="op",
        ),
        pytest.param(
            good_change() | {"values": {}},
            "change 7: an update needs a non-empty 'values' object",
            id="values",
        ),
        pytest.param(
            good_change() | {"base": {"a": "x"}},
            "change 7: base has invalid timestamp 'x'",
            id="base",
        ),
    ],
)
def test_a_push_the_quick_read_refuses_is_worded_the_long_way(change: Any, message: str) -> None:
    body = _push_body([change])
    assert read_push(body, "astana") is None
    assert _the_long_way(body) == message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"changes": []}, id="no-version"),
        pytest.param({"protocol": 1, "changes": []}, id="version-1"),
        pytest.param({"protocol": PROTOCOL_VERSION, "changes": [], "node": 5}, id="node-not-text"),
        pytest.param({"protocol": PROTOCOL_VERSION}, id="no-changes"),
    ],
)
def test_the_quick_read_leaves_a_malformed_push_to_the_long_way(body: Any) -> None:
    assert read_push(json.dumps(body).encode(), "astana") is None


def test_the_quick_read_takes_the_node_named() -> None:
    body = _push_body([good_change()], node="astana")
    assert read_push(body, "astana") == ("astana", [Change.from_json(good_change(), "astana")])


_SAMPLES = [
    PushResult(1, 1, 0, 5, "a", [Rejection(3, "why", _page().rows[0]), Rejection(4, "gone")]),
    _page(),
    PullPage([], 0, False, 1, "astana", acked=4, remaining=0),
    StatusReport(
        4,
        "2026-12-01T10:00:00",
        1,
        -5,
        "0.1.0",
        60.0,
        "cut",
        "hub_unavailable",
        "2026-12-01T10:00:00",
        [SyncEvent(3, "2026-12-01T10:00:00+00:00", 0.5, "error", 1, 2, 0, 0, 10, 20, "cut", "x")],
    ),
]


@pytest.mark.parametrize("message", _SAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_writes_what_its_struct_declares(message: Any) -> None:
    # to_json writes the bytes (see shared.protocol); its type's declaration reads them
    # back whole, so the two cannot drift apart.
    data = message.to_json()
    assert type(message).from_json(dumps(data)) == message
    assert type(message).from_json(wire(data)) == message
    declared = set(type(message).__struct_fields__)
    assert set(data) - {"protocol"} <= declared
    assert data["protocol"] == PROTOCOL_VERSION


def test_a_change_writes_what_a_pushed_change_declares() -> None:
    change = Change(2, "cases", {"id": "c1"}, "update", TS, {"notes": "x"}, BASE, TS.hlc - 1)
    data = change.to_json()
    assert set(data) == set(PushedChange.__struct_fields__)
    assert msgspec.convert(data, PushedChange).ts == TS.hlc


def test_a_pulled_row_without_versions_is_refused() -> None:
    data = _page().to_json()
    del data["rows"][0]["versions"]
    with pytest.raises(ProtocolError, match="row 5 has no 'versions'"):
        PullPage.from_json(data)


def test_a_status_report_is_cut_to_size_when_read() -> None:
    report = _SAMPLES[-1]
    assert isinstance(report, StatusReport)
    long = StatusReport.from_json(
        report.to_json()
        | {"last_error": "x" * 5000, "version": "9" * 99}
        | {"events": [report.events[0].to_json() | {"error": "y" * 5000}]}
    )
    assert long.last_error == "x" * MAX_ERROR_CHARS and long.version == "9" * 40
    assert long.events[0].error == "y" * MAX_ERROR_CHARS


# -- Schema -------------------------------------------------------------------------


def test_default_schema_has_cases_and_assistance() -> None:
    schema = Schema.load()
    assert list(schema.tables) == ["cases", "assistance"]
    for name in ("cases", "assistance"):
        table = schema.table(name)
        assert table.primary_key == ("id",)
        assert table.policy == "merge"
    cases = schema.table("cases")
    assert cases.column_names[:3] == ("id", "case_number", "family_name")
    assert cases.column("household_size") == Column("household_size", "INTEGER", False)
    assert cases.column("id").notnull is True
    assert schema.table("assistance").column("quantity").type == "REAL"


def test_default_schema_is_stable_text() -> None:
    a, b = Schema.load(), Schema.load()
    assert a.source == b.source
    assert Schema.from_toml(a.source).tables == a.tables


def test_unknown_table_is_invalid_change() -> None:
    schema = Schema.load()
    with pytest.raises(InvalidChangeError, match="unknown table 'people'.*cases, assistance"):
        schema.table("people")
    with pytest.raises(InvalidChangeError):
        schema.table(None)


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    path.write_text(
        '[tables.visits]\npolicy = "record"\n'
        'create = "CREATE TABLE visits (office TEXT, day TEXT, n INT, '
        'PRIMARY KEY (day, office)) WITHOUT ROWID"\n',
        encoding="utf-8",
    )
    schema = Schema.load(path)
    visits = schema.table("visits")
    assert visits.policy == "record"
    assert visits.primary_key == ("day", "office")  # in key order, not column order
    assert visits.pk_key({"office": "astana", "day": "2024-01-02"}) == '["2024-01-02","astana"]'


def test_policy_defaults_to_merge_and_integer_key_without_rowid() -> None:
    schema = Schema.from_toml(
        '[tables.t]\ncreate = "CREATE TABLE t (n INTEGER PRIMARY KEY, label TEXT) WITHOUT ROWID"\n'
    )
    assert schema.table("t").policy == "merge"
    assert schema.table("t").primary_key == ("n",)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="cannot read schema file"):
        Schema.load(tmp_path / "nope.toml")


def _toml(create: str, policy: str = "merge", name: str = "t") -> str:
    return f'[tables.{name}]\npolicy = "{policy}"\ncreate = """{create}"""\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(_toml("CREATE TABLE t (a TEXT, b TEXT)"), "no primary key", id="no-pk"),
        pytest.param(
            _toml("CREATE TABLE t (a TEXT PRIMARY KEY)", policy="newest"),
            "unknown policy 'newest'",
            id="bad-policy",
        ),
        pytest.param(_toml("CREATE TABEL t (a TEXT)"), "cannot create table t", id="bad-sql"),
        pytest.param(
            _toml("CREATE TABLE t (a TEXT PRIMARY KEY, photo BLOB)"),
            "column t.photo cannot be synced",
            id="blob-column",
        ),
        pytest.param(
            _toml("CREATE TABLE t (a TEXT PRIMARY KEY, photo blob)"),
            "column t.photo cannot be synced",
            id="blob-lowercase",
        ),
        pytest.param(
            _toml('CREATE TABLE t (a TEXT PRIMARY KEY, "~" TEXT)'),
            "cannot be synced",
            id="tilde-column",
        ),
        pytest.param(
            _toml('CREATE TABLE t (a TEXT PRIMARY KEY, "q""x" TEXT)'),
            "cannot be synced",
            id="quote-in-column-name",
        ),
        pytest.param(
            _toml("CREATE TABLE t (a REAL PRIMARY KEY)"),
            "must be TEXT or INTEGER",
            id="real-primary-key",
        ),
        pytest.param(
            _toml("CREATE TABLE other (a TEXT PRIMARY KEY)"),
            "does not create a table t",
            id="creates-another-table",
        ),
        pytest.param(
            _toml("CREATE TABLE _fieldsync_x (a TEXT PRIMARY KEY)", name="_fieldsync_x"),
            "reserved",
            id="reserved-name",
        ),
        pytest.param("[tables.t]\npolicy = 'merge'\n", "needs a 'create'", id="no-create"),
        pytest.param("[tables]\n", "declares no", id="no-tables"),
        pytest.param("title = 'x'\n", "declares no", id="no-tables-key"),
        pytest.param("[tables.t\n", "cannot read", id="bad-toml"),
    ],
)
def test_from_toml_errors(text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Schema.from_toml(text)


# -- Table.check_value and check_pk -------------------------------------------------

CHECK_SCHEMA = Schema.from_toml(
    _toml(
        "CREATE TABLE t (id TEXT PRIMARY KEY, name TEXT, n INTEGER, i INT, x REAL, "
        "f FLOAT, num NUMERIC, anything)"
    )
)
T = CHECK_SCHEMA.table("t")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("name", "Ali", id="text-str"),
        pytest.param("name", "", id="text-empty"),
        pytest.param("name", None, id="text-null"),
        pytest.param("n", 3, id="integer-int"),
        pytest.param("n", -(2**62), id="integer-negative"),
        pytest.param("n", None, id="integer-null"),
        pytest.param("i", 3, id="int-int"),
        pytest.param("x", 2.5, id="real-float"),
        pytest.param("x", 2, id="real-int"),
        pytest.param("f", 1.0, id="float-float"),
        pytest.param("num", 7, id="numeric-int"),
        pytest.param("anything", "s", id="untyped-str"),
        pytest.param("anything", 1, id="untyped-int"),
        pytest.param("anything", 1.5, id="untyped-float"),
    ],
)
def test_check_value_accepts(column: str, value: Any) -> None:
    T.check_value(column, value)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("name", 3, id="text-int"),
        pytest.param("name", True, id="text-bool"),
        pytest.param("n", "three", id="integer-str"),
        pytest.param("n", 3.0, id="integer-float"),
        pytest.param("n", True, id="integer-bool"),
        pytest.param("i", "3", id="int-str"),
        pytest.param("x", "2.5", id="real-str"),
        pytest.param("x", False, id="real-bool"),
        pytest.param("anything", True, id="untyped-bool"),
        pytest.param("anything", {"a": 1}, id="untyped-object"),
        pytest.param("anything", [1], id="untyped-list"),
        pytest.param("name", ["Ali"], id="text-list"),
        pytest.param("name", b"Ali", id="text-bytes"),
    ],
)
def test_check_value_rejects(column: str, value: Any) -> None:
    with pytest.raises(InvalidChangeError, match=f"column t.{column} holds"):
        T.check_value(column, value)


def test_check_value_unknown_column_lists_the_columns() -> None:
    with pytest.raises(
        InvalidChangeError, match="table t has no column 'nmae'; its columns are id"
    ):
        T.check_value("nmae", "x")


def test_check_pk() -> None:
    assert T.check_pk({"id": "c1"}) == {"id": "c1"}
    for bad in ({}, {"id": "c1", "name": "x"}, {"name": "x"}, ["c1"], "c1"):
        with pytest.raises(InvalidChangeError, match="primary key of t must name exactly id"):
            T.check_pk(bad)
    with pytest.raises(InvalidChangeError, match="is null"):
        T.check_pk({"id": None})
    with pytest.raises(InvalidChangeError, match="holds TEXT"):
        T.check_pk({"id": 5})


def test_pk_key_is_compact_json_like_sqlite() -> None:
    assert pk_key(["c1"]) == '["c1"]'
    assert pk_key(["Алматы", 3]) == '["Алматы",3]'
    assert T.pk_key({"id": "c1"}) == '["c1"]'


def test_column_lookup() -> None:
    assert T.column("x") == Column("x", "REAL", False)
    with pytest.raises(KeyError):
        T.column("missing")


def test_wire_types_are_frozen() -> None:
    change = Change(1, "cases", {"id": "c1"}, "insert", TS, {"id": "c1"})
    with pytest.raises(AttributeError):
        change.seq = 2  # type: ignore[misc]
    assert copy.copy(change) == change


@settings(max_examples=150)
@given(
    st.lists(
        st.one_of(st.text(max_size=12), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=3
    )
)
def test_pk_key_matches_sqlite_json_array(values: list[Any]) -> None:
    # The node's triggers key records with json_array(); the hub keys them with pk_key.
    conn = sqlite3.connect(":memory:")
    try:
        marks = ", ".join("?" for _ in values)
        [sqlite_text] = conn.execute(f"SELECT json_array({marks})", values).fetchone()
    finally:
        conn.close()
    assert pk_key(values) == sqlite_text


def test_custom_policy_is_accepted_and_its_function_loads() -> None:
    from shared.schema import load_custom

    schema = Schema.from_toml(
        _toml("CREATE TABLE t (a TEXT PRIMARY KEY)", policy="custom:tests.custom_merge:broken")
    )
    assert schema.tables["t"].policy == "custom:tests.custom_merge:broken"
    assert load_custom(schema.tables["t"].policy).__name__ == "broken"


@pytest.mark.parametrize(
    "policy",
    ["custom:tests.custom_merge:missing", "custom:no_such_module_here:f"],
)
def test_custom_policy_that_cannot_load_is_a_schema_error(policy: str) -> None:
    from shared.schema import load_custom

    with pytest.raises(SchemaError, match="cannot load"):
        load_custom(policy)


def test_malformed_custom_policy_is_refused() -> None:
    with pytest.raises(SchemaError, match="unknown policy"):
        Schema.from_toml(_toml("CREATE TABLE t (a TEXT PRIMARY KEY)", policy="custom:nodots"))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        pytest.param("x", float("inf"), "only finite numbers", id="infinity"),
        pytest.param("x", float("nan"), "only finite numbers", id="nan"),
        pytest.param("n", 2**63, "64 bits", id="int-too-big"),
        pytest.param("n", -(2**63) - 1, "64 bits", id="int-too-small"),
    ],
)
def test_check_value_rejects_what_sqlite_or_json_cannot_hold(
    column: str, value: Any, message: str
) -> None:
    with pytest.raises(InvalidChangeError, match=message):
        T.check_value(column, value)


def test_auto_numbered_integer_keys_are_refused() -> None:
    with pytest.raises(SchemaError, match="INTEGER PRIMARY KEY"):
        Schema.from_toml(_toml("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)"))
    # Integer keys an office assigns itself are fine in a table WITHOUT ROWID.
    schema = Schema.from_toml(
        _toml("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT) WITHOUT ROWID")
    )
    assert schema.tables["t"].primary_key == ("id",)


def test_versions_of_a_record_written_once_are_stored_as_one_stamp() -> None:
    table = Schema.load().table("cases")
    stamp = str(Timestamp(0x19ABCDEF0000 << 16 | 3, "astana"))
    once = dict.fromkeys(table.column_names, stamp)
    packed = table.pack_versions(once)
    assert json.loads(packed) == stamp
    assert table.unpack_versions(packed) == once
    # Anything else keeps every column's stamp, and reads back the same.
    other = str(Timestamp(0x19ABCDEF0000 << 16 | 4, "almaty"))
    for versions in (
        {**once, "status": other},  # one column written later
        {**once, EXISTS: stamp},  # existence versioned (a re-insert or delete)
        {name: stamp for name in table.column_names[:-1]},  # a column never written
        {},
    ):
        packed = table.pack_versions(versions)
        assert json.loads(packed) == versions
        assert table.unpack_versions(packed) == versions
    # The form stored by earlier versions (always the object) still reads.
    assert table.unpack_versions(json.dumps(once)) == once
    # Either form, as a pulled row carries it, column by column.
    assert table.expand_versions(stamp) == once
    assert table.expand_versions({"status": other}) == {"status": other}


def test_pulled_row_versions_may_be_packed_into_one_stamp() -> None:
    stamp = str(Timestamp(5 << 16, "astana"))
    row = PullRow(1, "cases", {"id": "c1"}, {"id": "c1"}, stamp)
    assert PullRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    for bad in (5, None, ["x"]):
        with pytest.raises(ProtocolError):
            PullRow.from_json({**row.to_json(), "versions": bad})
