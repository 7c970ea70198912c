"""
The hub's web layer: ``create_app(store)`` returns the Starlette application.

Routes of the sync protocol (``shared.protocol.PROTOCOL_VERSION``; paths under ``/v1``):

- ``GET  /v1/health``   liveness and the hub's time, no token needed; with an office's
  token, also ``acked``: that office's last change the hub has dealt with, and
  ``node``: the office the token belongs to
- ``POST /v1/push``     a batch of an office's changes (bearer token; gzip body welcome)
- ``GET  /v1/pull``     records changed after ``cursor`` (bearer token)
- ``POST /v1/status``   the office's state and its recent syncs, after each sync
- ``GET  /v1/conflicts`` the office's own edits that lost, changed after ``after``
- ``GET  /v1/schema``   the hub's schema version and its TOML source (office token)
- ``GET  /v1/openapi.json``  every route, body and error (``hub/openapi.py``)

and those of ``hub/admin.py`` (the admin API, ``/metrics``) and ``hub/dashboard.py``.

Every error is JSON, ``{"error": CODE, "detail": MESSAGE}``, with a message a
person can act on. The office is always the token's owner, never read from the body.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import msgspec
from msgspec import UNSET
from starlette import status
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import Route

from hub.admin import admin_routes
from hub.auth import SeenTokens, SignInThrottle
from hub.dashboard import dashboard_routes
from hub.limits import (
    CutOffError,
    TooLargeError,
    check_items,
    inflate,
    int_param,
    parse_json,
    read_body,
    read_small_json,
)
from hub.openapi import openapi_document
from hub.store import HubStore
from shared import __version__
from shared.clock import now_ms
from shared.errors import (
    AuthError,
    FieldsyncError,
    HubRejectedError,
    ProtocolError,
    StoreError,
)
from shared.protocol import (
    MAX_CHANGES_PER_PUSH,
    MAX_INFLATED_PUSH_BYTES,
    MAX_JSON_BODY_BYTES,
    MAX_PUSH_BYTES,
    MAX_PUSH_VALUES,
    PROTOCOL_VERSION,
    SCHEMA_HEADER,
    Change,
    Health,
    PullPage,
    PushResult,
    StatusKept,
    check_version,
    dumps,
    read_push,
)
from shared.reports import StatusReport
from shared.schema import Schema

log = logging.getLogger("fieldsync.hub")

DEFAULT_MAX_BODY_BYTES = MAX_PUSH_BYTES  # as sent (compressed)
DEFAULT_MAX_BATCH = MAX_CHANGES_PER_PUSH
MAX_PAGE = 10_000

# Every error code the hub answers with (node/client.py maps each one back).
ERROR_CODES = {
    "bad_request": status.HTTP_400_BAD_REQUEST,
    "version_mismatch": status.HTTP_400_BAD_REQUEST,
    "unauthorized": status.HTTP_401_UNAUTHORIZED,
    "revoked": status.HTTP_401_UNAUTHORIZED,
    "forbidden": status.HTTP_403_FORBIDDEN,
    "not_found": status.HTTP_404_NOT_FOUND,
    "method_not_allowed": status.HTTP_405_METHOD_NOT_ALLOWED,
    "diverged": status.HTTP_409_CONFLICT,
    "refused": status.HTTP_409_CONFLICT,
    "upgrade_required": status.HTTP_409_CONFLICT,
    "too_large": status.HTTP_413_CONTENT_TOO_LARGE,
    "invalid_change": status.HTTP_422_UNPROCESSABLE_CONTENT,
    "clock_skew": status.HTTP_422_UNPROCESSABLE_CONTENT,
    "throttled": status.HTTP_429_TOO_MANY_REQUESTS,
}

# Every route, body and error (served at /v1/openapi.json).
OPENAPI: dict[str, Any] = openapi_document(ERROR_CODES, MAX_PAGE)


class JSONResponse(StarletteJSONResponse):
    """JSON answers rendered with orjson (compact, UTF-8)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _error(
    code: str, detail: str, status_code: int | None = None, details: dict[str, Any] | None = None
) -> JSONResponse:
    # hub_time_ms lets an office whose clock is wrong correct it even from a refusal.
    return JSONResponse(
        {**(details or {}), "error": code, "detail": detail, "hub_time_ms": now_ms()},
        status_code=status_code or ERROR_CODES[code],
    )


