"""``fieldsync hub export``: real hub databases (SQLite files, and PostgreSQL) filled
through the store's push.

Outputs are parsed back and compared with ``store.rows``, and between the engines byte
for byte; errors go through the real click command (CliRunner); memory is measured with
tracemalloc, never with a clock.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sqlite3
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from click.testing import CliRunner, Result

from fieldsync.cli import cli
from hub.export import export_query, export_rows, export_to_path, stream_export
from hub.pg.engine import POSTGRES
from hub.store import SqlHubStore, SqliteHubStore, open_store
from node.store import NodeStore
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.errors import FieldsyncError
from shared.protocol import Change
from shared.schema import Schema
from tests.engines import Engine, PgCluster

T0 = now_ms() << COUNTER_BITS

CASES: dict[str, dict[str, Any]] = {
    "c01": {
        "family_name": "Ålí ✓ 🙂",
        "given_name": 'Quote "x", comma',
        "notes": "line one\nline two\r\nthree",
        "household_size": 4,
        "status": "refugee",
    },
    "c02": {"family_name": "", "given_name": " ", "household_size": 0},  # '' is not NULL
    "c03": {},  # every column NULL but the key
    "c04": {"family_name": "Нурсултан", "given_name": "محمد", "household_size": 2**62},
    "c05": {"family_name": "deleted later"},
    "c06": {"family_name": "Abai", "office": "almaty"},  # the office column is user data
    "c07": {"status": "refugee"},
}

QUANTITIES = [0.1, 1 / 3, 1e-300, 2.5e300, 5, 123456789.12345679, -2.5, 0.30000000000000004]


def change(
    seq: int,
    office: str,
    tick: int,
    table: str,
    key: str,
    values: dict[str, Any] | None,
    op: str = "insert",
    base: dict[str, str] | None = None,
) -> Change:
    ts = Timestamp(T0 + tick, office)
    if values is not None and op == "insert":
        values = {"id": key, **values}
    return Change(seq, table, {"id": key}, op, ts, values, base or {})


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Iterator[SqlHubStore]:
    """A hub on each engine, open (serving) while exports read it (see :func:`push_records`)."""
    with open_store(engine.db(tmp_path)) as hub:
        push_records(hub)
        yield hub


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteHubStore]:
    """The same on a SQLite file: for what is about the file itself."""
    with SqliteHubStore(tmp_path / "hub.db") as hub:
        push_records(hub)
        yield hub


def push_records(hub: SqlHubStore) -> None:
    """Astana's and almaty's records, an edit of almaty's merged into astana's record, a
    conflict an admin resolved, a delete."""
    hub.add_node("astana")
    hub.set_scopes("astana", ["*"])
    hub.add_node("almaty")
    hub.set_scopes("almaty", ["*"])
    hub.add_node("shymkent")  # registered, never pushed
    changes = [change(i, "astana", i, "cases", k, v) for i, (k, v) in enumerate(CASES.items(), 1)]
    changes += [
        change(
            10 + i,
            "astana",
            10 + i,
            "assistance",
            f"a{i:02d}",
            {"case_id": "c01", "kind": "cash", "quantity": q},
        )
        for i, q in enumerate([*QUANTITIES, None])
    ]
    seen = {col: str(Timestamp(T0 + 5, "astana")) for col in ("id", "family_name")}
    changes.append(change(30, "astana", 30, "cases", "c05", None, op="delete", base=seen))
    hub.push("astana", changes)
    hub.push(
        "almaty",
        [
            # Office almaty's own record; its office column says astana: it is user data.
            change(1, "almaty", 40, "cases", "b01", {"family_name": "Bek", "office": "astana"}),
            # An edit merged into astana's record (not exact: origin stays empty).
            change(2, "almaty", 41, "cases", "c06", {"notes": "seen in Almaty"}, op="update"),
            # A concurrent edit of the same field: almaty wins, the conflict is logged...
            change(3, "almaty", 42, "cases", "c07", {"status": "closed"}, op="update"),
        ],
    )
    # ...and an admin keeps astana's value: the record's newest stamp is the hub's.
    (conflict,) = hub.conflicts()
    hub.resolve(conflict.id, "other", "admin")


def export(store: SqlHubStore, *args: str | Path) -> Result:
    return CliRunner().invoke(
        cli, ["hub", "export", *map(str, args), "--db", store.where], catch_exceptions=False
    )


def write_mirror(store: SqlHubStore, sql: str, *parameters: Any) -> None:
    """Another program writes the hub's mirrored table (what the hub never writes)."""
    with store.database.write() as conn:
        conn.execute(sql, parameters)


