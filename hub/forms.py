"""
The dashboard's forms: where a form may come from, what it carries, where it may lead.

Every form that changes something comes from this site (``Origin``) and carries the
session's CSRF token (:func:`check_form`); a ``next`` path after sign-in stays on this
site (:func:`local_path`, never an open redirect).
"""

from __future__ import annotations

import secrets
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse

from hub.render import Session, redirect


def local_path(target: str | None) -> str:
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


def to_login(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return redirect(f"/login?{urlencode({'next': here})}")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin.lower() == own.lower()


def form_text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def check_form(request: Request, session: Session, form: FormData) -> None:
    if not same_origin(request):
        raise HTTPException(403, "This form was sent from another site; nothing was changed.")
    sent = form_text(form, "csrf").encode("utf-8")
    if not secrets.compare_digest(sent, session.csrf.encode("utf-8")):
        raise HTTPException(
            403, "This form is out of date (or was not sent by this dashboard); reload the page."
        )
