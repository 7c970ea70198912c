"""Convergence, as a property: 3 offices, random writes, random sync orders.

The hub runs in-process (through tests/asgi.py), so hypothesis
can try many histories quickly; the wire format and code paths are the real ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from hub.app import create_app
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from tests.asgi import client as asgi_client

pytestmark = [pytest.mark.integration, pytest.mark.engines]

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
                hub.set_scopes(name, ["*"])  # every office holds every case
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


# -- with sync scopes: each office ends with exactly the hub's records in its scopes --

SCOPED = {"astana": None, "almaty": None, "hq": ["*"]}
OWNERS = st.sampled_from(["astana", "almaty"])
AIDS = ("f1", "f2", "f3")
CASE_IDS = st.sampled_from(["c1", "c2"])  # few: moves meet assistance often
scoped_ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(sorted(SCOPED)), CASE_IDS, OWNERS),
        st.tuples(
            st.just("update"),
            st.sampled_from(sorted(SCOPED)),
            CASE_IDS,
            st.just("notes"),
            COLUMNS["notes"],
        ),
        st.tuples(st.just("move"), st.sampled_from(sorted(SCOPED)), CASE_IDS, OWNERS),
        st.tuples(
            st.just("aid"),
            st.sampled_from(sorted(SCOPED)),
            st.sampled_from(AIDS),
            CASE_IDS,
        ),
        st.tuples(st.just("delete"), st.sampled_from(sorted(SCOPED)), CASE_IDS),
        st.tuples(st.just("sync"), st.sampled_from(sorted(SCOPED))),
        st.tuples(st.just("admin-move"), st.just("hub"), CASE_IDS, OWNERS),
        st.tuples(st.just("widen"), st.just("hub"), st.booleans()),
    ),
    min_size=1,
    max_size=40,
)


def run_scoped(op: tuple, paths: dict[str, Path], agents: dict[str, SyncAgent], hub) -> None:
    kind, office = op[0], op[1]
    if kind == "sync":
        agents[office].sync_once()
        return
    if kind == "admin-move":
        try:
            hub.move("cases", [op[2]], op[3], "ops")
        except Exception as exc:  # no such case at the hub (yet)
            assert "holds no cases record" in str(exc)
        return
    if kind == "widen":
        hub.set_scopes("almaty", ["almaty", "astana"] if op[2] else ["almaty"])
        return
    conn = sqlite3.connect(paths[office])
    with conn:
        if kind == "insert":
            conn.execute(
                "INSERT OR IGNORE INTO cases (id, family_name, office) VALUES (?, 'Ali', ?)",
                [op[2], op[3]],
            )
        elif kind == "update":
            conn.execute("UPDATE cases SET notes = ? WHERE id = ?", [op[4], op[2]])
        elif kind == "move":
            conn.execute("UPDATE cases SET office = ? WHERE id = ?", [op[3], op[2]])
        elif kind == "aid":
            conn.execute(
                "INSERT OR IGNORE INTO assistance (id, case_id, kind) "
                "SELECT ?, id, 'food' FROM cases WHERE id = ?",
                [op[2], op[3]],
            )
        else:
            conn.execute("DELETE FROM assistance WHERE case_id = ?", [op[2]])
            conn.execute("DELETE FROM cases WHERE id = ?", [op[2]])
    conn.close()


def in_scope(hub: SqliteHubStore, table: str, scopes: list[str] | None) -> list[dict]:
    """The hub's live rows of ``table`` that belong to ``scopes`` (None: all), worked
    out from the values alone: a case by its office, assistance by its case's office
    (the case as the hub last held it, deleted or not)."""
    with hub.database.read() as conn:
        office = {
            json.loads(pk)[0]: json.loads(vals).get("office")
            for pk, vals in conn.execute(
                "SELECT pk, vals FROM _fieldsync_records WHERE tbl = 'cases'"
            )
        }
    rows = hub.rows(table)
    if scopes is None:
        return rows
    if table == "cases":
        return [row for row in rows if row["office"] in scopes]
    return [row for row in rows if office.get(row["case_id"]) in scopes]


@settings(
    max_examples=int(os.environ.get("FIELDSYNC_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scoped_ops)
# The moves that must always be tried: at an office, by an admin over an offline edit,
# and a scope widened then narrowed, each with assistance that follows its case.
@example(
    [
        ("insert", "astana", "c1", "astana"),
        ("aid", "astana", "f1", "c1"),
        ("sync", "astana"),
        ("move", "astana", "c1", "almaty"),
        ("sync", "astana"),
    ]
)
@example(
    [
        ("insert", "astana", "c1", "astana"),
        ("aid", "astana", "f1", "c1"),
        ("sync", "astana"),
        ("update", "astana", "c1", "notes", "moved"),
        ("admin-move", "hub", "c1", "almaty"),
        ("aid", "almaty", "f2", "c1"),
    ]
)
@example(
    [
        ("insert", "astana", "c1", "astana"),
        ("aid", "astana", "f1", "c1"),
        ("sync", "astana"),
        ("widen", "hub", True),
        ("sync", "almaty"),
        ("update", "almaty", "c1", "notes", "moved"),
        ("widen", "hub", False),
    ]
)
def test_with_scopes_and_moves_each_office_holds_exactly_its_scope(ops):
    from shared.schema import Schema

    schema = Schema.load()  # as shipped: cases by office, assistance with its case
    assert schema.scoped
    with tempfile.TemporaryDirectory() as tmp:
        hub = SqliteHubStore(Path(tmp) / "hub.db", schema)
        http = asgi_client(create_app(hub))
        stores: dict[str, NodeStore] = {}
        agents: dict[str, SyncAgent] = {}
        paths: dict[str, Path] = {}
        try:
            for name, scopes in SCOPED.items():
                paths[name] = Path(tmp) / f"{name}.db"
                stores[name] = NodeStore.init(paths[name], name, "http://testserver", "-", schema)
                client = HttpHubClient("http://testserver", hub.add_node(name), client=http)
                if scopes:
                    hub.set_scopes(name, scopes)
                agents[name] = SyncAgent(stores[name], client, batch_size=3, page_size=2)
            for op in ops:
                run_scoped(op, paths, agents, hub)
            for _ in range(3):
                for name in SCOPED:
                    agents[name].sync_once()
            held = hub.scopes()
            for name in SCOPED:
                for table in ("cases", "assistance"):
                    expected = in_scope(hub, table, held[name])
                    assert stores[name].rows(table) == expected, (name, table)
                assert stores[name].pending_count() == 0
        finally:
            http.close()
            for store in stores.values():
                store.close()
            hub.close()
