"""The audit log and sign-in throttling, on a real uvicorn hub (tests/conftest.py).

Wrong tokens come from 127.0.0.1; "another address" is a client bound to 127.0.0.2
(Linux routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.auth import BLOCK_SECONDS, FAILURES
from tests.conftest import Hub, Office

pytestmark = pytest.mark.integration

FIELDSYNC = Path(sys.executable).parent / "fieldsync"
SECRET = "Sekretova"  # a case value: never in the audit log
GUESSES = 300


def elsewhere(hub: Hub) -> httpx.Client:
    """A client of the hub from another loopback address."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    return httpx.Client(base_url=hub.url, transport=transport, timeout=30)


def audit_rows(hub: Hub) -> list[dict[str, Any]]:
    return hub.store.audit_entries(1000)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_wrong_admin_tokens_are_throttled_per_address(hub: Hub) -> None:
    right = hub.store.add_admin("ops", "viewer")
    answers = []
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        for n in range(GUESSES):
            answers.append(client.get("/v1/admin/offices", headers=bearer(f"guess-{n}")))
        codes = [a.status_code for a in answers]
        assert codes[:FAILURES] == [401] * FAILURES
        assert codes[FAILURES:] == [429] * (GUESSES - FAILURES)
        throttled = answers[-1]
        assert throttled.json()["error"] == "throttled"
        assert 1 <= int(throttled.headers["retry-after"]) <= BLOCK_SECONDS
        # The right token from the throttled address waits too ...
        assert client.get("/v1/admin/offices", headers=bearer(right)).status_code == 429
    # ... but works from another address, and does not lift the first one's block.
    with elsewhere(hub) as other:
        assert other.get("/v1/admin/offices", headers=bearer(right)).status_code == 200
    assert httpx.get(f"{hub.url}/metrics", headers=bearer(right)).status_code == 429
    rows = audit_rows(hub)
    counts = Counter(r["action"] for r in rows)
    assert counts["api_auth_failed"] == FAILURES
    assert counts["api_auth_throttled"] == GUESSES - FAILURES + 2
    failed = [r for r in rows if r["action"] == "api_auth_failed"]
    assert {(r["actor"], r["source"]) for r in failed} == {("?", "127.0.0.1")}
    assert all("guess" not in json.dumps(r) for r in rows)  # never a token


def test_wrong_sign_ins_are_throttled_and_recorded(hub: Hub) -> None:
    right = hub.store.add_admin("ops", "owner")
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        codes = [
            web.post("/login", data={"token": f"guess-{n}", "next": "/"}).status_code
            for n in range(GUESSES)
        ]
        assert codes[:FAILURES] == [401] * FAILURES
        assert set(codes[FAILURES:]) == {429}
        page = web.post("/login", data={"token": right, "next": "/"})
        assert page.status_code == 429 and "Too many failed sign-ins" in page.text
        assert page.headers["retry-after"].isdigit()
    with elsewhere(hub) as other:
        assert other.post("/login", data={"token": right, "next": "/"}).status_code == 303
        assert other.get("/audit").status_code == 200
    counts = Counter(r["action"] for r in audit_rows(hub))
    assert counts["sign_in_failed"] == FAILURES
    assert counts["sign_in_throttled"] == GUESSES - FAILURES + 1
    assert counts["sign_in"] == 1
    [signed] = [r for r in audit_rows(hub) if r["action"] == "sign_in"]
    assert (signed["actor"], signed["source"], signed["detail"]) == (
        "ops",
        "127.0.0.2",
        {"role": "owner"},
    )


def test_a_success_clears_the_failures(hub: Hub) -> None:
    right = hub.store.add_admin("ops")
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        for _ in range(3):
            for n in range(FAILURES - 1):
                wrong = client.get("/metrics", headers=bearer(f"guess-{n}"))
                assert wrong.status_code == 401
            assert client.get("/metrics", headers=bearer(right)).status_code == 200


def test_a_revoked_admin_token_counts_against_its_admin(hub: Hub) -> None:
    """A revoked token names its admin: tried from several addresses, it is refused
    from every address for a while (429), each try recorded under the name; the
    admin's new token still works."""
    old = hub.store.add_admin("ops", "owner")
    hub.store.revoke("ops", "admin")
    for n in range(FAILURES + 1):
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{10 + n}")
        with httpx.Client(base_url=hub.url, transport=transport) as client:
            answer = client.get("/metrics", headers=bearer(old))
            assert answer.status_code == (401 if n < FAILURES else 429), n
    _, new = hub.store.rotate_token("ops", "admin")
    with elsewhere(hub) as other:
        assert other.get("/metrics", headers=bearer(new)).status_code == 200
        assert other.get("/metrics", headers=bearer(old)).status_code == 429
    rows = audit_rows(hub)
    failed = [r for r in rows if r["action"] == "api_auth_failed"]
    assert len(failed) == FAILURES
    assert {r["actor"] for r in failed} == {"ops"}
    assert {r["detail"]["reason"] for r in failed} == {"revoked"}
    throttled = [r for r in rows if r["action"] == "api_auth_throttled"]
    assert [(r["actor"], r["source"]) for r in throttled] == [
        ("ops", "127.0.0.2"),
        ("ops", f"127.0.0.{10 + FAILURES}"),
    ]


