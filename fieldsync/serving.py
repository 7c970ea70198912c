"""
`fieldsync hub serve`: the hub's application under uvicorn, in one process or several.

With ``--workers N`` uvicorn's supervisor binds the port once and starts N worker
processes; each builds its own application with :func:`app` (a factory, run after
the process started, so no database connection or pool crosses a fork) from the
settings the command left in the environment (:data:`SETTINGS`), and a worker that
dies is started again. Workers share nothing but the database: a push commits
exactly once whichever worker takes it, and a pull's cursor never passes a record
still to commit (one writer at a time, hub/database.py). Several machines may serve
one PostgreSQL database the same way, behind any load balancer.

uvicorn serves with httptools (HTTP parsing in C) and uvloop (the event loop on
libuv), both dependencies of fieldsync: it takes them when installed (its ``auto``),
and with them a sync costs the hub about a quarter less CPU than with h11 and
asyncio's own loop (bench/README.md, "Scale").
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fieldsync.options import open_hub

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hub.store import SqlHubStore

#: The environment variable that carries :class:`Serving` to the worker processes.
SETTINGS = "FIELDSYNC_SERVE"


@dataclass(frozen=True)
class Serving:
    """What `hub serve` was told, as every worker needs it."""

    db: str
    schema_path: str | None = None
    max_future_seconds: int = 300
    stale_after: int | None = None
    keep_text: str | None = None
    compact_after: int = 300

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> Serving:
        return cls(**json.loads(os.environ[SETTINGS]))


def build(settings: Serving, store: SqlHubStore) -> Starlette:
    """The application around an open ``store``, with the daily compaction
    (hub/compact.py) in a thread of its own; both stop when the application does."""
    from starlette.concurrency import run_in_threadpool

    from hub.app import create_app
    from hub.compact import Keep, parse_keep
    from hub.compactor import Compactor

    keep = parse_keep(settings.keep_text) if settings.keep_text is not None else Keep()
    store.max_future_ms = settings.max_future_seconds * 1000
    stale = timedelta(seconds=settings.stale_after) if settings.stale_after else None
    application = create_app(store, stale_after=stale)
    compactor = Compactor(store.database, keep, first=timedelta(seconds=settings.compact_after))

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        compactor.start()
        try:
            yield
        finally:
            await run_in_threadpool(compactor.stop)
            await run_in_threadpool(store.close)

    application.router.lifespan_context = lifespan
    return application


def app() -> Starlette:
    """A worker's application (``uvicorn fieldsync.serving:app --factory``)."""
    settings = Serving.from_env()
    store = open_hub(settings.db, settings.schema_path, serving=True)
    try:
        return build(settings, store)
    except BaseException:
        store.close()
        raise
