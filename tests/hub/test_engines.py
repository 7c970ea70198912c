"""What differs between the two engines, and what must not."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings, strategies as st

from hub.compact import Busy, compact
from hub.pg.engine import POSTGRES, display_url, translate
from hub.store import open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.errors import FieldsyncError
from shared.protocol import Change
from shared.schema import Schema, pk_key
from tests.engines import Engine


def test_the_hubs_sql_is_translated_for_psycopg() -> None:
    assert translate("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == (
        "SELECT a FROM t WHERE b = %s AND c IN (%s, %s)"
    )
    # % is doubled everywhere (psycopg reads it inside literals too); ? in a literal stays
    assert translate("SELECT '50%', 'why?' WHERE x LIKE ? ESCAPE '\\'") == (
        "SELECT '50%%', 'why?' WHERE x LIKE %s ESCAPE '\\'"
    )
    assert translate("SELECT \"odd?col\" FROM t WHERE a = 'it''s ?' AND b = ?") == (
        "SELECT \"odd?col\" FROM t WHERE a = 'it''s ?' AND b = %s"
    )


def test_a_password_is_left_out_of_what_is_shown() -> None:
    shown = display_url("postgresql://hub:s3cret@db.example.org:5433/fieldsync?sslmode=require")
    assert shown == "postgresql://hub@db.example.org:5433/fieldsync?sslmode=require"
    plain = "postgresql://hub@/fieldsync?host=/run/postgresql"
    assert display_url(plain) == plain


KEYS = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=8).filter(lambda t: "\x00" not in t),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ),
    min_size=1,
    max_size=3,
)


def test_postgresql_writes_a_records_key_text_as_the_hub_does(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:

        @settings(max_examples=150, deadline=None)
        @given(KEYS)
        def same(values: list[Any]) -> None:
            columns = [f"%s::{'text' if isinstance(v, str) else 'bigint'}" for v in values]
            found = conn.execute(f"SELECT {POSTGRES.key_text(columns)}", values).fetchone()
            assert found is not None and found[0] == pk_key(values)

        same()


UNTYPED = Schema.from_toml(
    '''
[tables.notes]
policy = "record"
create = """CREATE TABLE notes (id TEXT PRIMARY KEY, body, amount NUMERIC, seen_on DATE)"""
''',
    "untyped.toml",
)


def test_columns_without_a_type_keep_text_and_numbers_apart(tmp_path: Path, engine: Engine) -> None:
    # On PostgreSQL such columns are jsonb: what a push writes comes back the same.
    values = [
        {"id": "n1", "body": "5", "amount": 5, "seen_on": "2026-12-03"},
        {"id": "n2", "body": 2.5, "amount": 0.25, "seen_on": None},
        {"id": "n3", "body": "ü 'x' 😀", "amount": 2**63 - 1, "seen_on": 20261203},
    ]
    with open_store(engine.db(tmp_path), UNTYPED) as store:
        store.add_node("astana")
        store.set_scopes("astana", ["*"])
        store.add_node("almaty")
        store.set_scopes("almaty", ["*"])
        stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
        changes = [
            Change(i, "notes", {"id": v["id"]}, "insert", stamp, v) for i, v in enumerate(values, 1)
        ]
        assert store.push("astana", changes).applied == 3
        assert store.rows("notes") == values
        page = store.pull("almaty", 0, 10)
        assert [row.values for row in page.rows] == values


def test_one_compaction_at_a_time_across_processes(tmp_path: Path, engine: Engine) -> None:
    db = engine.db(tmp_path)
    with open_store(db) as one, open_store(db) as two:
        with one.database.exclusive("compact") as got:
            assert got
            with two.database.exclusive("compact") as other:
                assert not other
            with two.database.exclusive("another") as other:
                assert other
        with two.database.exclusive("compact") as got:
            assert got  # let go at the end of the block
            with pytest.raises(Busy, match="a compaction of this hub is running already"):
                compact(one.database)
        assert compact(one.database).tombstones == 0


INDEXED = Schema.from_toml(
    '''
[tables.notes]
policy = "record"
create = """CREATE TABLE notes (id TEXT PRIMARY KEY, office TEXT, body TEXT)"""
indexes = ["CREATE INDEX notes_office ON notes (office, body)"]
''',
    "indexed.toml",
)


def test_the_schemas_indexes_are_made_on_either_engine(tmp_path: Path, engine: Engine) -> None:
    with open_store(engine.db(tmp_path), INDEXED) as store, store.database.read() as conn:
        if store.database.dialect.name == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
        else:
            query = "SELECT indexname FROM pg_indexes WHERE tablename = ?"
        assert "notes_office" in {row[0] for row in conn.execute(query, ["notes"])}


def test_a_column_whose_type_changed_is_read_by_every_open_store(
    tmp_path: Path, engine: Engine
) -> None:
    # A serving hub has read the table many times (PostgreSQL would have prepared the
    # statement); another process changes the column's type: the next read still works.
    from hub import schemas
    from hub.audit import Actor

    db = engine.db(tmp_path)
    source = Schema.load().source
    text = Schema.from_toml(source.replace("household_size INTEGER", "household_size TEXT"))
    with open_store(db) as serving:
        for _ in range(8):
            assert serving.rows("cases") == []
        with open_store(db) as admin:
            schemas.apply(admin.database, text, Actor("ops", "cli"), allow_loss=True)
        assert serving.rows("cases") == []
        assert serving.schema.tables["cases"].column("household_size").type == "TEXT"


WIDE = Schema.from_toml(
    '''
[tables.visits]
policy = "record"
create = """CREATE TABLE visits (id TEXT PRIMARY KEY, people BIGINT, cost DOUBLE PRECISION,
    note VARCHAR(40))"""
''',
    "wide.toml",
)


def test_values_a_column_cannot_hold_are_set_aside_alike_on_both_engines(
    tmp_path: Path, engine: Engine
) -> None:
    # Checked by the column's affinity (BIGINT is an integer, VARCHAR text): a value
    # PostgreSQL's column would refuse is refused by both engines, change by change,
    # and the rest of the batch is taken: nothing stalls the office.
    bad = [
        {"id": "v1", "people": "abc"},
        {"id": "v2", "people": 1.5},
        {"id": "v3", "cost": "cheap"},
        {"id": "v4", "note": "a\x00b"},
        {"id": "v\x005", "people": 1},
    ]
    good = {"id": "v6", "people": 2**63 - 1, "cost": 2.5, "note": "ü"}
    with open_store(engine.db(tmp_path), WIDE) as store:
        store.add_node("astana")
        store.set_scopes("astana", ["*"])
        stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
        changes = [
            Change(i, "visits", {"id": v["id"]}, "insert", stamp, v)
            for i, v in enumerate([*bad, good], 1)
        ]
        result = store.push("astana", changes)
        assert (result.acked, result.applied) == (6, 1)
        assert [r.seq for r in result.rejected] == [1, 2, 3, 4, 5]
        assert all("a\x00b" not in r.reason and "abc" not in r.reason for r in result.rejected)
        assert store.rows("visits") == [{"id": "v6", "people": 2**63 - 1, "cost": 2.5, "note": "ü"}]


def test_a_schema_change_waits_only_a_moment_for_a_long_read(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a download reads cases, adding a column to it must wait; every push and
    # pull waits behind that change, so it gives up soon, in one line, changing nothing.
    from hub import schemas
    from hub.audit import Actor
    from hub.pg import schema_change

    monkeypatch.setattr(schema_change, "LOCK_WAIT", "200ms")
    source = Schema.load().source
    wider = Schema.from_toml(
        source.replace("    notes TEXT\n", "    notes TEXT,\n    phone TEXT\n")
    )
    assert wider.source != source
    with open_store(pg_url) as serving, open_store(pg_url) as admin:
        with serving.database.snapshot() as conn:
            conn.execute("SELECT count(*) FROM cases").fetchone()  # the read holds the table
            with pytest.raises(FieldsyncError, match="was in use for more than 200ms"):
                schemas.apply(admin.database, wider, Actor("ops", "cli"))
        assert admin.schema_version == 1
        assert schemas.apply(admin.database, wider, Actor("ops", "cli")).version == 2


def test_downloads_left_open_hold_up_no_push(pg_url: str) -> None:
    # More downloads than the pool has connections, each read one chunk and left
    # there (a slow client): pushes and pulls still get a connection at once.
    from hub.export import stream_export

    with open_store(pg_url) as store:
        store.add_node("astana")
        store.set_scopes("astana", ["*"])
        streams = [stream_export(store, "cases", "csv", chunk_rows=1)[1] for _ in range(10)]
        try:
            for chunks in streams:
                next(chunks)
            stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
            change = Change(1, "cases", {"id": "c1"}, "insert", stamp, {"id": "c1"})
            began = time.monotonic()
            assert store.push("astana", [change]).applied == 1
            assert [r.pk["id"] for r in store.pull("astana", 0, 10, include_own=True).rows] == [
                "c1"
            ]
            assert time.monotonic() - began < 5
        finally:
            for chunks in streams:
                chunks.close()


def test_a_database_gone_is_a_500_that_names_no_server(pg_cluster: Any) -> None:
    from hub.app import create_app
    from tests.asgi import client as asgi_client

    name = pg_cluster.new_database()
    store = open_store(pg_cluster.url(name))
    try:
        token = store.add_node("astana")
        client = asgi_client(create_app(store))
        pg_cluster.drop_database(name)  # its connections are closed under the hub
        answer = client.get(
            "/v1/pull", params={"cursor": 0}, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 500
        assert answer.json()["error"] == "internal"
        assert "database failed" in answer.json()["detail"]
        assert name not in answer.text and "postgresql" not in answer.text
        client.close()
    finally:
        store.close()
