"""Admin roles as a matrix: every admin API and dashboard route x every credential.

A real uvicorn hub (tests/conftest.py) with two real offices and four field conflicts.
Each credential is an owner, a resolver, a viewer, an office, a revoked owner, or
none: on the admin API a bearer token, at the dashboard a session cookie (an office
token or a revoked owner's session as the cookie). A refusal is 401/403 at the API
(the dashboard sends a browser without a live session to /login, and answers an
admin short of the role 403), and changes nothing in the hub's database but the
audit log, which records failed attempts.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.app import create_app
from hub.auth import ROLES, SignInThrottle
from hub.store import SqliteHubStore
from tests.conftest import Hub, Office, serve

pytestmark = pytest.mark.integration

FAMILY = "Nazarova-Secret"  # a case value: never in a refused answer
CONFLICT_COLUMNS = ("given_name", "status", "household_size", "notes")
CREDENTIALS = ("owner", "resolver", "viewer", "office", "revoked", "none")

# (method, path, least role); {id} is a conflict of the credential's own.
API = [
    ("GET", "/v1/admin/offices", "viewer"),
    ("GET", "/v1/admin/offices/astana", "viewer"),
    ("GET", "/v1/admin/conflicts", "resolver"),
    ("GET", "/v1/admin/conflicts/{id}", "resolver"),
    ("POST", "/v1/admin/conflicts/{id}/resolve", "resolver"),
    ("GET", "/v1/admin/rejected", "viewer"),
    ("GET", "/v1/admin/history/cases?id=c1", "owner"),
    ("GET", "/v1/admin/records?q=Nazarova", "owner"),
    ("GET", "/v1/admin/figures", "viewer"),
    ("GET", "/v1/admin/audit", "owner"),
    ("GET", "/metrics", "viewer"),
]
DASHBOARD = [
    ("GET", "/", "viewer"),
    ("GET", "/offices/astana", "viewer"),
    ("GET", "/conflicts", "resolver"),
    ("GET", "/conflicts/{id}", "resolver"),
    ("POST", "/conflicts/{id}/resolve", "resolver"),
    ("GET", "/hq", "viewer"),
    ("GET", "/export/cases.csv", "owner"),
    ("GET", "/export/cases.json?office=astana", "owner"),
    ("GET", "/records", "owner"),
    ("GET", "/records/cases?id=c1", "owner"),
    ("GET", "/records?q=Nazarova", "owner"),
    ("GET", "/audit", "owner"),
]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """The conftest's hub, with a throttle that never blocks: the revoked owner's
    token is refused at every API route, more often than sign-ins may fail."""
    path = tmp_path / "hub.db"
    store = SqliteHubStore(path)
    gen = serve(create_app(store, throttle=SignInThrottle(failures=10**6)))
    url = next(gen)
    try:
        yield Hub(url, store, path)
    finally:
        gen.close()
        store.close()


def write(office: Office, sql: str, *params: Any) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)
    conn.close()


def digest(path: Path) -> str:
    """Every table of the hub's database but the audit log, as one hash."""
    with sqlite3.connect(path) as conn:
        tables = [
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if row[0] != "_fieldsync_audit"
        ]
        found = hashlib.sha256()
        for table in sorted(tables):
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1"):
                found.update(repr((table, row)).encode())
    conn.close()
    return found.hexdigest()


def sign_in(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    response = client.post("/login", data={"token": token, "next": "/"})
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: httpx.Client) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
    assert found
    return found.group(1)


@pytest.fixture
def world(hub: Hub, make_office: Callable[..., Office]) -> Iterator[dict[str, Any]]:
    """Two offices, case c1 with four field conflicts, one admin of each role and a
    revoked owner (signed in before the revocation)."""
    astana, almaty = make_office("astana"), make_office("almaty")
    write(
        astana,
        "INSERT INTO cases (id, family_name, given_name, status, household_size, office, notes) "
        "VALUES ('c1', ?, 'Dilnoza', 'asylum_seeker', 2, 'astana', 'n1')",
        FAMILY,
    )
    for office in (astana, almaty, astana, almaty):
        office.sync()
    for office, values in (
        (astana, ("A", "refugee", 3, "n2")),
        (almaty, ("B", "closed", 4, "n3")),
    ):
        sets = ", ".join(f"{c} = ?" for c in CONFLICT_COLUMNS)
        write(office, f"UPDATE cases SET {sets} WHERE id = 'c1'", *values)
    for office in (astana, almaty, astana, almaty):
        office.sync()
    conflicts = sorted(c.id for c in hub.store.conflicts() if c.column in CONFLICT_COLUMNS)
    assert len(conflicts) == len(CONFLICT_COLUMNS)
    tokens = {role: hub.store.add_admin(role, role) for role in ROLES}
    tokens["office"] = astana.store.token
    tokens["revoked"] = hub.store.add_admin("gone", "owner")
    sessions = {name: sign_in(hub.url, tokens[name]) for name in ("owner", "resolver", "viewer")}
    sessions["revoked"] = sign_in(hub.url, tokens["revoked"])
    hub.store.revoke("gone", "admin")
    # Each credential that may resolve settles a conflict of its own, once per door.
    own = iter(conflicts)
    ids = {(name, door): next(own) for name in ("owner", "resolver") for door in ("api", "web")}
    yield {"tokens": tokens, "sessions": sessions, "ids": ids, "any_id": conflicts[0]}
    for client in sessions.values():
        client.close()


