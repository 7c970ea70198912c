"""Keys that can be taken back: ``fieldsync hub revoke`` and ``hub rotate-token`` on a
running hub (the real console script, ``hub serve`` as a child process), and the
dashboard sessions of a revoked admin."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub.auth import hash_token
from tests.integration.test_cli import (
    HubProcess,
    Office,
    add_node,
    assert_one_line_error,
    fieldsync,
    init_office,
    ok,
    query,
)

pytestmark = pytest.mark.integration

TOKEN = re.compile(r"[A-Za-z0-9_-]{32,}")


def insert_case(office: Office, case_id: str) -> None:
    with sqlite3.connect(office.db) as conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES (?, 'Karimova')", [case_id])
    conn.close()


def push_status(hub: HubProcess, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{hub.url}/v1/pull", params={"scopes": 1}, headers=headers)


def audit(hub: HubProcess) -> list[dict[str, object]]:
    return list(json.loads(ok("hub", "audit", "--db", hub.db, "--json")))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    server = HubProcess(tmp_path / "hub.db", tmp_path / "hub.log")
    server.start()
    yield server
    server.stop()


def test_revoke_and_rotate_an_office_on_the_running_hub(tmp_path: Path, hub: HubProcess) -> None:
    astana = init_office(tmp_path, hub, "astana")
    [(old_hash,)] = query(hub.db, "SELECT token_hash FROM _fieldsync_nodes")
    insert_case(astana, "c1")
    astana.sync()
    [(acked,)] = query(hub.db, "SELECT acked_seq FROM _fieldsync_nodes")
    assert acked >= 1
    old_token = office_token(astana)
    assert hub.proc is not None
    pid = hub.proc.pid

    out = ok("hub", "revoke", "astana", "--db", hub.db)
    assert "Revoked the token of office 'astana'" in out
    assert "rotate-token astana" in out
    insert_case(astana, "c2")  # waits at the office while the token is revoked
    result = fieldsync("node", "sync", astana.db)
    assert result.returncode == 1
    assert "revoked" in result.stdout + result.stderr
    assert "fieldsync node set --token" in result.stdout + result.stderr
    assert query(hub.db, "SELECT count(*) FROM cases WHERE id = 'c2'") == [(0,)]

    again = ok("hub", "revoke", "astana", "--db", hub.db)
    assert "already revoked" in again
    revokes = [e for e in audit(hub) if e["action"] == "revoke"]
    assert [e["detail"] for e in revokes] == [{"already": True}, {"already": False}]
    assert {e["source"] for e in revokes} == {"cli"} and all(e["actor"] for e in revokes)

    lines = ok("hub", "rotate-token", "astana", "--db", hub.db).strip().splitlines()
    new = lines[-1]
    assert TOKEN.fullmatch(new), lines
    assert "node set --token" in lines[0]
    [(new_hash, revoked_at, kept)] = query(
        hub.db, "SELECT token_hash, revoked_at, acked_seq FROM _fieldsync_nodes"
    )
    assert (new_hash, revoked_at, kept) == (hash_token(new), None, acked)  # state kept
    assert new_hash != old_hash
    # The old token is told it was revoked; the new one works at once.
    refused = push_status(hub, old_token)
    assert refused.status_code == 401 and refused.json()["error"] == "revoked"
    assert "node set --token NEW" in refused.json()["detail"]
    assert "\n" not in refused.json()["detail"]
    assert set(refused.json()) == {"error", "detail", "hub_time_ms"}  # as ErrorBody says
    assert push_status(hub, new).status_code == 200

    ok("node", "set", astana.db, "--token", new)
    astana.sync()  # the change made while revoked goes with the new token
    assert query(hub.db, "SELECT family_name FROM cases WHERE id = 'c2'") == [("Karimova",)]
    [(after,)] = query(hub.db, "SELECT acked_seq FROM _fieldsync_nodes")
    assert after > acked
    assert hub.proc is not None and hub.proc.pid == pid  # never restarted
    rotations = [e for e in audit(hub) if e["action"] == "rotate"]
    assert [e["detail"] for e in rotations] == [{"was_revoked": True}]
    for path in tmp_path.glob("hub.db*"):
        assert new.encode() not in path.read_bytes(), f"the token is readable in {path}"


def office_token(office: Office) -> str:
    """The token the office database holds."""
    [(token,)] = query(office.db, "SELECT token FROM _fieldsync_state")
    return str(token)


def test_revoke_asks_which_when_a_name_is_both(tmp_path: Path, hub: HubProcess) -> None:
    office_token = add_node(hub.db, "ops")
    admin_token = ok("hub", "add-admin", "ops", "--db", hub.db).strip().splitlines()[-1]
    before = query(hub.db, "SELECT * FROM _fieldsync_nodes") + query(
        hub.db, "SELECT * FROM _fieldsync_admins"
    )
    for command in ("revoke", "rotate-token"):
        result = fieldsync("hub", command, "ops", "--db", hub.db)
        assert_one_line_error(result, "both an office and an admin", "--office or --admin")
    after = query(hub.db, "SELECT * FROM _fieldsync_nodes") + query(
        hub.db, "SELECT * FROM _fieldsync_admins"
    )
    assert after == before
    assert_one_line_error(fieldsync("hub", "revoke", "nobody", "--db", hub.db), "'nobody'")
    ok("hub", "revoke", "ops", "--admin", "--db", hub.db)
    admin = httpx.get(
        f"{hub.url}/v1/admin/offices", headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert admin.status_code == 401 and admin.json()["error"] == "revoked"
    assert push_status(hub, office_token).status_code == 200  # the office is untouched


def test_a_revoked_or_rotated_admin_is_signed_out(hub: HubProcess) -> None:
    token = ok("hub", "add-admin", "ops", "--role", "owner", "--db", hub.db).splitlines()[-1]
    with httpx.Client(base_url=hub.url) as web:
        assert web.post("/login", data={"token": token, "next": "/"}).status_code == 303
        assert web.get("/").status_code == 200
        ok("hub", "revoke", "ops", "--db", hub.db)
        gone = web.get("/")
        assert gone.status_code == 303 and gone.headers["location"].startswith("/login")
        page = web.post("/login", data={"token": token, "next": "/"})
        assert page.status_code == 401 and "was revoked" in page.text

        new = ok("hub", "rotate-token", "ops", "--db", hub.db).strip().splitlines()[-1]
        assert web.post("/login", data={"token": new, "next": "/"}).status_code == 303
        assert web.get("/audit").status_code == 200  # still an owner
        ok("hub", "rotate-token", "ops", "--db", hub.db)  # ends the session again
        assert web.get("/").status_code == 303
    api = httpx.get(f"{hub.url}/metrics", headers={"Authorization": f"Bearer {new}"})
    assert api.status_code == 401 and api.json()["error"] == "revoked"


def test_roles_on_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    out = ok("hub", "add-admin", "ann", "--db", db)
    assert "(viewer)" in out  # the default: least privilege
    ok("hub", "add-admin", "bob", "--role", "owner", "--db", db)
    assert query(db, "SELECT name, role FROM _fieldsync_admins ORDER BY name") == [
        ("ann", "viewer"),
        ("bob", "owner"),
    ]
    assert "now a resolver (was a viewer)" in ok("hub", "set-role", "ann", "resolver", "--db", db)
    assert_one_line_error(fieldsync("hub", "set-role", "nobody", "owner", "--db", db), "nobody")
    result = fieldsync("hub", "set-role", "ann", "king", "--db", db)
    assert result.returncode == 2 and "king" in result.stderr  # click's usage error
    listed = json.loads(ok("hub", "admins", "--db", db, "--json"))
    assert [(a["name"], a["role"]) for a in listed] == [("ann", "resolver"), ("bob", "owner")]
    changes = json.loads(ok("hub", "audit", "--db", db, "--json"))
    assert [(e["action"], e["target"]) for e in changes] == [
        ("set_role", "admin ann"),
        ("add_admin", "admin bob"),
        ("add_admin", "admin ann"),
    ]
    assert changes[0]["detail"] == {"old": "viewer", "new": "resolver"}
