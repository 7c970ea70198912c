"""
The admin dashboard: server-rendered pages at ``/`` for the people who run the hub.

Pages (every one but ``/login`` needs a signed-in admin; without a session a page
redirects to ``/login?next=PATH``), with the least role each needs (hub/auth.py;
short of it: a 403 page):

- ``GET  /``                         viewer: offices and their health (refreshes every 30 s)
- ``GET  /offices/{name}?page=``     viewer: one office, its syncs (added up, and 20 a
  page, newest first), its rejected changes
- ``GET  /conflicts?status=``        resolver: the conflict inbox (refreshes)
- ``GET  /conflicts/{id}``           resolver: both sides of one conflict, and its form
- ``POST /conflicts/{id}/resolve``   resolver: form fields csrf, keep, value, force
- ``GET  /hq``                       viewer: headquarters' figures and charts (owners:
  download links)
- ``GET  /export/{table}.{csv|json}?office=``  owner: a streamed download
- ``GET  /records?q=``, ``GET /records/{table}?COLUMN=VALUE``  owner: search records by
  case number, name or key (hub/search.py); every version of one record, marked
- ``GET  /audit?before=``            owner: the audit log, newest first, paged
- ``GET|POST /login``, ``POST /logout``; ``/static/`` holds the one style sheet

Failed sign-ins are counted per client address (and per admin a revoked token
names) by the hub's :class:`hub.auth.SignInThrottle`: too many get 429. Sign-ins
(failed, throttled), sign-outs, resolutions, downloads and record histories read go
to the audit log (hub/audit.py).

Signing in takes an admin token (``fieldsync hub add-admin NAME``) and starts a session
(see hub/auth.py) kept in an HttpOnly, SameSite=Strict cookie. A form that changes
something also carries the session's CSRF token, and is refused when the browser says
it comes from another origin. Pages are Jinja2 templates (hub/templates, autoescaped:
case values are user data) with one CSS file (hub/static); there is no script, and
the Content-Security-Policy allows none. Errors render as HTML pages, not as the JSON
the API answers with. Nothing here logs case values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from datetime import timedelta
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hub.admin import (
    audit_record_view,
    audit_resolution,
    client_address,
    conflicts_of,
    record_history,
    resolve,
    role_refusal,
    sign_in,
)
from hub.audit import Actor
from hub.auth import SESSION_HOURS, Admin, SignInThrottle, ThrottledError, allows
from hub.export import FORMATS, stream_export
from hub.forms import check_form, form_text, local_path, same_origin, to_login
from hub.health import OfficeStatus
from hub.limits import SIGNED_IN_FORM, read_form
from hub.render import (
    HERE,
    SECURITY_HEADERS,
    Session,
    conflict_outcome,
    country_chart,
    error_page,
    guarded,
    health_summary,
    kind_month_grid,
    month_chart,
    record_url,
    redirect,
    render,
    sync_summary,
)
from hub.status import EVENTS_KEPT
from hub.store import ConflictRecord, HubStore, SqlHubStore
from shared.errors import AuthError, FieldsyncError, HubRejectedError, ProtocolError

log = logging.getLogger("fieldsync.hub")

COOKIE = "fieldsync_session"
REFRESH_SECONDS = 30  # the offices and conflicts pages reload themselves
MAX_LISTED = 200  # conflicts, events and rejected changes shown on one page
EVENTS_SHOWN = 20  # syncs on one page of an office's history (newest first)

WRONG_TOKEN = "That token is not an admin token."
AUDIT_PAGE = 100  # audit entries on one page
OFFICE_TOKEN = (
    "This is an office token; sign in with an admin token (fieldsync hub add-admin NAME)."
)

# The inbox's filters: status parameter, and what the link says.
FILTERS = (
    ("unsettled", "To review"),
    ("open", "Waiting for a decision"),
    ("logged", "Settled by policy"),
    ("resolved", "Resolved"),
)


Endpoint = Callable[[Request], Awaitable[Response]]
Page = Callable[[Request, Session], Awaitable[Response]]
FormPage = Callable[[Request, Session, FormData], Awaitable[Response]]


def dashboard_routes(
    store: HubStore,
    *,
    stale_after: timedelta | None = None,
    throttle: SignInThrottle | None = None,
) -> list[BaseRoute]:
    """The dashboard's routes, mounted at ``/`` by :func:`hub.app.create_app`
    (``throttle``: the hub's, shared with the admin API)."""
    return _Dashboard(store, stale_after, throttle or SignInThrottle()).routes()


# -- sessions and forms ---------------------------------------------------------------


def _role_refused(session: Session, needed: str) -> HTTPException:
    return HTTPException(403, role_refusal(Admin(session.admin, session.role), needed))


def _parse_value(store: HubStore, record: ConflictRecord, text: str) -> Any:
    """The value an admin typed, as the conflict's column holds it (as the CLI reads it)."""
    if record.column is None:
        raise ProtocolError(
            f"conflict {record.id} is about a whole record; keep one side or the other"
        )
    table = store.schema.table(record.table)
    value = table.parse_value(record.column, text)
    allowed = table.choices(record.column)
    if allowed is not None and value is not None and value not in allowed:
        raise ProtocolError(f"{record.column} takes one of: {', '.join(allowed)}")
    return value


async def _drain(chunks: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """Read the export in worker threads (each read is database work), and close it (and
    its connection) even when the download is cut short."""
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield chunk
    finally:
        chunks.close()


def _download_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# -- the pages --------------------------------------------------------------------------


class _Dashboard:
    def __init__(
        self, store: HubStore, stale_after: timedelta | None, throttle: SignInThrottle
    ) -> None:
        self.store = store
        self.stale_after = stale_after
        self.throttle = throttle

    def routes(self) -> list[BaseRoute]:
        page, form = self._page, self._form
        return [
            Route("/", page(self.offices)),
            Route("/login", self.login_form),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", form(self.logout), methods=["POST"]),
            Route("/offices/{name}", page(self.office)),
            Route("/conflicts", page(self.conflicts, "resolver")),
            Route("/conflicts/{id:int}", page(self.conflict, "resolver")),
            Route(
                "/conflicts/{id:int}/resolve",
                form(self.resolve_conflict, "resolver"),
                methods=["POST"],
            ),
            Route("/hq", page(self.hq)),
            Route("/export/{file}", page(self.export, "owner")),
            Route("/records", page(self.find_record, "owner")),
            Route("/records/{table}", page(self.record, "owner")),
            Route("/audit", page(self.audit, "owner")),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    async def _session(self, request: Request) -> Session | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        found = await run_in_threadpool(self.store.session, token)
        return Session(found[0], found[1], token, found[2]) if found else None

    def _page(self, handler: Page, needed: str = "viewer") -> Endpoint:
        """A page for signed-in admins of role ``needed`` or above; anyone else is sent
        to sign in, an admin of a lesser role gets a 403 page."""

        async def endpoint(request: Request) -> Response:
            session = await self._session(request)
            if session is None:
                return to_login(request)
            if not allows(session.role, needed):
                return error_page(_role_refused(session, needed), session)
            return await guarded(handler(request, session), session)

        return endpoint

    def _form(self, handler: FormPage, needed: str = "viewer") -> Endpoint:
        """A form that changes something: signed in with role ``needed`` or above, same
        origin, the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            session = await self._session(request)
            if session is None:
                return redirect("/login")

            async def checked() -> Response:
                if not allows(session.role, needed):
                    raise _role_refused(session, needed)
                form = await read_form(request, **SIGNED_IN_FORM)
                check_form(request, session, form)
                return await handler(request, session, form)

            return await guarded(checked(), session)

        return endpoint

    # -- signing in and out ---------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        target = local_path(request.query_params.get("next"))
        if await self._session(request) is not None:
            return redirect(target)
        return render("login.html", next=target, error=None)

    async def login(self, request: Request) -> Response:
        return await guarded(self._login(request), None)

    async def _login(self, request: Request) -> Response:
        if not same_origin(request):
            raise HTTPException(403, "This sign-in form was sent from another site.")
        form = await read_form(request)  # small: bounded before it is parsed
        target = local_path(form_text(form, "next"))
        address = client_address(request)
        try:
            found = await run_in_threadpool(
                sign_in,
                self.store,
                self.throttle,
                form_text(form, "token"),
                address,
                dashboard=True,
            )
        except ThrottledError as exc:
            error = f"Too many failed sign-ins from here; try again in {exc.retry_after} seconds."
            page = render("login.html", 429, next=target, error=error)
            page.headers.update(exc.headers)
            return page
        except AuthError as exc:
            error = OFFICE_TOKEN if exc.status == 403 else WRONG_TOKEN
            if exc.code == "revoked":
                error = "That admin token was revoked; ask an owner of the hub for a new one."
            return render("login.html", 403 if exc.status == 403 else 401, next=target, error=error)
        admin = found.name
        token, _csrf = await run_in_threadpool(self.store.start_session, admin)
        log.info("admin %s signed in to the dashboard", admin)
        response = redirect(target)
        response.set_cookie(
            COOKIE,
            token,
            max_age=SESSION_HOURS * 3600,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request, session: Session, form: FormData) -> Response:
        await run_in_threadpool(self.store.end_session, session.token)
        actor = Actor(session.admin, client_address(request))
        await run_in_threadpool(self.store.audit, "sign_out", actor)
        response = redirect("/login")
        response.delete_cookie(
            COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict"
        )
        return response

    # -- offices ------------------------------------------------------------------

    async def offices(self, request: Request, session: Session) -> Response:
        def load() -> tuple[list[OfficeStatus], int, int]:
            offices = self.store.offices(stale_after=self.stale_after)
            counts = self.store.conflict_counts()
            return offices, counts["open"], counts["open"] + counts["logged"]

        offices, waiting, unsettled = await run_in_threadpool(load)
        return render(
            "offices.html",
            200,
            session,
            section="offices",
            refresh=REFRESH_SECONDS,
            offices=offices,
            summary=health_summary(offices),
            waiting=waiting,
            unsettled=unsettled,
        )

    async def office(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]

        text = request.query_params.get("page", "1")
        number = int(text) if text.isdigit() and 0 < int(text) <= EVENTS_KEPT else 1

        def load() -> tuple[OfficeStatus, list[dict[str, Any]]]:
            try:
                found = self.store.office(name, stale_after=self.stale_after, events=EVENTS_KEPT)
            except FieldsyncError:
                raise HTTPException(404, f"There is no office {name!r}.") from None
            return found, self.store.rejected(name)

        office, rejected = await run_in_threadpool(load)
        events = office.events[(number - 1) * EVENTS_SHOWN : number * EVENTS_SHOWN]
        return render(
            "office.html",
            200,
            session,
            section="offices",
            office=office,
            events=events,
            history=sync_summary(office.events),
            page=number,
            newer=number - 1 if number > 1 else None,
            older=number + 1 if len(office.events) > number * EVENTS_SHOWN else None,
            rejected=rejected[:MAX_LISTED],
            more_rejected=len(rejected) > MAX_LISTED,
        )

    # -- conflicts ----------------------------------------------------------------

    async def conflicts(self, request: Request, session: Session) -> Response:
        status = request.query_params.get("status", "unsettled")
        found = await run_in_threadpool(conflicts_of, self.store, status, MAX_LISTED + 1)
        return render(
            "conflicts.html",
            200,
            session,
            section="conflicts",
            refresh=REFRESH_SECONDS,
            conflicts=found[:MAX_LISTED],
            more=len(found) > MAX_LISTED,
            shown=status,
            filters=FILTERS,
        )

    def _conflict(self, conflict_id: int) -> ConflictRecord:
        try:
            return self.store.conflict(conflict_id)
        except FieldsyncError:
            raise HTTPException(404, f"There is no conflict {conflict_id}.") from None

    def _conflict_page(
        self,
        session: Session,
        record: ConflictRecord,
        *,
        status: int = 200,
        error: str | None = None,
        typed: str = "",
        done: bool = False,
    ) -> HTMLResponse:
        table = self.store.schema.tables.get(record.table)
        column_type, choices, notnull = "", None, False
        if table is not None and record.column is not None:
            column_type = table.column(record.column).type.upper()
            choices = table.choices(record.column)
            notnull = table.column(record.column).notnull
        return render(
            "conflict.html",
            status,
            session,
            section="conflicts",
            c=record,
            column_type=column_type,
            choices=choices,
            notnull=notnull,
            outcome=conflict_outcome(self.store, record),
            error=error,
            # the record changed since: the force box can apply the decision anyway
            changed=error is not None and status == 409 and record.status != "resolved",
            typed=typed,
            done=done,
        )

    async def conflict(self, request: Request, session: Session) -> Response:
        done = request.query_params.get("done") == "1"

        def load() -> HTMLResponse:  # the page reads the record's value now
            record = self._conflict(request.path_params["id"])
            return self._conflict_page(session, record, done=done)

        return await run_in_threadpool(load)

    async def resolve_conflict(
        self, request: Request, session: Session, form: FormData
    ) -> Response:
        conflict_id: int = request.path_params["id"]
        record = await run_in_threadpool(self._conflict, conflict_id)
        keep, typed = form_text(form, "keep"), form_text(form, "value")
        decision: dict[str, Any] = {"keep": keep, "force": bool(form_text(form, "force"))}
        try:
            if keep == "value":
                decision["value"] = _parse_value(self.store, record, typed)
            done = await run_in_threadpool(
                resolve, self.store, conflict_id, session.admin, decision
            )
        except (HubRejectedError, ProtocolError) as exc:
            status = exc.status if isinstance(exc, HubRejectedError) else 400
            if status == 404:
                raise
            message = str(exc)

            def again() -> HTMLResponse:
                found = self._conflict(conflict_id)
                return self._conflict_page(
                    session, found, status=status, error=message, typed=typed
                )

            return await run_in_threadpool(again)
        actor = Actor(session.admin, client_address(request))
        await run_in_threadpool(audit_resolution, self.store, actor, done)
        log.info("admin %s resolved conflict %d: keep %s", session.admin, conflict_id, keep)
        return redirect(f"/conflicts/{conflict_id}?done=1")

    # -- headquarters and downloads -------------------------------------------------

    async def hq(self, request: Request, session: Session) -> Response:
        def load() -> tuple[dict[str, Any], list[str]]:
            return self.store.figures(), [node["name"] for node in self.store.nodes()]

        figures, offices = await run_in_threadpool(load)
        return render(
            "hq.html",
            200,
            session,
            section="hq",
            figures=figures,
            country_chart=country_chart(figures["cases_by_country"]),
            month_chart=month_chart(figures["assistance_by_kind_month"]),
            kind_month=kind_month_grid(figures["assistance_by_kind_month"]),
            tables=list(self.store.schema.tables),
            offices=offices,
        )

    async def export(self, request: Request, session: Session) -> Response:
        table, dot, fmt = request.path_params["file"].rpartition(".")
        if not dot or fmt not in FORMATS or table not in self.store.schema.tables:
            raise HTTPException(
                404,
                f"There is no download {request.path_params['file']!r}: synced tables are "
                f"{', '.join(self.store.schema.tables)}, as .csv or .json.",
            )
        if not isinstance(self.store, SqlHubStore):
            raise HTTPException(501, "Downloads read the hub's SQL database; this hub has none.")
        office = request.query_params.get("office") or None
        try:
            name, chunks = await run_in_threadpool(stream_export, self.store, table, fmt, office)
        except FieldsyncError as exc:  # the table and format are known: the office is not
            raise HTTPException(400, f"Cannot export {table}: {exc}.") from None
        log.info("admin %s downloads %s (office %s)", session.admin, name, office or "all")
        actor = Actor(session.admin, client_address(request))
        what = {"table": table, "format": fmt, "office": office}
        await run_in_threadpool(lambda: self.store.audit("download", actor, name, **what))
        return StreamingResponse(
            _drain(chunks),
            media_type="text/csv; charset=utf-8" if fmt == "csv" else "application/json",
            headers={
                **SECURITY_HEADERS,
                "Content-Disposition": f'attachment; filename="{_download_name(name)}"',
            },
        )

    # -- record history -----------------------------------------------------------

    def _lookup_page(
        self,
        session: Session,
        status: int = 200,
        error: str | None = None,
        chosen: dict[str, str] | None = None,
        found: dict[str, Any] | None = None,
    ) -> HTMLResponse:
        """The forms that search for records and find one by table and key (``chosen``:
        what was typed; ``found``: a search's answer, hub/search.py)."""
        tables = self.store.schema.tables
        keys = list(dict.fromkeys(c for t in tables.values() for c in t.primary_key))
        return render(
            "records.html",
            status,
            session,
            section="records",
            tables=tables,
            keys=keys,
            chosen=chosen or {},
            error=error,
            found=found,
        )

    async def _search(self, request: Request, session: Session, text: str) -> Response:
        try:
            found = await run_in_threadpool(self.store.find_records, text)
        except ValueError as exc:  # too short
            return self._lookup_page(session, 400, f"{exc}.", {"q": text})
        actor = Actor(session.admin, client_address(request))
        shown = len(found["results"])  # the audit log keeps the count, never the text
        await run_in_threadpool(lambda: self.store.audit("search_records", actor, shown=shown))
        return self._lookup_page(session, chosen={"q": text}, found=found)

    async def find_record(self, request: Request, session: Session) -> Response:
        params = request.query_params
        if "q" in params:
            return await self._search(request, session, params["q"])
        table = params.get("table")
        if not table:
            return self._lookup_page(session)
        spec = self.store.schema.tables.get(table)
        if spec is None:
            raise HTTPException(404, f"There is no synced table {table!r}.")
        key = {column: params.get(column, "") for column in spec.primary_key}
        if all(key.values()):
            return redirect(record_url(table, key))
        error = f"Give the record's key: {', '.join(spec.primary_key)}."
        return self._lookup_page(session, 400, error, dict(params))

    async def record(self, request: Request, session: Session) -> Response:
        table = request.path_params["table"]
        params = dict(request.query_params)
        try:
            found = await run_in_threadpool(record_history, self.store, table, params)
        except ProtocolError as exc:  # the key is missing or mistyped
            return self._lookup_page(session, 400, str(exc), {**params, "table": table})
        actor = Actor(session.admin, client_address(request))
        await run_in_threadpool(audit_record_view, self.store, actor, found)
        return render(
            "record.html",
            200 if found["versions"] else 404,
            session,
            section="records",
            table=table,
            pk=found["pk"],
            versions=found["versions"],
            current=found["current"],
        )

    # -- the audit log ---------------------------------------------------------------

    async def audit(self, request: Request, session: Session) -> Response:
        text = request.query_params.get("before", "")
        before = int(text) if text.isdigit() and 0 < int(text) < 2**62 else None
        found = await run_in_threadpool(self.store.audit_entries, AUDIT_PAGE + 1, before)
        entries = found[:AUDIT_PAGE]
        older = entries[-1]["id"] if len(found) > AUDIT_PAGE else None
        return render(
            "audit.html",
            200,
            session,
            section="audit",
            entries=entries,
            older=older,
            paged=before is not None,
        )
