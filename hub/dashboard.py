"""
The admin dashboard: server-rendered pages at ``/`` for the people who run the hub.

Pages (every one but ``/login`` needs a signed-in admin; without a session a page
redirects to ``/login?next=PATH``):

- ``GET  /``                         offices and their health (refreshes every 30 s)
- ``GET  /offices/{name}``           one office in words, its syncs, its rejected changes
- ``GET  /conflicts?status=``        the conflict inbox: unsettled by default (refreshes)
- ``GET  /conflicts/{id}``           both sides of one conflict, and the form that settles it
- ``POST /conflicts/{id}/resolve``   form fields csrf, keep (kept|other|value), value, force
- ``GET  /hq``                       headquarters' figures and charts, download links
- ``GET  /export/{table}.{csv|json}?office=``  a streamed download
- ``GET  /records``, ``GET /records/{table}?COLUMN=VALUE``  every version of one record
- ``GET|POST /login``, ``POST /logout``; ``/static/`` holds the one style sheet

Signing in takes an admin token (``fieldsync hub add-admin NAME``) and starts a session
(see hub/monitor.py) kept in an HttpOnly, SameSite=Strict cookie. A form that changes
something also carries the session's CSRF token, and is refused when the browser says
it comes from another origin. Pages are Jinja2 templates (hub/templates, autoescaped:
case values are user data) with one CSS file (hub/static); there is no script, and
the Content-Security-Policy allows none. Errors render as HTML pages, not as the JSON
the API answers with. Nothing here logs case values.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hub.admin import conflicts_of, record_history, resolve
from hub.export import FORMATS, stream_export
from hub.monitor import HEALTH_STATES, SESSION_HOURS, OfficeStatus, ago, stamp_time
from hub.report import UNDATED, bar_chart_svg, column_chart_svg
from hub.store import ConflictRecord, HubStore, SqliteHubStore
from shared.errors import AuthError, FieldsyncError, HubRejectedError, ProtocolError

log = logging.getLogger("fieldsync.hub")

COOKIE = "fieldsync_session"
REFRESH_SECONDS = 30  # the offices and conflicts pages reload themselves
MAX_LISTED = 200  # conflicts, events and rejected changes shown on one page
EVENTS_SHOWN = 50
HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

WRONG_TOKEN = "That token is not an admin token."
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
STATUS_WORDS = {
    "open": "waits for a decision",
    "logged": "settled by policy",
    "resolved": "resolved",
}


@dataclass(frozen=True, slots=True)
class Session:
    """The signed-in admin, the session's CSRF token and its cookie value."""

    admin: str
    csrf: str
    token: str


Endpoint = Callable[[Request], Awaitable[Response]]
Page = Callable[[Request, Session], Awaitable[Response]]
FormPage = Callable[[Request, Session, FormData], Awaitable[Response]]


def dashboard_routes(store: HubStore, *, stale_after: timedelta | None = None) -> list[BaseRoute]:
    """The dashboard's routes, mounted at ``/`` by :func:`hub.app.create_app`."""
    return _Dashboard(store, stale_after).routes()


# -- rendering ----------------------------------------------------------------------


