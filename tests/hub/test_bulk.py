"""A large pushed batch is written set-based (PostgreSQL: hub/pg/bulk.py); what it
leaves in the hub's tables must be what the same changes leave pushed a few at a time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from hub.pg.bulk import BULK
from hub.store import SqlHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change
from shared.schema import Schema
from tests.engines import Engine

TYPED = Schema.from_toml(
    '''
[tables.visits]
policy = "merge"
create = """CREATE TABLE visits (
    office TEXT NOT NULL, number INTEGER NOT NULL, tag, weight REAL, note TEXT,
    visitors INTEGER CHECK (visitors >= 0), PRIMARY KEY (office, number))"""

[tables.fs_stage]
policy = "record"
create = """CREATE TABLE fs_stage (id INTEGER PRIMARY KEY, label TEXT) WITHOUT ROWID"""
''',
    "typed.toml",
)


def _changes(first: int, stamp: Timestamp, count: int, op: str) -> list[Change]:
    """Visits and plain rows; ``op`` insert or update of the same keys."""
    found = []
    for i in range(count):
        seq = first + i
        tag: Any = [f"t{i % 3}", i % 3, 2.5][i % 3]
        table, pk = "visits", {"office": "астана" if i % 2 else 'o"1', "number": i}
        if i % 4 == 3:
            table, pk = "fs_stage", {"id": i * 1000}
            values: dict[str, Any] | None = {**pk, "label": f"{op} {i}"}
        elif op == "insert":
            values = {
                **pk,
                "tag": tag,
                "weight": i / 3,
                "note": None if i % 5 else "ü 😀 \\ '",
                "visitors": i,
            }
            if i % 7 == 0:
                del values["weight"]  # a column the values lack: NULL
        else:
            values = {**pk, "note": f"changed {i}"}
        found.append(Change(seq, table, pk, op, stamp, values))
    return found


def _push(store: SqlHubStore, changes: Sequence[Change], size: int) -> list[str]:
    reasons: list[str] = []
    for start in range(0, len(changes), size):
        result = store.push("astana", changes[start : start + size])
        reasons.extend(r.reason for r in result.rejected)
    return reasons


def _versions(store: SqlHubStore, change: Change) -> dict[str, Any]:
    state = store.record_state(change.table, change.pk)
    assert state is not None
    return dict(state.versions)


def _tables(store: SqlHubStore) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "visits": "SELECT * FROM visits ORDER BY office, number",
        "plain": "SELECT * FROM fs_stage ORDER BY id",  # as the stage once was
        "records": "SELECT * FROM _fieldsync_records ORDER BY seq",
        "history": "SELECT seq, prev, tbl, pk, actor, ts, op, vals FROM _fieldsync_history "
        "ORDER BY seq",
    }
    with store.database.read() as conn:
        return {name: [tuple(row) for row in conn.execute(sql)] for name, sql in queries.items()}


def test_a_large_batch_leaves_what_small_ones_leave(tmp_path: Path, engine: Engine) -> None:
    count = 2 * BULK + 3
    start = now_ms()
    stamp, later, last = (Timestamp((start + i) << COUNTER_BITS, "astana") for i in range(3))
    inserts = _changes(1, stamp, count, "insert")
    inserts[10] = Change(  # broken CHECK: set aside, the others go in
        11,
        "visits",
        inserts[10].pk,
        "insert",
        stamp,
        {**(inserts[10].values or {}), "visitors": -1},
    )
    updates = _changes(count + 1, later, count, "update")
    found = []
    for size in (count, 5):
        with open_store(engine.db(tmp_path), TYPED) as store:
            store.add_node("astana")
            store.set_scopes("astana", ["*"])
            reasons = _push(store, inserts, size)
            after_inserts = _tables(store)
            reasons += _push(store, updates, size)
            deletes = [  # of the first half, each as the hub holds it
                Change(2 * count + 1 + i, c.table, c.pk, "delete", last, None, _versions(store, c))
                for i, c in enumerate(updates[: count // 2])
            ]
            reasons += _push(store, deletes, size)
            found.append((reasons, after_inserts, _tables(store)))
    (big_reasons, big_inserted, big), (small_reasons, small_inserted, small) = found
    assert big_reasons == small_reasons and len(big_reasons) == 1
    assert "constraint of table visits" in big_reasons[0]
    assert big_inserted == small_inserted
    assert len(big_inserted["visits"]) + len(big_inserted["plain"]) == count - 1
    assert big == small
    # the update of the refused record made it; deleted ones stay as tombstones
    assert len(big["records"]) == count
    assert len(big["visits"]) + len(big["plain"]) == count - count // 2
    assert {row[4] for row in big["visits"]} == {
        f"changed {i}" for i in range(count // 2, count) if i % 4 != 3
    }
    assert all(row[1].startswith("update") for row in big["plain"])


def test_a_role_refused_temporary_tables_still_takes_large_pushes(
    tmp_path: Path, pg_url: str
) -> None:
    # REVOKE TEMPORARY ... FROM PUBLIC is a common hardening: the hub writes row by row.
    role = f"fs_notemp_{os.getpid()}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        name = admin.info.dbname
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC')
        admin.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"')
        admin.execute(f'GRANT ALL ON SCHEMA public TO "{role}"')
        try:
            parts = urlsplit(pg_url)
            url = parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}").geturl()
            count = BULK + 2
            stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
            with open_store(url, TYPED) as store:
                store.add_node("astana")
                store.set_scopes("astana", ["*"])
                assert _push(store, _changes(1, stamp, count, "insert"), count) == []
                tables = _tables(store)
            assert len(tables["visits"]) + len(tables["plain"]) == count
        finally:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')
