"""The admin dashboard: server-rendered pages at ``/`` (filled in below)."""

from __future__ import annotations

from datetime import timedelta

from starlette.routing import BaseRoute

from hub.store import HubStore


def dashboard_routes(store: HubStore, *, stale_after: timedelta | None = None) -> list[BaseRoute]:
    """The dashboard's routes, mounted at ``/`` by :func:`hub.app.create_app`."""
    return []