def write(office: Office, sql: str, *params: Any) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)
    conn.close()


def test_the_audit_log_records_who_what_where_and_never_values(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    write(
        astana,
        "INSERT INTO cases (id, family_name, notes, office) VALUES ('c1', ?, 'n', 'almaty')",
        SECRET,
    )
    for office in (astana, almaty, astana, almaty):
        office.sync()
    for office in (astana, almaty):
        sets = "notes = ?, given_name = ?"
        write(
            office,
            f"UPDATE cases SET {sets} WHERE id = 'c1'",
            f"{SECRET}-{office.name}",
            office.name,
        )
    for office in (astana, almaty, astana, almaty):
        office.sync()
    [conflict] = [c for c in hub.store.conflicts() if c.column == "notes"]
    [by_cli] = [c for c in hub.store.conflicts() if c.column == "given_name"]
    owner = hub.store.add_admin("ops", "owner")
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert web.post("/login", data={"token": owner, "next": "/"}).status_code == 303
        assert SECRET in web.get("/export/cases.csv?office=almaty").text
        assert web.get("/records/cases?id=c1").status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/").text)
        assert csrf
        form = {"csrf": csrf.group(1), "keep": "value", "value": f"{SECRET}-typed"}
        assert web.post(f"/conflicts/{conflict.id}/resolve", data=form).status_code == 303
        page = web.get("/audit")
        assert page.status_code == 200
        for action in ("sign_in", "download", "view_record", "resolve", "add_admin"):
            assert f'data-action="{action}"' in page.text, action
    history = httpx.get(
        f"{hub.url}/v1/admin/history/cases", params={"id": "c1"}, headers=bearer(owner)
    )
    assert history.status_code == 200
    export = subprocess.run(
        [str(FIELDSYNC), "hub", "export", "cases", "--db", str(hub.path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert export.returncode == 0 and SECRET in export.stdout
    resolved = subprocess.run(
        [
            str(FIELDSYNC),
            "hub",
            "resolve",
            str(by_cli.id),
            "--db",
            str(hub.path),
            "--keep",
            "other",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert resolved.returncode == 0, resolved.stderr

    rows = audit_rows(hub)
    by_action = {r["action"]: r for r in reversed(rows)}  # the newest of each
    assert by_action["download"]["target"].startswith("cases")
    assert by_action["download"]["detail"] == {
        "table": "cases",
        "format": "csv",
        "office": "almaty",
    }
    assert (by_action["download"]["actor"], by_action["download"]["source"]) == ("ops", "127.0.0.1")
    resolutions = {r["target"]: r for r in rows if r["action"] == "resolve"}
    web = resolutions[f"conflict {conflict.id}"]
    assert (web["actor"], web["source"]) == ("ops", "127.0.0.1")
    assert web["detail"]["pk"] == {"id": "c1"} and web["detail"]["keep"] == "value"
    assert resolutions[f"conflict {by_cli.id}"]["source"] == "cli"
    assert by_action["view_record"]["detail"]["pk"] == {"id": "c1"}
    assert by_action["export"]["source"] == "cli"
    assert by_action["export"]["detail"]["rows"] == 1
    assert {"add_office", "add_admin", "sign_in"} <= set(by_action)
    # Never a case value, anywhere in the log.
    dump = sqlite3.connect(hub.path).execute("SELECT * FROM _fieldsync_audit").fetchall()
    assert dump and SECRET not in repr(dump)
    # Kept apart from the conflict log.
    assert hub.store.conflict(conflict.id).resolved_by == "ops"


def test_the_audit_page_is_paged_and_for_owners(hub: Hub) -> None:
    owner = hub.store.add_admin("boss", "owner")
    viewer = hub.store.add_admin("eye", "resolver")
    for n in range(130):
        hub.store.add_node(f"office{n}")
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert web.post("/login", data={"token": viewer, "next": "/"}).status_code == 303
        refused = web.get("/audit")
        assert refused.status_code == 403 and "office0" not in refused.text
        assert httpx.get(f"{hub.url}/v1/admin/audit", headers=bearer(viewer)).status_code == 403
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert web.post("/login", data={"token": owner, "next": "/"}).status_code == 303
        first = web.get("/audit").text
        assert first.count("data-audit=") == 100
        assert "office129" in first and "office0<" not in first
        older = re.search(r'href="/audit\?before=(\d+)"', first)
        assert older
        second = web.get(f"/audit?before={older.group(1)}").text
        assert "office0<" in second and "office129" not in second
        assert 'href="/audit?before=' not in second  # the last page
    api = httpx.get(f"{hub.url}/v1/admin/audit", params={"limit": 5}, headers=bearer(owner))
    assert api.json()["entries"] == hub.store.audit_entries(5)
    assert len(api.json()["entries"]) == 5