def allowed(credential: str, needed: str) -> bool:
    return credential in ROLES and ROLES.index(credential) >= ROLES.index(needed)


def test_every_route_and_credential(hub: Hub, world: dict[str, Any]) -> None:
    tokens, sessions, ids = world["tokens"], world["sessions"], world["ids"]
    cells = 0
    refused_cells = 0
    for door, routes in (("api", API), ("web", DASHBOARD)):
        # Refusals first, so that every allowed resolution finds its conflict open.
        for credential in sorted(CREDENTIALS, key=lambda c: c in ROLES):
            for method, template, needed in routes:
                path = template.replace("{id}", str(ids.get((credential, door), world["any_id"])))
                before = digest(hub.path)
                if door == "api":
                    response = api_call(hub.url, tokens.get(credential), method, path)
                else:
                    response = web_call(hub.url, sessions, tokens, credential, method, path)
                where = f"{door} {method} {path} as {credential}: {response.status_code}"
                cells += 1
                if allowed(credential, needed):
                    ok = {"GET": 200, "POST": 200 if door == "api" else 303}[method]
                    assert response.status_code == ok, f"{where} {response.text[:300]}"
                    continue
                refused_cells += 1
                assert digest(hub.path) == before, f"{where}: changed the hub"
                assert FAMILY not in response.text, f"{where}: a case value"
                if credential in ROLES:  # signed in, short of the role
                    assert response.status_code == 403, where
                    article = "an" if needed == "owner" else "a"
                    assert f"only {article} {needed}" in response.text, where
                elif door == "api":
                    expected = {"office": 403, "revoked": 401, "none": 401}[credential]
                    assert response.status_code == expected, where
                    if credential == "revoked":
                        assert response.json()["error"] == "revoked", where
                else:  # no live session: sent to sign in
                    assert response.status_code == 303, where
                    assert response.headers["location"].startswith("/login"), where
    assert cells == (len(API) + len(DASHBOARD)) * len(CREDENTIALS) == 138
    assert refused_cells == 93
    settled = {c.id: c.resolved_by for c in hub.store.conflicts("resolved")}
    assert settled == {ids[name, door]: name for name, door in ids}


def api_call(url: str, token: str | None, method: str, path: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"keep": "other"} if method == "POST" else None
    return httpx.request(method, f"{url}{path}", headers=headers, json=body, timeout=30)


def web_call(
    url: str,
    sessions: dict[str, httpx.Client],
    tokens: dict[str, str],
    credential: str,
    method: str,
    path: str,
) -> httpx.Response:
    if credential in sessions:
        client = sessions[credential]
        csrf = csrf_of(client) if credential in ROLES else "stale"
    else:
        cookie = {"office": {"fieldsync_session": tokens["office"]}, "none": {}}[credential]
        with httpx.Client(base_url=url, cookies=cookie, timeout=30) as client:
            data = {"csrf": "none", "keep": "other"} if method == "POST" else None
            return client.request(method, path, data=data)
    data = {"csrf": csrf, "keep": "other"} if method == "POST" else None
    return client.request(method, path, data=data)


def test_a_role_change_is_effective_at_once(hub: Hub, world: dict[str, Any]) -> None:
    viewer = world["sessions"]["viewer"]
    assert viewer.get("/conflicts").status_code == 403
    assert 'href="/conflicts"' not in viewer.get("/").text  # not offered
    hub.store.set_role("viewer", "resolver")
    assert viewer.get("/conflicts").status_code == 200
    assert 'href="/conflicts"' in viewer.get("/").text
    assert viewer.get("/export/cases.csv").status_code == 403
    page = world["sessions"]["owner"].get("/").text
    assert 'href="/audit"' in page and 'href="/records"' in page
    assert 'href="/audit"' not in viewer.get("/").text


def test_hq_offers_downloads_to_owners_only(hub: Hub, world: dict[str, Any]) -> None:
    assert "/export/cases.csv" in world["sessions"]["owner"].get("/hq").text
    for role in ("resolver", "viewer"):
        page = world["sessions"][role].get("/hq")
        assert page.status_code == 200 and "/export/" not in page.text, role


def test_only_owners_are_offered_record_histories(hub: Hub, world: dict[str, Any]) -> None:
    path = f"/conflicts/{world['any_id']}"
    assert "/records/cases?id=c1" in world["sessions"]["owner"].get(path).text
    page = world["sessions"]["resolver"].get(path)
    assert page.status_code == 200 and "/records/" not in page.text
