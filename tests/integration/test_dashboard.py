"""The admin dashboard through a real uvicorn hub (tests/conftest.py) and httpx.

Offices are real node databases that sync with the hub; conflicts come from two offices
editing the same field. Pages are read as a browser gets them, and conflicts are
settled through the same form a browser posts.
"""

from __future__ import annotations

import io
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from hub.app import create_app
from hub.export import export_rows, stream_export
from hub.store import ConflictRecord, SqliteHubStore
from shared.errors import FieldsyncError
from shared.schema import Schema
from tests.conftest import Hub, Office, serve

pytestmark = [pytest.mark.integration, pytest.mark.engines]

ADMIN = "ops"
SCRIPT = "<script>alert(1)</script>"
CSP = (
    "default-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'"
)


# -- offices and their databases ----------------------------------------------------------


def write(office: Office, sql: str, *params: Any) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)
    conn.close()


def add_case(office: Office, case_id: str, /, **values: Any) -> None:
    row = {
        "id": case_id,
        "family_name": "Nazarova",
        "given_name": "Dilnoza",
        "status": "asylum_seeker",
        "household_size": 2,
        "office": office.name,
        **values,
    }
    marks = ", ".join("?" for _ in row)
    write(office, f"INSERT INTO cases ({', '.join(row)}) VALUES ({marks})", *row.values())


def office_value(office: Office, case_id: str, column: str) -> Any:
    with sqlite3.connect(office.path) as conn:
        row = conn.execute(f"SELECT {column} FROM cases WHERE id = ?", [case_id]).fetchone()
    conn.close()
    return row[0] if row else None


def hub_value(hub: Hub, case_id: str, column: str) -> Any:
    [row] = [r for r in hub.store.rows("cases") if r["id"] == case_id]
    return row[column]


def sync_all(*offices: Office, rounds: int = 2) -> None:
    for _ in range(rounds):
        for office in offices:
            office.sync()


@pytest.fixture
def offices(make_office: Callable[..., Office]) -> tuple[Office, Office]:
    """Astana and almaty, both holding case c1 (made at astana), synced."""
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    return astana, almaty


def make_conflict(
    hub: Hub, offices: tuple[Office, Office], column: str, values: tuple[Any, Any]
) -> ConflictRecord:
    """Both offices change case c1's ``column`` before either syncs: a field conflict."""
    for office, value in zip(offices, values, strict=True):
        write(office, f"UPDATE cases SET {column} = ? WHERE id = 'c1'", value)
    sync_all(*offices)
    [conflict] = [c for c in hub.store.conflicts() if c.column == column]
    assert (conflict.kind, conflict.status) == ("field", "logged")
    assert {conflict.kept_value, conflict.other_value} == set(values)
    return conflict


# -- the dashboard as a browser uses it -----------------------------------------------------


@pytest.fixture
def web(hub: Hub) -> Iterator[httpx.Client]:
    """A client of the hub that keeps cookies and does not follow redirects."""
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        yield client


@pytest.fixture
def admin_token(hub: Hub) -> str:
    return hub.store.add_admin(ADMIN, "owner")


@pytest.fixture
def admin(web: httpx.Client, admin_token: str) -> httpx.Client:
    """``web``, signed in as admin ``ops``."""
    response = sign_in(web, admin_token)
    assert response.status_code == 303, response.text
    return web


def sign_in(client: httpx.Client, token: str, next_path: str = "/") -> httpx.Response:
    return client.post("/login", data={"token": token, "next": next_path})


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1)


def decide(
    client: httpx.Client, conflict_id: int, headers: dict[str, str] | None = None, **fields: str
) -> httpx.Response:
    """Post the conflict page's form, with the session's CSRF token, as a browser does."""
    page = client.get(f"/conflicts/{conflict_id}")
    data = {"csrf": csrf_of(page.text), **fields}
    return client.post(f"/conflicts/{conflict_id}/resolve", data=data, headers=headers)


def rows(page: str, attribute: str) -> list[str]:
    return re.findall(rf'<tr {attribute}="([^"]*)"', page)


def with_cookie(hub: Hub, cookie: str) -> httpx.Client:
    """A client that sends this session cookie, whatever the hub answers."""
    return httpx.Client(base_url=hub.url, headers={"Cookie": f"fieldsync_session={cookie}"})


