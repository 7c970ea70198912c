"""Sync scopes against a real uvicorn hub: each office holds only its cases, moves.

The shipped schema is scoped (cases by office, assistance with its case): these tests
use it as it is."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.clock import Timestamp
from shared.protocol import Change
from shared.schema import Schema
from tests.conftest import Hub, Office

pytestmark = [pytest.mark.integration, pytest.mark.engines]


@pytest.fixture
def scoped(hub: Hub, make_office: Callable[..., Office]) -> tuple[Hub, Callable[..., Office]]:
    """The conftest hub, with the shipped schema; ``make("hq", "*")`` registers an
    office holding the given scopes (none: its own name, as `hub add-node` does)."""
    assert hub.store.schema.scoped and Schema.load().scoped  # as shipped

    def make(name: str, *scopes: str) -> Office:
        return make_office(name, scopes=scopes)

    return hub, make


def write(office: Office, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(office.path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def add_case(office: Office, case_id: str, owner: str | None = None, **values: Any) -> None:
    row = {"id": case_id, "family_name": "Nazarova", "office": owner or office.name, **values}
    marks = ", ".join("?" * len(row))
    write(office, f"INSERT INTO cases ({', '.join(row)}) VALUES ({marks})", *row.values())


def add_aid(office: Office, aid_id: str, case_id: str) -> None:
    write(
        office,
        "INSERT INTO assistance (id, case_id, kind, quantity) VALUES (?, ?, 'food', 1)",
        aid_id,
        case_id,
    )


def ids(where: Office | Hub, table: str = "cases") -> set[str]:
    return {row["id"] for row in where.store.rows(table)}


def sync(*offices: Office, rounds: int = 2) -> None:
    for _ in range(rounds):
        for office in offices:
            office.sync()


def test_each_office_pulls_only_its_scope_and_a_new_office_starts_with_its_own(scoped):
    hub, make = scoped
    astana, almaty, hq = make("astana"), make("almaty"), make("hq", "*")
    add_case(astana, "a1")
    add_aid(astana, "a1-food", "a1")
    add_case(almaty, "b1")
    add_aid(almaty, "b1-food", "b1")
    sync(astana, almaty, hq)
    assert ids(astana) == {"a1"} and ids(astana, "assistance") == {"a1-food"}
    assert ids(almaty) == {"b1"} and ids(almaty, "assistance") == {"b1-food"}
    assert ids(hq) == {"a1", "b1"} and ids(hq, "assistance") == {"a1-food", "b1-food"}
    # A third office registered later: its first sync brings none of the others' cases.
    shymkent = make("shymkent")
    shymkent.sync()
    assert ids(shymkent) == set() and ids(shymkent, "assistance") == set()


def test_a_change_outside_the_scope_is_refused_per_change_and_kept_aside(scoped):
    hub, make = scoped
    astana, almaty = make("astana"), make("almaty")
    add_case(astana, "a1", notes="astana's")
    sync(astana)
    # Almaty cannot see a1; a forged push of an update and a delete is refused, per change.
    stamp = Timestamp(hub.store.database.clock.tick().hlc, "almaty")
    result = almaty.client.push(
        [
            Change(1, "cases", {"id": "a1"}, "update", stamp, {"notes": "overwritten"}),
            Change(2, "cases", {"id": "a1"}, "delete", stamp, None),
        ]
    )
    assert result.acked == 2 and result.applied == 0
    assert [r.record for r in result.rejected] == [None, None]  # nothing of a1 leaks
    assert all("outside its scope" in r.reason for r in result.rejected)
    assert [r["notes"] for r in hub.store.rows("cases")] == ["astana's"]
    # A new case of another office, made at almaty: kept aside there, not applied.
    add_case(almaty, "x1", owner="astana")
    almaty.sync()
    assert ids(hub) == {"a1"}
    [kept] = almaty.store.rejected()
    assert "must belong to its scope" in kept["reason"]


def test_a_case_moved_at_an_office_goes_with_its_assistance_and_leaves_no_delete(scoped):
    hub, make = scoped
    astana, almaty = make("astana"), make("almaty")
    add_case(astana, "a1")
    add_aid(astana, "a1-food", "a1")
    add_case(astana, "a2")
    sync(astana, almaty)
    write(astana, "UPDATE cases SET office = 'almaty' WHERE id = 'a1'")
    sync(astana, almaty)
    assert ids(almaty) == {"a1"} and ids(almaty, "assistance") == {"a1-food"}
    assert ids(astana) == {"a2"} and ids(astana, "assistance") == set()
    assert astana.store.pending_count() == 0  # the removal was not captured
    assert ids(hub) == {"a1", "a2"} and ids(hub, "assistance") == {"a1-food"}
    # Almaty now works on it; astana hears nothing more of it.
    write(almaty, "UPDATE cases SET notes = 'seen in almaty' WHERE id = 'a1'")
    add_aid(almaty, "a1-tent", "a1")
    sync(almaty, astana)
    assert ids(astana) == {"a2"} and ids(astana, "assistance") == set()
    assert ids(hub, "assistance") == {"a1-food", "a1-tent"}


def test_an_offline_edit_to_a_case_an_admin_moved_away_is_merged_not_lost(scoped):
    hub, make = scoped
    astana, almaty = make("astana"), make("almaty")
    add_case(astana, "a1")
    add_aid(astana, "a1-food", "a1")
    sync(astana, almaty)
    write(astana, "UPDATE cases SET notes = 'written offline' WHERE id = 'a1'")
    hub.store.move("cases", ["a1"], "almaty", "ops")
    sync(astana, almaty)
    [record] = hub.store.rows("cases")
    assert record["notes"] == "written offline" and record["office"] == "almaty"
    assert ids(astana) == set() and ids(astana, "assistance") == set()
    assert ids(almaty) == {"a1"} and ids(almaty, "assistance") == {"a1-food"}
    [moved] = almaty.store.rows("cases")
    assert moved["notes"] == "written offline"
    assert astana.store.rejected() == []


def test_a_wider_then_narrower_scope_takes_effect_on_the_next_sync(scoped):
    hub, make = scoped
    astana, almaty = make("astana"), make("almaty")
    add_case(astana, "a1")
    add_aid(astana, "a1-food", "a1")
    add_case(almaty, "b1")
    sync(astana, almaty)
    hub.store.set_scopes("almaty", ["almaty", "astana"])
    almaty.sync()
    assert ids(almaty) == {"a1", "b1"} and ids(almaty, "assistance") == {"a1-food"}
    write(almaty, "UPDATE cases SET notes = 'regional review' WHERE id = 'a1'")
    sync(almaty, astana)
    assert {r["notes"] for r in astana.store.rows("cases")} == {"regional review"}
    hub.store.set_scopes("almaty", ["almaty"])
    almaty.sync()
    assert ids(almaty) == {"b1"} and ids(almaty, "assistance") == set()
    assert almaty.store.pending_count() == 0
    assert ids(hub) == {"a1", "b1"}


def test_an_office_too_old_for_scopes_is_told_to_upgrade_and_keeps_its_changes(scoped):
    hub, make = scoped
    astana = make("astana")
    add_case(astana, "a1")
    token = hub.store.add_node("old")  # an office whose fieldsync does not ask scopes=1
    answer = httpx.get(
        f"{hub.url}/v1/pull", params={"cursor": 0}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 409
    assert answer.json()["error"] == "upgrade_required"
    assert "upgrade fieldsync" in answer.json()["detail"]
    astana.sync()  # this version asks with scopes=1
    assert astana.store.pending_count() == 0 and ids(hub) == {"a1"}


# -- the command line, as an admin uses it ----------------------------------------------


def test_scopes_from_the_command_line(tmp_path: Path) -> None:
    from tests.integration.test_cli import (
        HubProcess,
        assert_one_line_error,
        fieldsync,
        ok,
        query,
    )

    # The README's way, with the shipped schema: headquarters holds everything.
    hub_db = tmp_path / "hub.db"
    tokens = {}
    for name, extra in (("astana", []), ("almaty", []), ("hq", ["--scope", "*"])):
        out = ok("hub", "add-node", name, "--db", hub_db, *extra)
        tokens[name] = out.strip().splitlines()[-1]
    assert json.loads(ok("hub", "scope", "--db", hub_db, "--json")) == {
        "almaty": ["almaty"],
        "astana": ["astana"],
        "hq": None,
    }
    server = HubProcess(hub_db, tmp_path / "hub.log")
    server.start()
    try:
        dbs = {}
        for name, token in tokens.items():
            dbs[name] = tmp_path / f"{name}.db"
            ok(
                "node",
                "init",
                dbs[name],
                "--name",
                name,
                "--hub",
                server.url,
                "--token",
                token,
            )

        def sync_all() -> None:
            for db in dbs.values():
                ok("node", "sync", db)

        def cases(name: str) -> list[tuple]:
            return query(dbs[name], "SELECT id, office FROM cases ORDER BY id")

        conn = sqlite3.connect(dbs["astana"])
        with conn:
            conn.execute("INSERT INTO cases (id, office) VALUES ('a1', 'astana')")
            conn.execute("INSERT INTO assistance (id, case_id, kind) VALUES ('f1', 'a1', 'food')")
        conn.close()
        sync_all()
        assert cases("astana") == [("a1", "astana")] and cases("almaty") == []
        assert cases("hq") == [("a1", "astana")]
        out = ok("hub", "move", "cases", "a1", "--to", "almaty", "--db", hub_db, "--by", "ops")
        assert "Moved the cases record to almaty" in out
        sync_all()
        assert cases("astana") == [] and cases("almaty") == [("a1", "almaty")]
        assert query(dbs["almaty"], "SELECT id FROM assistance") == [("f1",)]
        assert query(dbs["astana"], "SELECT count(*) FROM assistance") == [(0,)]
        # A regional office: almaty is given astana's records too.
        out = ok("hub", "scope", "astana", "astana", "almaty", "--db", hub_db)
        assert "Office astana now holds almaty, astana" in out
        ok("node", "sync", dbs["astana"])
        assert cases("astana") == [("a1", "almaty")]
        # Bad input: one line each, nothing changed.
        assert_one_line_error(
            fieldsync("hub", "scope", "nobody", "x", "--db", hub_db), "no office named 'nobody'"
        )
        assert_one_line_error(
            fieldsync("hub", "move", "assistance", "f1", "--to", "astana", "--db", hub_db),
            "follow their cases record",
        )
        assert_one_line_error(
            fieldsync("hub", "move", "cases", "nope", "--to", "astana", "--db", hub_db),
            "holds no cases record",
        )
        assert query(hub_db, "SELECT office FROM cases") == [("almaty",)]
        # Both are recorded in the audit log: who, and what (names and keys, no values).
        entries = json.loads(ok("hub", "audit", "--db", hub_db, "--json"))
        done = {(e["action"], e["target"]) for e in entries}
        assert {("set_scope", "office hq"), ("set_scope", "office astana")} <= done
        assert ("move", 'cases ["a1"]') in done
    finally:
        server.stop()


def test_an_office_given_scopes_before_it_ever_synced_pulls_at_once(scoped):
    hub, make = scoped
    astana = make("astana")
    add_case(astana, "a1")
    astana.sync()
    hq = make("hq", "*")  # `hub add-node hq --scope '*'`: registered, then given scopes
    page = hq.client.pull(0, 100)
    assert not page.resync and [row.pk for row in page.rows] == [{"id": "a1"}]
    # Once it has pulled, new scopes make it pull its whole scope again.
    hub.store.set_scopes("hq", ["almaty"])
    assert hq.client.pull(page.cursor, 100).resync
