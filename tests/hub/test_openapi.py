"""The OpenAPI document (hub/openapi.py) against the routes the hub really serves."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import msgspec
import pytest
from starlette.routing import BaseRoute, Mount, Route

from hub.app import ERROR_CODES, OPENAPI, create_app
from hub.store import SqliteHubStore
from shared.protocol import PROTOCOL_VERSION, ErrorBody, Health, PushResult, StatusKept
from shared.reports import StatusReport
from tests.asgi import client as asgi_client


@pytest.fixture
def client(hub_store: SqliteHubStore) -> Iterator[httpx.Client]:
    with asgi_client(create_app(hub_store)) as client:
        yield client


def served(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path as OpenAPI writes it) of every route, mounted ones included."""
    for route in routes:
        if isinstance(route, Route):
            path = re.sub(r"{(\w+):\w+}", r"{\1}", prefix + route.path)
            for method in route.methods or ():
                if method != "HEAD":  # Starlette answers HEAD wherever it answers GET
                    yield method.lower(), path
        elif isinstance(route, Mount):
            if route.routes:
                yield from served(route.routes, prefix + route.path)
            else:  # an app of its own, such as the static files: every path below it
                yield "get", f"{prefix}{route.path}/{{path}}"
        else:
            raise AssertionError(f"a route of a kind this test cannot read: {route!r}")


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


def test_the_document_names_every_route_served_and_no_other(hub_store: SqliteHubStore) -> None:
    routes = set(served(create_app(hub_store).routes))
    assert ("post", "/v1/push") in routes and ("get", "/static/{path}") in routes
    assert ("post", "/v1/admin/conflicts/{id}/resolve") in routes
    assert not routes - documented(OPENAPI), "served but not in hub/openapi.py"
    assert not documented(OPENAPI) - routes, "in hub/openapi.py but not served"


def test_the_hub_serves_the_document(client: httpx.Client) -> None:
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.json() == OPENAPI
    assert OPENAPI["openapi"].startswith("3.1")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_reference_names_a_schema_and_every_schema_is_used() -> None:
    schemas = OPENAPI["components"]["schemas"]
    refs = set(_refs(OPENAPI))
    assert refs == {f"#/components/schemas/{name}" for name in schemas}
    for item in OPENAPI["paths"].values():
        for operation in item.values():
            for needs in operation["security"]:
                assert set(needs) <= set(OPENAPI["components"]["securitySchemes"])


def test_every_json_error_is_the_error_body_with_its_status() -> None:
    codes = OPENAPI["components"]["schemas"]["ErrorBody"]["properties"]["error"]["enum"]
    assert codes == sorted({*ERROR_CODES, "internal"})
    statuses = {**ERROR_CODES, "internal": 500}
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            answers = operation["responses"]
            assert "200" in answers and "405" in answers and "500" in answers, (method, path)
            for status, answer in answers.items():
                if status.isdigit() and int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}
                    for code in answer["description"].split(", "):
                        assert statuses[code] == int(status), (method, path, code)


def test_the_wire_schemas_say_what_the_types_check() -> None:
    schemas = OPENAPI["components"]["schemas"]
    change = schemas["PushedChange"]
    assert set(change["required"]) == {"seq", "table", "pk", "op", "ts"}
    assert set(change["properties"]) == {
        "seq", "table", "pk", "op", "ts", "base", "values", "captured"
    }  # fmt: skip
    assert sorted(change["properties"]["op"]["enum"]) == ["delete", "insert", "update"]
    assert schemas["PushRequest"]["properties"]["protocol"]["enum"] == [PROTOCOL_VERSION]
    assert "versions" in schemas["PullRow"]["required"]
    report = schemas["StatusReport"]
    assert set(report["properties"]) == {"protocol", *StatusReport.__struct_fields__}
    assert sorted(schemas["SyncEvent"]["properties"]["outcome"]["enum"]) == ["error", "ok"]
    for name in ("PushResult", "PullPage", "StatusReport", "PushRequest"):
        assert "protocol" in schemas[name]["required"], name


def test_the_answers_are_what_the_document_says(
    client: httpx.Client, hub_store: SqliteHubStore
) -> None:
    token = hub_store.add_node("astana")
    auth = {"Authorization": f"Bearer {token}"}
    assert msgspec.convert(client.get("/v1/health").json(), Health).acked is msgspec.UNSET
    health = msgspec.convert(client.get("/v1/health", headers=auth).json(), Health)
    assert health.acked == 0
    pushed = client.post(
        "/v1/push", json={"protocol": PROTOCOL_VERSION, "changes": []}, headers=auth
    )
    assert PushResult.from_json(pushed.content).acked == 0
    report = StatusReport(0, None, 0, 0, "0.1.0")
    kept = client.post("/v1/status", json=report.to_json(), headers=auth)
    msgspec.convert(kept.json(), StatusKept)
    for response in (
        client.post("/v1/push", json={"protocol": 1, "changes": []}, headers=auth),
        client.get("/v1/admin/offices", headers=auth),
        client.get("/v1/nothing"),
        client.put("/login"),  # the dashboard's 405 is JSON too, as the document says
        client.get("/static/nothing.css"),
    ):
        assert response.status_code >= 400, response.text
        body = msgspec.convert(response.json(), ErrorBody)
        assert body.error in ERROR_CODES