# -- signing in ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/conflicts?status=open", "/offices/astana", "/conflicts/1", "/hq", "/records"]
)
def test_signed_out_pages_redirect_to_sign_in(hub: Hub, web: httpx.Client, path: str) -> None:
    response = web.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next={quote(path, safe='')}"
    with with_cookie(hub, "not-a-session") as unknown:
        assert unknown.get(path).headers["location"].startswith("/login?next=")


def test_sign_in_page_asks_for_an_admin_token(web: httpx.Client) -> None:
    page = web.get("/login?next=/hq")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert re.search(r'<input type="password" name="token" id="token"', page.text)
    assert '<label for="token">Admin token</label>' in page.text
    assert ">Sign in</button>" in page.text
    assert 'name="next" value="/hq"' in page.text


def test_a_wrong_token_is_refused_with_401(web: httpx.Client, admin_token: str) -> None:
    response = sign_in(web, admin_token + "x")
    assert response.status_code == 401
    assert "That token is not an admin token." in response.text
    assert "set-cookie" not in response.headers
    assert web.get("/").status_code == 303


def test_an_office_token_is_refused_with_403(hub: Hub, web: httpx.Client) -> None:
    response = sign_in(web, hub.store.add_node("astana"))
    assert response.status_code == 403
    assert (
        "This is an office token; sign in with an admin token "
        "(fieldsync hub add-admin NAME)." in response.text
    )
    assert "set-cookie" not in response.headers


def test_sign_in_sets_a_strict_http_only_cookie_and_goes_on(
    web: httpx.Client, admin_token: str
) -> None:
    response = sign_in(web, admin_token, "/conflicts?status=open")
    assert response.status_code == 303
    assert response.headers["location"] == "/conflicts?status=open"
    cookie = response.headers["set-cookie"]
    parts = [part.strip().lower() for part in cookie.split(";")]
    assert parts[0].startswith("fieldsync_session=") and len(parts[0]) > 40
    assert {"httponly", "samesite=strict", "path=/", "max-age=43200"} <= set(parts)
    assert "secure" not in parts  # plain http: a Secure cookie would never come back
    assert web.get("/conflicts?status=open").status_code == 200


def test_the_cookie_is_secure_over_https(web: httpx.Client, admin_token: str) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1, as behind a TLS proxy.
    response = web.post(
        "/login", data={"token": admin_token}, headers={"X-Forwarded-Proto": "https"}
    )
    assert response.status_code == 303
    assert "secure" in [p.strip().lower() for p in response.headers["set-cookie"].split(";")]


@pytest.mark.parametrize(
    "target", ["//evil.example/", "https://evil.example/", "/\\evil.example", "hq", ""]
)
def test_sign_in_goes_only_to_local_paths(web: httpx.Client, admin_token: str, target: str) -> None:
    response = sign_in(web, admin_token, target)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_sign_out_ends_the_session(hub: Hub, admin: httpx.Client) -> None:
    cookie = admin.cookies["fieldsync_session"]
    with with_cookie(hub, cookie) as old:
        assert old.get("/").status_code == 200
        page = admin.get("/")
        response = admin.post("/logout", data={"csrf": csrf_of(page.text)})
        assert response.status_code == 303
        assert response.headers["location"] == "/login"
        assert 'fieldsync_session=""' in response.headers["set-cookie"]
        assert old.get("/").status_code == 303
    assert hub.store.session(cookie) is None


def test_sign_out_needs_the_csrf_token(hub: Hub, admin: httpx.Client) -> None:
    cookie = admin.cookies["fieldsync_session"]
    assert admin.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert hub.store.session(cookie) is not None


# -- offices --------------------------------------------------------------------------


def test_offices_page_lists_every_office_with_its_health(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office], make_office: Any
) -> None:
    make_office("shymkent")  # registered, never synced
    page = admin.get("/")
    assert page.status_code == 200
    found = re.findall(r'<tr data-office="([^"]+)" data-health="([^"]+)"', page.text)
    assert found == [("almaty", "ok"), ("astana", "ok"), ("shymkent", "never-synced")]
    assert "3 offices: 2 ok, 1 never synced" in page.text
    assert '<a href="/offices/astana">astana</a>' in page.text
    assert 'class="badge health-ok">ok</span>' in page.text
    assert 'class="badge health-never-synced">never synced</span>' in page.text
    assert re.search(r'<time datetime="[^"]+" title="[^"]+">(just now|\d+ seconds ago)', page.text)
    assert '<meta http-equiv="refresh" content="30">' in page.text


