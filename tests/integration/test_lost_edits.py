"""An office learns which of its own edits lost at the hub (GET /v1/conflicts), against
a real uvicorn hub: `node conflicts`, `node status`, the sync summary, an admin's
resolution, and never another office's conflicts nor values outside its scopes."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from tests.conftest import Hub, Office

pytestmark = [pytest.mark.integration, pytest.mark.engines]


def write(office: Office, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(office.path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def add_case(office: Office, case_id: str, owner: str | None = None) -> None:
    write(
        office,
        "INSERT INTO cases (id, family_name, office) VALUES (?, 'Nazarova', ?)",
        case_id,
        owner or office.name,
    )


def sharing_a_case(make_office: Callable[..., Office], **astana: Any) -> tuple[Office, Office]:
    """Offices astana and almaty, both holding astana's case c1."""
    offices = make_office("astana", **astana), make_office("almaty")
    add_case(offices[0], "c1", "astana")
    for office in offices:
        office.sync()
    return offices


def later() -> None:
    time.sleep(0.02)  # so the second office's stamp is later by the wall clock


def node_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, ["node", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_delete_undone_by_a_later_update_is_shown_at_the_office_that_deleted(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    # The README's example: astana deletes a case, almaty's later update brings it back.
    astana, almaty = sharing_a_case(make_office)
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    later()
    write(almaty, "UPDATE cases SET notes = 'visited' WHERE id = 'c1'")
    astana.sync()
    pushed = almaty.agent.sync_once()
    assert pushed.conflicts == 1 and pushed.lost == 0  # almaty's edit won

    report = astana.agent.sync_once()
    assert report.lost == 1
    assert "1 of this office's edits lost" in report.summary()
    assert "fieldsync node conflicts" in report.summary()
    [case] = astana.store.rows("cases")
    assert case["notes"] == "visited"  # back

    [entry] = astana.store.lost_edits()
    assert entry["kind"] == "delete" and entry["table"] == "cases"
    assert entry["pk"] == {"id": "c1"}
    assert entry["your_value"] is None  # the delete
    assert entry["winning_office"] == "almaty"
    assert entry["status"] == "logged"
    assert almaty.store.lost_edits() == []

    # Offline: the hub is not asked again.
    out = node_cli("conflicts", str(astana.path))
    assert "cases id=c1" in out and "this office deleted it" in out and "almaty" in out
    data = json.loads(node_cli("conflicts", str(astana.path), "--json"))
    assert [d["id"] for d in data] == [entry["id"]]
    # A second sync learns nothing new and asks nothing more.
    assert astana.agent.sync_once().lost == 0
    assert len(astana.store.lost_edits()) == 1


def test_a_same_field_edit_that_lost_and_an_admins_resolution_reach_the_office(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana, almaty = sharing_a_case(make_office)
    write(astana, "UPDATE cases SET family_name = 'Nazarov' WHERE id = 'c1'")
    later()
    write(almaty, "UPDATE cases SET family_name = 'Nazarova-Ali' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    astana.sync()

    [entry] = astana.store.lost_edits()
    assert entry["kind"] == "field" and entry["column"] == "family_name"
    assert entry["your_value"] == "Nazarov"
    assert entry["winning_value"] == "Nazarova-Ali"
    assert entry["winning_office"] == "almaty"
    assert entry["your_time"] and entry["winning_time"]
    assert entry["resolved_by"] is None

    status = json.loads(node_cli("status", str(astana.path), "--json"))
    assert status["conflicts"] == {"lost": 1, "open": 0, "logged": 1, "resolved": 0}
    assert "Lost edits:        1" in node_cli("status", str(astana.path))
    assert json.loads(node_cli("status", str(almaty.path), "--json"))["conflicts"]["lost"] == 0

    hub.store.resolve(entry["id"], "other", "ops")  # an admin restores astana's value
    report = astana.agent.sync_once()
    assert report.lost == 0 and report.resolved == 1
    assert "1 resolved by an admin" in report.summary()
    [resolved] = astana.store.lost_edits()
    assert resolved["status"] == "resolved" and resolved["resolved_by"] == "ops"
    assert resolved["resolution"] == {"keep": "other"}
    assert astana.store.rows("cases")[0]["family_name"] == "Nazarov"
    assert "resolved by ops" in node_cli("conflicts", str(astana.path))
    status = json.loads(node_cli("status", str(astana.path), "--json"))
    assert status["conflicts"] == {"lost": 1, "open": 0, "logged": 0, "resolved": 1}


def test_an_office_never_receives_another_offices_conflicts(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    bishkek = make_office("bishkek")
    add_case(astana, "c1", "astana")
    for office in (astana, almaty, bishkek):
        office.sync()
    write(astana, "UPDATE cases SET notes = 'a' WHERE id = 'c1'")
    later()
    write(almaty, "UPDATE cases SET notes = 'b' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    for office in (astana, almaty, bishkek):
        office.sync()
    assert len(hub.store.conflicts()) == 1
    assert len(astana.store.lost_edits()) == 1
    assert almaty.store.lost_edits() == [] and bishkek.store.lost_edits() == []

    for name, token in (("almaty", almaty.store.token), ("bishkek", bishkek.store.token)):
        answer = httpx.get(
            f"{hub.url}/v1/conflicts",
            params={"after": 0},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 200
        assert answer.json()["conflicts"] == [] and answer.json()["node"] == name
    mine = httpx.get(
        f"{hub.url}/v1/conflicts", headers={"Authorization": f"Bearer {astana.store.token}"}
    ).json()
    assert [c["value"] for c in mine["conflicts"]] == ["a"]
    unauthenticated = httpx.get(f"{hub.url}/v1/conflicts")
    assert unauthenticated.status_code == 401


def test_the_winning_value_of_a_record_moved_out_of_the_offices_scope_is_withheld(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana, hq = make_office("astana", scopes=()), make_office("hq")
    add_case(astana, "a1")
    astana.sync()
    hq.sync()
    write(astana, "UPDATE cases SET notes = 'mine' WHERE id = 'a1'")
    later()
    write(hq, "UPDATE cases SET notes = 'secret' WHERE id = 'a1'")
    astana.sync()
    hq.sync()
    hub.store.move("cases", ["a1"], "almaty", "ops")
    astana.sync()

    [entry] = astana.store.lost_edits()
    assert entry["your_value"] == "mine"
    assert entry["hidden"] is True and entry["winning_value"] is None
    assert "secret" not in json.dumps(astana.store.lost_edits())
    assert "no longer in this office's scope" in node_cli("conflicts", str(astana.path))


class CountingTransport(httpx.HTTPTransport):
    """A real transport that notes the path of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return super().handle_request(request)


def test_the_office_asks_for_its_conflicts_only_when_there_is_something_new(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    transport = CountingTransport()
    astana, almaty = sharing_a_case(make_office, transport=transport)
    for n in range(3):  # syncs with work but no conflict
        write(astana, "UPDATE cases SET notes = ? WHERE id = 'c1'", f"round {n}")
        astana.sync()
        almaty.sync()
    assert "/v1/conflicts" not in transport.paths
    write(astana, "UPDATE cases SET notes = 'a' WHERE id = 'c1'")
    later()
    write(almaty, "UPDATE cases SET notes = 'b' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    astana.sync()
    assert transport.paths.count("/v1/conflicts") == 1
    astana.sync()
    astana.sync()
    assert transport.paths.count("/v1/conflicts") == 1
    assert len(astana.store.lost_edits()) == 1


def test_an_edit_that_won_but_an_admin_overrode_reaches_its_office(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana, almaty = sharing_a_case(make_office)
    write(almaty, "UPDATE cases SET family_name = 'Nazarova-Ali' WHERE id = 'c1'")
    later()
    write(astana, "UPDATE cases SET family_name = 'Nazarov' WHERE id = 'c1'")  # wins
    almaty.sync()
    astana.sync()
    almaty.sync()
    assert astana.store.lost_edits() == [] and len(almaty.store.lost_edits()) == 1

    [logged] = hub.store.conflicts()
    hub.store.resolve(logged.id, "other", "ops")  # almaty's value after all
    report = astana.agent.sync_once()
    assert report.lost == 1
    [entry] = astana.store.lost_edits()
    assert entry["overridden"] is True and entry["status"] == "resolved"
    assert entry["your_value"] == "Nazarov" and entry["winning_value"] == "Nazarova-Ali"
    assert entry["winning_office"] == "almaty" and entry["resolved_by"] == "ops"
    out = node_cli("conflicts", str(astana.path))
    assert "it won, until ops chose almaty's" in out
    assert astana.store.rows("cases")[0]["family_name"] == "Nazarova-Ali"

    assert almaty.agent.sync_once().resolved == 1
    [restored] = almaty.store.lost_edits()
    assert restored["overridden"] is False and restored["resolution"] == {"keep": "other"}
    # A decision that keeps the winner overrides no one: astana is not told of it again.
    assert astana.agent.sync_once().lost == 0
