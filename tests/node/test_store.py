"""NodeStore on real SQLite files: capture by triggers, pulls without echo, push bookkeeping."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from msgspec.structs import replace

from node import inbox
from node.outbox import ROWS_PER_WRITE, kept_changes
from node.store import NodeStore, trigger_sql
from shared.clock import COUNTER_BITS, Timestamp
from shared.errors import ProtocolError, StoreError
from shared.protocol import PullPage, PullRow, Rejection
from shared.schema import EXISTS, Schema
from shared.sqlite import write

HUB_URL = "http://127.0.0.1:9"
CASE_COLUMNS = Schema.load().table("cases").column_names


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "astana.db"


@pytest.fixture
def store(path: Path) -> Iterator[NodeStore]:
    node = NodeStore.init(path, "astana", HUB_URL, "tok")
    try:
        yield node
    finally:
        node.close()


@contextlib.contextmanager
def plain(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of the python sqlite3 module, as any program would open it."""
    conn = sqlite3.connect(path)
    try:
        with conn:  # commit on success, roll back on error
            yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def utils_db(path: Path) -> Iterator[sqlite_utils.Database]:
    db = sqlite_utils.Database(path)
    try:
        yield db
    finally:
        db.close()


def shell(path: Path, sql: str) -> None:
    """Run SQL through the sqlite3 command-line shell."""
    exe = shutil.which("sqlite3")
    if exe is None:
        pytest.skip("the sqlite3 command-line shell is not installed")
    subprocess.run([exe, str(path)], input=sql, text=True, check=True, timeout=30)


def log(store: NodeStore) -> list[dict[str, Any]]:
    """The pending part of the change log, oldest first, with keys and values decoded.

    Inserts log no values (a push reads them from the record, see ``pending``).
    """
    rows = store.db.conn.execute(
        "SELECT seq, tbl, pk, op, hlc, vals FROM _fieldsync_changes "
        "WHERE seq > (SELECT acked_seq FROM _fieldsync_state) ORDER BY seq"
    ).fetchall()
    return [
        {
            "seq": seq,
            "table": tbl,
            "pk": json.loads(pk),
            "op": op,
            "hlc": hlc,
            "values": json.loads(vals) if vals is not None else None,
        }
        for seq, tbl, pk, op, hlc, vals in rows
    ]


def ops(store: NodeStore) -> list[tuple[str, str, list[Any], dict[str, Any] | None]]:
    return [(c["table"], c["op"], c["pk"], c["values"]) for c in log(store)]


def full(**values: Any) -> dict[str, Any]:
    """A whole cases row as the insert trigger logs it: every column, nulls included."""
    return {c: values.get(c) for c in CASE_COLUMNS}


def versions(store: NodeStore, table: str, pk: list[Any]) -> dict[str, str] | None:
    row = store.db.conn.execute(
        "SELECT vers FROM _fieldsync_versions WHERE tbl = ? AND pk = ?", [table, json.dumps(pk)]
    ).fetchone()
    return store.schema.table(table).unpack_versions(row[0]) if row else None