def test_offices_page_counts_the_conflicts_to_review(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    assert "No conflict waits for review." in admin.get("/").text
    make_conflict(hub, offices, "given_name", ("Aigerim", "Aisha"))
    page = admin.get("/").text
    assert '<a href="/conflicts">1 conflict waits for review</a>' in page


def test_office_page_shows_its_state_and_sync_history(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    # A sync that moves something reports at once (with an idle one before it).
    add_case(offices[0], "c2")
    offices[0].sync()
    page = admin.get("/offices/astana")
    assert page.status_code == 200
    events = hub.store.sync_events("astana")
    assert len(events) >= 2
    assert rows(page.text, "data-event") == [str(e["id"]) for e in events]
    assert 'data-outcome="ok"' in page.text
    for words in ("Last successful sync", "Lag", "Pending at the office", "Clock", "version"):
        assert words in page.text
    assert "Rejected changes" in page.text


def test_office_page_pages_its_sync_history_and_adds_it_up(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    astana = offices[0]
    for number in range(25):
        write(astana, "UPDATE cases SET household_size = ? WHERE id = 'c1'", number)
        astana.sync()
    events = hub.store.sync_events("astana", 200)
    assert len(events) >= 27
    first = admin.get("/offices/astana").text
    assert rows(first, "data-event") == [str(e["id"]) for e in events[:20]]
    summary = re.search(r'data-syncs="(\d+)" data-failed="(\d+)">(.*?)</p>', first, re.S)
    assert summary and int(summary.group(1)) == len(events) and summary.group(2) == "0"
    pushed = sum(e["pushed"] for e in events)
    assert f"{pushed} changes pushed" in summary.group(3)
    assert 'href="/offices/astana?page=2#syncs" rel="next">Older syncs' in first
    second = admin.get("/offices/astana?page=2").text
    assert rows(second, "data-event") == [str(e["id"]) for e in events[20:40]]
    assert 'href="/offices/astana#syncs" rel="prev">Newer syncs' in second
    for wrong in ("0", "x", "-1", "99999999999"):  # a page number out of range: the first
        assert rows(admin.get(f"/offices/astana?page={wrong}").text, "data-event") == rows(
            first, "data-event"
        )


def test_an_unknown_office_is_an_html_404(admin: httpx.Client) -> None:
    page = admin.get("/offices/nowhere")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "There is no office &#39;nowhere&#39;." in page.text


# -- conflicts ----------------------------------------------------------------------


def test_a_field_conflict_shows_in_the_inbox_with_both_values(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    page = admin.get("/conflicts")
    assert page.status_code == 200
    assert rows(page.text, "data-conflict") == [str(conflict.id)]
    row = page.text.split(f'<tr data-conflict="{conflict.id}"', 1)[1].split("</tr>", 1)[0]
    assert ">Abenova</span>" in row and ">Abenov</span>" in row
    assert "astana" in row and "almaty" in row and "family_name" in row
    assert "settled by policy" in row
    assert f'<a href="/conflicts/{conflict.id}">' in row
    assert '<meta http-equiv="refresh" content="30">' in page.text
    assert rows(admin.get("/conflicts?status=resolved").text, "data-conflict") == []
    assert admin.get("/conflicts?status=nonsense").status_code == 400


def test_the_conflict_page_offers_one_form_and_does_not_refresh(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    page = admin.get(f"/conflicts/{conflict.id}").text
    assert page.count('<form method="post" action="/conflicts/') == 1
    assert f'action="/conflicts/{conflict.id}/resolve"' in page
    for keep in ("kept", "other", "value"):
        assert f'<button type="submit" name="keep" value="{keep}">' in page
    assert 'name="value" id="value"' in page and 'name="force" value="1"' in page
    assert "http-equiv" not in page
    assert 'href="/records/cases?id=c1"' in page


def test_resolving_by_the_form_reaches_the_hub_and_both_offices(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    assert hub_value(hub, "c1", "family_name") == conflict.kept_value
    # a browser sends its own origin: accepted
    response = decide(admin, conflict.id, headers={"Origin": str(admin.base_url)}, keep="other")
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"/conflicts/{conflict.id}?done=1"
    done = hub.store.conflict(conflict.id)
    assert (done.status, done.resolved_by, done.resolution) == (
        "resolved",
        ADMIN,
        {"keep": "other"},
    )
    assert hub_value(hub, "c1", "family_name") == conflict.other_value
    sync_all(*offices)
    for office in offices:
        assert office_value(office, "c1", "family_name") == conflict.other_value
    page = admin.get(response.headers["location"]).text
    assert "Conflict resolved." in page
    assert f'data-resolved-by="{ADMIN}"' in page and 'name="keep"' not in page


@pytest.mark.parametrize(
    "fields", [pytest.param({}, id="missing"), pytest.param({"csrf": "forged"}, id="wrong")]
)
def test_resolving_needs_the_sessions_csrf_token(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office], fields: dict[str, str]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    response = admin.post(f"/conflicts/{conflict.id}/resolve", data={"keep": "other", **fields})
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/html")
    assert hub.store.conflict(conflict.id).status == "logged"
    assert hub_value(hub, "c1", "family_name") == conflict.kept_value


def test_resolving_from_another_origin_is_refused(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    response = decide(admin, conflict.id, headers={"Origin": "http://evil.example"}, keep="other")
    assert response.status_code == 403
    assert "another site" in response.text
    assert hub.store.conflict(conflict.id).status == "logged"
    assert hub_value(hub, "c1", "family_name") == conflict.kept_value


def test_resolving_signed_out_changes_nothing(
    hub: Hub, web: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    response = web.post(f"/conflicts/{conflict.id}/resolve", data={"keep": "other"})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert hub.store.conflict(conflict.id).status == "logged"


def test_a_typed_value_takes_the_columns_type(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "household_size", (3, 4))
    refused = decide(admin, conflict.id, keep="value", value="five")
    assert refused.status_code == 400
    assert "household_size takes whole numbers" in refused.text
    assert 'value="five"' in refused.text  # what was typed stays in the box
    assert hub.store.conflict(conflict.id).status == "logged"
    response = decide(admin, conflict.id, keep="value", value="5")
    assert response.status_code == 303, response.text
    value = hub_value(hub, "c1", "household_size")
    assert value == 5 and type(value) is int
    sync_all(*offices)
    assert [office_value(o, "c1", "household_size") for o in offices] == [5, 5]


def test_resolving_twice_is_a_409(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    assert decide(admin, conflict.id, keep="other").status_code == 303
    again = decide(admin, conflict.id, keep="kept")
    assert again.status_code == 409
    assert "already resolved by ops" in again.text
    assert hub_value(hub, "c1", "family_name") == conflict.other_value
    assert hub.store.conflict(conflict.id).resolution == {"keep": "other"}


def test_a_record_changed_since_needs_force(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    write(offices[0], "UPDATE cases SET family_name = 'Later' WHERE id = 'c1'")
    offices[0].sync()
    refused = decide(admin, conflict.id, keep="other")
    assert refused.status_code == 409
    assert "changed after the conflict was logged" in refused.text
    assert "to apply your decision anyway, tick" in refused.text
    assert hub_value(hub, "c1", "family_name") == "Later"
    forced = decide(admin, conflict.id, keep="other", force="1")
    assert forced.status_code == 303
    assert hub_value(hub, "c1", "family_name") == conflict.other_value


def outcome_of(page: str) -> dict[str, str]:
    """The resolved page's outcome box: decision, value kept, by whom, value now (text)."""
    box = re.search(
        r'<section class="outcome-box" id="outcome" data-kept="(\w*)">(.*?)</section>', page, re.S
    )
    assert box, "the page shows no outcome"
    found = {"kept": box.group(1)}
    for name in ("decision", "kept-value", "resolution", "now-value"):
        # up to the next of the outcome's own labels (a whole record is a list of its own)
        end = r'<dt>(?:Value kept|Decided by|Now at the hub)</dt>|</dl>\s*<p class="hint">'
        cell = re.search(rf'<dd class="{name}"[^>]*>(.*?)(?:{end})', box.group(2), re.S)
        assert cell, f"the outcome has no {name}"
        found[name] = " ".join(re.sub(r"<[^>]+>", "", cell.group(1)).split())
    return found


def test_after_keeping_the_other_value_the_page_shows_the_outcome(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "status", ("closed", "refugee"))
    assert conflict.kept_value == "closed" or conflict.other_value == "closed"
    response = decide(admin, conflict.id, keep="other")
    assert response.status_code == 303, response.text
    page = admin.get(response.headers["location"]).text
    assert "Current value (kept)" not in page  # the old side is no longer "kept"
    outcome = outcome_of(page)
    assert outcome["kept"] == "other"
    assert f"kept the other value, from {conflict.other_node}" in outcome["decision"]
    assert outcome["kept-value"] == conflict.other_value
    assert outcome["now-value"] == conflict.other_value
    assert outcome["resolution"].startswith(f"{ADMIN},") and "UTC" in outcome["resolution"]
    # the record changes later: the page says what the hub holds now
    write(offices[0], "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")
    offices[0].sync()
    outcome = outcome_of(admin.get(f"/conflicts/{conflict.id}").text)
    assert outcome["kept-value"] == conflict.other_value
    assert outcome["now-value"] == "rejected (changed since the decision)"


def test_after_applying_a_delete_the_outcome_says_the_record_is_gone(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET family_name = 'Later' WHERE id = 'c1'")
    sync_all(astana, almaty)
    [conflict] = [c for c in hub.store.conflicts() if c.kind == "delete"]
    assert decide(admin, conflict.id, keep="kept").status_code == 303
    kept = outcome_of(admin.get(f"/conflicts/{conflict.id}").text)
    assert kept["kept"] == "kept" and "Later" in kept["kept-value"]
    assert "Later" in kept["now-value"] and "changed since" not in kept["now-value"]


def test_a_column_with_a_check_list_offers_its_values(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "status", ("closed", "refugee"))
    page = admin.get(f"/conflicts/{conflict.id}").text
    select = re.search(r'<select name="value" id="value">(.*?)</select>', page, re.S)
    assert select, "status is typed free-hand"
    options = re.findall(r'<option value="([^"]*)"', select.group(1))
    assert options == ["asylum_seeker", "refugee", "rejected", "closed", "null"]
    assert '<input type="text" name="value"' not in page
    # a value the list lacks is refused by the hub, whatever the browser sends
    refused = decide(admin, conflict.id, keep="value", value="deported")
    assert refused.status_code == 400
    assert "status takes one of: asylum_seeker, refugee, rejected, closed" in refused.text
    assert hub.store.conflict(conflict.id).status == "logged"
    chosen = decide(admin, conflict.id, keep="value", value="rejected")
    assert chosen.status_code == 303, chosen.text
    assert hub_value(hub, "c1", "status") == "rejected"
    outcome = outcome_of(admin.get(chosen.headers["location"]).text)
    assert (outcome["kept"], outcome["kept-value"], outcome["now-value"]) == (
        "value",
        "rejected",
        "rejected",
    )


def test_a_column_without_a_check_list_is_typed(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    page = admin.get(f"/conflicts/{conflict.id}").text
    assert '<input type="text" name="value" id="value"' in page and "<select" not in page


def test_an_unknown_conflict_is_an_html_404(admin: httpx.Client) -> None:
    page = admin.get("/conflicts/999")
    assert page.status_code == 404
    assert "There is no conflict 999." in page.text
    csrf = csrf_of(admin.get("/").text)
    response = admin.post("/conflicts/999/resolve", data={"csrf": csrf, "keep": "other"})
    assert response.status_code == 404


def test_case_values_are_escaped(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", (SCRIPT, "Safe"))
    add_case(offices[0], "c2", country_of_origin=SCRIPT, office=SCRIPT)
    offices[0].sync()
    paths = (f"/conflicts/{conflict.id}", "/conflicts", "/records/cases?id=c1", "/hq")
    for path in paths:
        page = admin.get(path).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        assert SCRIPT not in page, path


# -- headquarters and downloads -------------------------------------------------------


def test_hq_page_shows_figures_and_charts(
    hub: Hub, admin: httpx.Client, make_office: Callable[..., Office]
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1", country_of_origin="AFG", status="refugee")
    add_case(astana, "c2", country_of_origin="AFG")
    add_case(almaty, "c3", country_of_origin="SYR")
    write(
        almaty,
        "INSERT INTO assistance (id, case_id, kind, quantity, delivered_on, office) "
        "VALUES ('a1', 'c3', 'food', 12.5, '2024-03-02', 'almaty')",
    )
    sync_all(astana, almaty)
    page = admin.get("/hq")
    assert page.status_code == 200
    text = page.text
    assert text.count("<svg") == 2
    assert "Cases by country of origin" in text and "AFG" in text and "SYR" in text
    assert "2024-03" in text and "food" in text
    astana_row = text.split('<tr data-office="astana">', 1)[1].split("</tr>", 1)[0]
    assert re.findall(r'<td class="num">(\d+)</td>', astana_row) == ["1", "1", "2"]
    assert 'href="/export/cases.csv"' in text and 'href="/export/assistance.json"' in text
    assert 'href="/export/cases.csv?office=almaty"' in text
    assert "style=" not in text  # the Content-Security-Policy would block it


def test_hq_page_says_what_the_schema_lacks(admin: httpx.Client, tmp_path: Path) -> None:
    assert "Not in this schema." not in admin.get("/hq").text  # the default schema
    schema = Schema.from_toml(
        '[tables.notes]\npolicy = "merge"\n'
        'create = "CREATE TABLE notes (id TEXT PRIMARY KEY NOT NULL, body TEXT) STRICT"\n'
    )
    store = SqliteHubStore(tmp_path / "notes.db", schema)
    server = serve(create_app(store))
    try:
        with httpx.Client(base_url=next(server)) as client:
            assert sign_in(client, store.add_admin(ADMIN, "owner")).status_code == 303
            page = client.get("/hq").text
    finally:
        server.close()
        store.close()
    assert page.count("Not in this schema.") == 4
    assert '<tr data-table="notes">' in page and 'href="/export/notes.json"' in page


def test_export_streams_what_export_rows_writes(
    hub: Hub, admin: httpx.Client, make_office: Callable[..., Office]
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name, notes, household_size) VALUES (?, ?, ?, ?)",
            [(f"c{i:05}", f"Ålí {i}", 'quote " and, comma\nline', i) for i in range(2500)],
        )
    conn.close()
    add_case(almaty, "z1", family_name=SCRIPT)
    sync_all(astana, almaty, rounds=1)
    today = datetime.now(UTC).date().isoformat()
    for fmt, office in [("csv", None), ("json", None), ("csv", "almaty"), ("json", "astana")]:
        expected = io.BytesIO()
        count = export_rows(hub.db, "cases", fmt, expected, office)
        # astana's cases name no office: in the whole table only.
        assert count == (2501 if office is None else 1 if office == "almaty" else 0)
        params = {"office": office} if office else {}
        response = admin.get(f"/export/cases.{fmt}", params=params)
        assert response.status_code == 200
        assert response.content == expected.getvalue()
        name = "-".join(["cases", *([office] if office else []), today])
        assert response.headers["content-disposition"] == f'attachment; filename="{name}.{fmt}"'
        assert response.headers["cache-control"] == "no-store"
        assert "content-length" not in response.headers  # streamed, not sized up front
    assert admin.get("/export/cases.csv").headers["content-type"] == "text/csv; charset=utf-8"


def test_export_errors_are_html_pages(hub: Hub, admin: httpx.Client, offices: Any) -> None:
    for path in ("/export/nothing.csv", "/export/cases.xml", "/export/cases"):
        page = admin.get(path)
        assert page.status_code == 404, path
        assert page.headers["content-type"].startswith("text/html")
    page = admin.get("/export/cases.csv", params={"office": "nowhere"})
    assert page.status_code == 400
    assert "unknown office &#39;nowhere&#39;; offices are almaty, astana" in page.text


# -- record history -----------------------------------------------------------------


def test_record_history_lists_every_version_oldest_first(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    write(almaty, "UPDATE cases SET notes = 'moved to Almaty' WHERE id = 'c1'")
    almaty.sync()
    page = admin.get("/records/cases", params={"id": "c1"})
    assert page.status_code == 200
    actors = re.findall(r'<tr data-seq="\d+" data-actor="([^"]+)" data-op="([^"]+)"', page.text)
    assert actors == [("astana", "insert"), ("almaty", "update")]
    assert "moved to Almaty" in page.text and "Nazarova" in page.text
    lookup = admin.get("/records", params={"table": "cases", "id": "c1"})
    assert lookup.status_code == 303
    assert lookup.headers["location"] == "/records/cases?id=c1"


def test_record_history_of_nothing(admin: httpx.Client, hub: Hub) -> None:
    page = admin.get("/records/cases", params={"id": "nope"})
    assert page.status_code == 404
    assert "There is no such record" in page.text
    missing_key = admin.get("/records/cases")
    assert missing_key.status_code == 400
    assert "name the record by its key: id" in missing_key.text
    assert admin.get("/records/nothing", params={"id": "1"}).status_code == 404
    form = admin.get("/records")
    assert form.status_code == 200 and '<select name="table" id="table">' in form.text


# -- every page -------------------------------------------------------------------


def test_every_page_is_uncached_unframed_and_script_free(
    hub: Hub, admin: httpx.Client, offices: tuple[Office, Office]
) -> None:
    conflict = make_conflict(hub, offices, "family_name", ("Abenova", "Abenov"))
    paths = ["/", "/offices/astana", "/conflicts", f"/conflicts/{conflict.id}", "/hq", "/records"]
    with httpx.Client(base_url=hub.url) as signed_out:
        pages = [signed_out.get("/login"), signed_out.get("/")]
    pages += [admin.get(path) for path in [*paths, "/records/cases?id=c1", "/offices/nowhere"]]
    for response in pages:
        path = response.url.path
        assert response.headers["cache-control"] == "no-store", path
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["content-security-policy"] == CSP, path
        if response.status_code == 303:  # the redirect to sign in
            continue
        assert "<script" not in response.text and "style=" not in response.text, path
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in (
            response.text
        )
    for path in paths:
        nav = admin.get(path).text
        for link in ('href="/"', 'href="/conflicts"', 'href="/hq"', 'href="/records"'):
            assert link in nav
        assert 'action="/logout"' in nav
    css = admin.get("/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


# -- stream_export itself ---------------------------------------------------------------


@pytest.fixture
def filled(hub: Hub, offices: tuple[Office, Office]) -> str:
    """The hub (its file, or its database's URL) with 25 cases, 24 of them from almaty."""
    with sqlite3.connect(offices[1].path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name) VALUES (?, ?)",
            [(f"d{i:02}", f"name {i}") for i in range(24)],
        )
    conn.close()
    offices[1].sync()
    return hub.db


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_stream_export_yields_chunk_by_chunk(filled: str, fmt: str) -> None:
    name, chunks = stream_export(filled, "cases", fmt, chunk_rows=10)
    assert name == f"cases-{datetime.now(UTC).date().isoformat()}.{fmt}"
    parts = list(chunks)
    assert len(parts) == 4  # csv: the header, then 3 chunks; json: 3 chunks, then the end
    expected = io.BytesIO()
    export_rows(filled, "cases", fmt, expected)
    assert b"".join(parts) == expected.getvalue()


@pytest.mark.parametrize(
    ("table", "fmt", "office", "words"),
    [
        ("nothing", "csv", None, "unknown table 'nothing'"),
        ("cases", "xml", None, "unknown export format"),
        ("cases", "csv", "nowhere", "offices are almaty, astana"),
    ],
)
def test_stream_export_checks_before_it_returns(
    filled: str, table: str, fmt: str, office: str | None, words: str
) -> None:
    with pytest.raises(FieldsyncError, match=re.escape(words)):
        stream_export(filled, table, fmt, office)


def test_stream_export_can_be_read_from_other_threads(filled: str) -> None:
    _, chunks = stream_export(filled, "cases", "csv", chunk_rows=5)
    parts: list[bytes] = []

    def read_one() -> None:
        parts.extend([next(chunks, b"")])

    for _ in range(8):  # a new thread for every chunk, as a web server's pool may do
        thread = threading.Thread(target=read_one)
        thread.start()
        thread.join()
    expected = io.BytesIO()
    export_rows(filled, "cases", "csv", expected)
    assert b"".join(parts) == expected.getvalue()


@pytest.mark.sqlite_only  # writes to the hub's file by hand meanwhile
def test_stream_export_holds_one_snapshot_until_closed(filled: str) -> None:
    conn = sqlite3.connect(filled, isolation_level=None)
    try:
        _, chunks = stream_export(conn, "cases", "json", chunk_rows=5)
        assert conn.in_transaction  # the snapshot is taken before the first byte
        next(chunks)
        chunks.close()  # a download cut short
        assert not conn.in_transaction
    finally:
        conn.close()
