"""The hub's web layer through httpx, in process (tests/asgi.py), on a real SQLite hub file."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from hub.app import ERROR_CODES, create_app
from hub.ingest import all_receipts
from hub.store import ALL_RECEIPTS, SqliteHubStore
from node.client import ERROR_CLASSES
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.errors import (
    AuthError,
    ClockSkewError,
    HubRejectedError,
    InvalidChangeError,
    ProtocolError,
    VersionMismatchError,
)
from shared.protocol import PROTOCOL_VERSION, Change, ErrorBody, PullPage, PushResult
from shared.schema import Schema
from tests.asgi import client as asgi_client


@pytest.fixture
def tokens(hub_store: SqliteHubStore) -> dict[str, str]:
    tokens = {name: hub_store.add_node(name) for name in ("astana", "almaty")}
    for name in tokens:
        hub_store.set_scopes(name, ["*"])  # both offices hold every record
    return tokens


@pytest.fixture
def make_client(hub_store: SqliteHubStore) -> Iterator[Callable[..., httpx.Client]]:
    """Factory: an in-process httpx client (closed at teardown) around create_app(hub_store)."""
    clients: list[httpx.Client] = []

    def make(**options: Any) -> httpx.Client:
        client = asgi_client(create_app(hub_store, **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., httpx.Client]) -> httpx.Client:
    return make_client()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hlc(offset_ms: int = 0, counter: int = 0) -> int:
    return ((now_ms() + offset_ms) << COUNTER_BITS) + counter


def insert(seq: int, pk: str, **values: Any) -> dict[str, Any]:
    """A change as a node sends it: an insert of cases row ``pk``."""
    return {
        "seq": seq,
        "table": "cases",
        "pk": {"id": pk},
        "op": "insert",
        "ts": hlc(counter=seq),
        "values": {"id": pk, **values},
        "base": {},
    }


def body(*changes: dict[str, Any], protocol: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"protocol": protocol, "changes": list(changes)}


def push(client: httpx.Client, token: str, *changes: dict[str, Any]) -> Any:
    return client.post("/v1/push", json=body(*changes), headers=auth(token))


def pull(client: httpx.Client, token: str, cursor: int = 0, limit: int = 1000) -> Any:
    params = {"cursor": cursor, "limit": limit, "scopes": 1}  # as offices of today ask
    return client.get("/v1/pull", params=params, headers=auth(token))


def assert_error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert {"error", "detail"} <= set(data)
    # other fields an error may carry: the hub's clock, for offices to learn from, and
    # how far the hub has committed the office's changes
    assert set(data) - {"error", "detail"} <= {"hub_time_ms", "acked", "diverged_at"}
    assert isinstance(data.get("hub_time_ms", 0), int)
    assert data["error"] == code
    assert isinstance(data["detail"], str) and data["detail"]
    msgspec.convert(data, ErrorBody)  # as the OpenAPI document says
    return str(data["detail"])


# -- health and unknown paths -----------------------------------------------------------


def test_health_needs_no_token(client: httpx.Client) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json()["protocol"] == PROTOCOL_VERSION


def test_health_tells_an_office_how_far_the_hub_has_its_changes(
    client: httpx.Client, tokens: dict[str, str], hub_store: SqliteHubStore
) -> None:
    assert push(client, tokens["astana"], insert(1, "c1"), insert(2, "c2")).status_code == 200
    assert client.get("/v1/health", headers=auth(tokens["astana"])).json()["acked"] == 2
    assert client.get("/v1/health", headers=auth(tokens["almaty"])).json()["acked"] == 0
    admin = hub_store.add_admin("root", "owner")
    for headers in ({}, auth("not-a-token"), auth(admin), {"Authorization": "Basic x"}):
        answer = client.get("/v1/health", headers=headers)
        assert answer.status_code == 200 and "acked" not in answer.json(), headers
    assert all(o.last_error is None for o in hub_store.offices())  # not an office's error


def test_health_names_the_office_a_token_belongs_to(
    client: httpx.Client, tokens: dict[str, str], hub_store: SqliteHubStore
) -> None:
    # What `node set --token` checks a new token against.
    assert client.get("/v1/health", headers=auth(tokens["almaty"])).json()["node"] == "almaty"
    for headers in ({}, auth("not-a-token"), auth(hub_store.add_admin("root"))):
        assert "node" not in client.get("/v1/health", headers=headers).json(), headers


def test_unknown_path_is_json_404(client: httpx.Client) -> None:
    detail = assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert "/v1/nothing" in detail


def test_wrong_method_is_json_405(client: httpx.Client, tokens: dict[str, str]) -> None:
    assert_error(client.get("/v1/push", headers=auth(tokens["astana"])), 405, "method_not_allowed")


def test_openapi_lists_the_error_codes(client: httpx.Client) -> None:
    doc = client.get("/v1/openapi.json").json()
    assert set(doc["paths"]) >= {"/v1/push", "/v1/pull", "/v1/status", "/v1/health"}
    error = doc["components"]["schemas"]["ErrorBody"]["properties"]["error"]
    assert error["enum"] == sorted({*ERROR_CODES, "internal"})  # internal: the 500 answer


# -- authentication -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer not-a-token"}, id="wrong-token"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
        pytest.param({"Authorization": "Basic YXN0YW5hOnB3"}, id="basic-scheme"),
        pytest.param({"Authorization": "tok"}, id="no-scheme"),
    ],
)
def test_push_and_pull_need_a_valid_token(
    client: httpx.Client,
    hub_store: SqliteHubStore,
    tokens: dict[str, str],
    headers: dict[str, str],
) -> None:
    response = client.post("/v1/push", json=body(insert(1, "c1")), headers=headers)
    assert_error(response, 401, "unauthorized")
    assert_error(client.get("/v1/pull", headers=headers), 401, "unauthorized")
    assert hub_store.rows("cases") == []


def test_token_scheme_is_case_insensitive(client: httpx.Client, tokens: dict[str, str]) -> None:
    headers = {"Authorization": f"bearer {tokens['astana']}"}
    response = client.get("/v1/pull", params={"scopes": 1}, headers=headers)
    assert response.status_code == 200


# -- request bodies -------------------------------------------------------------------


def _post(client: httpx.Client, token: str, content: bytes, **headers: str) -> Any:
    return client.post(
        "/v1/push",
        content=content,
        headers={**auth(token), "Content-Type": "application/json", **headers},
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    ],
)
def test_malformed_json_is_400(
    client: httpx.Client, tokens: dict[str, str], content: bytes
) -> None:
    detail = assert_error(_post(client, tokens["astana"], content), 400, "bad_request")
    assert "not valid JSON" in detail


def test_gzip_body_is_accepted(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    raw = json.dumps(body(insert(1, "c1", family_name="Ali"))).encode()
    response = _post(client, tokens["astana"], gzip.compress(raw), **{"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert PushResult.from_json(response.json()).applied == 1
    assert [r["family_name"] for r in hub_store.rows("cases")] == ["Ali"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"this is not gzip", "corrupt", id="not-gzip"),
        pytest.param(gzip.compress(b'{"protocol": 2, "changes": []}')[:-12], "cut short", id="cut"),
    ],
)
def test_corrupt_gzip_is_400(
    client: httpx.Client, tokens: dict[str, str], content: bytes, message: str
) -> None:
    response = _post(client, tokens["astana"], content, **{"Content-Encoding": "gzip"})
    assert message in assert_error(response, 400, "bad_request")


def test_unknown_content_encoding_is_400(client: httpx.Client, tokens: dict[str, str]) -> None:
    response = _post(client, tokens["astana"], b"{}", **{"Content-Encoding": "br"})
    assert "Content-Encoding" in assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("protocol", [0, 1, 3, None, "2"])
def test_wrong_protocol_version(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str], protocol: Any
) -> None:
    data = {"protocol": protocol, "changes": [insert(1, "c1")]}
    response = client.post("/v1/push", json=data, headers=auth(tokens["astana"]))
    assert "upgrade fieldsync" in assert_error(response, 400, "version_mismatch")
    assert hub_store.rows("cases") == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param([1, 2], id="not-an-object"),
        pytest.param({"protocol": 2}, id="no-changes"),
        pytest.param({"protocol": 2, "changes": {}}, id="changes-object"),
        pytest.param({"protocol": 2, "changes": [insert(2, "a"), insert(1, "b")]}, id="unsorted"),
        pytest.param({"protocol": 2, "changes": [insert(1, "a"), insert(1, "b")]}, id="dup-seq"),
        pytest.param({"protocol": 2, "changes": [insert(1, "a") | {"op": "x"}]}, id="bad-op"),
        pytest.param({"protocol": 2, "changes": [insert(1, "a") | {"ts": True}]}, id="bool-ts"),
    ],
)
def test_malformed_push_is_400(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str], data: Any
) -> None:
    response = client.post("/v1/push", json=data, headers=auth(tokens["astana"]))
    assert_error(response, 400, "bad_request")
    assert hub_store.rows("cases") == []


# -- invalid changes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(insert(1, "c1") | {"table": "people"}, "unknown table 'people'", id="table"),
        pytest.param(insert(1, "c1", nmae="Ali"), "no column 'nmae'", id="column"),
        pytest.param(insert(1, "c1", household_size="three"), "household_size", id="type"),
        pytest.param(insert(1, "c1", household_size=True), "household_size", id="bool-as-int"),
        pytest.param(insert(1, "c1") | {"pk": {"uuid": "c1"}}, "primary key", id="pk-name"),
        pytest.param(insert(1, "c1") | {"pk": {"id": None}}, "null", id="pk-null"),
        pytest.param(
            insert(1, "c1") | {"values": {"id": "c2"}}, "contradict its primary key", id="pk-clash"
        ),
        pytest.param(
            insert(1, "c1") | {"base": {"nmae": str(Timestamp(1, "hub"))}}, "nmae", id="base-col"
        ),
        pytest.param(insert(1, "c1", status="stateless"), "constraint", id="check-constraint"),
    ],
)
def test_invalid_change_is_rejected_alone_and_changes_nothing(
    client: httpx.Client,
    hub_store: SqliteHubStore,
    tokens: dict[str, str],
    change: dict[str, Any],
    message: str,
) -> None:
    assert push(client, tokens["astana"], insert(1, "c0", family_name="Before")).status_code == 200
    before = hub_store.rows("cases")
    before_page = hub_store.pull("almaty", 0, 100)
    change = change | {"seq": 2}
    response = push(client, tokens["astana"], change)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["acked"] == 2 and answer["applied"] == 0
    [rejection] = answer["rejected"]
    assert rejection["seq"] == 2 and message in rejection["reason"]
    assert hub_store.rows("cases") == before
    assert hub_store.pull("almaty", 0, 100).rows == before_page.rows
    # admins see it, with the office and the reason
    [seen] = hub_store.rejected()
    assert (seen["node"], seen["seq"], seen["table"]) == ("astana", 2, change["table"])
    assert message in seen["reason"]
    # sent again (its answer was lost), it is reported rejected again, not applied
    again = push(client, tokens["astana"], change).json()
    assert again["applied"] == 0 and [r["seq"] for r in again["rejected"]] == [2]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(insert(2, "c2", household_size="three"), id="validation"),
        pytest.param(insert(2, "c2", status="stateless"), id="sqlite-constraint"),
    ],
)
def test_a_bad_second_change_does_not_hold_back_the_rest(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str], bad: dict[str, Any]
) -> None:
    response = push(client, tokens["astana"], insert(1, "c1"), bad, insert(3, "c3"))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["acked"], answer["applied"]) == (3, 2)
    assert [(r["seq"], r["record"]) for r in answer["rejected"]] == [(2, None)]
    assert [r["id"] for r in hub_store.rows("cases")] == ["c1", "c3"]
    assert [r["pk"]["id"] for r in pull(client, tokens["almaty"]).json()["rows"]] == ["c1", "c3"]
    [astana] = [n for n in hub_store.nodes() if n["name"] == "astana"]
    assert astana["acked_seq"] == 3
    assert hub_store.conflicts() == []


def test_a_rejected_update_answers_with_the_record_as_the_hub_holds_it(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    push(client, tokens["astana"], insert(1, "c1", status="refugee", family_name="Ali"))
    bad = {**insert(2, "c1", status="stateless"), "op": "update"}
    bad["values"] = {"status": "stateless"}
    answer = push(client, tokens["astana"], bad).json()
    [rejection] = answer["rejected"]
    assert rejection["record"]["values"]["status"] == "refugee"
    assert rejection["record"]["values"]["family_name"] == "Ali"
    assert hub_store.rows("cases")[0]["status"] == "refugee"


# -- limits ----------------------------------------------------------------------------


def test_body_over_the_limit_is_413(
    make_client: Callable[..., httpx.Client], hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    client = make_client(max_body_bytes=1000)
    small = push(client, tokens["astana"], insert(1, "c1"))
    assert small.status_code == 200, small.text
    big = push(client, tokens["astana"], insert(2, "c2", notes="x" * 2000))
    assert "1000 byte limit" in assert_error(big, 413, "too_large")
    assert [r["id"] for r in hub_store.rows("cases")] == ["c1"]


def test_gzip_bomb_is_413(
    make_client: Callable[..., httpx.Client], hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    client = make_client(max_body_bytes=1000)
    raw = json.dumps(body(insert(1, "c1", notes=" " * 50_000))).encode()
    packed = gzip.compress(raw)
    assert len(packed) < 1000
    response = _post(client, tokens["astana"], packed, **{"Content-Encoding": "gzip"})
    assert_error(response, 413, "too_large")
    assert hub_store.rows("cases") == []


def test_more_changes_than_max_batch_is_413(
    make_client: Callable[..., httpx.Client], hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    client = make_client(max_batch=2)
    ok = push(client, tokens["astana"], insert(1, "c1"), insert(2, "c2"))
    assert ok.status_code == 200
    response = push(client, tokens["astana"], insert(3, "c3"), insert(4, "c4"), insert(5, "c5"))
    assert "at most 2" in assert_error(response, 413, "too_large")
    assert [r["id"] for r in hub_store.rows("cases")] == ["c1", "c2"]


# -- idempotency and clock --------------------------------------------------------------


def test_replayed_push_changes_the_hub_once(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    changes = (insert(1, "c1", family_name="Ali"), insert(2, "c2", family_name="Bek"))
    first = PushResult.from_json(push(client, tokens["astana"], *changes).json())
    rows = hub_store.rows("cases")
    page = hub_store.pull("almaty", 0, 100)
    second = PushResult.from_json(push(client, tokens["astana"], *changes).json())
    assert (first.acked, first.applied, first.node) == (2, 2, "astana")
    assert (second.acked, second.applied, second.conflicts) == (2, 0, 0)
    assert hub_store.rows("cases") == rows
    assert hub_store.pull("almaty", 0, 100).rows == page.rows
    # a batch overlapping the acknowledged part applies only the new change
    third = push(client, tokens["astana"], changes[1], insert(3, "c3"))
    assert (third.json()["acked"], third.json()["applied"]) == (3, 1)


@pytest.mark.parametrize(
    "older_hub",
    [False, pytest.param(True, marks=pytest.mark.sqlite_only)],  # no PG hub had row receipts
    ids=["batch-receipts", "row-receipts"],
)
def test_replays_are_checked_against_the_receipts_of_earlier_batches(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str], older_hub: bool
) -> None:
    token = tokens["astana"]
    first, second = (insert(1, "c1"), insert(2, "c2")), (insert(3, "c3"),)
    push(client, token, *first)
    push(client, token, *second)
    if older_hub:  # receipts kept a row per change, as hubs before batch receipts did
        with hub_store.database.write() as conn:
            conn.execute(
                "INSERT INTO _fieldsync_receipts SELECT b.node, r.value ->> 0, r.value ->> 1 "
                "FROM _fieldsync_receipt_batches AS b, json_each(b.receipts) AS r"
            )
            conn.execute("DELETE FROM _fieldsync_receipt_batches")
    with hub_store.database.read() as conn:
        kept = sorted(all_receipts(conn))
        if hub_store.database.dialect.name == "sqlite":  # the same as SQLite's JSON reads
            assert sorted(conn.execute(ALL_RECEIPTS).fetchall()) == kept
    assert kept == [("astana", c["seq"], c["ts"]) for c in first + second]
    # a replay across both batches, with one new change: only the new one applies
    again = push(client, token, first[1], second[0], insert(4, "c4"))
    assert (again.json()["acked"], again.json()["applied"]) == (4, 1)
    # number 2 again, but another change: the office database is an older copy
    other = insert(2, "c2", family_name="Other") | {"ts": first[1]["ts"] + 1}
    assert_error(push(client, token, other, insert(5, "c5")), 409, "diverged")
    assert [r["id"] for r in hub_store.rows("cases")] == ["c1", "c2", "c3", "c4"]


def test_change_stamped_far_in_the_future_is_clock_skew(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    future = insert(1, "c1") | {"ts": hlc(offset_ms=60 * 60 * 1000)}
    detail = assert_error(push(client, tokens["astana"], future), 422, "clock_skew")
    assert "astana" in detail
    assert hub_store.rows("cases") == []
    slightly_ahead = insert(1, "c1") | {"ts": hlc(offset_ms=60 * 1000)}
    assert push(client, tokens["astana"], slightly_ahead).status_code == 200


def test_push_result_carries_hub_time(client: httpx.Client, tokens: dict[str, str]) -> None:
    before = now_ms()
    result = PushResult.from_json(push(client, tokens["astana"], insert(1, "c1")).json())
    assert before <= result.hub_time_ms <= now_ms()


# -- pull ------------------------------------------------------------------------------


@pytest.mark.sqlite_only  # PostgreSQL's reads never hold up a write
def test_pull_reads_on_a_snapshot_of_its_own(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    # Counting what an office has left reads as many records as it is behind: on the
    # store's connection, under its lock, every push would wait for it.
    push(client, tokens["astana"], *(insert(i, f"c{i}") for i in range(1, 4)))

    def no_reading_records(action: int, table: str | None, *_: Any) -> int:
        refused = action == sqlite3.SQLITE_READ and table == "_fieldsync_records"
        return sqlite3.SQLITE_DENY if refused else sqlite3.SQLITE_OK

    hub_store.db.conn.set_authorizer(no_reading_records)
    try:
        page = hub_store.pull("almaty", 0, 2, count=True)
    finally:
        hub_store.db.conn.set_authorizer(None)
    assert [row.pk["id"] for row in page.rows] == ["c1", "c2"]
    assert (page.more, page.remaining) == (True, 3)
    [almaty] = [o for o in hub_store.offices() if o.name == "almaty"]
    assert almaty.last_pull_at is not None  # the pull was noted all the same


def test_pull_pages_through_everything(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    push(client, tokens["astana"], *(insert(i, f"c{i}", household_size=i) for i in range(1, 6)))
    seen: list[str] = []
    cursor, pages = 0, 0
    while True:
        page = PullPage.from_json(pull(client, tokens["almaty"], cursor, limit=2).json())
        pages += 1
        assert len(page.rows) <= 2
        assert page.node == "almaty"
        seen += [row.pk["id"] for row in page.rows]
        assert page.cursor >= cursor
        cursor = page.cursor
        if not page.more:
            break
    assert pages == 3
    assert seen == ["c1", "c2", "c3", "c4", "c5"]
    # nothing new: an empty last page at the same cursor
    again = PullPage.from_json(pull(client, tokens["almaty"], cursor, limit=2).json())
    assert (again.rows, again.cursor, again.more) == ([], cursor, False)


def test_pull_rows_carry_values_and_versions(client: httpx.Client, tokens: dict[str, str]) -> None:
    change = insert(1, "c1", family_name="Ali", household_size=3)
    push(client, tokens["astana"], change)
    [row] = PullPage.from_json(pull(client, tokens["almaty"]).json()).rows
    assert row.table == "cases"
    assert row.values is not None
    assert row.values["family_name"] == "Ali"
    assert row.values["household_size"] == 3
    assert row.values["notes"] is None  # every column travels
    assert row.versions["family_name"] == str(Timestamp(change["ts"], "astana"))


def test_packed_pull_sends_one_version_for_a_record_written_once(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    every = dict.fromkeys(Schema.load().table("cases").column_names[1:])  # but id
    first = insert(1, "c1", **{**every, "family_name": "Ali"})
    other = insert(2, "c2", **{**every, "family_name": "Bek"})
    v1 = str(Timestamp(first["ts"], "astana"))
    edit = {
        "seq": 3,
        "table": "cases",
        "pk": {"id": "c2"},
        "op": "update",
        "ts": other["ts"] + 10,
        "values": {"notes": "moved"},
        "base": {"notes": str(Timestamp(other["ts"], "astana"))},
    }
    push(client, tokens["astana"], first, other, edit)
    params = {"cursor": 0, "limit": 10, "packed": 1, "scopes": 1}
    answer = client.get("/v1/pull", params=params, headers=auth(tokens["almaty"])).json()
    by_id = {row["pk"]["id"]: row for row in answer["rows"]}
    assert by_id["c1"]["versions"] == v1  # every column at one version: that version
    assert by_id["c2"]["versions"]["notes"] == str(Timestamp(edit["ts"], "astana"))
    assert by_id["c2"]["versions"]["family_name"] == str(Timestamp(other["ts"], "astana"))
    # Without packed=1 (an office of an earlier version) every row names every column.
    plain_rows = pull(client, tokens["almaty"]).json()["rows"]
    assert all(isinstance(row["versions"], dict) for row in plain_rows)
    [c1] = [row for row in plain_rows if row["pk"]["id"] == "c1"]
    assert set(c1["versions"]) == set(c1["values"]) and set(c1["versions"].values()) == {v1}


def test_many_edits_to_a_record_travel_as_one_row(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    first = insert(1, "c1", family_name="A")
    v1 = str(Timestamp(first["ts"], "astana"))
    edit = {
        "seq": 2,
        "table": "cases",
        "pk": {"id": "c1"},
        "op": "update",
        "ts": first["ts"] + 10,
        "values": {"family_name": "B"},
        "base": {"id": v1, "family_name": v1},
    }
    push(client, tokens["astana"], first, edit)
    rows = PullPage.from_json(pull(client, tokens["almaty"]).json()).rows
    assert [(r.pk, r.values["family_name"]) for r in rows if r.values] == [({"id": "c1"}, "B")]


def test_office_does_not_get_back_what_it_pushed(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    push(client, tokens["astana"], insert(1, "c1"), insert(2, "c2"))
    own = PullPage.from_json(pull(client, tokens["astana"]).json())
    other = PullPage.from_json(pull(client, tokens["almaty"]).json())
    assert own.rows == []
    assert own.cursor == other.cursor > 0  # the cursor still moves past them
    assert [r.pk["id"] for r in other.rows] == ["c1", "c2"]
    # once almaty edits c1, astana gets it back
    versions = other.rows[0].versions
    edit = {
        "seq": 1,
        "table": "cases",
        "pk": {"id": "c1"},
        "op": "update",
        "ts": hlc(counter=99),
        "values": {"notes": "seen in almaty"},
        "base": dict(versions),
    }
    assert push(client, tokens["almaty"], edit).json()["applied"] == 1
    back = PullPage.from_json(pull(client, tokens["astana"], own.cursor).json())
    assert [(r.pk["id"], (r.values or {}).get("notes")) for r in back.rows] == [
        ("c1", "seen in almaty")
    ]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"cursor": -1}, id="negative-cursor"),
        pytest.param({"limit": 0}, id="zero-limit"),
        pytest.param({"limit": 10_001}, id="huge-limit"),
        pytest.param({"cursor": "abc"}, id="cursor-text"),
        pytest.param({"limit": "1.5"}, id="limit-float"),
    ],
)
def test_bad_pull_parameters_are_400(
    client: httpx.Client, tokens: dict[str, str], params: dict[str, Any]
) -> None:
    response = client.get("/v1/pull", params=params, headers=auth(tokens["astana"]))
    assert_error(response, 400, "bad_request")


# -- identity --------------------------------------------------------------------------


def test_node_comes_from_the_token_not_the_body(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    # a change cannot carry another office's name: extra fields are ignored
    spoof = insert(1, "c1", family_name="Ali") | {"node": "almaty", "origin": "almaty"}
    response = push(client, tokens["astana"], spoof)
    result = PushResult.from_json(response.json())
    assert result.node == "astana"
    [row] = PullPage.from_json(pull(client, tokens["almaty"]).json()).rows
    assert {Timestamp.parse(v).node for v in row.versions.values()} == {"astana"}
    # it was acknowledged for astana only: almaty's own seq 1 is still new
    acked = {n["name"]: n["acked_seq"] for n in hub_store.nodes()}
    assert acked == {"almaty": 0, "astana": 1}
    own = push(client, tokens["almaty"], insert(1, "c9"))
    assert own.json()["applied"] == 1
    assert own.json()["node"] == "almaty"


def test_claiming_another_office_is_forbidden(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    data = body(insert(1, "c1")) | {"node": "almaty"}
    response = client.post("/v1/push", json=data, headers=auth(tokens["astana"]))
    assert "almaty" in assert_error(response, 403, "forbidden")
    assert hub_store.rows("cases") == []
    response = client.get("/v1/pull", params={"node": "almaty"}, headers=auth(tokens["astana"]))
    assert_error(response, 403, "forbidden")
    # claiming itself is fine
    data = body(insert(1, "c1")) | {"node": "astana"}
    response = client.post("/v1/push", json=data, headers=auth(tokens["astana"]))
    assert response.json()["applied"] == 1


def test_concurrent_edits_are_logged_with_both_offices(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    first = insert(1, "c1", family_name="Ali")
    push(client, tokens["astana"], first)
    v1 = str(Timestamp(first["ts"], "astana"))
    base = {"id": v1, "family_name": v1}

    def edit(seq: int, value: str, counter: int) -> dict[str, Any]:
        return {
            "seq": seq,
            "table": "cases",
            "pk": {"id": "c1"},
            "op": "update",
            "ts": hlc(counter=1000 + counter),
            "values": {"family_name": value},
            "base": base,
        }

    assert push(client, tokens["astana"], edit(2, "Aliev", 1)).json()["conflicts"] == 0
    late = edit(1, "Alieva", 2)
    assert push(client, tokens["almaty"], late).json()["conflicts"] == 1
    [conflict] = hub_store.conflicts()
    assert (conflict.kind, conflict.column, conflict.status) == ("field", "family_name", "logged")
    assert {conflict.kept_node, conflict.other_node} == {"astana", "almaty"}
    assert {conflict.kept_value, conflict.other_value} == {"Aliev", "Alieva"}
    [winner] = hub_store.rows("cases")
    assert winner["family_name"] == conflict.kept_value


# -- error codes ------------------------------------------------------------------------


def test_every_hub_error_code_maps_to_a_client_error_class() -> None:
    missing = set(ERROR_CODES) - set(ERROR_CLASSES)
    assert not missing, f"node/client.py has no class for {sorted(missing)}"
    for code, status in ERROR_CODES.items():
        assert issubclass(ERROR_CLASSES[code], HubRejectedError)
        assert 400 <= status < 500
        if status in (401, 403):
            assert issubclass(ERROR_CLASSES[code], AuthError)
    assert ERROR_CLASSES["clock_skew"] is ClockSkewError


def test_codes_raised_by_exceptions_are_declared() -> None:
    codes = {
        ProtocolError.code,
        VersionMismatchError.code,
        InvalidChangeError.code,
    }
    assert codes <= set(ERROR_CODES)


def test_change_from_node_side_is_accepted_verbatim(
    client: httpx.Client, hub_store: SqliteHubStore, tokens: dict[str, str]
) -> None:
    # The wire form Change.to_json() produces is what the hub takes.
    change = Change(
        1,
        "assistance",
        {"id": "a1"},
        "insert",
        Timestamp(hlc(), "astana"),
        {"id": "a1", "kind": "food", "quantity": 2.5},
    )
    response = push(client, tokens["astana"], change.to_json())
    assert response.status_code == 200, response.text
    [row] = hub_store.rows("assistance")
    assert (row["kind"], row["quantity"]) == ("food", 2.5)


def test_cursor_past_the_hubs_last_seq_serves_everything_again(hub_store: SqliteHubStore) -> None:
    # An office's cursor is ahead when the hub was restored from an older backup.
    token = hub_store.add_node("astana")
    other = hub_store.add_node("almaty")
    for name in ("astana", "almaty"):
        hub_store.set_scopes(name, ["*"])
    assert token != other
    c = Change(
        1,
        "cases",
        {"id": "c1"},
        "insert",
        Timestamp(now_ms() << COUNTER_BITS, "astana"),
        {"id": "c1", "family_name": "Ali"},
        {},
    )
    hub_store.push("astana", [c])
    page = hub_store.pull("almaty", 10_000, 100)
    assert [row.pk for row in page.rows] == [{"id": "c1"}]
    assert page.cursor == 1 and page.more is False


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"household_size": "Karimova, 3 children"}, id="wrong-type"),
        pytest.param({"notes": ["Karimova", "secret"]}, id="list"),
    ],
)
def test_refusals_never_quote_case_contents(
    client: httpx.Client, hub_store: SqliteHubStore, values: dict[str, Any]
) -> None:
    token = hub_store.add_node("astana")
    response = push(client, token, insert(1, "c1", **values))
    assert response.status_code == 200, response.text
    [rejection] = response.json()["rejected"]
    assert "Karimova" not in response.text
    assert "cases." in rejection["reason"]  # it names the column instead
    assert "Karimova" not in json.dumps(hub_store.rejected())
