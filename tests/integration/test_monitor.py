"""Office status, health, the admin API and /metrics: a real uvicorn hub, real offices."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.auth import hash_token
from hub.health import health
from hub.times import ago
from shared.errors import AuthError, HubUnavailableError, ProtocolError
from shared.protocol import PROTOCOL_VERSION
from shared.reports import StatusReport, SyncEvent
from tests.faults import FlakyTransport

pytestmark = [pytest.mark.integration, pytest.mark.engines]

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def at(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat(timespec="seconds")


def state(**given: Any) -> tuple[str, str]:
    args: dict[str, Any] = {
        "now": NOW,
        "stale_after": timedelta(minutes=3),
        "last_success_at": None,
        "last_error_at": None,
        "last_error": None,
        "pending": None,
        "oldest_pending_at": None,
    }
    args.update(given)
    return health(**args)


def test_health_in_one_word_and_why() -> None:
    assert state() == ("never synced", "has not synced yet")
    assert state(last_success_at=at(1))[0] == "ok"
    assert state(last_success_at=at(5)) == ("stale", "no successful sync since 5 minutes ago")
    failing = state(last_success_at=at(5), last_error_at=at(1), last_error="timed out")
    assert failing == ("failing", "failed 1 minute ago: timed out")
    # An error followed by a success is over.
    assert state(last_success_at=at(1), last_error_at=at(2), last_error="x")[0] == "ok"
    # Never synced, but trying and failing: failing says more.
    assert state(last_error_at=at(1), last_error="refused")[0] == "failing"
    # A stall: syncs succeed, yet changes wait longer than the stale limit.
    stalled = state(last_success_at=at(0.5), pending=12, oldest_pending_at=at(20))
    assert stalled == (
        "failing",
        "stalled: 12 changes waiting since 20 minutes ago although it syncs",
    )
    # Changes made since the last sync are not a stall.
    assert state(last_success_at=at(0.5), pending=12, oldest_pending_at=at(1))[0] == "ok"


def test_ago_reads_like_a_person() -> None:
    assert ago(None) == "never"
    assert ago(at(0), NOW) == "just now"
    assert ago(at(1), NOW) == "1 minute ago"
    assert ago(at(12), NOW) == "12 minutes ago"
    assert ago(at(60 * 26), NOW) == "1 day ago"


def test_status_report_round_trip_and_refusals() -> None:
    event = SyncEvent(3, at(1), 0.5, "error", error="cut", error_code="hub_unavailable")
    report = StatusReport(
        4, at(2), 1, -250, "0.1.0", 60.0, "cut", "hub_unavailable", at(1), [event]
    )
    assert StatusReport.from_json(report.to_json()) == report
    bad: list[dict[str, Any]] = [
        {**report.to_json(), "pending": -1},
        {**report.to_json(), "pending": "4"},
        {**report.to_json(), "oldest_pending_at": "yesterday"},
        {**report.to_json(), "events": [{**event.to_json(), "outcome": "fine"}]},
        {**report.to_json(), "events": [event.to_json()] * 101},
        {**report.to_json(), "interval_seconds": 0},
    ]
    for data in bad:
        with pytest.raises(ProtocolError):
            StatusReport.from_json(data)
    long = StatusReport.from_json({**report.to_json(), "last_error": "x" * 5000})
    assert long.last_error is not None and len(long.last_error) == 1000


def admin_get(hub: Any, token: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{hub.url}{path}", params=params, headers={"Authorization": f"Bearer {token}"}
    )


def write(office: Any, sql: str, *params: Any) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)


def test_offices_report_after_each_sync_and_admins_see_it(hub, make_office) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    admin = hub.store.add_admin("ops", "owner")
    for n in range(3):
        write(astana, "INSERT INTO cases (id, office) VALUES (?, 'astana')", f"a{n}")
    astana.sync()
    almaty.sync()
    write(almaty, "INSERT INTO cases (id, office) VALUES ('b1', 'almaty')")
    almaty.sync()
    response = admin_get(hub, admin, "/v1/admin/offices")
    assert response.status_code == 200
    offices = {o["name"]: o for o in response.json()["offices"]}
    assert set(offices) == {"astana", "almaty"}
    a, b = offices["astana"], offices["almaty"]
    assert (a["health"], b["health"]) == ("ok", "ok")
    assert (a["pushed"], a["pulled"], b["pushed"], b["pulled"]) == (3, 0, 1, 3)
    assert a["lag"] == 1 and b["lag"] == 0  # astana has not pulled b1 yet
    assert a["pending"] == 0 and a["version"] and a["clock_offset_ms"] is not None
    detail = admin_get(hub, admin, "/v1/admin/offices/almaty").json()
    events = detail["events"]
    assert [e["outcome"] for e in events] == ["ok", "ok"]
    assert [(e["pushed"], e["pulled"]) for e in events] == [(1, 0), (0, 3)]  # newest first
    assert events[0]["bytes_sent"] > 0 and events[1]["bytes_sent"] == 0  # a pull sends none
    assert all(e["bytes_received"] > 0 for e in events)
    assert admin_get(hub, admin, "/v1/admin/offices/nowhere").status_code == 404


def test_a_failed_sync_reaches_the_hub_with_the_next_report(hub, make_office) -> None:
    down = {"on": False}
    transport = FlakyTransport(lambda n, request: "refuse" if down["on"] else "ok")
    astana = make_office("astana", transport=transport)
    astana.sync()
    down["on"] = True
    write(astana, "INSERT INTO cases (id) VALUES ('c1')")
    with pytest.raises(HubUnavailableError):
        astana.sync()
    down["on"] = False
    astana.sync()
    events = hub.store.office("astana").events
    assert [e["outcome"] for e in events] == ["ok", "error", "ok"]
    assert events[1]["error_code"] == "hub_unavailable"
    assert "cannot reach" in events[1]["error"]
    assert hub.store.office("astana").health == "ok"
    # Reported once: a fourth sync adds one event, not the old ones again (a sync
    # that moves something: an idle one is reported later, with the next report).
    write(astana, "INSERT INTO cases (id) VALUES ('c2')")
    astana.sync()
    assert len(hub.store.office("astana").events) == 4


def test_a_refusal_the_office_cannot_report_is_seen_by_the_hub(hub, make_office) -> None:
    astana = make_office("astana")
    astana.sync()
    token = astana.store.hub_settings().token
    # A pull the hub refuses (an office too old for sync scopes), sent as astana.
    response = httpx.get(
        f"{hub.url}/v1/pull",
        params={"node": "astana"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 409
    office = hub.store.office("astana")
    assert office.health == "failing" and office.last_error_code == "upgrade_required"


def test_a_stray_database_with_an_office_token_does_not_mark_it_failing(hub, make_office) -> None:
    astana = make_office("astana")
    make_office("almaty")
    astana.sync()
    astana.client.node = "almaty"  # almaty's database sending astana's token
    with pytest.raises(AuthError, match="belongs to office 'astana'"):
        astana.sync()
    office = hub.store.office("astana")  # its own syncs went through: not its failure
    assert office.health == "ok" and office.last_error_code is None, office.health_reason
    assert hub.store.office("almaty").health == "never synced"


def test_stale_stalled_and_the_reported_interval(hub, make_office) -> None:
    astana = make_office("astana")
    astana.sync()
    now = datetime.now(UTC)
    assert hub.store.office("astana", now=now).health == "ok"
    later = now + timedelta(minutes=10)
    stale = hub.store.office("astana", now=later)
    assert stale.health == "stale" and stale.advice and "agent runs" in stale.advice
    assert hub.store.office("astana", now=later, stale_after=timedelta(hours=1)).health == "ok"
    astana.agent.interval_seconds = 600.0  # as `node run --interval 600` reports it
    astana.sync()
    assert hub.store.office("astana", now=datetime.now(UTC) + timedelta(minutes=10)).health == "ok"
    # A stall: the office syncs, but its oldest change waits for 20 minutes.
    old = (datetime.now(UTC) - timedelta(minutes=20)).isoformat(timespec="seconds")
    hub.store.record_status("astana", StatusReport(7, old, 0, 0, "0.1.0", 60.0))
    stalled = hub.store.office("astana")
    assert stalled.health == "failing" and stalled.health_reason.startswith("stalled: 7 changes")
    assert stalled.advice and "sync agent runs" in stalled.advice


def test_tokens_keep_to_their_side(hub, make_office) -> None:
    astana = make_office("astana")
    office_token = astana.store.token
    admin = hub.store.add_admin("ops", "owner")
    assert hub.sql("SELECT token_hash FROM _fieldsync_admins") == [(hash_token(admin),)]
    for path in ("/v1/admin/offices", "/v1/admin/conflicts", "/metrics", "/v1/admin/figures"):
        assert admin_get(hub, office_token, path).status_code == 403, path
        assert admin_get(hub, "not-a-token", path).status_code == 401, path
        assert httpx.get(f"{hub.url}{path}").status_code == 401, path
    pull = admin_get(hub, admin, "/v1/pull", cursor=0, limit=10)
    assert pull.status_code == 403 and "admin token cannot push or pull" in pull.json()["detail"]
    push = httpx.post(
        f"{hub.url}/v1/push",
        json={"protocol": PROTOCOL_VERSION, "changes": []},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert push.status_code == 403
    bad_report = httpx.post(
        f"{hub.url}/v1/status",
        json={"protocol": PROTOCOL_VERSION, "pending": "many"},
        headers={"Authorization": f"Bearer {office_token}"},
    )
    assert bad_report.status_code == 400 and bad_report.json()["error"] == "bad_request"


def test_metrics_match_the_offices(hub, make_office) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    admin = hub.store.add_admin("ops", "owner")
    write(astana, "INSERT INTO cases (id, family_name) VALUES ('c1', 'A')")
    astana.sync()
    almaty.sync()
    write(astana, "UPDATE cases SET family_name = 'B' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET family_name = 'C' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    write(almaty, "INSERT INTO cases (id) VALUES ('c2')")  # pending at almaty from now on
    response = admin_get(hub, admin, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }

    def value(name: str, office: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"office": office, **labels}.items())))]

    for office in hub.store.offices():
        name = office.name
        assert value("fieldsync_office_lag_changes", name) == office.lag
        assert value("fieldsync_office_open_conflicts", name) == office.open_conflicts == 1
        assert value("fieldsync_office_pending_changes", name) == office.pending == 0
        assert value("fieldsync_office_health", name, state="ok") == 1
        assert value("fieldsync_office_health", name, state="never_synced") == 0
        assert 0 <= value("fieldsync_office_seconds_since_last_sync", name) < 60
    assert value("fieldsync_office_pushed_changes_total", "astana") == 2
    assert value("fieldsync_office_lag_changes", "astana") == 1  # almaty's later edit


def test_conflicts_resolved_through_the_api_reach_both_offices(hub, make_office) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    admin = hub.store.add_admin("ops", "owner")
    write(astana, "INSERT INTO cases (id, family_name) VALUES ('c1', 'Original')")
    astana.sync()
    almaty.sync()
    write(astana, "UPDATE cases SET family_name = 'Astana' WHERE id = 'c1'")
    astana.sync()
    write(almaty, "UPDATE cases SET family_name = 'Almaty' WHERE id = 'c1'")
    almaty.sync()
    inbox = admin_get(hub, admin, "/v1/admin/conflicts").json()["conflicts"]
    assert len(inbox) == 1
    conflict = inbox[0]
    assert conflict["column"] == "family_name" and conflict["status"] == "logged"
    assert {conflict["kept"]["office"], conflict["other"]["office"]} == {"astana", "almaty"}
    other = conflict["other"]["value"]
    url = f"{hub.url}/v1/admin/conflicts/{conflict['id']}/resolve"
    auth = {"Authorization": f"Bearer {admin}"}
    assert httpx.post(url, json={"keep": "neither"}, headers=auth).status_code == 400
    assert httpx.post(url, json={"keep": "value"}, headers=auth).status_code == 400
    missing = f"{hub.url}/v1/admin/conflicts/999/resolve"
    assert httpx.post(missing, json={"keep": "kept"}, headers=auth).status_code == 404
    done = httpx.post(url, json={"keep": "other"}, headers=auth)
    assert done.status_code == 200
    assert done.json()["status"] == "resolved" and done.json()["resolved_by"] == "ops"
    again = httpx.post(url, json={"keep": "kept"}, headers=auth)
    assert again.status_code == 409 and again.json()["error"] == "refused"
    assert admin_get(hub, admin, "/v1/admin/conflicts").json()["conflicts"] == []
    for office in (astana, almaty):
        office.sync()
        row = office.store.db.conn.execute("SELECT family_name FROM cases WHERE id = 'c1'")
        assert row.fetchone()[0] == other
    history = admin_get(hub, admin, "/v1/admin/history/cases", id="c1").json()
    actors = [(v["actor"], v["op"]) for v in history["versions"]]
    assert actors == [
        ("astana", "insert"),
        ("astana", "update"),
        ("almaty", "update"),
        ("admin ops", "resolve"),
    ]
    assert history["versions"][-1]["values"] == {"family_name": other}
    assert history["versions"][1]["values"] == {"family_name": "Astana"}
    assert admin_get(hub, admin, "/v1/admin/history/cases").status_code == 400
    assert admin_get(hub, admin, "/v1/admin/history/nope", id="x").status_code == 404
    figures = admin_get(hub, admin, "/v1/admin/figures").json()
    assert figures["tables"][0] == {
        "table": "cases",
        "records": 1,
        "by_office": [{"office": None, "records": 1}],
    }