def now_hlc() -> int:
    return (time.time_ns() // 1_000_000) << COUNTER_BITS


# -- init ---------------------------------------------------------------------------


def test_init_creates_tables_state_and_triggers(store: NodeStore, path: Path) -> None:
    assert (store.node, store.hub_url, store.token) == ("astana", HUB_URL, "tok")
    assert list(store.schema.tables) == ["cases", "assistance"]
    names = {
        row[0]
        for row in store.db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    }
    assert {"_fieldsync_cases_insert", "_fieldsync_assistance_delete"} <= names
    assert store.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.pending_count() == 0
    assert store.cursor == 0
    reopened = NodeStore(path)
    try:
        assert reopened.node == "astana"
        assert reopened.schema.tables == store.schema.tables
    finally:
        reopened.close()


def test_init_strips_trailing_slash(tmp_path: Path) -> None:
    node = NodeStore.init(tmp_path / "x.db", "x", "http://hub:8000/", "t")
    try:
        assert node.hub_url == "http://hub:8000"
    finally:
        node.close()


def test_init_twice_refuses(store: NodeStore, path: Path) -> None:
    with pytest.raises(StoreError, match="already a fieldsync office database"):
        NodeStore.init(path, "astana", HUB_URL, "tok")


def test_init_rejects_bad_office_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid office name"):
        NodeStore.init(tmp_path / "x.db", "no spaces", HUB_URL, "tok")
    assert not (tmp_path / "x.db").exists()


def test_open_missing_or_foreign_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        NodeStore(tmp_path / "missing.db")
    foreign = tmp_path / "foreign.db"
    with plain(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a fieldsync office database"):
        NodeStore(foreign)


def test_rows_existing_before_init_are_backfilled_as_inserts(path: Path) -> None:
    schema = Schema.load()
    with plain(path) as conn:
        conn.execute(schema.table("cases").create)
        conn.execute(schema.table("assistance").create)
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali'), ('c2', 'Bek')")
        conn.execute("INSERT INTO assistance (id, case_id, quantity) VALUES ('a1', 'c1', 2.5)")
    node = NodeStore.init(path, "astana", HUB_URL, "tok")
    try:
        assert sorted(ops(node), key=lambda c: (c[0], c[2])) == [
            (
                "assistance",
                "insert",
                ["a1"],
                {
                    "id": "a1",
                    "case_id": "c1",
                    "kind": None,
                    "quantity": 2.5,
                    "delivered_on": None,
                    "office": None,
                    "notes": None,
                },
            ),
            ("cases", "insert", ["c1"], full(id="c1", family_name="Ali")),
            ("cases", "insert", ["c2"], full(id="c2", family_name="Bek")),
        ]
        assert node.rows("cases")[0]["family_name"] == "Ali"
        assert [c.op for c in node.pending(10)] == ["insert"] * 3
    finally:
        node.close()


def test_init_refuses_an_existing_table_missing_columns(path: Path) -> None:
    with plain(path) as conn:
        conn.execute("CREATE TABLE cases (id TEXT PRIMARY KEY)")
    with pytest.raises(StoreError, match="lacks column"):
        NodeStore.init(path, "astana", HUB_URL, "tok")


# -- capture ------------------------------------------------------------------------


def test_python_sqlite3_writes_are_captured(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name, household_size) VALUES ('c1', 'Ali', 3)")
    with plain(path) as conn:
        conn.execute("UPDATE cases SET household_size = 4 WHERE id = 'c1'")
    with plain(path) as conn:
        conn.execute("DELETE FROM cases WHERE id = 'c1'")
    assert ops(store) == [
        ("cases", "insert", ["c1"], None),
        ("cases", "update", ["c1"], {"household_size": 4}),
        # a delete logs the record as it was (its queued insert logged nothing)
        ("cases", "delete", ["c1"], full(id="c1", family_name="Ali", household_size=4)),
    ]
    # the insert travels with the record as it was when deleted
    assert [(c.op, c.values) for c in store.pending(10)] == [
        ("insert", full(id="c1", family_name="Ali", household_size=4)),
        ("update", {"household_size": 4}),
        ("delete", None),
    ]
    assert store.rows("cases") == []


def test_sqlite_utils_writes_are_captured(store: NodeStore, path: Path) -> None:
    with utils_db(path) as db:
        cases = db["cases"]
        cases.insert({"id": "c1", "family_name": "Ali", "status": "refugee"})
        cases.update("c1", {"notes": "visited"})
        cases.upsert({"id": "c1", "status": "closed"}, pk="id")
        cases.upsert({"id": "c2", "family_name": "Bek"}, pk="id")
        cases.delete("c1")
    assert ops(store) == [
        ("cases", "insert", ["c1"], None),
        ("cases", "update", ["c1"], {"notes": "visited"}),
        ("cases", "update", ["c1"], {"status": "closed"}),
        ("cases", "insert", ["c2"], None),
        (
            "cases",
            "delete",
            ["c1"],
            full(id="c1", family_name="Ali", status="closed", notes="visited"),
        ),
    ]
    assert [r["id"] for r in store.rows("cases")] == ["c2"]


def test_replace_is_captured_as_the_whole_new_row(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name, notes) VALUES ('c1', 'A', 'n')")
        # without recursive triggers, REPLACE fires only the insert trigger
        conn.execute("INSERT OR REPLACE INTO cases (id, family_name) VALUES ('c1', 'B')")
    with utils_db(path) as db:
        # sqlite-utils turns recursive triggers on: the replaced row is logged deleted
        db["cases"].insert({"id": "c1", "family_name": "C"}, replace=True)
    assert ops(store)[1:] == [
        ("cases", "insert", ["c1"], None),
        ("cases", "delete", ["c1"], full(id="c1", family_name="B")),
        ("cases", "insert", ["c1"], None),
    ]
    assert store.rows("cases") == [full(id="c1", family_name="C")]


def test_sqlite3_shell_writes_are_captured(store: NodeStore, path: Path) -> None:
    shell(
        path,
        "INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali');\n"
        "INSERT INTO assistance (id, case_id, kind, quantity) VALUES ('a1', 'c1', 'food', 2);\n"
        "UPDATE cases SET given_name = 'Olga', family_name = 'Ali' WHERE id = 'c1';\n"
        "DELETE FROM assistance WHERE id = 'a1';\n",
    )
    assert [(t, op, pk) for t, op, pk, _ in ops(store)] == [
        ("cases", "insert", ["c1"]),
        ("assistance", "insert", ["a1"]),
        ("cases", "update", ["c1"]),
        ("assistance", "delete", ["a1"]),
    ]
    changes = log(store)
    assert changes[2]["values"] == {"given_name": "Olga"}


def test_a_push_carries_inserted_records_as_they_are_then(store: NodeStore, path: Path) -> None:
    shell(
        path,
        "INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali');\n"
        "INSERT INTO assistance (id, case_id, kind, quantity) VALUES ('a1', 'c1', 'food', 2);\n"
        "UPDATE cases SET given_name = 'Olga' WHERE id = 'c1';\n",
    )
    changes = store.pending(10)
    assert [(c.op, c.values) for c in changes] == [
        ("insert", full(id="c1", family_name="Ali", given_name="Olga")),
        (
            "insert",
            {
                "id": "a1",
                "case_id": "c1",
                "kind": "food",
                "quantity": 2.0,
                "delivered_on": None,
                "office": None,
                "notes": None,
            },
        ),
        ("update", {"given_name": "Olga"}),
    ]
    assert type(changes[1].values["quantity"]) is float  # REAL affinity, read back exactly
    # each column's base follows the changes before it in the queue
    assert changes[2].base["given_name"] == str(changes[0].ts)


def test_sqlite3_shell_rollback_logs_nothing(store: NodeStore, path: Path) -> None:
    shell(
        path,
        "BEGIN;\nINSERT INTO cases (id) VALUES ('c1');\nDELETE FROM cases;\nROLLBACK;\n",
    )
    assert log(store) == []
    assert store.rows("cases") == []


def test_update_logs_only_the_changed_columns(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute(
            "INSERT INTO cases (id, family_name, status, notes) "
            "VALUES ('c1', 'Ali', 'refugee', 'n')"
        )
        conn.execute(
            "UPDATE cases SET family_name = 'Ali', status = 'closed', notes = NULL WHERE id = 'c1'"
        )
    assert log(store)[1]["op"] == "update"
    assert log(store)[1]["values"] == {"status": "closed", "notes": None}


def test_update_of_a_column_with_an_awkward_name(tmp_path: Path) -> None:
    create = (
        'CREATE TABLE "odd table" ("the id" TEXT PRIMARY KEY, '
        '"it\'s" TEXT, "a.b" TEXT, "n" INTEGER)'
    )
    schema = Schema.from_toml(f'[tables."odd table"]\ncreate = {json.dumps(create)}\n')
    node = NodeStore.init(tmp_path / "odd.db", "astana", HUB_URL, "tok", schema)
    try:
        with plain(node.path) as conn:
            conn.execute(
                'INSERT INTO "odd table" ("the id", "it\'s", "a.b", n) VALUES (\'k\', 1, 2, 3)'
            )
            conn.execute('UPDATE "odd table" SET "a.b" = \'z\' WHERE "the id" = \'k\'')
            conn.execute('UPDATE "odd table" SET "it\'s" = \'4\' WHERE "the id" = \'k\'')
        assert [c.values for c in node.pending(10)][0] == {
            "the id": "k",
            "it's": "4",
            "a.b": "z",
            "n": 3,
        }
        assert [c["values"] for c in log(node)] == [
            None,
            {"a.b": "z"},
            {"it's": "4"},
        ]
    finally:
        node.close()


def test_noop_update_logs_nothing(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali')")
        conn.execute("UPDATE cases SET family_name = family_name, notes = NULL")
        conn.execute("UPDATE cases SET family_name = 'Ali' WHERE id = 'c1'")
        conn.execute("UPDATE cases SET notes = 'x' WHERE id = 'nobody'")
    assert [c["op"] for c in log(store)] == ["insert"]


def test_rolled_back_transaction_logs_nothing(store: NodeStore, path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali')")
        conn.execute("UPDATE cases SET family_name = 'Bek'")
        assert conn.execute("SELECT count(*) FROM _fieldsync_changes").fetchone()[0] == 2
        conn.rollback()
    finally:
        conn.close()
    assert log(store) == []
    assert store.rows("cases") == []
    assert store.pending_count() == 0


def test_failed_statement_logs_nothing(store: NodeStore, path: Path) -> None:
    with pytest.raises(sqlite3.IntegrityError), plain(path) as conn:
        conn.execute("INSERT INTO cases (id, status) VALUES ('c1', 'refugee')")
        conn.execute("INSERT INTO cases (id, status) VALUES ('c2', 'not-a-status')")
    assert log(store) == []


def test_stamps_strictly_increase(store: NodeStore, path: Path) -> None:
    before = now_hlc()
    with plain(path) as conn:
        # one statement, many rows: each row gets its own tick
        conn.executemany(
            "INSERT INTO cases (id, household_size) VALUES (?, ?)",
            [(f"c{i}", i) for i in range(20)],
        )
        conn.execute("UPDATE cases SET household_size = household_size + 1")
    with utils_db(path) as db:
        db["cases"].delete_where("household_size > 15")
    stamps = [c["hlc"] for c in log(store)]
    assert len(stamps) == 20 + 20 + 5
    assert all(a < b for a, b in itertools.pairwise(stamps))
    # julianday('now') goes through a double, so the SQL clock may trail by a millisecond
    assert stamps[0] >= before - (2 << COUNTER_BITS)
    assert Timestamp(stamps[-1], "astana").wall_ms <= time.time_ns() // 1_000_000 + 1


def test_clock_offset_shifts_stamps(store: NodeStore, path: Path) -> None:
    store.set_clock_offset(3_600_000)
    assert store.clock_offset_ms == 3_600_000
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id) VALUES ('c1')")
    wall = log(store)[0]["hlc"] >> COUNTER_BITS
    expected = time.time_ns() // 1_000_000 + 3_600_000
    assert expected - 60_000 < wall <= expected


def test_the_clock_never_goes_back_when_changes_leave_the_log(store: NodeStore, path: Path) -> None:
    # New stamps follow the newest change in the log; once it has left the log (acked,
    # dropped, renumbered away), the state row holds its stamp for them.
    store.set_clock_offset(3_600_000)  # believed an hour behind the hub...
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, household_size) VALUES ('c1', 1)")
        conn.execute("UPDATE cases SET household_size = 2")
    first, second = store.pending(10)
    store.set_clock_offset(0)  # ...then not
    assert store.drop_change(second.seq)
    [_, relogged] = store.pending(10)
    assert relogged.ts.hlc > second.ts.hlc
    store.mark_acked(relogged.seq, store.pending(10))
    assert log(store) == []
    with plain(path) as conn:
        conn.execute("UPDATE cases SET household_size = 3")
    [after_ack] = store.pending(10)
    assert after_ack.ts.hlc > relogged.ts.hlc
    assert store.renumber_after(after_ack.seq + 5) == 1
    with plain(path) as conn:
        conn.execute("UPDATE cases SET household_size = 4")
    stamps = [c.ts.hlc for c in store.pending(10)]
    assert stamps[0] == after_ack.ts.hlc < stamps[1]
    assert all(c.captured in (None, c.ts.hlc) for c in store.pending(10))


def test_a_restamped_change_keeps_the_stamp_it_was_captured_with(
    store: NodeStore, path: Path
) -> None:
    store.set_clock_offset(3_600_000)  # believed an hour behind the hub, wrongly
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id) VALUES ('c1')")
        conn.execute("INSERT INTO cases (id) VALUES ('c2')")
    before = store.pending(10)
    assert [c.captured for c in before] == [c.ts.hlc for c in before]
    store.set_clock_offset(0)
    assert store.restamp(time.time_ns() // 1_000_000, -3_600_000, every=True) == 2
    after = store.pending(10)
    assert [c.captured for c in after] == [c.ts.hlc for c in before]
    assert after[0].ts.hlc < after[1].ts.hlc < before[0].ts.hlc
    assert store.restamp(time.time_ns() // 1_000_000, -1, every=True) == 2  # again
    assert [c.captured for c in store.pending(10)] == [c.ts.hlc for c in before]


def test_changing_a_primary_key_logs_delete_then_insert(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Ali')")
        conn.execute("UPDATE cases SET id = 'c9', notes = 'renumbered' WHERE id = 'c1'")
    assert ops(store) == [
        ("cases", "insert", ["c1"], None),
        ("cases", "delete", ["c1"], full(id="c1", family_name="Ali")),
        ("cases", "insert", ["c9"], None),
    ]
    pushed = [(c.op, c.pk, c.values) for c in store.pending(10)]
    assert pushed == [
        ("insert", {"id": "c1"}, full(id="c1", family_name="Ali")),  # as it was when renamed
        ("delete", {"id": "c1"}, None),
        ("insert", {"id": "c9"}, full(id="c9", family_name="Ali", notes="renumbered")),
    ]
    stamps = [c["hlc"] for c in log(store)]
    assert stamps[0] < stamps[1] < stamps[2]


def test_record_policy_logs_the_whole_row_on_update(tmp_path: Path) -> None:
    schema = Schema.from_toml(
        '[tables.t]\npolicy = "record"\n'
        'create = "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, b TEXT)"\n'
    )
    node = NodeStore.init(tmp_path / "r.db", "astana", HUB_URL, "tok", schema)
    try:
        with plain(node.path) as conn:
            conn.execute("INSERT INTO t VALUES ('k', 'x', 'y')")
            conn.execute("UPDATE t SET a = 'z'")
        assert log(node)[1]["values"] == {"id": "k", "a": "z", "b": "y"}
    finally:
        node.close()


# -- apply_page (pull side) ----------------------------------------------------------


def _row(
    seq: int, pk: str, values: dict[str, Any] | None, hlc: int | None = None, node: str = "almaty"
) -> PullRow:
    version = str(Timestamp(hlc or now_hlc(), node))
    vers = {c: version for c in (values or {})} if values is not None else {EXISTS: version}
    return PullRow(seq, "cases", {"id": pk}, full(id=pk, **(values or {})), vers)


def _page(rows: list[PullRow], cursor: int, more: bool = False) -> PullPage:
    return PullPage(rows, cursor, more, time.time_ns() // 1_000_000, "astana")


def test_apply_page_writes_rows_without_echo(store: NodeStore) -> None:
    r1 = _row(3, "c1", {"family_name": "Ali", "household_size": 2})
    r2 = _row(4, "c2", {"family_name": "Bek"})
    assert store.apply_page(_page([r1, r2], cursor=4)) == 2
    assert store.rows("cases") == [
        full(id="c1", family_name="Ali", household_size=2),
        full(id="c2", family_name="Bek"),
    ]
    assert log(store) == []  # no echo
    assert store.cursor == 4
    assert versions(store, "cases", ["c1"]) == r1.versions
    assert store.db.conn.execute("SELECT applying FROM _fieldsync_state").fetchone()[0] == 0
    # an update of an existing row and a delete are not echoed either
    r1b = _row(7, "c1", {"family_name": "Alieva"})
    gone = PullRow(8, "cases", {"id": "c2"}, None, {EXISTS: str(Timestamp(now_hlc(), "hq"))})
    assert store.apply_page(_page([r1b, gone], cursor=8)) == 2
    assert store.rows("cases") == [full(id="c1", family_name="Alieva")]
    assert log(store) == []
    assert store.cursor == 8
    # ...while local writes after it still are
    with plain(store.path) as conn:
        conn.execute("UPDATE cases SET notes = 'x'")
    assert ops(store) == [("cases", "update", ["c1"], {"notes": "x"})]


def test_apply_page_skips_records_with_pending_local_changes(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Local')")
    page = _page([_row(5, "c1", {"family_name": "Remote"}), _row(6, "c2", {"family_name": "B"})], 6)
    assert store.apply_page(page) == 1
    assert [(r["id"], r["family_name"]) for r in store.rows("cases")] == [
        ("c1", "Local"),
        ("c2", "B"),
    ]
    assert versions(store, "cases", ["c1"]) is None
    assert store.pending_count() == 1
    assert store.cursor == 6


def test_apply_page_moves_the_clock_past_pulled_versions(store: NodeStore, path: Path) -> None:
    future = now_hlc() + (3_600_000 << COUNTER_BITS)  # another office an hour ahead
    store.apply_page(_page([_row(1, "c1", {"family_name": "A"}, hlc=future)], 1))
    with plain(path) as conn:
        conn.execute("UPDATE cases SET family_name = 'B'")
    assert log(store)[0]["hlc"] > future


def test_apply_page_rejects_a_bad_record_and_writes_nothing(store: NodeStore) -> None:
    good = _row(1, "c1", {"family_name": "A"})
    bad = PullRow(2, "cases", {"id": "c2"}, {"id": "c2", "household_size": "three"}, {})
    with pytest.raises(ProtocolError):
        store.apply_page(_page([good, bad], 2))
    unknown = PullRow(2, "people", {"id": "p1"}, {"id": "p1"}, {})
    with pytest.raises(ProtocolError):
        store.apply_page(_page([good, unknown], 2))
    bad_version = PullRow(2, "cases", {"id": "c2"}, {"id": "c2"}, {"id": "yesterday"})
    with pytest.raises(ProtocolError, match="cannot take"):
        store.apply_page(_page([good, bad_version], 2))
    assert store.rows("cases") == []
    assert store.cursor == 0


def test_apply_page_names_the_first_bad_record_in_seq_order(store: NodeStore) -> None:
    # The stamps of a page are checked in one go: a page with a bad one is checked
    # again record by record, so the record named is still the first bad one.
    bad_stamp = PullRow(2, "cases", {"id": "c2"}, full(id="c2"), "yesterday")
    bad_value = PullRow(3, "cases", {"id": "c3"}, full(id="c3", household_size="three"), {})
    unknown = PullRow(3, "people", {"id": "p1"}, {"id": "p1"}, {})
    for rows, expected in [
        ([bad_value, bad_stamp], "a version is not a stamp"),
        ([replace(bad_value, seq=1), bad_stamp], "household_size holds INTEGER"),
        ([unknown, bad_stamp], "a version is not a stamp"),
        ([replace(unknown, seq=1), bad_stamp], "unknown table 'people'"),
    ]:
        good = _row(4, "c4", {"family_name": "A"})
        with pytest.raises(ProtocolError, match=expected):
            store.apply_page(_page([good, *rows], 4))
    assert store.rows("cases") == [] and store.cursor == 0


def test_a_page_checked_ahead_is_checked_again_against_another_schema_or_page(
    store: NodeStore,
) -> None:
    good = _page([_row(1, "c1", {"family_name": "A"})], 1)
    bad = _page([PullRow(1, "cases", {"id": "c1"}, full(id="c1"), "yesterday")], 1)
    with pytest.raises(ProtocolError, match="cannot take"):
        store.apply_page(bad, store.check_page(good))  # checked, but another page
    other = Schema.from_toml(store.schema.source)
    with pytest.raises(ProtocolError, match="cannot take"):
        store.apply_page(bad, inbox.Checked(list(store.check_page(good)), bad, other))
    assert store.rows("cases") == [] and store.cursor == 0
    assert store.apply_page(good, store.check_page(good)) == 1
    assert store.cursor == 1


def test_apply_page_takes_a_packed_version_for_every_column(store: NodeStore) -> None:
    stamp = str(Timestamp(now_hlc(), "almaty"))
    packed = PullRow(1, "cases", {"id": "c1"}, full(id="c1", family_name="A"), stamp)
    assert store.apply_page(_page([packed], 1)) == 1
    assert versions(store, "cases", ["c1"]) == dict.fromkeys(full(id="c1"), stamp)
    stored = store.db.conn.execute("SELECT vers FROM _fieldsync_versions").fetchone()[0]
    assert json.loads(stored) == stamp  # stored packed too
    assert store.rows("cases") == [full(id="c1", family_name="A")]
    # A packed version is checked like any other, and a bad one writes nothing.
    for bad in ("yesterday", ""):
        row = PullRow(2, "cases", {"id": "c2"}, full(id="c2"), bad)
        with pytest.raises(ProtocolError, match="cannot take"):
            store.apply_page(_page([row], 2))
    assert [r["id"] for r in store.rows("cases")] == ["c1"]
    assert store.cursor == 1


def test_apply_page_with_no_rows_saves_the_cursor(store: NodeStore) -> None:
    assert store.apply_page(_page([], 42)) == 0
    assert store.cursor == 42


# -- pending and mark_acked (push side) ------------------------------------------------


def test_pending_base_comes_from_versions_and_earlier_changes(store: NodeStore, path: Path) -> None:
    pulled = _row(1, "c1", {"family_name": "A", "status": "refugee"})
    store.apply_page(_page([pulled], 1))
    with plain(path) as conn:
        conn.execute("UPDATE cases SET family_name = 'B' WHERE id = 'c1'")
        conn.execute("UPDATE cases SET status = 'closed' WHERE id = 'c1'")
        conn.execute("DELETE FROM cases WHERE id = 'c1'")
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c2', 'New')")
        conn.execute("UPDATE cases SET notes = 'n' WHERE id = 'c2'")
    changes = store.pending(100)
    assert [(c.op, c.pk) for c in changes] == [
        ("update", {"id": "c1"}),
        ("update", {"id": "c1"}),
        ("delete", {"id": "c1"}),
        ("insert", {"id": "c2"}),
        ("update", {"id": "c2"}),
    ]
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert all(c.ts.node == "astana" for c in changes)
    upd1, upd2, dele, ins, upd3 = changes
    assert upd1.base == pulled.versions
    assert upd1.values == {"family_name": "B"}
    assert upd2.base == pulled.versions | {"family_name": str(upd1.ts)}
    assert dele.base == pulled.versions | {
        "family_name": str(upd1.ts),
        "status": str(upd2.ts),
    }
    assert dele.values is None
    assert ins.base == {}
    assert upd3.base == dict.fromkeys(CASE_COLUMNS, str(ins.ts))
    # limit takes the oldest
    assert store.pending(2) == changes[:2]


def test_mark_acked_forgets_changes_and_records_versions(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'A')")
        conn.execute("UPDATE cases SET family_name = 'B'")
        conn.execute("UPDATE cases SET notes = 'n'")
    ins, upd, last = store.pending(10)
    store.mark_acked(upd.seq, [ins, upd, last])
    assert store.pending_count() == 1
    assert [c.seq for c in store.pending(10)] == [last.seq]
    expected = dict.fromkeys(CASE_COLUMNS, str(ins.ts)) | {"family_name": str(upd.ts)}
    assert versions(store, "cases", ["c1"]) == expected
    assert store.pending(10)[0].base == expected
    acked = store.db.conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
    assert acked == upd.seq
    # the rest, then a delete that versions existence
    store.mark_acked(last.seq, [last])
    assert store.pending_count() == 0
    with plain(path) as conn:
        conn.execute("DELETE FROM cases")
    [dele] = store.pending(10)
    store.mark_acked(dele.seq, [dele])
    assert versions(store, "cases", ["c1"])[EXISTS] == str(dele.ts)  # type: ignore[index]
    # acked_seq never goes back
    store.mark_acked(1, [])
    acked = store.db.conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
    assert acked == dele.seq


def _acked_state(store: NodeStore) -> tuple[Any, ...]:
    conn = store.db.conn
    return (
        conn.execute("SELECT * FROM _fieldsync_versions ORDER BY tbl, pk").fetchall(),
        conn.execute("SELECT * FROM _fieldsync_changes ORDER BY seq").fetchall(),
        conn.execute("SELECT seq, first, count FROM _fieldsync_sent ORDER BY seq").fetchall(),
        list(kept_changes(conn, 0)),
        conn.execute("SELECT seq, reason FROM _fieldsync_rejected ORDER BY seq").fetchall(),
        conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone(),
    )


@pytest.mark.parametrize("refused", [False, True], ids=["all-taken", "one-rejected"])
def test_an_acknowledgement_worked_out_ahead_writes_what_one_worked_out_after_does(
    store: NodeStore, path: Path, tmp_path: Path, refused: bool
) -> None:
    k = ROWS_PER_WRITE
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c0', 'A'), ('gone', 'G')")
    first = store.pending(10)
    store.mark_acked(first[-1].seq, first)
    with plain(path) as conn:  # each record once: an update, inserts, a delete
        conn.execute("UPDATE cases SET family_name = 'B' WHERE id = 'c0'")
        conn.executemany(
            "INSERT INTO cases (id, household_size) VALUES (?, ?)",
            [(f"c{i}", i) for i in range(1, 2 * k + 3)],
        )
        conn.execute("DELETE FROM cases WHERE id = 'gone'")
    copy = tmp_path / "copy.db"
    with sqlite3.connect(copy) as target:
        store.db.conn.backup(target)
    target.close()
    other = NodeStore(copy)
    try:
        ahead, after = store.pending(10 * k), other.pending(10 * k)
        assert len(ahead) == 2 * k + 4 and ahead.once_each()
        rejected = [Rejection(ahead[k + 1].seq, "refused")] if refused else []
        store.prepare_ack(ahead)  # while the hub works on the batch
        store.mark_acked(ahead[-1].seq, ahead, rejected)
        # The other copy works everything out from the stored versions, once answered.
        other.mark_acked(after[-1].seq, list(after), rejected)
        assert _acked_state(store) == _acked_state(other)
    finally:
        other.close()
    kept = [c.seq for c in kept_changes(store.db.conn, first[-1].seq)]
    assert kept == [c.seq for c in ahead if not rejected or c.seq != rejected[0].seq]
    assert versions(store, "cases", ["c0"])["family_name"] == str(ahead[0].ts)  # type: ignore[index]


def test_pulls_resume_for_a_record_once_its_changes_are_acked(store: NodeStore, path: Path) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('c1', 'Local')")
    changes = store.pending(10)
    store.mark_acked(changes[-1].seq, changes)
    assert store.apply_page(_page([_row(9, "c1", {"family_name": "Hub"})], 9)) == 1
    assert store.rows("cases")[0]["family_name"] == "Hub"
    assert log(store) == []


# -- status -------------------------------------------------------------------------


def test_status_numbers(store: NodeStore, path: Path) -> None:
    status = store.status()
    assert status.node == "astana"
    assert status.hub_url == HUB_URL
    assert status.pending == 0
    assert status.oldest_pending_at is None
    assert status.last_sync_at is None
    assert status.last_error is None
    assert status.cursor == 0
    assert status.clock_offset_ms == 0

    with plain(path) as conn:
        conn.executemany("INSERT INTO cases (id) VALUES (?)", [("a",), ("b",), ("c",)])
    store.apply_page(_page([], 17))
    store.set_clock_offset(-250)
    store.record_sync(pushed=3, pulled=1, conflicts=0)
    status = store.status()
    assert status.pending == 3
    oldest = datetime.fromisoformat(status.oldest_pending_at or "")
    assert abs(oldest.timestamp() - time.time()) < 60
    assert status.cursor == 17
    assert status.clock_offset_ms == -250
    assert status.last_sync_at is not None
    assert status.last_success_at == status.last_sync_at
    assert status.last_error is None

    store.record_sync(pushed=0, pulled=0, conflicts=0, error="hub down")
    status = store.status()
    assert status.last_error == "hub down"
    assert status.last_error_at is not None
    assert status.last_success_at is not None
    data = status.to_json()
    assert data["pending"] == 3
    assert data["last_error"] == "hub down"
    assert set(data) == {
        "node",
        "hub_url",
        "pending",
        "oldest_pending_at",
        "last_sync_at",
        "last_success_at",
        "last_error",
        "last_error_at",
        "cursor",
        "clock_offset_ms",
        "rejected",
        "unencrypted",
        "ca_file",
        "allow_http",
        "next_try_at",
        "conflicts",
    }


def test_set_hub(store: NodeStore, path: Path) -> None:
    store.set_hub("http://other:8000/", "tok2")
    assert (store.hub_url, store.token) == ("http://other:8000", "tok2")
    reopened = NodeStore(path)
    try:
        assert (reopened.hub_url, reopened.token) == ("http://other:8000", "tok2")
    finally:
        reopened.close()


def test_write_helper_rolls_back_on_error(store: NodeStore) -> None:
    with pytest.raises(RuntimeError), write(store.db) as conn:
        conn.execute("INSERT INTO cases (id) VALUES ('c1')")
        raise RuntimeError("boom")
    assert store.rows("cases") == []
    assert log(store) == []


def test_changes_sent_are_not_restamped_until_the_hub_says_it_did_not_commit_them(
    store: NodeStore, path: Path
) -> None:
    now = time.time_ns() // 1_000_000
    with plain(path) as conn:
        for key in ("c1", "c2", "c3"):
            conn.execute("INSERT INTO cases (id) VALUES (?)", [key])
            # Each in a millisecond of its own: c3 stamped c2's + 1 could not move back.
            time.sleep(0.002)
    before = {c.seq: c.ts.hlc for c in store.pending(10)}
    first, second, third = sorted(before)
    store.note_sent(second)  # c1 and c2 are on their way; the answer may be lost
    assert store.set_clock_offset(-60_000, now) == 1  # only c3 moves
    moved = {c.seq: c.ts.hlc for c in store.pending(10)}
    assert moved[first] == before[first] and moved[second] == before[second]
    assert moved[third] != before[third]
    assert store.restamp(now, -1000, every=True) == 1
    store.not_committed_after(first)  # the hub: nothing after c1 was committed
    assert store.restamp(now, -1000, every=True) == 2
    assert store.pending(10)[0].ts.hlc == before[first]
    assert store.set_clock_offset(-60_000, now) == 0  # no change: nothing moves
    store.set_clock_offset(0)  # without the hub's time: the offset only
    assert {c.seq: c.ts.hlc for c in store.pending(10)}[first] == before[first]


def test_a_record_logged_again_after_a_drop_is_numbered_after_what_was_sent(
    store: NodeStore, path: Path
) -> None:
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id) VALUES ('c1')")
        conn.execute("INSERT INTO cases (id) VALUES ('c2')")
    first, second = store.pending(10)
    store.note_sent(second.seq)  # both sent; the second can never be taken
    assert store.drop_change(second.seq) is True
    again = store.pending(10)[-1]
    assert again.pk == {"id": "c2"} and again.seq == second.seq + 1  # not the number sent
    assert store.set_clock_offset(-60_000, time.time_ns() // 1_000_000) == 1  # re-stampable
    # Dropping a delete logs nothing again (the record is gone), and nothing else moves.
    with plain(path) as conn:
        conn.execute("DELETE FROM cases WHERE id = 'c1'")
    before = [c.seq for c in store.pending(10)]
    store.note_sent(before[-1])
    assert store.drop_change(before[-1]) is True
    assert [c.seq for c in store.pending(10)] == before[:-1]


def test_an_older_office_database_gets_the_sent_mark_covering_its_queue(path: Path) -> None:
    NodeStore.init(path, "astana", "http://127.0.0.1:9", "t").close()
    with plain(path) as conn:
        conn.execute("INSERT INTO cases (id) VALUES ('c1')")
        conn.execute("INSERT INTO cases (id) VALUES ('c2')")
        conn.execute("ALTER TABLE _fieldsync_state DROP COLUMN sent_seq")  # as before it
        conn.execute("DROP TABLE _fieldsync_version")  # older versions kept no number
    store = NodeStore(path)
    try:
        queued = store.pending(10)
        (sent,) = store.db.conn.execute("SELECT sent_seq FROM _fieldsync_state").fetchone()
        assert sent == queued[-1].seq  # whatever was queued may have been sent
        assert store.restamp(time.time_ns() // 1_000_000, -1000, every=True) == 0
    finally:
        store.close()


def test_a_database_made_by_fieldsync_0_1_is_upgraded_when_opened(path: Path) -> None:
    schema = Schema.load()
    NodeStore.init(path, "astana", HUB_URL, "tok").close()
    with plain(path) as conn:  # as 0.1 left it: schema in the state row, no rejected table
        conn.execute("ALTER TABLE _fieldsync_state ADD COLUMN schema TEXT NOT NULL DEFAULT ''")
        conn.execute("UPDATE _fieldsync_state SET schema = ?", [schema.source])
        conn.execute("DROP TABLE _fieldsync_schema")
        conn.execute("DROP TABLE _fieldsync_rejected")
        conn.execute("DROP TABLE _fieldsync_sync_log")
        conn.execute("DROP TRIGGER _fieldsync_cases_insert")
        conn.execute(  # 0.1 logged an insert with its values
            "CREATE TRIGGER _fieldsync_cases_insert AFTER INSERT ON cases BEGIN "
            "INSERT INTO _fieldsync_changes (tbl, pk, op, hlc, captured, vals) "
            "VALUES ('cases', json_array(NEW.id), 'insert', 1, 1, "
            "json_object('id', NEW.id, 'family_name', NEW.family_name)); END"
        )
        conn.execute("INSERT INTO cases (id, family_name) VALUES ('old', 'Queued before')")
        conn.execute("DROP TABLE _fieldsync_version")
    store = NodeStore(path)
    try:
        assert store.schema.source == schema.source
        with plain(path) as conn:
            conn.execute("INSERT INTO cases (id, family_name) VALUES ('new', 'After')")
        assert [c["values"] for c in log(store)] == [
            {"id": "old", "family_name": "Queued before"},
            None,
        ]
        assert [c.values["family_name"] for c in store.pending(10)] == ["Queued before", "After"]
        assert store.rejected() == [] and store.status().rejected == 0
        store.record_sync(pushed=1, pulled=0, conflicts=0)
        assert [e.pushed for e in store.status_report().events] == [1]
    finally:
        store.close()
    NodeStore(path).close()  # opens again without upgrading twice


# The capture trigger of the version before 0.x kept the clock in the state row,
# updating it on every write (the value checks left out here).
_OLD_INSERT_TRIGGER = (
    "CREATE TRIGGER _fieldsync_cases_insert AFTER INSERT ON cases "
    "WHEN (SELECT applying FROM _fieldsync_state) = 0 BEGIN "
    "UPDATE _fieldsync_state SET hlc = MAX(hlc + 1, "
    "(CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) + offset_ms) << 16);"
    "INSERT INTO _fieldsync_changes (tbl, pk, op, hlc, captured, vals) "
    "SELECT 'cases', json_array(NEW.id), 'insert', s.hlc, s.hlc, NULL "
    "FROM _fieldsync_state AS s; END"
)


def test_older_capture_triggers_are_replaced_when_opened(path: Path) -> None:
    NodeStore.init(path, "astana", HUB_URL, "tok").close()
    future = now_hlc() + (3_600_000 << COUNTER_BITS)  # its clock ran an hour ahead
    with plain(path) as conn:
        conn.execute("DROP TRIGGER _fieldsync_cases_insert")
        conn.execute(_OLD_INSERT_TRIGGER)
        conn.execute("UPDATE _fieldsync_state SET hlc = ?", [future])
        conn.execute("INSERT INTO cases (id) VALUES ('old1')")
        conn.execute("INSERT INTO cases (id) VALUES ('old2')")
    store = NodeStore(path)
    try:
        triggers = dict(
            store.db.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        )
        wanted = {
            name: sql
            for table in store.schema.tables.values()
            for name, sql in trigger_sql(table, strict=True).items()
        }
        assert triggers == wanted
        old = store.pending(10)
        assert [c.ts.hlc for c in old] == [future + 1, future + 2]
        with plain(path) as conn:
            conn.execute("INSERT INTO cases (id) VALUES ('new1')")
        store.mark_acked(old[-1].seq, old)  # the old changes leave the log
        with plain(path) as conn:
            conn.execute("INSERT INTO cases (id, family_name) VALUES ('new2', 'Ali')")
            conn.execute("UPDATE cases SET family_name = 'Aliev' WHERE id = 'new2'")
        new = store.pending(10)
        assert [(c.op, c.pk["id"]) for c in new] == [
            ("insert", "new1"),
            ("insert", "new2"),
            ("update", "new2"),
        ]
        stamps = [c.ts.hlc for c in new]
        assert future + 2 < stamps[0] < stamps[1] < stamps[2]
        assert all(c.captured in (None, c.ts.hlc) for c in new)
    finally:
        store.close()
    with plain(path) as conn:
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
    NodeStore(path).close()  # opens again without replacing them twice
    with plain(path) as conn:
        assert conn.execute("PRAGMA schema_version").fetchone()[0] == version


# -- how long a sync holds the write lock ---------------------------------------------


def _count_transactions(store: NodeStore) -> list[str]:
    """The write transactions the store opens from now on (their BEGIN statements)."""
    begins: list[str] = []
    store.db.conn.set_trace_callback(
        lambda sql: begins.append(sql) if sql.startswith("BEGIN IMMEDIATE") else None
    )
    return begins


def test_a_big_page_is_applied_in_transactions_of_at_most_rows_per_write(
    store: NodeStore, path: Path
) -> None:
    k = ROWS_PER_WRITE
    rows = [_row(seq, f"c{seq}", {"family_name": "F"}) for seq in range(1, 5 * k // 2 + 1)]
    with plain(path) as conn:  # another program refuses one record of the third K
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON cases WHEN NEW.id = 'c{2 * k + 5}' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    begins = _count_transactions(store)
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.apply_page(_page(rows, cursor=3 * k))
    # The first 2K records are applied, each K with the cursor just after it; the rest not.
    assert len(begins) == 3
    assert store.cursor == 2 * k
    assert len(store.rows("cases")) == 2 * k and versions(store, "cases", [f"c{2 * k}"])
    assert versions(store, "cases", [f"c{2 * k + 1}"]) is None
    assert store.db.conn.execute("SELECT applying FROM _fieldsync_state").fetchone()[0] == 0
    with plain(path) as conn:
        conn.execute("DROP TRIGGER refuse")
    # Pulled again from there, the page ends where the hub said.
    assert store.apply_page(_page(rows[2 * k :], cursor=3 * k)) == k // 2
    assert store.cursor == 3 * k and len(store.rows("cases")) == len(rows)
    assert log(store) == []


def test_a_big_acknowledged_batch_is_forgotten_in_transactions_of_at_most_rows_per_write(
    store: NodeStore, path: Path
) -> None:
    k = ROWS_PER_WRITE
    with plain(path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name) VALUES (?, 'F')",
            [(f"c{i}",) for i in range(1, 5 * k // 2 + 1)],
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON _fieldsync_versions "
            f"""WHEN NEW.pk = '["c{2 * k + 5}"]' BEGIN SELECT RAISE(ABORT, 'refused'); END"""
        )
    batch = store.pending(10 * k)
    assert len(batch) == 5 * k // 2
    begins = _count_transactions(store)
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.mark_acked(batch[-1].seq, batch)
    # The first 2K are forgotten, with their versions; the rest still wait.
    assert len(begins) == 3
    assert [c.seq for c in store.pending(10 * k)] == [c.seq for c in batch[2 * k :]]
    assert versions(store, "cases", [f"c{2 * k}"])
    assert versions(store, "cases", [f"c{2 * k + 1}"]) is None
    with plain(path) as conn:
        conn.execute("DROP TRIGGER refuse")
    store.mark_acked(batch[-1].seq, batch)
    assert store.pending_count() == 0 and versions(store, "cases", [f"c{len(batch)}"])
