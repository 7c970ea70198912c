"""
The hub's OpenAPI document, served at ``GET /v1/openapi.json``.

It is made from two things, so that it cannot drift from what the hub does:

- the wire types of ``shared.protocol``, whose JSON Schemas msgspec writes from the
  same declarations that read the requests (``msgspec.json.schema_components``);
- :func:`endpoints`, one entry per route and method: what it is for, who may call it,
  its body, its answer, its parameters and the error codes it may answer with.

``tests/hub/test_openapi.py`` walks the routes ``create_app`` serves (the API, the
admin API, ``/metrics``, the dashboard and its static files) and fails when one is
missing here or when this names one that is not served.

The JSON API answers every error as an :class:`shared.protocol.ErrorBody`; the
dashboard's pages answer HTML, and send a browser without a session to ``/login``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from shared import __version__
from shared.protocol import (
    PROTOCOL_VERSION,
    SCHEMA_HEADER,
    ConflictPage,
    ErrorBody,
    Health,
    PullPage,
    PushRequest,
    PushResult,
    SchemaInfo,
    StatusKept,
)
from shared.reports import StatusReport

Auth = Literal["office", "admin", "session"]
# How each kind of caller proves who it is (OpenAPI security schemes).
SECURITY_SCHEMES: Final[dict[str, Any]] = {
    "office": {
        "type": "http",
        "scheme": "bearer",
        "description": "an office token (`fieldsync hub add-node NAME`)",
    },
    "admin": {
        "type": "http",
        "scheme": "bearer",
        "description": "an admin token (`fieldsync hub add-admin NAME`)",
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": "fieldsync_session",
        "description": "the dashboard's session, started by signing in at /login with an "
        "admin token",
    },
}
# The codes a caller may be refused with for want of a good token or session.
_AUTH_ERRORS: Final[dict[str, tuple[str, ...]]] = {
    "office": ("unauthorized", "revoked", "forbidden"),
    # forbidden: an office token, or an admin whose role is short of the route's
    "admin": ("unauthorized", "revoked", "forbidden", "throttled"),
    "session": (),  # the dashboard sends such a browser to /login instead
}
# Every route may answer these: another method (405) or the hub's own failure (500).
_ALWAYS: Final = ("method_not_allowed", "internal")


@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    located: Literal["query", "header"] = "query"


@dataclass(frozen=True)
class Endpoint:
    """One route and method of the hub, as the document describes it."""

    method: Literal["get", "post"]
    path: str  # as in OpenAPI: /v1/admin/conflicts/{id}
    summary: str
    auth: Auth | None
    # A wire type (JSON), or a media type and what it holds.
    answer: type | tuple[str, str]
    body: type | tuple[str, str] | None = None
    errors: tuple[str, ...] = ()  # error codes beyond those of its auth and _ALWAYS
    params: tuple[Param, ...] = ()
    path_types: tuple[tuple[str, str], ...] = ()  # path parameters that are not text
    # The dashboard's own refusals are HTML pages; 405 and 500 are JSON everywhere.
    html_errors: bool = False
    body_schema: dict[str, Any] | None = None  # a body given as a media type: its fields


_JSON_OBJECT = ("application/json", "a JSON object (see the summary)")
_HTML = ("text/html", "the page")
_FORM = ("application/x-www-form-urlencoded", "the form's fields (see the summary)")
_FLAG = {"type": "integer", "enum": [0, 1]}
_ADMIN_LIMIT = {"type": "integer", "minimum": 1}
_KEEP = {"enum": ["kept", "other", "value"]}


def _fields(required: tuple[str, ...], **fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": fields, "required": list(required)}


_TEXT: dict[str, Any] = {"type": "string"}
# The office's schema version, sent with push and pull (hub/app.py check_schema).
_SCHEMA_PARAM = Param(
    SCHEMA_HEADER,
    {"type": "integer", "minimum": 0},
    "the office's schema version. Absent (a fieldsync from before schema versions): "
    "refused (409 upgrade_required) once the hub's schema is past version 1. Above the "
    "hub's (a hub restored from before `hub schema apply`): refused (409 refused). "
    "Below: a push is taken, a pull refused (409 refused) until the office migrates",
    "header",
)


def endpoints(max_page: int) -> tuple[Endpoint, ...]:
    """Every route and method the hub serves (``max_page``: the most records a pull
    page may ask for)."""
    admin_json: dict[str, Any] = {"auth": "admin", "answer": _JSON_OBJECT}
    page: dict[str, Any] = {"auth": "session", "answer": _HTML, "html_errors": True}
    form: dict[str, Any] = {"auth": "session", "body": _FORM, "html_errors": True}
    return (
        # -- the sync API (offices) --
        Endpoint(
            "get",
            "/v1/health",
            "Liveness, the protocol version and the hub's clock; with an office's token, "
            "also acked: that office's last change the hub has dealt with, and node: the "
            "office the token belongs to. epoch: the hub's identity, new after a restore "
            "from a backup (also in push answers and pull pages)",
            None,
            Health,
        ),
        Endpoint(
            "post",
            "/v1/push",
            "Push a batch of changes, in increasing seq order (idempotent per change seq; "
            "gzip body welcome). Refused: nothing applied (422 clock_skew: what came before "
            "the first change stamped too far ahead is, as acked says)",
            "office",
            PushResult,
            body=PushRequest,
            errors=(
                "bad_request",
                "version_mismatch",
                "too_large",
                "invalid_change",
                "clock_skew",
                "diverged",
                "upgrade_required",
                "refused",
            ),
            params=(_SCHEMA_PARAM,),
        ),
        Endpoint(
            "get",
            "/v1/pull",
            "Records changed after a cursor, one page: each record's current state, once",
            "office",
            PullPage,
            errors=("bad_request", "upgrade_required", "refused"),
            params=(
                _SCHEMA_PARAM,
                Param("cursor", {"type": "integer", "minimum": 0, "default": 0}),
                Param(
                    "limit", {"type": "integer", "minimum": 1, "maximum": max_page, "default": 1000}
                ),
                Param(
                    "own",
                    _FLAG,
                    "1: also send records whose latest state came from this office "
                    "(to rebuild its copy)",
                ),
                Param("count", _FLAG, "1: say how many records are left (for a progress bar)"),
                Param(
                    "packed",
                    _FLAG,
                    "1: a record whose columns all carry one version gets that version "
                    "alone as its versions (a string, not an object)",
                ),
                Param(
                    "scopes",
                    _FLAG,
                    "1: this office understands sync scopes (gone rows, resync pages); "
                    "required (409 upgrade_required) when the hub's schema has scopes",
                ),
                Param(
                    "node",
                    {"type": "string"},
                    "the office the caller thinks it is; refused (403) if the token's "
                    "office is another",
                ),
            ),
        ),
        Endpoint(
            "post",
            "/v1/status",
            "The office's state after a sync, and its syncs since the last report",
            "office",
            StatusKept,
            body=StatusReport,
            errors=("bad_request", "version_mismatch", "too_large"),
        ),
        Endpoint(
            "get",
            "/v1/conflicts",
            "The asking office's own edits that lost at the hub (never another office's), "
            "logged or resolved after a mark, in that order; a pull page's conflicts field "
            "is the newest mark. Winning values of records outside the office's scopes are "
            "withheld (hidden)",
            "office",
            ConflictPage,
            errors=("bad_request",),
            params=(
                Param("after", {"type": "integer", "minimum": 0, "default": 0}),
                Param(
                    "limit", {"type": "integer", "minimum": 1, "maximum": max_page, "default": 1000}
                ),
            ),
        ),
        Endpoint(
            "get",
            "/v1/schema",
            "The hub's schema: its version and TOML source (an office whose version is "
            "older migrates to it; see README, Changing the schema)",
            "office",
            SchemaInfo,
        ),
        Endpoint(
            "get",
            "/v1/openapi.json",
            "This document",
            None,
            ("application/json", "an OpenAPI 3.1 document"),
        ),
        # -- the admin API --
        Endpoint("get", "/v1/admin/offices", "Every office: status and health", **admin_json),
        Endpoint(
            "get",
            "/v1/admin/offices/{name}",
            "One office and its recent syncs",
            errors=("bad_request", "not_found"),
            params=(Param("events", {**_ADMIN_LIMIT, "maximum": 200, "default": 50}),),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/v1/admin/conflicts",
            "The conflict log, newest first (unsettled: open and logged)",
            errors=("bad_request",),
            params=(
                Param(
                    "status",
                    {"enum": ["unsettled", "open", "logged", "resolved"], "default": "unsettled"},
                ),
                Param("limit", {**_ADMIN_LIMIT, "maximum": 1000, "default": 100}),
            ),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/v1/admin/conflicts/{id}",
            "One conflict",
            errors=("not_found",),
            path_types=(("id", "integer"),),
            **admin_json,
        ),
        Endpoint(
            "post",
            "/v1/admin/conflicts/{id}/resolve",
            'Settle a conflict: {"keep": "kept" | "other" | "value", "value": ..., '
            '"force": true|false}; answers the conflict as settled',
            body=("application/json", '{"keep", "value", "force"}'),
            body_schema=_fields(("keep",), keep=_KEEP, value={}, force={"type": "boolean"}),
            errors=("bad_request", "too_large", "invalid_change", "not_found", "refused"),
            path_types=(("id", "integer"),),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/v1/admin/rejected",
            "Changes the hub set aside (no values), of one office or all",
            errors=("not_found",),
            params=(Param("office", {"type": "string"}),),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/v1/admin/history/{table}",
            "Every version of one record in stamp order, each marked winner (its values are "
            "in the record now) or loser (with why), and the record now; name it by its "
            "key columns as query parameters (?COLUMN=VALUE)",
            errors=("bad_request", "not_found"),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/v1/admin/records",
            "Live records whose key or a text column contains q (any case), at most 50: "
            '{"query", "results": [{"table", "pk", "values", "matched"}], "more"}',
            errors=("bad_request",),
            params=(Param("q", {"type": "string", "minLength": 2}, "the text to look for"),),
            **admin_json,
        ),
        Endpoint("get", "/v1/admin/figures", "Consolidated figures for headquarters", **admin_json),
        Endpoint(
            "get",
            "/v1/admin/audit",
            "The audit log, newest first (owners only): sign-ins, downloads, resolutions, "
            "tokens revoked and rotated, roles changed; never case values",
            errors=("bad_request",),
            params=(
                Param("limit", {**_ADMIN_LIMIT, "maximum": 1000, "default": 100}),
                Param(
                    "before",
                    {**_ADMIN_LIMIT, "maximum": 2**62},
                    "only entries older than this id (the next page)",
                ),
            ),
            **admin_json,
        ),
        Endpoint(
            "get",
            "/metrics",
            "Per-office gauges and counters",
            "admin",
            ("text/plain", "the Prometheus text format"),
        ),
        # -- the dashboard (HTML for people; see hub/dashboard.py) --
        Endpoint("get", "/", "Offices and their health", **page),
        Endpoint(
            "get",
            "/login",
            "The sign-in form",
            None,
            _HTML,
            params=(Param("next", _TEXT, "the page to go to once signed in (a path here)"),),
        ),
        Endpoint(
            "post",
            "/login",
            "Sign in with an admin token (form field token, next); starts a session",
            None,
            ("text/html", "303 to the page asked for, or the form again"),
            body=_FORM,
            html_errors=True,
            body_schema=_fields(("token",), token=_TEXT, next=_TEXT),
        ),
        Endpoint(
            "post",
            "/logout",
            "Sign out (form field csrf)",
            answer=("text/html", "303 to /login"),
            body_schema=_fields(("csrf",), csrf=_TEXT),
            **form,
        ),
        Endpoint(
            "get",
            "/offices/{name}",
            "One office, its syncs (20 a page, added up) and rejected changes",
            params=(Param("page", {"type": "integer", "minimum": 1}),),
            **page,
        ),
        Endpoint(
            "get",
            "/conflicts",
            "The conflict inbox",
            params=(Param("status", {"enum": ["unsettled", "open", "logged", "resolved"]}),),
            **page,
        ),
        Endpoint(
            "get",
            "/conflicts/{id}",
            "Both sides of one conflict, and the form that settles it",
            path_types=(("id", "integer"),),
            **page,
        ),
        Endpoint(
            "post",
            "/conflicts/{id}/resolve",
            "Settle a conflict (form fields csrf, keep: kept|other|value, value, force)",
            answer=("text/html", "303 to the conflict"),
            path_types=(("id", "integer"),),
            body_schema=_fields(
                ("csrf", "keep"), csrf=_TEXT, keep=_KEEP, value=_TEXT, force={"enum": ["1"]}
            ),
            **form,
        ),
        Endpoint("get", "/hq", "Headquarters' figures and charts, download links", **page),
        Endpoint(
            "get",
            "/export/{file}",
            "A streamed download of one table: file is TABLE.csv or TABLE.json",
            "session",
            ("text/csv", "the table's rows (application/json for .json)"),
            params=(Param("office", {"type": "string"}),),
            html_errors=True,
        ),
        Endpoint(
            "get",
            "/audit",
            "The audit log, newest first, a page at a time (owners only)",
            params=(Param("before", {"type": "integer"}, "entries older than this id"),),
            **page,
        ),
        Endpoint(
            "get",
            "/records",
            "Find a record by its key, or search (?q=) by case number, name or part of a key",
            **page,
        ),
        Endpoint(
            "get",
            "/records/{table}",
            "Every version of one record in stamp order, winners and losers marked, and the "
            "record now (?COLUMN=VALUE for its key)",
            **page,
        ),
        Endpoint(
            "get",
            "/static/{path}",
            "The dashboard's style sheet",
            None,
            ("text/css", "a file of hub/static"),
            errors=("not_found",),
        ),
    )


_PATH_PARAM = re.compile(r"{(\w+)}")


def openapi_document(error_codes: Mapping[str, int], max_page: int) -> dict[str, Any]:
    """The document: ``error_codes`` maps every code of the JSON error body to its
    HTTP status (the 500 answer, ``internal``, is added here)."""
    codes = {**error_codes, "internal": 500}
    wire = [
        PushRequest,
        PushResult,
        PullPage,
        StatusReport,
        StatusKept,
        Health,
        ErrorBody,
        ConflictPage,
        SchemaInfo,
    ]
    _, schemas = msgspec.json.schema_components(wire, ref_template="#/components/schemas/{name}")
    schemas["ErrorBody"]["properties"]["error"]["enum"] = sorted(codes)
    # PullRow's versions has a default only so that its constructor can keep values
    # (which may be left out) first; every row carries its versions.
    schemas["PullRow"]["required"].append("versions")
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints(max_page):
        paths.setdefault(endpoint.path, {})[endpoint.method] = _operation(endpoint, codes)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fieldsync hub",
            "version": __version__,
            "description": f"Sync protocol version {PROTOCOL_VERSION}. Every error of the "
            'JSON API is {"error": CODE, "detail": MESSAGE} (ErrorBody).',
        },
        "components": {"securitySchemes": SECURITY_SCHEMES, "schemas": schemas},
        "paths": paths,
    }


def _operation(endpoint: Endpoint, codes: Mapping[str, int]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "security": [{endpoint.auth: []}] if endpoint.auth else [],
    }
    types = dict(endpoint.path_types)
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": types.get(name, "string")},
        }
        for name in _PATH_PARAM.findall(endpoint.path)
    ]
    parameters += [
        {"name": p.name, "in": p.located, "schema": p.schema}
        | ({"description": p.description} if p.description else {})
        for p in endpoint.params
    ]
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        content = _content(endpoint.body)
        if endpoint.body_schema is not None:
            for media in content.values():
                media["schema"] = {**media["schema"], **endpoint.body_schema}
        operation["requestBody"] = {"required": True, "content": content}
    responses: dict[str, Any] = {
        "200": {"description": "done", "content": _content(endpoint.answer)}
    }
    if endpoint.auth == "session":
        responses["303"] = {"description": "no session: to /login?next=PATH"}
    if endpoint.html_errors:
        responses["4XX"] = {
            "description": "an HTML page saying what is wrong",
            "content": _content(_HTML),
        }
        if endpoint.path_types:  # a path whose number is not one matches no route: JSON
            responses["404"] = {
                "description": "not_found",
                "content": {**_content(_HTML), **_content(ErrorBody)},
            }
    refusals: dict[str, list[str]] = {}
    for code in (*_AUTH_ERRORS.get(endpoint.auth or "", ()), *endpoint.errors, *_ALWAYS):
        refusals.setdefault(str(codes[code]), []).append(code)
    for status, named in sorted(refusals.items()):
        responses[status] = {"description": ", ".join(named), "content": _content(ErrorBody)}
    operation["responses"] = responses
    return operation


def _content(kind: type | tuple[str, str]) -> dict[str, Any]:
    if isinstance(kind, tuple):
        media, what = kind
        return {media: {"schema": {"description": what}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind.__name__}"}}}