def _size(count: int | None) -> str:
    """A byte count for people: 512 B, 1.2 kB, 3.4 MB."""
    if count is None:
        return ""
    if count < 1000:
        return f"{count} B"
    value = count / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _number(value: float | int | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def _utc_text(iso: str | None) -> str:
    """``2024-03-02 14:05:09 UTC`` for an ISO 8601 time (kept as it is if it is not one)."""
    if not iso:
        return ""
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_text(pk: dict[str, Any]) -> str:
    """A record's key as words: ``c1``, or ``office=almaty, id=7`` for several columns."""
    if len(pk) == 1:
        return str(next(iter(pk.values())))
    return ", ".join(f"{name}={value}" for name, value in pk.items())


def _record_url(table: str, pk: dict[str, Any]) -> str:
    return f"/records/{quote(table, safe='')}?{urlencode(pk)}"


_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(
    ago=ago,
    stamp_time=stamp_time,
    size=_size,
    number=_number,
    utc_text=_utc_text,
    key_text=_key_text,
)
_templates.globals.update(record_url=_record_url, status_words=STATUS_WORDS)


def _render(
    template: str, status: int = 200, session: Session | None = None, /, **context: Any
) -> HTMLResponse:
    page = _templates.get_template(template).render(
        admin=session.admin if session else None,
        csrf=session.csrf if session else "",
        section=context.pop("section", None),
        refresh=context.pop("refresh", None),
        **context,
    )
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def _error_page(exc: Exception, session: Session | None) -> HTMLResponse:
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    elif isinstance(exc, HubRejectedError):
        status, message = exc.status, str(exc)
    elif isinstance(exc, ProtocolError):
        status, message = 400, str(exc)
    else:  # the hub's own failure: its message names tables and functions, not values
        status, message = 500, f"The hub failed: {exc}"
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return _render("error.html", status, session, title=title, message=message, code=status)


async def _guarded(page: Awaitable[Response], session: Session | None) -> Response:
    """The page, or an HTML error page for what went wrong making it."""
    try:
        return await page
    except (HTTPException, FieldsyncError) as exc:
        return _error_page(exc, session)
    except Exception as exc:
        # Never the message: it may quote case data.
        log.error("dashboard page failed: %s", type(exc).__name__)
        failed = HTTPException(500, "The hub failed to answer; its log names the error.")
        return _error_page(failed, session)


# -- sessions and forms ---------------------------------------------------------------


def _local_path(target: str | None) -> str:
    """``target`` if it is a path on this site, else ``/`` (never an open redirect)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(char) < 0x20 for char in target)
    ):
        return "/"
    return target


def _to_login(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _redirect(f"/login?{urlencode({'next': here})}")


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin.lower() == own.lower()


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _check_form(request: Request, session: Session, form: FormData) -> None:
    if not _same_origin(request):
        raise HTTPException(403, "This form was sent from another site; nothing was changed.")
    sent = _text(form, "csrf").encode("utf-8")
    if not secrets.compare_digest(sent, session.csrf.encode("utf-8")):
        raise HTTPException(
            403, "This form is out of date (or was not sent by this dashboard); reload the page."
        )


def _parse_value(store: HubStore, record: ConflictRecord, text: str) -> Any:
    """The value an admin typed, as the conflict's column holds it (as the CLI reads it)."""
    if record.column is None:
        raise ProtocolError(
            f"conflict {record.id} is about a whole record; keep one side or the other"
        )
    return store.schema.table(record.table).parse_value(record.column, text)


# -- headquarters' figures ------------------------------------------------------------


def _country_chart(rows: list[dict[str, Any]] | None) -> Markup | None:
    if rows is None:
        return None
    bars = []
    for row in rows:
        label = "unknown" if row["country"] is None else str(row["country"])
        if "countries" in row:
            label = f"other ({row['countries']} countries)"
        bars.append((label, float(row["cases"])))
    # bar_chart_svg escapes every text it draws.
    return Markup(bar_chart_svg(bars, title="Cases by country of origin", unit="cases"))


def _month_chart(section: dict[str, Any] | None) -> Markup | None:
    if section is None:
        return None
    columns = [(row["month"] or UNDATED, float(row["deliveries"])) for row in section["by_month"]]
    return Markup(column_chart_svg(columns, title="Assistance deliveries by month"))


def _kind_month_grid(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """Assistance as a table: one row per kind, one column per month."""
    if section is None:
        return None
    cells = {(row["kind"], row["month"]): row for row in section["rows"]}
    months = section["months"]
    return {
        "months": [month or UNDATED for month in months],
        "rows": [
            {"kind": kind, "cells": [cells.get((kind, month)) for month in months]}
            for kind in section["kinds"]
        ],
    }


def _health_summary(offices: list[OfficeStatus]) -> str:
    """``2 offices: 1 ok, 1 failing``."""
    counts = Counter(office.health for office in offices)
    states = ", ".join(f"{counts[state]} {state}" for state in HEALTH_STATES if counts[state])
    noun = "office" if len(offices) == 1 else "offices"
    return f"{len(offices)} {noun}: {states}" if offices else "No office is registered yet."


async def _drain(chunks: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """Read the export in worker threads (each read is SQLite work), and close it (and
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
    def __init__(self, store: HubStore, stale_after: timedelta | None) -> None:
        self.store = store
        self.stale_after = stale_after

    def routes(self) -> list[BaseRoute]:
        page, form = self._page, self._form
        return [
            Route("/", page(self.offices)),
            Route("/login", self.login_form),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", form(self.logout), methods=["POST"]),
            Route("/offices/{name}", page(self.office)),
            Route("/conflicts", page(self.conflicts)),
            Route("/conflicts/{id:int}", page(self.conflict)),
            Route("/conflicts/{id:int}/resolve", form(self.resolve_conflict), methods=["POST"]),
            Route("/hq", page(self.hq)),
            Route("/export/{file}", page(self.export)),
            Route("/records", page(self.find_record)),
            Route("/records/{table}", page(self.record)),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    async def _session(self, request: Request) -> Session | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        found = await run_in_threadpool(self.store.session, token)
        return Session(found[0], found[1], token) if found else None

    def _page(self, handler: Page) -> Endpoint:
        """A page for signed-in admins; anyone else is sent to sign in."""

        async def endpoint(request: Request) -> Response:
            session = await self._session(request)
            if session is None:
                return _to_login(request)
            return await _guarded(handler(request, session), session)

        return endpoint

    def _form(self, handler: FormPage) -> Endpoint:
        """A form that changes something: signed in, same origin, the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            session = await self._session(request)
            if session is None:
                return _redirect("/login")

            async def checked() -> Response:
                form = await request.form()
                _check_form(request, session, form)
                return await handler(request, session, form)

            return await _guarded(checked(), session)

        return endpoint

    # -- signing in and out ---------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        target = _local_path(request.query_params.get("next"))
        if await self._session(request) is not None:
            return _redirect(target)
        return _render("login.html", next=target, error=None)

    async def login(self, request: Request) -> Response:
        return await _guarded(self._login(request), None)

    async def _login(self, request: Request) -> Response:
        if not _same_origin(request):
            raise HTTPException(403, "This sign-in form was sent from another site.")
        form = await request.form()
        target = _local_path(_text(form, "next"))
        try:
            admin = await run_in_threadpool(self.store.authenticate_admin, _text(form, "token"))
        except AuthError as exc:
            error = OFFICE_TOKEN if exc.status == 403 else WRONG_TOKEN
            return _render(
                "login.html", 403 if exc.status == 403 else 401, next=target, error=error
            )
        token, _csrf = await run_in_threadpool(self.store.start_session, admin)
        log.info("admin %s signed in to the dashboard", admin)
        response = _redirect(target)
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
        response = _redirect("/login")
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
        return _render(
            "offices.html",
            200,
            session,
            section="offices",
            refresh=REFRESH_SECONDS,
            offices=offices,
            summary=_health_summary(offices),
            waiting=waiting,
            unsettled=unsettled,
        )

    async def office(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]

        def load() -> tuple[OfficeStatus, list[dict[str, Any]]]:
            try:
                found = self.store.office(name, stale_after=self.stale_after, events=EVENTS_SHOWN)
            except FieldsyncError:
                raise HTTPException(404, f"There is no office {name!r}.") from None
            return found, self.store.rejected(name)

        office, rejected = await run_in_threadpool(load)
        return _render(
            "office.html",
            200,
            session,
            section="offices",
            office=office,
            rejected=rejected[:MAX_LISTED],
            more_rejected=len(rejected) > MAX_LISTED,
        )

    # -- conflicts ----------------------------------------------------------------

    async def conflicts(self, request: Request, session: Session) -> Response:
        status = request.query_params.get("status", "unsettled")
        found = await run_in_threadpool(conflicts_of, self.store, status, MAX_LISTED + 1)
        return _render(
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
        column_type = ""
        if table is not None and record.column is not None:
            column_type = table.column(record.column).type.upper()
        return _render(
            "conflict.html",
            status,
            session,
            section="conflicts",
            c=record,
            column_type=column_type,
            error=error,
            # the record changed since: the force box can apply the decision anyway
            changed=error is not None and status == 409 and record.status != "resolved",
            typed=typed,
            done=done,
        )

    async def conflict(self, request: Request, session: Session) -> Response:
        record = await run_in_threadpool(self._conflict, request.path_params["id"])
        done = request.query_params.get("done") == "1"
        return self._conflict_page(session, record, done=done)

    async def resolve_conflict(
        self, request: Request, session: Session, form: FormData
    ) -> Response:
        conflict_id: int = request.path_params["id"]
        record = await run_in_threadpool(self._conflict, conflict_id)
        keep, typed = _text(form, "keep"), _text(form, "value")
        decision: dict[str, Any] = {"keep": keep, "force": bool(_text(form, "force"))}
        try:
            if keep == "value":
                decision["value"] = _parse_value(self.store, record, typed)
            await run_in_threadpool(resolve, self.store, conflict_id, session.admin, decision)
        except (HubRejectedError, ProtocolError) as exc:
            status = exc.status if isinstance(exc, HubRejectedError) else 400
            if status == 404:
                raise
            record = await run_in_threadpool(self._conflict, conflict_id)
            return self._conflict_page(session, record, status=status, error=str(exc), typed=typed)
        log.info("admin %s resolved conflict %d: keep %s", session.admin, conflict_id, keep)
        return _redirect(f"/conflicts/{conflict_id}?done=1")

    # -- headquarters and downloads -------------------------------------------------

    async def hq(self, request: Request, session: Session) -> Response:
        def load() -> tuple[dict[str, Any], list[str]]:
            return self.store.figures(), [node["name"] for node in self.store.nodes()]

        figures, offices = await run_in_threadpool(load)
        return _render(
            "hq.html",
            200,
            session,
            section="hq",
            figures=figures,
            country_chart=_country_chart(figures["cases_by_country"]),
            month_chart=_month_chart(figures["assistance_by_kind_month"]),
            kind_month=_kind_month_grid(figures["assistance_by_kind_month"]),
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
        if not isinstance(self.store, SqliteHubStore):
            raise HTTPException(501, "Downloads read the hub's SQLite file; this hub has none.")
        office = request.query_params.get("office") or None
        try:
            name, chunks = await run_in_threadpool(stream_export, self.store, table, fmt, office)
        except FieldsyncError as exc:  # the table and format are known: the office is not
            raise HTTPException(400, f"Cannot export {table}: {exc}.") from None
        log.info("admin %s downloads %s (office %s)", session.admin, name, office or "all")
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
    ) -> HTMLResponse:
        """The form that finds a record by table and key (``chosen``: what was typed)."""
        tables = self.store.schema.tables
        keys = list(dict.fromkeys(c for t in tables.values() for c in t.primary_key))
        return _render(
            "records.html",
            status,
            session,
            section="records",
            tables=tables,
            keys=keys,
            chosen=chosen or {},
            error=error,
        )

    async def find_record(self, request: Request, session: Session) -> Response:
        params = request.query_params
        table = params.get("table")
        if not table:
            return self._lookup_page(session)
        spec = self.store.schema.tables.get(table)
        if spec is None:
            raise HTTPException(404, f"There is no synced table {table!r}.")
        key = {column: params.get(column, "") for column in spec.primary_key}
        if all(key.values()):
            return _redirect(_record_url(table, key))
        error = f"Give the record's key: {', '.join(spec.primary_key)}."
        return self._lookup_page(session, 400, error, dict(params))

    async def record(self, request: Request, session: Session) -> Response:
        table = request.path_params["table"]
        params = dict(request.query_params)
        try:
            found = await run_in_threadpool(record_history, self.store, table, params)
        except ProtocolError as exc:  # the key is missing or mistyped
            return self._lookup_page(session, 400, str(exc), {**params, "table": table})
        return _render(
            "record.html",
            200 if found["versions"] else 404,
            session,
            section="records",
            table=table,
            pk=found["pk"],
            versions=found["versions"],
        )
