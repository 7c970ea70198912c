"""Convergence, as a property: 3 offices, random writes, random sync orders.

The hub runs in-process (through tests/asgi.py), so hypothesis
can try many histories quickly; the wire format and code paths are the real ones.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hub.app import create_app
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from tests.asgi import client as asgi_client

pytestmark = pytest.mark.integration

OFFICES = ("astana", "almaty", "shymkent")
IDS = ("c1", "c2", "c3", "c4")
COLUMNS = {
    "status": st.sampled_from(["asylum_seeker", "refugee", "rejected", "closed"]),
    "household_size": st.integers(1, 9),
    "notes": st.sampled_from(["", "needs interpreter", "moved", "Ünal", None]),
}

insert = st.tuples(
    st.just("insert"),
    st.sampled_from(OFFICES),
    st.sampled_from(IDS),
    st.sampled_from(["Karimov", "Haidari", "Ali"]),
)
update = st.sampled_from(sorted(COLUMNS)).flatmap(
    lambda col: st.tuples(
        st.just("update"),
        st.sampled_from(OFFICES),
        st.sampled_from(IDS),
        st.just(col),
        COLUMNS[col],
    )
)
delete = st.tuples(st.just("delete"), st.sampled_from(OFFICES), st.sampled_from(IDS))
sync = st.tuples(st.just("sync"), st.sampled_from(OFFICES))
operations = st.lists(st.one_of(insert, update, delete, sync), min_size=1, max_size=30)


def run(op: tuple, paths: dict[str, Path], agents: dict[str, SyncAgent]) -> None:
    kind, office = op[0], op[1]
    if kind == "sync":
        agents[office].sync_once()
        return
    conn = sqlite3.connect(paths[office])
    with conn:
        if kind == "insert":
            conn.execute(
                "INSERT OR IGNORE INTO cases (id, family_name, status) "
                "VALUES (?, ?, 'asylum_seeker')",
                [op[2], op[3]],
            )
        elif kind == "update":
            conn.execute(f"UPDATE cases SET {op[3]} = ? WHERE id = ?", [op[4], op[2]])
        else:
            conn.execute("DELETE FROM cases WHERE id = ?", [op[2]])
    conn.close()


@settings(
    max_examples=int(os.environ.get("FIELDSYNC_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    operations,
    st.sampled_from(["merge", "record", "manual", "custom:tests.custom_merge:larger_household"]),
)
def test_offices_converge_after_two_rounds(ops, policy):
    from shared.schema import Schema

    schema = Schema.from_toml(
        Schema.load().source.replace(
            '[tables.cases]\npolicy = "merge"', f'[tables.cases]\npolicy = "{policy}"'
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        hub = SqliteHubStore(Path(tmp) / "hub.db", schema)
        http = asgi_client(create_app(hub))
        stores: dict[str, NodeStore] = {}
        agents: dict[str, SyncAgent] = {}
        paths: dict[str, Path] = {}
        try:
            for name in OFFICES:
                paths[name] = Path(tmp) / f"{name}.db"
                stores[name] = NodeStore.init(paths[name], name, "http://testserver", "-", schema)
                client = HttpHubClient("http://testserver", hub.add_node(name), client=http)
                agents[name] = SyncAgent(stores[name], client, batch_size=3, page_size=2)
            for op in ops:
                run(op, paths, agents)
            for _ in range(2):
                for name in OFFICES:
                    agents[name].sync_once()
            expected = hub.rows("cases")
            for name in OFFICES:
                assert stores[name].rows("cases") == expected, name
                assert stores[name].pending_count() == 0
            # Nothing is lost silently: every concurrent same-field write that lost is logged.
            for record in hub.conflicts():
                assert record.other_node in OFFICES
        finally:
            http.close()
            for store in stores.values():
                store.close()
            hub.close()
