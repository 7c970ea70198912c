"""
How the dashboard renders: Jinja2 templates and their filters, redirects, HTML error
pages, and the charts and tables of headquarters' figures.

Templates live in hub/templates and are autoescaped (case values are user data);
every response carries :data:`SECURITY_HEADERS`. The pages themselves, sessions and
forms are in hub/dashboard.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, RedirectResponse, Response

from hub.health import HEALTH_STATES, OfficeStatus
from hub.report import UNDATED, bar_chart_svg, column_chart_svg
from hub.times import ago, stamp_time
from shared.errors import FieldsyncError, HubRejectedError, ProtocolError

if TYPE_CHECKING:
    from hub.store import ConflictRecord, HubStore

log = logging.getLogger("fieldsync.hub")

HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

STATUS_WORDS = {
    "open": "waits for a decision",
    "logged": "settled by policy",
    "resolved": "resolved",
}


@dataclass(frozen=True, slots=True)
class Session:
    """The signed-in admin, the session's CSRF token, its cookie value and the admin's
    role (hub/auth.py's ROLES)."""

    admin: str
    csrf: str
    token: str
    role: str = "viewer"


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


def record_url(table: str, pk: dict[str, Any]) -> str:
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
_templates.globals.update(record_url=record_url, status_words=STATUS_WORDS)


def render(
    template: str, status: int = 200, session: Session | None = None, /, **context: Any
) -> HTMLResponse:
    page = _templates.get_template(template).render(
        admin=session.admin if session else None,
        csrf=session.csrf if session else "",
        role=session.role if session else None,
        section=context.pop("section", None),
        refresh=context.pop("refresh", None),
        **context,
    )
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def error_page(exc: Exception, session: Session | None) -> HTMLResponse:
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
    return render("error.html", status, session, title=title, message=message, code=status)


async def guarded(page: Awaitable[Response], session: Session | None) -> Response:
    """The page, or an HTML error page for what went wrong making it."""
    try:
        return await page
    except (HTTPException, FieldsyncError) as exc:
        return error_page(exc, session)
    except Exception as exc:
        # Never the message: it may quote case data.
        log.error("dashboard page failed: %s", type(exc).__name__)
        failed = HTTPException(500, "The hub failed to answer; its log names the error.")
        return error_page(failed, session)


# -- headquarters' figures ------------------------------------------------------------


def country_chart(rows: list[dict[str, Any]] | None) -> Markup | None:
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


def month_chart(section: dict[str, Any] | None) -> Markup | None:
    if section is None:
        return None
    columns = [(row["month"] or UNDATED, float(row["deliveries"])) for row in section["by_month"]]
    return Markup(column_chart_svg(columns, title="Assistance deliveries by month"))


def kind_month_grid(section: dict[str, Any] | None) -> dict[str, Any] | None:
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


def health_summary(offices: list[OfficeStatus]) -> str:
    """``2 offices: 1 ok, 1 failing``."""
    counts = Counter(office.health for office in offices)
    states = ", ".join(f"{counts[state]} {state}" for state in HEALTH_STATES if counts[state])
    noun = "office" if len(offices) == 1 else "offices"
    return f"{len(offices)} {noun}: {states}" if offices else "No office is registered yet."


# -- what pages show ------------------------------------------------------------------

SUMMED = ("pushed", "pulled", "conflicts", "rejected")  # an office's sync history, added up


def conflict_outcome(store: HubStore, record: ConflictRecord) -> dict[str, Any] | None:
    """What a resolution decided (``side``: kept, other or value; ``value``), and the
    value the hub holds now (``now``; ``gone``: the record is deleted now)."""
    if record.status != "resolved":
        return None
    side = record.resolution.get("keep") if isinstance(record.resolution, dict) else None
    decided = {"kept": record.kept_value, "other": record.other_value}.get(side or "")
    if side == "value":
        decided = record.resolution.get("value")
    known = record.table in store.schema.tables
    state = store.record_state(record.table, record.pk) if known else None
    gone = state is None or state.deleted
    now: Any = None
    if not gone and state is not None:
        now = state.values if record.column is None else state.values.get(record.column)
    same = now == decided
    if isinstance(now, dict) and isinstance(decided, dict):  # a whole record: its fields
        same = all(now.get(name) == value for name, value in decided.items())
    return {"side": side, "value": decided, "now": now, "gone": gone, "same": same}


def sync_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What an office's kept syncs add up to: how many, how many failed, the changes
    they moved, and since when (``events``: newest first)."""
    total = {key: sum(e[key] or 0 for e in events) for key in SUMMED}
    failed = sum(1 for e in events if e["outcome"] != "ok")
    since = events[-1]["started_at"] if events else None
    return {"syncs": len(events), "failed": failed, "since": since, **total}
