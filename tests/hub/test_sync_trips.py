"""What a sync request costs the hub in trips to a worker thread, and that the tokens
seen good (hub/auth.py ``SeenTokens``) never let a revoked or replaced token in, on
both engines (real app through httpx's ASGI transport, no network)."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.concurrency import run_in_threadpool

import hub.app
import hub.database
import hub.pull
from hub.app import create_app
from hub.auth import SeenTokens
from hub.store import SqlHubStore, open_store
from shared.protocol import PROTOCOL_VERSION, SCHEMA_HEADER
from shared.reports import StatusReport
from tests.asgi import client as asgi_client
from tests.engines import Engine

CASE = {"id": "c-1", "household_size": 3, "office": "astana"}


@pytest.fixture
def database(tmp_path: Path, engine: Engine) -> str:
    return engine.db(tmp_path)


@pytest.fixture
def store(database: str) -> Iterator[SqlHubStore]:
    with open_store(database) as store:
        yield store


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of each function the app runs in a worker thread (the real one runs)."""
    made: list[str] = []
    real = run_in_threadpool

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        made.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(hub.app, "run_in_threadpool", counted)
    return made


def office_headers(store: SqlHubStore, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", SCHEMA_HEADER: str(store.schema_version)}


def push(web: httpx.Client, headers: dict[str, str], seq: int) -> httpx.Response:
    change = {"seq": seq, "table": "cases", "pk": {"id": f"c-{seq}"}, "op": "insert"}
    body = {"protocol": PROTOCOL_VERSION, "changes": [{**change, "ts": seq << 16, **values(seq)}]}
    sent = gzip.compress(orjson.dumps(body))
    return web.post(
        "/v1/push",
        content=sent,
        headers={**headers, "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )


def values(seq: int) -> dict[str, Any]:
    return {"values": {**CASE, "id": f"c-{seq}"}}


def status(web: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return web.post(
        "/v1/status", json=StatusReport(0, None, 0, 0, "0.1.0").to_json(), headers=headers
    )


def test_each_request_of_a_sync_takes_one_trip_to_a_worker_thread(
    store: SqlHubStore, trips: list[str]
) -> None:
    headers = office_headers(store, store.add_node("astana"))
    with asgi_client(create_app(store)) as web:
        steps: list[tuple[str, Callable[[], httpx.Response]]] = [
            ("health", lambda: web.get("/v1/health", headers=headers)),
            ("push", lambda: push(web, headers, 1)),
            (
                "pull",
                lambda: web.get("/v1/pull", params={"cursor": 0, "scopes": 1}, headers=headers),
            ),
            ("status", lambda: status(web, headers)),
        ]
        for step, request in steps:
            trips.clear()
            answer = request()
            assert answer.status_code == 200, answer.text
            # before: 2 (the token, then acked and the schema), 3 (the token, the
            # body, the push), 2 (the token, the pull) and 3 (the token, the body,
            # the report)
            assert len(trips) == 1, (step, trips)
    assert store.acked("astana") == 1


def test_an_idle_pull_reads_no_record_and_the_schema_version_once(
    store: SqlHubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An office with nothing to pull costs no record query, and the schema version its
    page is read under is read once (it was read before and after the pull, and again
    by the note of the pull: a round trip each on PostgreSQL)."""
    headers = office_headers(store, store.add_node("astana"))
    other = office_headers(store, store.add_node("almaty"))
    store.set_scopes("almaty", ["almaty", "astana"])  # it may write astana's cases
    read: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            read.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(hub.pull, "_scoped_rows", counted("records", hub.pull._scoped_rows))
    monkeypatch.setattr(hub.database, "_version", counted("version", hub.database._version))
    with asgi_client(create_app(store)) as web:
        assert push(web, other, 1).status_code == 200
        params = {"cursor": 0, "scopes": 1, "count": 1}
        first = web.get("/v1/pull", params=params, headers=headers).json()
        assert [row["pk"] for row in first["rows"]] == [{"id": "c-1"}]
        version = store.schema_version
        read.clear()
        for _ in range(3):
            params["cursor"] = first["cursor"]
            idle = web.get("/v1/pull", params=params, headers=headers)
            assert idle.status_code == 200, idle.text
            page = idle.json()
            assert (page["rows"], page["remaining"], page["more"]) == ([], 0, False)
            assert page["schema_version"] == version
            assert read.count("records") == 0, read
            assert read.count("version") <= 1, read
            read.clear()
        # One more record: the next pull reads it (the idle path is for an idle pull only).
        assert push(web, other, 2).status_code == 200
        busy = web.get("/v1/pull", params=params, headers=headers).json()
        assert [row["pk"] for row in busy["rows"]] == [{"id": "c-2"}]
        assert read.count("records") == 1, read
    nodes = {node["name"]: node for node in store.nodes()}
    assert nodes["astana"]["last_pull_at"] is not None


def test_a_token_seen_good_is_refused_as_soon_as_another_process_revokes_it(
    database: str, store: SqlHubStore
) -> None:
    token = store.add_node("astana")
    headers = office_headers(store, token)
    with asgi_client(create_app(store)) as web, open_store(database) as cli:
        assert push(web, headers, 1).status_code == 200
        assert status(web, headers).status_code == 200
        cli.revoke("astana")  # as `fieldsync hub revoke`, in a process of its own
        for answer in (push(web, headers, 2), status(web, headers)):
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"] == "revoked"
        assert web.get("/v1/health", headers=headers).json().get("acked") is None
        assert store.acked("astana") == 1  # nothing of the refused push applied
        # Forgotten once refused: a body over the limit is not even read.
        over = {**headers, "Content-Length": str(100 * 1024 * 1024)}
        refused = web.post("/v1/push", content=b"x", headers=over)
        assert refused.status_code == 401, refused.text
        _, new = cli.rotate_token("astana")
        assert push(web, office_headers(store, new), 2).status_code == 200
        assert push(web, headers, 3).json()["error"] == "revoked"
        cli.rotate_token("astana")  # the token just seen good is replaced in turn
        replaced = status(web, office_headers(store, new))
        assert replaced.status_code == 401 and replaced.json()["error"] == "revoked"
    assert store.acked("astana") == 2


def test_seen_tokens_keep_hashes_only_and_a_bounded_number() -> None:
    seen = SeenTokens(size=2)
    seen.saw("token-a", "astana")
    seen.saw("token-b", "almaty")
    assert seen.office("token-a") == "astana"
    assert "token-a" not in repr(vars(seen))  # the token itself is not kept
    seen.saw("token-c", "oral")
    assert seen.office("token-a") is None  # the oldest went first
    assert (seen.office("token-b"), seen.office("token-c")) == ("almaty", "oral")
    seen.forget("token-b")
    assert seen.office("token-b") is None
