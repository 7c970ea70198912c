"""Finding a record and reading its history on the dashboard and the admin API, through
a real uvicorn hub with real offices (issue 15 point 5)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import Hub, Office
from tests.integration.test_dashboard import add_case, sign_in, sync_all, write

pytestmark = [pytest.mark.integration, pytest.mark.engines]


@contextmanager
def signed_in(hub: Hub, role: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        assert sign_in(client, hub.store.add_admin(f"{role}-admin", role)).status_code == 303
        yield client


def listed(page: str) -> list[str]:
    return re.findall(r'<tr data-table="cases" data-key="([^"]*)"', page)


def test_owners_find_a_case_by_number_or_name(hub: Hub, make_office: Callable[..., Office]) -> None:
    astana = make_office("astana")
    add_case(astana, "6f1c2d3e-0000", case_number="AST-2024-0017", family_name="Nazarova")
    add_case(astana, "9a8b7c6d-0000", case_number="AST-2024-0018", family_name="Karimov")
    sync_all(astana)
    with signed_in(hub, "owner") as owner:
        page = owner.get("/records", params={"q": "ast-2024-0017"})
        assert page.status_code == 200
        assert listed(page.text) == ["6f1c2d3e-0000"]
        assert 'href="/records/cases?id=6f1c2d3e-0000"' in page.text
        assert "AST-2024-0017" in page.text
        assert listed(owner.get("/records", params={"q": "karim"}).text) == ["9a8b7c6d-0000"]
        assert len(listed(owner.get("/records", params={"q": "AST-2024"}).text)) == 2
        assert "Nothing matches" in owner.get("/records", params={"q": "zzz%"}).text
        short = owner.get("/records", params={"q": "A"})
        assert short.status_code == 400 and "at least 2 characters" in short.text
        audit = owner.get("/audit").text
    assert 'data-action="search_records"' in audit
    assert "Nazarova" not in audit and "0017" not in audit  # the search text is not kept
    for role in ("viewer", "resolver"):
        with signed_in(hub, role) as other:
            refused = other.get("/records", params={"q": "Nazarova"})
            assert refused.status_code == 403 and "Nazarova" not in refused.text


def test_a_search_lists_at_most_50_and_says_there_are_more(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana = make_office("astana")
    for i in range(60):
        add_case(astana, f"k{i:03d}", family_name="Suleimenov")
    sync_all(astana)
    with signed_in(hub, "owner") as owner:
        page = owner.get("/records", params={"q": "suleimenov"}).text
    assert len(listed(page)) == 50
    assert "there are more" in page


def test_history_is_in_stamp_order_with_the_lost_edit_marked(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1", notes="first")
    sync_all(astana, almaty)
    # Both edit the notes offline: almaty first; astana's edit reaches the hub first.
    write(almaty, "UPDATE cases SET notes = 'almaty, earlier' WHERE id = 'c1'")
    time.sleep(0.01)
    write(astana, "UPDATE cases SET notes = 'astana, later' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    expected = [
        ("astana", "insert", "winner"),  # its other fields are still there
        ("almaty", "update", "loser"),  # made before astana's edit, received after it
        ("astana", "update", "winner"),
    ]
    with signed_in(hub, "owner") as owner:
        page = owner.get("/records/cases", params={"id": "c1"})
        token = hub.store.add_admin("api-owner", "owner")
        api = httpx.get(
            f"{hub.url}/v1/admin/history/cases",
            params={"id": "c1"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert page.status_code == 200
    marks = re.findall(
        r'<tr data-seq="\d+" data-actor="([^"]+)" data-op="([^"]+)" data-outcome="([^"]+)"',
        page.text,
    )
    assert marks == expected
    assert "lost a conflict" in page.text
    now = page.text.split('<section id="current">', 1)[1].split("</section>", 1)[0]
    assert "astana, later" in now and "almaty, earlier" not in now
    assert api.status_code == 200
    body = api.json()
    assert [(v["actor"], v["op"], v["outcome"]) for v in body["versions"]] == expected
    assert body["current"]["values"]["notes"] == "astana, later"
    assert [v["seq"] for v in body["versions"]] != sorted(v["seq"] for v in body["versions"])


def test_the_admin_api_finds_records_for_owners(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana = make_office("astana")
    add_case(astana, "c1", case_number="AST-0001", family_name="Nazarova")
    sync_all(astana)
    owner, viewer = hub.store.add_admin("api-owner", "owner"), hub.store.add_admin("v", "viewer")

    def get(token: str, text: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(f"{hub.url}/v1/admin/records", params={"q": text}, headers=headers)

    found = get(owner, "ast-0001")
    assert found.status_code == 200
    assert found.json() == {
        "query": "ast-0001",
        "results": [
            {
                "table": "cases",
                "pk": {"id": "c1"},
                "values": hub.store.rows("cases")[0],
                "matched": ["case_number"],
            }
        ],
        "more": False,
    }
    assert get(owner, "x").status_code == 400
    refused = get(viewer, "Nazarova")
    assert refused.status_code == 403 and "Nazarova" not in refused.text
