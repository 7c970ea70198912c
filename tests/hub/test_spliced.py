"""A pull served from the stored texts (hub/records.py spliced_row) reads, on the
office, exactly as the page decoded and encoded again: every column, every version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from hub import schemas
from hub.audit import Actor
from hub.pull import Spliced
from hub.records import COMPLETE
from hub.store import SqlHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change, PullPage
from shared.schema import Schema
from tests.engines import Engine

SOURCE = '''
[tables.people]
policy = "merge"
create = """CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT, age INTEGER, note)"""

[tables.visits]
policy = "record"
create = """CREATE TABLE visits (office TEXT NOT NULL, number INTEGER NOT NULL, cost REAL,
    PRIMARY KEY (office, number)) WITHOUT ROWID"""
'''
FIRST = Schema.from_toml(SOURCE, "spliced.toml")
WIDER = Schema.from_toml(
    SOURCE.replace("age INTEGER, note)", "age INTEGER, note, seen_on TEXT)"), "wider.toml"
)


def _same_on_the_wire(store: SqlHubStore) -> int:
    """The spliced page, as JSON, reads as the decoded one; returns its spliced rows."""
    plain = store.pull("almaty", 0, 1000, packed=True)
    spliced = store.pull("almaty", 0, 1000, packed=True, spliced=True)
    read = PullPage.from_json(orjson.dumps(spliced.to_json()))
    assert read.rows == plain.rows
    assert [row.values for row in read.rows if row.values] == [
        {**{c: None for c in store.schema.tables[row.table].column_names}, **row.values}
        for row in plain.rows
        if row.values
    ]
    return sum(isinstance(row, Spliced) for row in spliced.rows)


def _push(store: SqlHubStore, first: int, stamp: Timestamp, rows: list[Any]) -> None:
    changes = [
        Change(first + i, table, pk, op, stamp, values, base)
        for i, (table, pk, op, values, base) in enumerate(rows)
    ]
    assert not store.push("astana", changes).rejected


def test_a_spliced_page_reads_as_the_decoded_one(tmp_path: Path, engine: Engine) -> None:
    db = engine.db(tmp_path)
    start = now_ms()
    stamps = [Timestamp((start + i) << COUNTER_BITS, "astana") for i in range(4)]
    odd = 'o"ф\\1'
    with open_store(db, FIRST) as store:
        for office in ("astana", "almaty"):
            store.add_node(office)
            store.set_scopes(office, ["*"])
        _push(
            store,
            1,
            stamps[0],
            [
                ("people", {"id": "p1"}, "insert", {"id": "p1", "name": "Айгерим", "age": 30}, {}),
                ("people", {"id": odd}, "insert", {"id": odd, "note": 2.5}, {}),
                ("people", {"id": "p3"}, "insert", {"id": "p3", "name": "x", "note": "5"}, {}),
                ("visits", {"office": odd, "number": 7}, "insert", {"cost": 1e-7}, {}),
                ("visits", {"office": "b", "number": -1}, "insert", {"cost": None}, {}),
            ],
        )
        gone = store.record_state("people", {"id": "p3"})
        assert gone is not None
        _push(
            store,
            6,
            stamps[1],
            [
                ("people", {"id": "p1"}, "update", {"note": "edited"}, {}),
                ("people", {"id": "p3"}, "delete", None, dict(gone.versions)),
                ("people", {"id": "p4"}, "update", {"age": 4}, {}),  # never inserted here
            ],
        )
        assert _same_on_the_wire(store) == 5  # p1, the odd key, p4 and both visits
        schemas.apply(store.database, WIDER, Actor("ops", "cli"))
        # The column added is null in every record the hub holds, on the wire too.
        assert _same_on_the_wire(store) == 5
        page = store.pull("almaty", 0, 1000, packed=True)
        assert {
            row.values["seen_on"] for row in page.rows if row.table == "people" and row.values
        } == {None}
        _push(
            store,
            9,
            stamps[2],
            [("people", {"id": "p5"}, "insert", {"id": "p5", "seen_on": "2026-12-03"}, {})],
        )
        assert _same_on_the_wire(store) == 6


def test_a_hub_from_before_completes_its_records_when_opened(
    tmp_path: Path, engine: Engine
) -> None:
    db = engine.db(tmp_path)
    stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
    with open_store(db, FIRST) as store:
        for office in ("astana", "almaty"):
            store.add_node(office)
            store.set_scopes(office, ["*"])
        _push(store, 1, stamp, [("people", {"id": "p1"}, "insert", {"id": "p1", "age": 3}, {})])
        with store.database.write() as conn:  # as an older hub stored it
            conn.execute('UPDATE _fieldsync_records SET vals = \'{"id":"p1","age":3}\'')
            conn.execute("DELETE FROM _fieldsync_meta WHERE key = ?", [COMPLETE])
    with open_store(db) as store:
        with store.database.read() as conn:
            (vals,) = conn.execute("SELECT vals FROM _fieldsync_records").fetchone()
        assert orjson.loads(vals) == {"id": "p1", "age": 3, "name": None, "note": None}
        assert _same_on_the_wire(store) == 1