def create_app(
    store: HubStore,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_inflated_bytes: int | None = None,
    stale_after: timedelta | None = None,
    throttle: SignInThrottle | None = None,
) -> Starlette:
    """Build the hub application around ``store``.

    A push is at most ``max_body_bytes`` as sent, ``max_inflated_bytes`` once inflated
    (by default four times ``max_body_bytes``, at most MAX_INFLATED_PUSH_BYTES), and
    ``max_batch`` changes (see hub/limits.py).

    ``stale_after``: how long without a successful sync makes an office stale (by
    default three of its sync intervals). ``throttle``: how failed admin sign-ins are
    counted (by default hub/auth.py's limits).
    """

    seen = SeenTokens()

    def bearer(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(
                "this request needs an office token: send 'Authorization: Bearer TOKEN' "
                "(make one with `fieldsync hub add-node NAME`)",
                "unauthorized",
                401,
            )
        return token.strip()

    def authenticate(request: Request) -> str:
        """The office whose token the request carries, looked up (in a worker thread)."""
        token = bearer(request)
        try:
            node = store.authenticate(token)
        except AuthError:
            seen.forget(token)
            raise
        seen.saw(token, node)
        request.state.node = node  # for the office's status: see fieldsync_error
        return node

    async def sender(request: Request) -> None:
        """Before a body is read: refuse a request whose token this process has not
        seen good (a trip to a worker thread, 401 without reading the body). A token
        seen good skips it: the request is authenticated anyway with its body, in the
        same trip as its work (a trip costs more than the lookup)."""
        node = seen.office(bearer(request))
        if node is None:
            await run_in_threadpool(authenticate, request)
        else:
            request.state.node = node

    def check_claim(node: str, claimed: Any) -> None:
        # The token decides who the office is; a different claim means a mix-up of
        # databases and tokens that must stop before anything is applied.
        if claimed is not None and claimed != node:
            raise AuthError(
                f"this token belongs to office {node!r}, not {claimed!r}; "
                f"use the token made for {claimed!r}",
                "forbidden",
                403,
            )

    def office_acked(request: Request) -> tuple[str, int] | None:
        """The office whose token the request carries and the last change number of it
        the hub has dealt with (None: no office token)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            office = store.office_of(token.strip())
        except FieldsyncError:
            seen.forget(token.strip())
            return None
        seen.saw(token.strip(), office[0])
        return office

    async def health(request: Request) -> JSONResponse:
        def look() -> tuple[tuple[str, int] | None, int]:  # one trip to a worker thread
            asking = "authorization" in request.headers  # an office, before it syncs
            return office_acked(request) if asking else None, store.schema_version

        office, version = await run_in_threadpool(look)
        answer = Health(
            "ok",
            PROTOCOL_VERSION,
            __version__,
            now_ms(),
            UNSET if office is None else office[1],
            UNSET if office is None else office[0],
            epoch=store.epoch,
            schema_version=version,
        )
        return JSONResponse(msgspec.to_builtins(answer))

    def check_size(count: int) -> None:
        if count > max_batch:
            raise TooLargeError(
                f"the push carries {count} changes; send at most {max_batch} per request"
            )

    def read_push_the_long_way(body: bytes, node: str) -> tuple[Any, list[Change]]:
        data = parse_json(body)
        check_version(data, "the push")
        check_claim(node, data.get("node"))
        raw = data.get("changes")
        if not isinstance(raw, list):
            raise ProtocolError("the push needs a 'changes' list")
        check_size(len(raw))
        return data.get("node"), [Change.from_json(item, node) for item in raw]

    inflated_limit = max_inflated_bytes or min(4 * max_body_bytes, MAX_INFLATED_PUSH_BYTES)

    def read_whole_push(body: bytes, encoding: str, node: str) -> tuple[Any, list[Change]]:
        # In a worker thread: inflating, counting and parsing are the costly part.
        body = inflate(body, encoding, inflated_limit)
        check_items(body, MAX_PUSH_VALUES)
        read = read_push(body, node)
        if read is None:  # the long way, which says what is wrong
            read = read_push_the_long_way(body, node)
        return read

    async def push(request: Request) -> JSONResponse:
        await sender(request)
        body = await read_body(request, max_body_bytes)
        encoding = request.headers.get("content-encoding", "identity")

        def checked_push() -> tuple[str, int, PushResult]:  # one trip to a worker thread
            node = authenticate(request)
            claimed, changes = read_whole_push(body, encoding, node)
            check_claim(node, claimed)
            check_size(len(changes))
            seqs = [c.seq for c in changes]
            if seqs != sorted(set(seqs)):
                raise ProtocolError("changes must be in increasing seq order, each seq once")
            version = check_schema(request, node, "push")
            result = store.push(node, changes)
            return node, len(changes), msgspec.structs.replace(result, schema_version=version)

        node, count, result = await run_in_threadpool(checked_push)
        log.info(
            "push from %s: %d changes, %d applied, %d conflicts, %d rejected, acked %d",
            node,
            count,
            result.applied,
            result.conflicts,
            len(result.rejected),
            result.acked,
        )
        return JSONResponse(result.to_json())

    async def pull(request: Request) -> JSONResponse:
        def checked_pull() -> PullPage:  # one trip to a worker thread per pull
            node = authenticate(request)
            check_claim(node, request.query_params.get("node"))
            cursor = int_param(request, "cursor", 0, 0)
            limit = int_param(request, "limit", 1000, 1, MAX_PAGE)
            own = request.query_params.get("own") == "1"
            count = request.query_params.get("count") == "1"
            packed = request.query_params.get("packed") == "1"
            scoping = request.query_params.get("scopes") == "1"

            def admit(version: int, schema: Schema) -> None:
                # Against the version the page was read under (its rows may hold the
                # columns of a version applied a moment ago), before the pull is noted.
                if schema.scoped and not scoping:
                    raise HubRejectedError(
                        f"office {node} runs a fieldsync too old for this hub's sync scopes; "
                        "upgrade fieldsync at the office (its changes are kept meanwhile)",
                        "upgrade_required",
                        409,
                    )
                check_schema(request, node, "pull", version)

            return store.pull(
                node,
                cursor,
                limit,
                include_own=own,
                count=count,
                packed=packed,
                spliced=True,
                admit=admit,
            )

        page = await run_in_threadpool(checked_pull)
        return JSONResponse(page.to_json())

    def check_schema(request: Request, node: str, action: str, version: int | None = None) -> int:
        """The hub's schema version, if the office's (header SCHEMA_HEADER) may push or
        pull under it: an office that does not say (an older fieldsync) only while the
        hub is at version 1; an office ahead of the hub (restored from an older backup)
        never; one behind may push (what it queued is accepted) but migrates first
        before it pulls. ``version``: the hub's, if just read (else it is looked up)."""
        if version is None:
            version = store.schema_version
        sent = request.headers.get(SCHEMA_HEADER)
        if sent is None:
            if version > 1:
                raise HubRejectedError(
                    f"office {node} runs a fieldsync too old for this hub's schema version "
                    f"{version}; upgrade fieldsync at the office (its changes are kept "
                    "meanwhile)",
                    "upgrade_required",
                    409,
                )
            return version
        if not sent.isdigit() or len(sent) > 9:
            raise ProtocolError(f"the {SCHEMA_HEADER} header must be a schema version number")
        office = int(sent)
        if office > version:
            raise HubRejectedError(
                f"office {node} uses schema version {office}, but this hub has only version "
                f"{version} (restored from a backup taken before `hub schema apply`?): apply "
                "that schema again at the hub with `fieldsync hub schema apply FILE`; the "
                "office keeps its changes meanwhile",
                "refused",
                409,
            )
        if office < version and action == "pull":
            raise HubRejectedError(
                f"the hub's schema is at version {version}, office {node} at {office}: the "
                "office takes the new version at its next sync",
                "refused",
                409,
            )
        return version

    async def schema(request: Request) -> JSONResponse:
        await run_in_threadpool(authenticate, request)
        info = await run_in_threadpool(store.schema_info)
        return JSONResponse(msgspec.to_builtins(info))

    async def lost_edits(request: Request) -> JSONResponse:
        # The asking office's own lost edits only: the token decides whose.
        node = await run_in_threadpool(authenticate, request)
        after = int_param(request, "after", 0, 0)
        limit = int_param(request, "limit", 1000, 1, MAX_PAGE)
        page = await run_in_threadpool(store.lost_edits, node, after, limit)
        return JSONResponse(page.to_json())

    async def report_status(request: Request) -> JSONResponse:
        await sender(request)
        body = await read_body(request, MAX_JSON_BODY_BYTES)
        encoding = request.headers.get("content-encoding", "identity")

        def keep() -> None:  # one trip to a worker thread
            node = authenticate(request)
            data = read_small_json(body, encoding)
            check_claim(node, data.get("node") if isinstance(data, dict) else None)
            store.record_status(node, StatusReport.from_json(data))

        await run_in_threadpool(keep)
        return JSONResponse(msgspec.to_builtins(StatusKept("ok", now_ms())))

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)

    async def fieldsync_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HubRejectedError | ProtocolError):
            node = getattr(request.state, "node", None)
            code = exc.code
            if node is not None and code == "forbidden":
                # Not this office's failure: someone sent its token while claiming to be
                # another office (a stray database set up with the wrong token).
                log.warning("refused a request with office %s's token: %s", node, exc)
            elif node is not None and code != "unauthorized" and not isinstance(exc, CutOffError):
                # Admins see why an office's syncs fail, even when it cannot report.
                await run_in_threadpool(store.note_error, node, code, str(exc))
        if isinstance(exc, HubRejectedError):
            answer = _error(exc.code, str(exc), exc.status, exc.details)
            answer.headers.update(getattr(exc, "headers", {}))  # Retry-After of a 429
            return answer
        if isinstance(exc, ProtocolError):
            return _error(exc.code, str(exc))
        # Messages of the hub's own failures name functions and tables, not case data.
        log.error("request failed: %s", exc)
        if isinstance(exc, StoreError):  # its database: the log says which and why
            detail = "the hub's database failed (its log says why); nothing was applied"
            return _error("internal", detail, status.HTTP_500_INTERNAL_SERVER_ERROR)
        return _error("internal", str(exc), status.HTTP_500_INTERNAL_SERVER_ERROR)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, HTTPException):  # only registered for HTTPException
            raise exc
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(code, f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Never echo the exception: it may quote case data.
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return JSONResponse(
            {"error": "internal", "detail": "the hub failed; nothing of the request was applied"},
            status_code=500,
        )

    throttle = throttle or SignInThrottle()  # shared by the admin API and /login
    return Starlette(
        routes=[
            *admin_routes(store, stale_after=stale_after, throttle=throttle),
            *dashboard_routes(store, stale_after=stale_after, throttle=throttle),
            Route("/v1/health", health),
            Route("/v1/push", push, methods=["POST"]),
            Route("/v1/pull", pull),
            Route("/v1/status", report_status, methods=["POST"]),
            Route("/v1/conflicts", lost_edits),
            Route("/v1/schema", schema),
            Route("/v1/openapi.json", openapi),
        ],
        # Level 3: a tenth of level 9's CPU for about 20% more bytes (see README).
        middleware=[Middleware(GZipMiddleware, minimum_size=1024, compresslevel=3)],
        exception_handlers={
            FieldsyncError: fieldsync_error,
            HTTPException: http_error,
            500: server_error,
        },
    )
