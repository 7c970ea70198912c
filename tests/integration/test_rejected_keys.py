"""Changes the hub set aside, listed however odd the key an office sent, through a
real hub (uvicorn on 127.0.0.1, tests/conftest.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from shared.clock import COUNTER_BITS, now_ms
from shared.protocol import PROTOCOL_VERSION
from tests.conftest import Hub
from tests.integration.test_dashboard import sign_in

pytestmark = pytest.mark.integration


@pytest.fixture
def office(hub: Hub) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.store.add_node('almaty')}"}


@pytest.fixture
def web(hub: Hub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        yield client


def test_an_office_page_lists_changes_to_unknown_tables_and_old_bad_keys(
    hub: Hub, web: httpx.Client, office: dict[str, str]
) -> None:
    ts = now_ms() << COUNTER_BITS
    unknown = {"seq": 1, "table": "nope", "pk": {"id": 7}, "op": "delete", "ts": ts}
    nested = {**unknown, "seq": 2, "pk": {"id": [1, {"a": 2}]}}
    pushed = web.post(
        "/v1/push",
        json={"protocol": PROTOCOL_VERSION, "changes": [unknown, nested]},
        headers=office,
    )
    assert pushed.status_code == 200, pushed.text
    assert len(pushed.json()["rejected"]) == 2
    # kept before this release: a key as a list, of a table the hub does not have
    with sqlite3.connect(hub.path) as conn:
        conn.execute(
            "INSERT INTO _fieldsync_rejected (node, seq, tbl, pk, op, reason, created_at) "
            "VALUES ('almaty', 0, 'gone', '[[1,2],{\"x\":1}]', 'delete', 'old', "
            "'2026-01-01T00:00:00+00:00')"
        )
    conn.close()
    admin = hub.store.add_admin("ops")
    assert sign_in(web, admin).status_code == 303
    page = web.get("/offices/almaty")
    assert page.status_code == 200, page.text[-500:]  # before: 500, for good
    assert "nope" in page.text and "gone" in page.text
    listed = web.get("/v1/admin/rejected", headers={"Authorization": f"Bearer {admin}"})
    assert listed.status_code == 200
    keys = {r["seq"]: r["pk"] for r in listed.json()["rejected"]}
    assert keys == {1: {"id": 7}, 2: {"id": [1, {"a": 2}]}, 0: {"key": [[1, 2], {"x": 1}]}}
