"""
The admin HTTP API (JSON, ``/v1/admin/...``) and ``GET /metrics`` (Prometheus).

Both take an admin token as a bearer token (``fieldsync hub add-admin NAME``); an
office token gets 403, a missing or unknown one 401 (``revoked`` for a token taken
back), an admin whose role is short of the route's 403. Routes, with the least role
each needs (hub/auth.py: viewer < resolver < owner):

- ``GET  /v1/admin/offices``                 viewer: every office, with its health
- ``GET  /v1/admin/offices/{name}``          viewer: one office and its recent syncs
- ``GET  /v1/admin/conflicts?status=&limit=`` resolver: the conflict log (``unsettled``:
  open + logged)
- ``GET  /v1/admin/conflicts/{id}``          resolver
- ``POST /v1/admin/conflicts/{id}/resolve``  resolver: ``{"keep": "kept"|"other"|"value",
  "value", "force"}``
- ``GET  /v1/admin/rejected?office=``        viewer: changes the hub set aside (no values)
- ``GET  /v1/admin/history/{table}?COLUMN=VALUE`` owner: every version of one record,
  in stamp order, winners and losers marked, and the record now
- ``GET  /v1/admin/records?q=``             owner: records found by case number, name or
  key (hub/search.py; at most 50, ``more`` when there are others)
- ``GET  /v1/admin/figures``                 viewer: consolidated figures for headquarters
- ``GET  /v1/admin/audit?limit=&before=``    owner: the audit log, newest first
- ``GET  /metrics``                          viewer: per-office gauges, Prometheus format

Wrong tokens are counted per client address (:class:`hub.auth.SignInThrottle`): too
many get 429 with Retry-After. Failures, throttled attempts, resolutions and record
histories read are written to the audit log (hub/audit.py).

(Downloads are the dashboard's: ``GET /export/{table}.{csv|json}``.) The OpenAPI
document (``hub/openapi.py``) describes each route, its parameters and its errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSONResponse, Response
from starlette.routing import BaseRoute, Route

from hub.audit import NOBODY, Actor
from hub.auth import Admin, RevokedError, SignInThrottle, ThrottledError, allows
from hub.health import HEALTH_STATES
from hub.limits import read_json
from hub.store import HubStore
from shared import __version__
from shared.errors import AuthError, FieldsyncError, HubRejectedError, ProtocolError
from shared.protocol import dumps

CONFLICT_STATUSES = ("open", "logged", "resolved", "unsettled")
MAX_CONFLICTS = 1000
MAX_AUDIT = 1000


class _JSON(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def client_address(request: Request) -> str:
    """Where a request comes from (as uvicorn saw it, or as a trusted proxy said)."""
    return request.client.host if request.client else "unknown"


def sign_in(
    store: HubStore, throttle: SignInThrottle, token: str, address: str, *, dashboard: bool
) -> Admin:
    """The admin whose ``token`` comes from ``address``, counted by ``throttle``.

    A blocked address gets ThrottledError before the token is even looked at; a wrong
    token is counted against the address, and a revoked one also against the admin it
    names (whose revoked tokens are then refused from every address for a while; their
    current token still works). Failures and refusals go to the audit log, and so does
    a dashboard sign-in.
    """
    kind = "sign_in" if dashboard else "api_auth"
    here = [f"addr:{address}"]
    wait = throttle.retry_after(here)
    if wait is not None:
        store.audit(f"{kind}_throttled", Actor(NOBODY, address), retry_after=wait)
        raise ThrottledError(wait)
    try:
        admin = store.identify_admin(token)
    except AuthError as exc:
        name = exc.name if isinstance(exc, RevokedError) else None
        named = [f"admin:{name}"] if name else []
        wait = throttle.retry_after(named)
        if wait is not None:
            store.audit(f"{kind}_throttled", Actor(str(name), address), retry_after=wait)
            raise ThrottledError(wait) from None
        if exc.status == 401:  # a guess; an office's token at the wrong door is not
            throttle.failed([*here, *named])
        store.audit(f"{kind}_failed", Actor(name or NOBODY, address), reason=exc.code)
        raise
    throttle.succeeded(here)
    if dashboard:
        store.audit("sign_in", Actor(admin.name, address), role=admin.role)
    return admin


def role_refusal(admin: Admin, needed: str) -> str:
    """Why ``admin`` may not do what needs the role ``needed`` (one line)."""
    what = {
        "resolver": "settle conflicts (and see their values)",
        "owner": "read case data or the audit log",
    }.get(needed, "do this")
    return (
        f"admin {admin.name!r} is {with_article(admin.role)}; only {with_article(needed)}"
        f"{'' if needed == 'owner' else ' or an owner'} may {what} "
        f"(`fieldsync hub set-role {admin.name} {needed}`)"
    )


def with_article(role: str) -> str:
    """``a viewer``, ``an owner``."""
    return f"{'an' if role[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {role}"


def authenticate_admin(
    store: HubStore,
    request: Request,
    needed: str = "viewer",
    throttle: SignInThrottle | None = None,
) -> Admin:
    """The admin making ``request`` (bearer token), if their role is at least
    ``needed``; AuthError (401, 403) or ThrottledError (429) otherwise."""
    token = bearer_token(request)
    if token is None:
        raise AuthError(
            "this needs an admin token: send 'Authorization: Bearer TOKEN' "
            "(make one with `fieldsync hub add-admin NAME`)",
            "unauthorized",
            401,
        )
    admin = sign_in(
        store, throttle or SignInThrottle(), token, client_address(request), dashboard=False
    )
    if not allows(admin.role, needed):
        raise AuthError(role_refusal(admin, needed), "forbidden", 403)
    return admin


def not_found(message: str) -> HubRejectedError:
    return HubRejectedError(message, "not_found", 404)


def conflicts_of(store: HubStore, status: str, limit: int) -> list[Any]:
    """The conflict log filtered by ``status`` (see CONFLICT_STATUSES), newest first."""
    if status not in CONFLICT_STATUSES:
        raise ProtocolError(f"status must be one of {', '.join(CONFLICT_STATUSES)}")
    return store.conflicts(("open", "logged") if status == "unsettled" else status, limit)


def resolve(store: HubStore, conflict_id: int, admin: str, data: Any) -> Any:
    """Settle a conflict as ``admin`` from a decision ``{"keep", "value", "force"}``."""
    if not isinstance(data, dict) or data.get("keep") not in ("kept", "other", "value"):
        raise ProtocolError('send {"keep": "kept" | "other" | "value", "value": ...}')
    if data["keep"] == "value" and "value" not in data:
        raise ProtocolError("keep 'value' needs a 'value'")
    try:
        store.conflict(conflict_id)
    except FieldsyncError:
        raise not_found(f"there is no conflict {conflict_id}") from None
    try:
        return store.resolve(
            conflict_id, data["keep"], admin, data.get("value"), force=data.get("force") is True
        )
    except ProtocolError:
        raise
    except FieldsyncError as exc:  # already resolved, or the record changed since
        raise HubRejectedError(str(exc), "refused", 409) from None


def record_history(store: HubStore, table: str, params: dict[str, str]) -> dict[str, Any]:
    """Every version of the record of ``table`` whose key ``params`` give, in stamp order,
    each marked winner or loser, and the record as the hub holds it (hub/history.py)."""
    found = store.schema.tables.get(table)
    if found is None:
        raise not_found(f"there is no synced table {table!r}")
    missing = [c for c in found.primary_key if c not in params]
    if missing:
        raise ProtocolError(f"name the record by its key: {', '.join(found.primary_key)}")
    # Typed text, read as the CLI and the dashboard's forms read it (a ProtocolError).
    values = [found.parse_value(column, params[column]) for column in found.primary_key]
    story = store.record_versions(table, values)
    return {
        "table": table,
        "pk": dict(zip(found.primary_key, values, strict=True)),
        "versions": story["versions"],
        "current": story["current"],
    }


def audit_resolution(store: HubStore, actor: Actor, done: Any) -> None:
    """Record a settled conflict: its id, table, key and the side kept (never a value)."""
    how = done.resolution.get("keep") if isinstance(done.resolution, dict) else done.resolution
    store.audit(
        "resolve",
        actor,
        f"conflict {done.id}",
        table=done.table,
        pk=done.pk,
        column=done.column,
        keep=how,
    )


def audit_record_view(store: HubStore, actor: Actor, found: dict[str, Any]) -> None:
    """Record that ``actor`` read every version of a record (its table and key)."""
    store.audit(
        "view_record",
        actor,
        f"{found['table']} record",
        table=found["table"],
        pk=found["pk"],
        versions=len(found["versions"]),
    )


class _OfficeCollector:
    """Reads every office's status at each scrape (nothing is cached between scrapes)."""

    def __init__(self, store: HubStore, stale_after: timedelta | None) -> None:
        self.store = store
        self.stale_after = stale_after

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        offices = self.store.offices(stale_after=self.stale_after, now=now)
        label = ["office"]
        gauges = {
            "pending": GaugeMetricFamily(
                "fieldsync_office_pending_changes",
                "Changes waiting at the office, as it last reported",
                labels=label,
            ),
            "lag": GaugeMetricFamily(
                "fieldsync_office_lag_changes",
                "Hub changes the office has not pulled yet",
                labels=label,
            ),
            "since": GaugeMetricFamily(
                "fieldsync_office_seconds_since_last_sync",
                "Seconds since the office's last successful sync (absent: never synced)",
                labels=label,
            ),
            "conflicts": GaugeMetricFamily(
                "fieldsync_office_open_conflicts",
                "Conflicts on the office's records that no admin has settled",
                labels=label,
            ),
            "rejected": GaugeMetricFamily(
                "fieldsync_office_rejected_changes",
                "Changes of the office the hub rejected",
                labels=label,
            ),
            "offset": GaugeMetricFamily(
                "fieldsync_office_clock_offset_seconds",
                "How far the office clock is behind the hub's (negative: ahead)",
                labels=label,
            ),
        }
        state = GaugeMetricFamily(
            "fieldsync_office_health",
            "1 for the office's health state, 0 for the others",
            labels=["office", "state"],
        )
        pushed = CounterMetricFamily(
            "fieldsync_office_pushed_changes", "Changes the office pushed", labels=label
        )
        pulled = CounterMetricFamily(
            "fieldsync_office_pulled_changes", "Records the office pulled", labels=label
        )
        for office in offices:
            name = [office.name]
            if office.pending is not None:
                gauges["pending"].add_metric(name, office.pending)
            gauges["lag"].add_metric(name, office.lag)
            since = office.seconds_since_success(now)
            if since is not None:
                gauges["since"].add_metric(name, since)
            gauges["conflicts"].add_metric(name, office.open_conflicts)
            gauges["rejected"].add_metric(name, office.rejected)
            if office.clock_offset_ms is not None:
                gauges["offset"].add_metric(name, office.clock_offset_ms / 1000)
            for health in HEALTH_STATES:
                value = 1.0 if office.health == health else 0.0
                state.add_metric([office.name, health.replace(" ", "_")], value)
            pushed.add_metric(name, office.pushed)
            pulled.add_metric(name, office.pulled)
        info = GaugeMetricFamily("fieldsync_hub_info", "The hub's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield from gauges.values()
        yield state
        yield pushed
        yield pulled
        yield info


def admin_routes(
    store: HubStore,
    *,
    stale_after: timedelta | None = None,
    throttle: SignInThrottle | None = None,
) -> list[BaseRoute]:
    """The admin API and /metrics, for :func:`hub.app.create_app` (``throttle``: the
    hub's, shared with the dashboard's sign-in)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OfficeCollector(store, stale_after))
    counted = throttle or SignInThrottle()

    async def admin(request: Request, needed: str = "viewer") -> str:
        found = await run_in_threadpool(authenticate_admin, store, request, needed, counted)
        return found.name

    def int_param(request: Request, name: str, default: int, high: int) -> int:
        try:
            value = int(request.query_params.get(name, default))
        except ValueError:
            raise ProtocolError(f"{name} must be a whole number") from None
        if not 1 <= value <= high:
            raise ProtocolError(f"{name} must be between 1 and {high}")
        return value

    async def offices(request: Request) -> _JSON:
        await admin(request)
        found = await run_in_threadpool(lambda: store.offices(stale_after=stale_after))
        return _JSON({"offices": [o.to_json() for o in found]})

    async def office(request: Request) -> _JSON:
        await admin(request)
        name = request.path_params["name"]
        events = int_param(request, "events", 50, 200)

        def load() -> Any:
            try:
                return store.office(name, stale_after=stale_after, events=events)
            except FieldsyncError:
                raise not_found(f"there is no office {name!r}") from None

        return _JSON((await run_in_threadpool(load)).to_json())

    async def conflicts(request: Request) -> _JSON:
        await admin(request, "resolver")
        status = request.query_params.get("status", "unsettled")
        limit = int_param(request, "limit", 100, MAX_CONFLICTS)
        found = await run_in_threadpool(conflicts_of, store, status, limit)
        return _JSON({"conflicts": [c.to_json() for c in found]})

    async def conflict(request: Request) -> _JSON:
        await admin(request, "resolver")
        conflict_id = request.path_params["id"]

        def load() -> Any:
            try:
                return store.conflict(conflict_id)
            except FieldsyncError:
                raise not_found(f"there is no conflict {conflict_id}") from None

        return _JSON((await run_in_threadpool(load)).to_json())

    async def resolve_conflict(request: Request) -> _JSON:
        who = await admin(request, "resolver")
        data = await read_json(request)  # bounded, parsed off the event loop
        done = await run_in_threadpool(resolve, store, request.path_params["id"], who, data)
        await run_in_threadpool(audit_resolution, store, Actor(who, client_address(request)), done)
        return _JSON(done.to_json())

    async def rejected(request: Request) -> _JSON:
        await admin(request)
        office = request.query_params.get("office") or None

        def load() -> Any:
            try:
                return store.rejected(office)
            except FieldsyncError:
                raise not_found(f"there is no office {office!r}") from None

        return _JSON({"rejected": await run_in_threadpool(load)})

    async def history(request: Request) -> _JSON:
        who = await admin(request, "owner")
        params = dict(request.query_params)
        found = await run_in_threadpool(record_history, store, request.path_params["table"], params)
        await run_in_threadpool(
            audit_record_view, store, Actor(who, client_address(request)), found
        )
        return _JSON(found)

    async def find_records(request: Request) -> _JSON:
        who = await admin(request, "owner")
        text = request.query_params.get("q", "")
        try:
            found = await run_in_threadpool(store.find_records, text)
        except ValueError as exc:  # too short
            raise ProtocolError(str(exc)) from None
        actor = Actor(who, client_address(request))
        shown = len(found["results"])  # the count, never the text searched for
        await run_in_threadpool(lambda: store.audit("search_records", actor, shown=shown))
        return _JSON(found)

    async def audit_log(request: Request) -> _JSON:
        await admin(request, "owner")
        limit = int_param(request, "limit", 100, MAX_AUDIT)
        before = None
        if "before" in request.query_params:
            before = int_param(request, "before", 1, 2**62)
        found = await run_in_threadpool(store.audit_entries, limit, before)
        return _JSON({"entries": found})

    async def figures(request: Request) -> _JSON:
        await admin(request)
        return _JSON(await run_in_threadpool(store.figures))

    async def metrics(request: Request) -> Response:
        await admin(request)
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/v1/admin/offices", offices),
        Route("/v1/admin/offices/{name}", office),
        Route("/v1/admin/conflicts", conflicts),
        Route("/v1/admin/conflicts/{id:int}", conflict),
        Route("/v1/admin/conflicts/{id:int}/resolve", resolve_conflict, methods=["POST"]),
        Route("/v1/admin/rejected", rejected),
        Route("/v1/admin/history/{table}", history),
        Route("/v1/admin/records", find_records),
        Route("/v1/admin/figures", figures),
        Route("/v1/admin/audit", audit_log),
        Route("/metrics", metrics),
    ]