def exported(store: SqlHubStore, *args: str | Path) -> str:
    result = export(store, *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout_bytes.decode("utf-8")


def assert_one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def as_csv_field(value: Any) -> str:
    return "" if value is None else str(value)


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("table", ["cases", "assistance"])
def test_csv_round_trip(store: SqlHubStore, table: str) -> None:
    rows = read_csv(exported(store, table, "--format", "csv"))
    columns = list(store.schema.table(table).column_names)
    assert rows[0] == columns
    expected = [[as_csv_field(r[c]) for c in columns] for r in store.rows(table)]
    assert rows[1:] == expected
    assert len(expected) == (7 if table == "cases" else len(QUANTITIES) + 1)


@pytest.mark.parametrize("table", ["cases", "assistance"])
def test_json_round_trip(store: SqlHubStore, table: str) -> None:
    text = exported(store, table, "--format", "json")
    data = json.loads(text)
    assert data == store.rows(table)
    # Types survive: integers stay integers, REAL values stay floats.
    for got, want in zip(data, store.rows(table), strict=True):
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
        assert list(got) == list(store.schema.table(table).column_names)
    # An array written one object per line.
    lines = text.split("\n")
    assert lines[0] == "[" and lines[-2:] == ["]", ""]
    assert [json.loads(line.rstrip(",")) for line in lines[1:-2]] == data


def test_real_values_are_exact(store: SqlHubStore) -> None:
    stored = {r["id"]: r["quantity"] for r in store.rows("assistance")}
    assert sorted(v for v in stored.values() if v is not None) == sorted(map(float, QUANTITIES))
    rows = read_csv(exported(store, "assistance", "--format", "csv"))
    column = rows[0].index("quantity")
    for row in rows[1:]:
        value = stored[row[0]]
        assert row[column] == ("" if value is None else repr(value))
    data = json.loads(exported(store, "assistance", "--format", "json"))
    for record in data:
        value = stored[record["id"]]
        assert record["quantity"] == value and (
            value is None or repr(record["quantity"]) == repr(value)
        )
    text = exported(store, "assistance", "--format", "json")
    assert '"quantity": 0.30000000000000004' in text and '"quantity": 5.0' in text


def test_unicode_is_written_as_utf8(store: SqlHubStore) -> None:
    for fmt in ("csv", "json"):
        raw = export(store, "cases", "--format", fmt).stdout_bytes
        for text in ("Ålí ✓ 🙂", "Нурсултан", "محمد"):
            assert text.encode("utf-8") in raw
        assert b"\\u" not in raw  # no ASCII escapes


def test_nulls_and_empty_text(store: SqlHubStore) -> None:
    data = {r["id"]: r for r in json.loads(exported(store, "cases", "--format", "json"))}
    assert data["c03"]["family_name"] is None and data["c03"]["household_size"] is None
    assert data["c02"]["family_name"] == "" and data["c02"]["household_size"] == 0
    rows = {r[0]: r for r in read_csv(exported(store, "cases", "--format", "csv"))}
    assert rows["c03"][1:] == [""] * 9  # NULL: an empty field
    assert rows["c01"][-1] == "line one\nline two\r\nthree"  # quoted, kept whole


def test_deleted_records_are_not_exported(store: SqlHubStore) -> None:
    ids = [r["id"] for r in json.loads(exported(store, "cases", "--format", "json"))]
    assert ids == ["b01", "c01", "c02", "c03", "c04", "c06", "c07"]  # key order, no c05


def test_empty_table(tmp_path: Path, engine: Engine) -> None:
    hub = open_store(engine.db(tmp_path))
    try:
        assert exported(hub, "cases", "--format", "json") == "[\n]\n"
        assert json.loads(exported(hub, "cases", "--format", "json")) == []
        assert read_csv(exported(hub, "cases", "--format", "csv")) == [
            list(hub.schema.table("cases").column_names)
        ]
    finally:
        hub.close()


def test_format_is_case_insensitive(store: SqlHubStore) -> None:
    assert json.loads(exported(store, "cases", "--format", "JSON")) == store.rows("cases")


def test_both_engines_export_the_same_bytes(tmp_path: Path, pg_url: str) -> None:
    """The same pushes into a SQLite hub and a PostgreSQL hub: every export, whole or
    per office, CSV or JSON, is byte for byte the same (key order, floats, text)."""
    with SqliteHubStore(tmp_path / "hub.db") as sqlite_hub, open_store(pg_url) as pg_hub:
        for hub in (sqlite_hub, pg_hub):
            push_records(hub)
        for table in ("cases", "assistance"):
            for fmt in ("csv", "json"):
                for office in (None, "almaty", "astana", "shymkent"):
                    made = []
                    for hub in (sqlite_hub, pg_hub):
                        out = io.BytesIO()
                        export_rows(hub, table, fmt, out, office, chunk_rows=3)
                        made.append(out.getvalue())
                    assert made[0] == made[1], (table, fmt, office)
                    if office is None:
                        assert made[0].count(b"\n") > 7
        assert pg_hub.rows("assistance") == sqlite_hub.rows("assistance")


# -- the --office filter --------------------------------------------------------------


def exported_ids(store: SqlHubStore, office: str, fmt: str = "json") -> list[str]:
    text = exported(store, "cases", "--format", fmt, "--office", office)
    if fmt == "csv":
        return [row[0] for row in read_csv(text)[1:]]
    return [r["id"] for r in json.loads(text)]


def test_office_filter_takes_the_records_scope(store: SqlHubStore) -> None:
    """A record belongs to the office its scope column names, whoever changed it last."""
    # c06 is astana's record naming almaty; almaty's edit of it changes nothing.
    assert exported_ids(store, "almaty") == ["c06"]
    # b01 was made by almaty and names astana: astana's.
    assert exported_ids(store, "astana") == ["b01"]
    assert exported_ids(store, "shymkent") == []
    assert exported_ids(store, "almaty", "csv") == ["c06"]


def test_office_filter_of_a_follower_takes_its_parents_office(store: SqlHubStore) -> None:
    """Assistance follows its case: c01 names no office, so its assistance has none."""
    text = exported(store, "assistance", "--format", "json", "--office", "astana")
    assert json.loads(text) == []
    store.push("astana", [change(40, "astana", 60, "cases", "c01", {"office": "astana"}, "update")])
    text = exported(store, "assistance", "--format", "json", "--office", "astana")
    assert len(json.loads(text)) == len(QUANTITIES) + 1


def test_office_filter_and_the_unassigned_split_the_table(store: SqlHubStore) -> None:
    """Every record belongs to one office or to none: the parts make the whole table."""
    parts = {
        office: json.loads(exported(store, "cases", "--format", "json", "--office", office))
        for office in ("almaty", "astana", "shymkent")
    }
    listed = sorted((r for part in parts.values() for r in part), key=lambda r: r["id"])
    assert listed == [r for r in store.rows("cases") if r["office"] is not None]
    assert [r["office"] for r in parts["almaty"]] == ["almaty"]


def test_office_filter_of_a_table_without_a_scope(tmp_path: Path, engine: Engine) -> None:
    hub = open_store(engine.db(tmp_path), Schema.from_toml(VISITS))
    try:
        hub.add_node("astana")
        result = export(hub, "visits", "--format", "csv", "--office", "astana")
    finally:
        hub.close()
    assert_one_line_error(result, "table visits has no scope", "export the whole table")


# -- composite keys, other schemas, query plans ---------------------------------------

VISITS = '''
[tables.visits]
policy = "record"
create = """
CREATE TABLE visits (
    site TEXT NOT NULL,
    n INTEGER NOT NULL,
    note TEXT,
    score REAL,
    PRIMARY KEY (site, n)
) WITHOUT ROWID
"""

[tables.stays]
create = """
CREATE TABLE stays (site TEXT, day TEXT, nights INTEGER, PRIMARY KEY (site, day))
"""
'''


def test_composite_keys_in_key_order(tmp_path: Path, engine: Engine) -> None:
    hub = open_store(engine.db(tmp_path), Schema.from_toml(VISITS))
    try:
        hub.add_node("astana")
        hub.add_node("almaty")
        keys = [("b", 1), ("a", 10), ("a", 2), ("é", 3)]
        hub.push(
            "astana",
            [
                Change(
                    i,
                    "visits",
                    {"site": s, "n": n},
                    "insert",
                    Timestamp(T0 + i, "astana"),
                    {"site": s, "n": n, "note": f"{s}{n}", "score": n / 7},
                )
                for i, (s, n) in enumerate(keys, 1)
            ],
        )
        hub.push(
            "almaty",
            [
                Change(
                    1,
                    "visits",
                    {"site": "a", "n": 10},
                    "update",
                    Timestamp(T0 + 9, "almaty"),
                    {"note": "changed"},
                )
            ],
        )
        data = json.loads(exported(hub, "visits", "--format", "json"))
        assert data == hub.rows("visits")
        assert [(r["site"], r["n"]) for r in data] == [("a", 2), ("a", 10), ("b", 1), ("é", 3)]
        rows = read_csv(exported(hub, "visits", "--format", "csv"))
        assert [row[:2] for row in rows[:3]] == [["site", "n"], ["a", "2"], ["a", "10"]]
    finally:
        hub.close()


@pytest.mark.parametrize("office", [None, "astana"])
@pytest.mark.parametrize(
    "schema,table",
    [(None, "cases"), (None, "assistance"), (VISITS, "visits"), (VISITS, "stays")],
)
def test_query_plan_reads_in_key_order_through_indexes(
    tmp_path: Path, schema: str | None, table: str, office: str | None
) -> None:
    """No sort and no full scan of _fieldsync_records: a million rows stream."""
    hub = SqliteHubStore(tmp_path / "plan.db", Schema.from_toml(schema) if schema else None)
    try:
        if office is not None and hub.schema.table(table).scope is None:
            with pytest.raises(FieldsyncError, match="has no scope"):
                export_query(hub.schema.table(table), office)
            return
        sql, params = export_query(hub.schema.table(table), office)
        plan = [row[3] for row in hub.db.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    finally:
        hub.close()
    assert not any("TEMP B-TREE" in step for step in plan), plan
    assert plan[0].startswith("SCAN t"), plan
    if office is not None:
        assert any(
            step.startswith("SEARCH r USING INDEX") and "(tbl=? AND pk=?)" in step for step in plan
        ), plan
        assert not any(step.startswith("SCAN r") for step in plan), plan


# -- errors -------------------------------------------------------------------------


def test_unknown_table(store: SqlHubStore) -> None:
    result = export(store, "visits", "--format", "csv")
    assert_one_line_error(result, "unknown table 'visits'", "cases, assistance")


def test_unknown_office(store: SqlHubStore) -> None:
    result = export(store, "cases", "--format", "csv", "--office", "karaganda")
    assert_one_line_error(result, "unknown office 'karaganda'", "almaty, astana, shymkent")


def test_unknown_format(store: SqlHubStore, tmp_path: Path) -> None:
    result = export(store, "cases", "--format", "xml")
    assert_one_line_error(result, "unknown export format 'xml'", "csv or json")
    result = export(store, "cases", "--format", "xml", "--out", tmp_path / "out.xml")
    assert_one_line_error(result, "unknown export format 'xml'")
    assert not (tmp_path / "out.xml").exists()


def test_a_postgresql_database_that_holds_no_hub(pg_url: str) -> None:
    result = CliRunner().invoke(cli, ["hub", "export", "cases", "--format", "csv", "--db", pg_url])
    assert_one_line_error(result, "holds no hub yet")


def test_missing_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["hub", "export", "cases", "--format", "csv", "--db", str(tmp_path / "nope.db")]
    )
    assert_one_line_error(result, "nope.db does not exist")
    assert not (tmp_path / "nope.db").exists()


def test_not_a_hub_database(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE cases (id TEXT PRIMARY KEY)")
    conn.close()
    result = CliRunner().invoke(
        cli, ["hub", "export", "cases", "--format", "csv", "--db", str(other)]
    )
    assert_one_line_error(result, "is not a fieldsync hub database")
    office = NodeStore.init(tmp_path / "astana.db", "astana", "http://127.0.0.1:9", "token")
    office.close()
    result = CliRunner().invoke(
        cli, ["hub", "export", "cases", "--format", "csv", "--db", str(office.path)]
    )
    assert_one_line_error(result, "is an office database, not a hub database")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not SQLite at all" * 100)
    result = CliRunner().invoke(
        cli, ["hub", "export", "cases", "--format", "csv", "--db", str(junk)]
    )
    assert_one_line_error(result, "is not a fieldsync hub database")


def test_infinite_number_fails_json_with_the_column_named(store: SqlHubStore) -> None:
    """Another program wrote infinity into the mirrored table: JSON cannot hold it."""
    write_mirror(store, "UPDATE assistance SET quantity = ? WHERE id = 'a03'", math.inf)
    result = export(store, "assistance", "--format", "json")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: record 4 of table assistance holds an infinite number in quantity, which "
        "JSON cannot write (CSV can); the hub never stores one, so another program wrote it"
    ]
    rows = read_csv(exported(store, "assistance", "--format", "csv"))
    assert rows[4][3] == "inf"


# -- --out -------------------------------------------------------------------------


def test_out_writes_the_file_and_says_so(store: SqlHubStore, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "cases.json"
    out.parent.mkdir()
    out.write_text("an older export")
    result = export(store, "cases", "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == f"Exported 7 rows of cases to {out}\n"
    assert json.loads(out.read_text("utf-8")) == store.rows("cases")
    assert out.read_bytes() == export(store, "cases", "--format", "json").stdout_bytes
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    assert out.stat().st_mode & 0o077 == 0  # case data: readable by its owner only
    result = export(store, "cases", "--format", "csv", "--office", "almaty", "--out", out)
    assert result.stderr == f"Exported 1 row of cases to {out}\n"
    assert out.stat().st_mode & 0o077 == 0


def test_out_dash_is_stdout(store: SqlHubStore) -> None:
    assert exported(store, "cases", "--format", "csv", "--out", "-") == exported(
        store, "cases", "--format", "csv"
    )


def test_failed_export_leaves_no_file(store: SqlHubStore, tmp_path: Path) -> None:
    """A failure after rows were written leaves the old file whole and no partial one."""
    store.push(
        "astana",
        [
            change(100 + i, "astana", 100 + i, "assistance", f"z{i:04d}", {"quantity": i / 3})
            for i in range(1500)
        ],
    )
    # the last record cannot be JSON
    write_mirror(store, "UPDATE assistance SET quantity = ? WHERE id = 'z1499'", -math.inf)
    streamed = export(store, "assistance", "--format", "json")
    assert streamed.exit_code == 1
    assert streamed.stdout.count("\n") >= 1000  # the failure came mid-stream
    out = tmp_path / "out" / "assistance.json"
    out.parent.mkdir()
    result = export(store, "assistance", "--format", "json", "--out", out)
    assert_one_line_error(result, "infinite number in quantity")
    assert list(out.parent.iterdir()) == []
    out.write_text("the last good export")
    result = export(store, "assistance", "--format", "json", "--out", out)
    assert_one_line_error(result, "infinite number in quantity")
    assert out.read_text() == "the last good export"
    assert list(out.parent.iterdir()) == [out]


def test_out_refuses_the_hub_database(sqlite_store: SqliteHubStore) -> None:
    store = sqlite_store
    # Closed first: an open store's checkpoint thread may still be copying its WAL
    # into the file, which would change its bytes with no export involved.
    store.close()
    before = store.path.read_bytes()
    result = export(store, "cases", "--format", "csv", "--out", store.path)
    assert_one_line_error(result, "is the hub database")
    assert store.path.read_bytes() == before
    reopened = SqliteHubStore(store.path)
    try:
        assert reopened.rows("cases")
    finally:
        reopened.close()


def test_out_in_a_missing_directory(store: SqlHubStore, tmp_path: Path) -> None:
    result = export(store, "cases", "--format", "csv", "--out", tmp_path / "no" / "x.csv")
    assert_one_line_error(result, "directory", "does not exist")


def test_export_to_path_error_leaves_nothing(store: SqlHubStore, tmp_path: Path) -> None:
    with pytest.raises(FieldsyncError, match="unknown office"):
        export_to_path(store, "cases", "csv", tmp_path / "x.csv", office="nobody")
    assert not list(tmp_path.glob("*x.csv*"))


# -- reading a serving hub ---------------------------------------------------------


def test_export_never_writes_the_database(sqlite_store: SqliteHubStore) -> None:
    path = sqlite_store.path
    store = sqlite_store
    store.close()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for fmt in ("csv", "json"):
        for office in (None, "almaty"):
            export_rows(path, "cases", fmt, io.BytesIO(), office)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_export_reads_a_snapshot_without_blocking_the_hub(store: SqlHubStore) -> None:
    """While an export is half-way, the serving hub commits a push; the export does not
    block it and does not see it."""
    before = store.rows("cases")

    class PushingMidway(io.BytesIO):
        pushed = False

        def write(self, data: Any) -> int:
            if not self.pushed:
                self.pushed = True
                result = store.push(
                    "astana", [change(200, "astana", 200, "cases", "c99", {"notes": "new"})]
                )
                assert result.applied == 1
            return super().write(data)

    out = PushingMidway()
    assert export_rows(store, "cases", "json", out, chunk_rows=2) == len(before)
    assert out.pushed
    assert json.loads(out.getvalue()) == before
    assert [r["id"] for r in store.rows("cases")][-1] == "c99"


def test_export_to_a_text_stream_and_from_a_connection(sqlite_store: SqliteHubStore) -> None:
    store = sqlite_store
    text = io.StringIO(newline="")
    conn = sqlite3.connect(f"{store.path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        assert export_rows(conn, "cases", "csv", text) == 7
        assert not conn.in_transaction
    finally:
        conn.close()
    assert text.getvalue() == exported(store, "cases", "--format", "csv")


# -- memory --------------------------------------------------------------------------


def fill(path: Path, count: int) -> None:
    """``count`` cases straight into a hub file (push would take minutes at this size):
    the mirrored rows and their records, odd ones almaty's."""
    SqliteHubStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.executescript(
            f"""
            INSERT INTO _fieldsync_nodes (name, token_hash, created_at)
            VALUES ('astana', 'a', ''), ('almaty', 'b', '');
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
            INSERT INTO cases (id, family_name, given_name, household_size, notes, office)
            SELECT printf('c%08d', i), 'Ålí ' || i, 'Given name number ' || i, i,
                   CASE WHEN i % 3 THEN 'Some notes about the case, ' || i END, 'astana'
            FROM n;
            INSERT INTO _fieldsync_records (tbl, pk, seq, origin, deleted, vals, vers, scope)
            SELECT 'cases', json_array(id), household_size, NULL, 0, '{{}}',
                   json_object('id', printf('%016x-astana', household_size),
                               'notes', printf('%016x-%s', household_size + 1,
                               iif(household_size % 2, 'almaty', 'astana'))),
                   iif(household_size % 2, 'almaty', 'astana')
            FROM cases;
            """
        )
    conn.close()


class CountingSink:
    """A binary stream that keeps only a count, so the output costs no memory."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


BOUND = 4_000_000  # bytes of Python allocations at the peak of an export


@pytest.fixture(scope="module")
def big_hub(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Hub files of N cases, each filled once for the whole module."""
    made: dict[int, Path] = {}

    def get(count: int) -> Path:
        if count not in made:
            made[count] = tmp_path_factory.mktemp("big") / "hub.db"
            fill(made[count], count)
        return made[count]

    return get


@pytest.mark.parametrize(
    "fmt,office,count",
    # tracemalloc slows JSON encoding a lot: fewer rows there. Loading every row would
    # take 10 MB for 30,000 rows and 33 MB for 100,000 (see the test below).
    [("csv", None, 100_000), ("json", None, 30_000), ("json", "almaty", 30_000)],
)
def test_memory_stays_bounded(
    big_hub: Callable[[int], Path], fmt: str, office: str | None, count: int
) -> None:
    path = big_hub(count)
    out = CountingSink()
    tracemalloc.start()
    try:
        written = export_rows(path, "cases", fmt, out, office)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == (count if office is None else count // 2)
    assert out.size > written * 40
    assert peak < BOUND, f"peak {peak / 1e6:.1f} MB"


def test_memory_bound_would_catch_a_full_load(big_hub: Callable[[int], Path]) -> None:
    """The bound above means something: reading every row at once breaks it."""
    conn = sqlite3.connect(big_hub(30_000))
    tracemalloc.start()
    try:
        rows = conn.execute("SELECT * FROM cases ORDER BY id").fetchall()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        conn.close()
    assert len(rows) == 30_000
    assert peak > 2 * BOUND


def fill_postgres(store: SqlHubStore, count: int) -> None:
    """:func:`fill` on PostgreSQL: ``count`` cases straight into the hub's tables."""
    with store.database.write() as conn:
        conn.execute(
            "INSERT INTO _fieldsync_nodes (name, token_hash, created_at) "
            "VALUES ('astana', 'a', ''), ('almaty', 'b', '')"
        )
        conn.execute(
            "INSERT INTO cases (id, family_name, given_name, household_size, notes, office) "
            "SELECT 'c' || lpad(i::text, 8, '0'), 'Ålí ' || i, 'Given name number ' || i, i, "
            "CASE WHEN i % 3 <> 0 THEN 'Some notes about the case, ' || i END, 'astana' "
            "FROM generate_series(1, ?) AS i",
            [count],
        )
        conn.execute(
            "INSERT INTO _fieldsync_records (tbl, pk, seq, origin, deleted, vals, vers, scope) "
            "SELECT 'cases', '[\"' || id || '\"]', household_size, NULL, 0, '{}', '{}', "
            "CASE WHEN household_size % 2 = 1 THEN 'almaty' ELSE 'astana' END FROM cases"
        )


@pytest.fixture(scope="module")
def big_pg_hub(pg_cluster: PgCluster) -> Iterator[SqlHubStore]:
    """A PostgreSQL hub of 30,000 cases, filled once for the module."""
    name = pg_cluster.new_database()
    try:
        with open_store(pg_cluster.url(name)) as store:
            fill_postgres(store, 30_000)
            yield store
    finally:
        pg_cluster.drop_database(name)


@pytest.mark.parametrize("fmt,office", [("csv", None), ("json", "almaty")])
def test_memory_stays_bounded_on_postgres(
    big_pg_hub: SqlHubStore, fmt: str, office: str | None
) -> None:
    """A named (server-side) cursor: rows come a chunk at a time, never all at once."""
    out = CountingSink()
    tracemalloc.start()
    try:
        written = export_rows(big_pg_hub, "cases", fmt, out, office)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == (30_000 if office is None else 15_000)
    assert out.size > written * 40
    assert peak < BOUND, f"peak {peak / 1e6:.1f} MB"


def test_postgres_streams_in_key_order_through_indexes(big_pg_hub: SqlHubStore) -> None:
    """The per-office export's cursor: the cases' key index in order, one lookup in
    _fieldsync_records' key per row; no sort, no scan of _fieldsync_records."""
    sql, params = export_query(big_pg_hub.schema.table("cases"), "almaty", POSTGRES)
    with big_pg_hub.database.snapshot() as conn:
        plan = [row[0] for row in conn.execute(f"EXPLAIN DECLARE plan CURSOR FOR {sql}", params)]
    text = "\n".join(plan)
    assert plan[0].startswith("Index Scan using cases_pkey on cases t"), text
    assert "Index Scan using _fieldsync_records_pkey on _fieldsync_records r" in text, text
    assert "Sort" not in text and "Seq Scan" not in text, text


def test_a_postgres_stream_fetches_chunk_by_chunk(big_pg_hub: SqlHubStore) -> None:
    """A download half-read holds a named cursor and fetches a chunk per round trip (an
    ordinary cursor would have fetched every row into the client at once); closing it
    ends its snapshot."""
    url = cast(Any, big_pg_hub.database.engine).url
    sessions = (
        "SELECT state, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query <> ''"
    )
    _, chunks = stream_export(big_pg_hub, "cases", "csv", chunk_rows=100)
    try:
        read = b"".join(next(chunks) for _ in range(5))
        assert read.count(b"\r\n") >= 300
        with psycopg.connect(url, autocommit=True) as watcher:
            found = watcher.execute(sessions).fetchall()
        reading = [query for state, query in found if state == "idle in transaction"]
        assert len(reading) == 1, found
        assert reading[0].startswith('FETCH FORWARD 100 FROM "fs_stream_'), found
    finally:
        chunks.close()
    with psycopg.connect(url, autocommit=True) as watcher:
        found = watcher.execute(sessions).fetchall()
    assert all(state == "idle" for state, _ in found), found
