"""Two and three offices against a real uvicorn hub: conflicts, deletes, faults."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.clock import Timestamp
from shared.errors import ClockSkewError, HubUnavailableError
from tests.faults import FlakyTransport

pytestmark = [pytest.mark.integration, pytest.mark.engines]


def write(office, sql: str, *params) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)
    conn.close()


def add_case(office, case_id: str, **values) -> None:
    row = {
        "id": case_id,
        "family_name": "Nazarova",
        "given_name": "Dilnoza",
        "status": "asylum_seeker",
        "household_size": 2,
        **values,
    }
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    write(office, f"INSERT INTO cases ({cols}) VALUES ({marks})", *row.values())


def case(office_or_hub, case_id: str):
    rows = [r for r in office_or_hub.store.rows("cases") if r["id"] == case_id]
    return rows[0] if rows else None


def sync_all(*offices, rounds: int = 2) -> None:
    for _ in range(rounds):
        for office in offices:
            office.sync()


def assert_converged(hub, *offices) -> None:
    for table in ("cases", "assistance"):
        expected = hub.store.rows(table)
        for office in offices:
            assert office.store.rows(table) == expected, (
                f"{office.name}.{table} differs from the hub"
            )


def test_concurrent_edits_to_different_fields_both_survive(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET household_size = 5 WHERE id = 'c1'")
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    assert case(hub, "c1")["status"] == "refugee"
    assert case(hub, "c1")["household_size"] == 5
    assert hub.store.conflicts() == []


@pytest.mark.parametrize("first", ["astana", "almaty"])
def test_same_field_later_stamp_wins_and_loser_is_logged(hub, make_office, first):
    offices = {"astana": make_office("astana"), "almaty": make_office("almaty")}
    astana, almaty = offices["astana"], offices["almaty"]
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")
    stamps = {
        name: office.store.pending(10)[-1].ts for name, office in offices.items()
    }  # the later stamp must win, whichever office syncs first; names break ties
    winner = max(stamps, key=stamps.__getitem__)
    loser = "almaty" if winner == "astana" else "astana"
    values = {"astana": "refugee", "almaty": "rejected"}
    other = almaty if first == "astana" else astana
    offices[first].sync()
    other.sync()
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    assert case(hub, "c1")["status"] == values[winner]
    [conflict] = hub.store.conflicts()
    assert (conflict.kind, conflict.column, conflict.status) == ("field", "status", "logged")
    assert (conflict.kept_value, conflict.kept_node) == (values[winner], winner)
    assert (conflict.other_value, conflict.other_node) == (values[loser], loser)
    assert conflict.kept_version == str(stamps[winner])
    assert conflict.other_version == str(stamps[loser])
    times = conflict.to_json()
    assert times["kept"]["time"] and times["other"]["time"]


def test_update_concurrent_with_delete_keeps_record(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET notes = 'needs winter kit' WHERE id = 'c1'")
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    assert case(hub, "c1")["notes"] == "needs winter kit"
    assert [c.kind for c in hub.store.conflicts()] == ["delete"]


def test_delete_arriving_after_concurrent_update_is_logged_not_applied(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(almaty, "UPDATE cases SET notes = 'moved to Almaty' WHERE id = 'c1'")
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    almaty.sync()  # the update reaches the hub first
    astana.sync()
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    assert case(hub, "c1")["notes"] == "moved to Almaty"
    [conflict] = hub.store.conflicts()
    assert conflict.kind == "delete" and conflict.other_node == "astana"


def test_delete_made_after_seeing_update_wins(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(almaty, "UPDATE cases SET notes = 'duplicate record' WHERE id = 'c1'")
    sync_all(almaty, astana)
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    assert case(hub, "c1") is None and case(almaty, "c1") is None
    assert hub.store.conflicts() == []


def test_reinsert_after_seen_delete_brings_record_back(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    sync_all(astana, almaty)
    add_case(almaty, "c1", family_name="Rahimi")
    sync_all(almaty, astana)
    assert_converged(hub, astana, almaty)
    assert case(astana, "c1")["family_name"] == "Rahimi"
    assert hub.store.conflicts() == []


def _offices(policy_hub, tmp_path):
    from node.agent import SyncAgent
    from node.client import HttpHubClient
    from tests.conftest import Office

    hub, schema = policy_hub
    offices = []
    for name in ("astana", "almaty"):
        token = hub.store.add_node(name)
        hub.store.set_scopes(name, ["*"])
        store = NodeStore.init(tmp_path / f"{name}.db", name, hub.url, token, schema)
        client = HttpHubClient(hub.url, token, node=name)
        offices.append(
            Office(name, store, SyncAgent(store, client), client, tmp_path / f"{name}.db")
        )
    return hub, offices


@pytest.mark.parametrize("policy_hub", ["record"], indirect=True)
def test_record_policy_whole_later_record_wins(policy_hub, tmp_path):
    hub, (astana, almaty) = _offices(policy_hub, tmp_path)
    try:
        add_case(astana, "c1")
        sync_all(astana, almaty)
        write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
        time.sleep(0.01)  # so Almaty's stamp is later by the wall clock, not by a tie-break
        write(almaty, "UPDATE cases SET household_size = 7 WHERE id = 'c1'")
        sync_all(astana, almaty)
        assert_converged(hub, astana, almaty)
        row = case(hub, "c1")
        # Almaty's whole record wins: its status (unchanged there) overrides Astana's edit.
        assert (row["status"], row["household_size"]) == ("asylum_seeker", 7)
        [conflict] = hub.store.conflicts()
        assert conflict.kind == "record" and conflict.other_value["status"] == "refugee"
    finally:
        for office in (astana, almaty):
            office.client.close()
            office.store.close()


@pytest.mark.parametrize(
    "policy_hub", ["custom:tests.custom_merge:larger_household"], indirect=True
)
def test_custom_policy_function_merges_on_the_hub(policy_hub, tmp_path):
    hub, (astana, almaty) = _offices(policy_hub, tmp_path)
    try:
        add_case(astana, "c1", household_size=3)
        sync_all(astana, almaty)
        write(astana, "UPDATE cases SET household_size = 6, notes = 'twins' WHERE id = 'c1'")
        write(almaty, "UPDATE cases SET household_size = 4, notes = 'grandmother' WHERE id = 'c1'")
        sync_all(astana, almaty)
        assert_converged(hub, astana, almaty)
        row = case(hub, "c1")
        assert (row["household_size"], row["notes"]) == (6, "grandmother | twins")
        logged = {c.column: c for c in hub.store.conflicts()}
        assert set(logged) == {"household_size", "notes"}
        size = logged["household_size"]
        # Both sides with their offices, and what the function chose.
        assert size.kind == "custom" and size.merged == 6
        assert {(size.kept_node, size.kept_value), (size.other_node, size.other_value)} == {
            ("astana", 6),
            ("almaty", 4),
        }
    finally:
        for office in (astana, almaty):
            office.client.close()
            office.store.close()


@pytest.mark.parametrize(
    "policy_hub", ["custom:tests.custom_merge:larger_household"], indirect=True
)
def test_custom_decision_reaches_the_office_that_edits_the_record_again(policy_hub, tmp_path):
    """The function's value is the hub's write: the office whose value lost takes it
    back even when its next change to the record comes before its next pull."""
    hub, (astana, almaty) = _offices(policy_hub, tmp_path)
    try:
        add_case(astana, "c1", household_size=3)
        sync_all(astana, almaty)
        write(almaty, "UPDATE cases SET household_size = 6 WHERE id = 'c1'")
        almaty.sync()
        write(astana, "UPDATE cases SET household_size = 4 WHERE id = 'c1'")
        write(astana, "UPDATE cases SET notes = 'second save' WHERE id = 'c1'")
        for _ in range(3):
            sync_all(astana, almaty)
        assert_converged(hub, astana, almaty)
        assert (case(astana, "c1")["household_size"], case(astana, "c1")["notes"]) == (
            6,
            "second save",
        )
        (size,) = hub.store.conflicts()
        assert (size.kind, size.other_value, size.merged) == ("custom", 4, 6)
        # Stamped by the hub, after the change it decided on.
        state = hub.store.db.conn.execute(
            "SELECT vers FROM _fieldsync_records WHERE pk = '[\"c1\"]'"
        ).fetchone()[0]
        assert json.loads(state)["household_size"].endswith("-hub")
        assert json.loads(state)["household_size"] > size.other_version
    finally:
        for office in (astana, almaty):
            office.client.close()
            office.store.close()


@pytest.mark.parametrize(
    "policy_hub",
    ["custom:tests.custom_merge:broken", "custom:tests.custom_merge:wrong_type"],
    indirect=True,
)
def test_failing_custom_function_applies_nothing_and_keeps_changes(policy_hub, tmp_path):
    hub, (astana, almaty) = _offices(policy_hub, tmp_path)
    try:
        add_case(astana, "c1", household_size=3)
        sync_all(astana, almaty)
        write(astana, "UPDATE cases SET household_size = 6 WHERE id = 'c1'")
        write(almaty, "UPDATE cases SET household_size = 4, status = 'refugee' WHERE id = 'c1'")
        sync_all(astana)
        with pytest.raises(HubUnavailableError, match="custom merge function"):
            almaty.sync()
        assert almaty.store.pending_count() == 1
        assert case(hub, "c1")["status"] == "asylum_seeker"  # nothing of the batch applied
    finally:
        for office in (astana, almaty):
            office.client.close()
            office.store.close()


@pytest.mark.parametrize("policy_hub", ["manual"], indirect=True)
def test_manual_policy_keeps_hub_value_until_an_admin_decides(policy_hub, tmp_path):
    hub, (astana, almaty) = _offices(policy_hub, tmp_path)
    try:
        add_case(astana, "c1")
        sync_all(astana, almaty)
        write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
        write(almaty, "UPDATE cases SET status = 'rejected', household_size = 4 WHERE id = 'c1'")
        sync_all(astana, almaty)
        assert_converged(hub, astana, almaty)
        row = case(hub, "c1")
        assert (row["status"], row["household_size"]) == ("refugee", 4)  # other field merged
        [conflict] = hub.store.conflicts("open")
        assert (conflict.kept_value, conflict.other_value) == ("refugee", "rejected")
        hub.store.resolve(conflict.id, "other", "admin")
        sync_all(astana, almaty)
        assert_converged(hub, astana, almaty)
        assert case(astana, "c1")["status"] == "rejected"
        assert hub.store.conflicts("open") == []
    finally:
        for office in (astana, almaty):
            office.client.close()
            office.store.close()


def test_admin_resolution_reaches_every_office(hub, make_office):
    astana, almaty, shymkent = make_office("astana"), make_office("almaty"), make_office("shymkent")
    add_case(astana, "c1")
    sync_all(astana, almaty, shymkent)
    write(astana, "UPDATE cases SET given_name = 'Aziz' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET given_name = 'Azis' WHERE id = 'c1'")
    sync_all(astana, almaty, shymkent)
    [conflict] = hub.store.conflicts()
    hub.store.resolve(conflict.id, "value", "hq-admin", "Aziz Karimovich")
    sync_all(astana, almaty, shymkent)
    assert_converged(hub, astana, almaty, shymkent)
    assert case(shymkent, "c1")["given_name"] == "Aziz Karimovich"
    [done] = hub.store.conflicts("resolved")
    assert done.resolved_by == "hq-admin"


def test_lost_push_answer_is_replayed_without_double_effect(hub, make_office):
    pushes: list[int] = []

    def plan(n, req):
        if req.url.path == "/v1/push":
            pushes.append(n)
            return "drop" if len(pushes) == 1 else "ok"
        return "ok"

    astana = make_office("astana", transport=FlakyTransport(plan))
    almaty = make_office("almaty")
    add_case(astana, "c1")
    write(astana, "UPDATE cases SET household_size = household_size + 1 WHERE id = 'c1'")
    with pytest.raises(HubUnavailableError):
        astana.sync()
    assert astana.store.pending_count() == 2  # not acknowledged, so kept
    nodes = {n["name"]: n for n in hub.store.nodes()}
    assert nodes["astana"]["acked_seq"] == 2  # ...although the hub committed them
    astana.sync()
    assert astana.store.pending_count() == 0
    sync_all(astana, almaty)
    assert case(hub, "c1")["household_size"] == 3
    assert_converged(hub, astana, almaty)
    assert hub.store.conflicts() == []


def test_cut_sync_resumes_from_last_acknowledged_batch(hub, make_office):
    pushes: list[int] = []

    def plan(n, request):
        if request.url.path == "/v1/push":
            pushes.append(n)
            return "refuse" if len(pushes) == 4 else "ok"
        return "ok"

    astana = make_office("astana", batch_size=10, transport=FlakyTransport(plan))
    almaty = make_office("almaty", page_size=7)
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name, household_size) VALUES (?, ?, ?)",
            [(f"c{i:03}", f"Family {i}", i % 9 + 1) for i in range(95)],
        )
    conn.close()
    with pytest.raises(HubUnavailableError):
        astana.sync()
    assert astana.store.pending_count() == 95 - 30  # three batches acknowledged
    astana.sync()
    assert len(pushes) == 4 + 7  # resumed with the fourth batch, not from zero
    sync_all(astana, almaty)
    assert len(almaty.store.rows("cases")) == 95
    assert_converged(hub, astana, almaty)


def test_cut_pull_keeps_applied_pages(hub, make_office):
    astana = make_office("astana")
    pulls: list[int] = []

    def plan(n, request):
        if request.url.path == "/v1/pull":
            pulls.append(n)
            return "refuse" if len(pulls) == 3 else "ok"
        return "ok"

    almaty = make_office("almaty", page_size=10, transport=FlakyTransport(plan))
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name) VALUES (?, ?)",
            [(f"c{i:03}", "X") for i in range(45)],
        )
    conn.close()
    astana.sync()
    with pytest.raises(HubUnavailableError):
        almaty.sync()
    assert len(almaty.store.rows("cases")) == 20
    almaty.sync()
    assert len(almaty.store.rows("cases")) == 45
    assert len(pulls) == 3 + 3  # pages 3, 4 and 5 after the cut, not 1 and 2 again
    assert_converged(hub, astana, almaty)


@pytest.mark.parametrize("offset_hours", [48, 24 * 365 * 10])
def test_clock_far_ahead_is_corrected_and_cannot_win_unfairly(hub, make_office, offset_hours):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(almaty, "c1")
    sync_all(almaty, astana)
    write(astana, "UPDATE _fieldsync_state SET offset_ms = ?", offset_hours * 3600 * 1000)
    write(astana, "UPDATE cases SET status = 'closed' WHERE id = 'c1'")  # stamped far ahead
    time.sleep(0.01)
    write(almaty, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")  # really later
    almaty.sync()
    astana.sync()  # refused as too far ahead, re-stamped with the hub's time, sent again
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    # Re-stamped with its real time, Astana's earlier edit loses to Almaty's later one.
    assert astana.store.pending_count() == 0
    assert abs(astana.store.clock_offset_ms) < 5000
    assert case(hub, "c1")["status"] == "refugee"
    [conflict] = hub.store.conflicts()
    assert (conflict.kept_node, conflict.other_node, conflict.other_value) == (
        "almaty",
        "astana",
        "closed",
    )
    assert abs(Timestamp.parse(conflict.other_version).wall_ms - time.time() * 1000) < 60_000


def test_clock_far_ahead_with_hub_refusing_keeps_changes_queued(hub, make_office):
    astana = make_office("astana")
    hub.store.max_future_ms = -(10**12)  # a hub that refuses everything as "in its future"
    add_case(astana, "c1")
    with pytest.raises(ClockSkewError, match="clock"):
        astana.sync()
    assert astana.store.pending_count() == 1
    assert hub.store.rows("cases") == []
    assert "clock" in astana.store.status().last_error


def test_office_never_receives_its_own_exact_changes_back(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn:
        conn.executemany("INSERT INTO cases (id) VALUES (?)", [(f"c{i}",) for i in range(20)])
    conn.close()
    astana.sync()
    report = astana.agent.sync_once()
    assert (report.pushed, report.pulled) == (0, 0)


def test_local_edit_made_during_a_sync_is_not_overwritten(hub, make_office, tmp_path: Path):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET notes = 'hub copy' WHERE id = 'c1'")
    astana.sync()
    write(almaty, "UPDATE cases SET notes = 'local edit, not yet pushed' WHERE id = 'c1'")
    # Pull only: the pending local edit must survive the pulled value.
    page = almaty.client.pull(almaty.store.cursor, 100)
    almaty.store.apply_page(page)
    assert case(almaty, "c1")["notes"] == "local edit, not yet pushed"
    sync_all(almaty, astana)
    assert_converged(hub, astana, almaty)


def test_token_of_another_office_is_refused_before_anything_is_applied(hub, make_office):
    from shared.errors import AuthError

    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(almaty, "c9")
    almaty.sync()
    add_case(astana, "c1")
    astana.store.set_hub(token=hub.store.add_node("shymkent"))
    mixed = HttpHubClient(hub.url, astana.store.token, node="astana")
    try:
        with pytest.raises(AuthError, match="belongs to office 'shymkent'"):
            SyncAgent(astana.store, mixed).sync_once()
    finally:
        mixed.close()
    assert [r["id"] for r in hub.store.rows("cases")] == ["c9"]
    assert astana.store.pending_count() == 1
