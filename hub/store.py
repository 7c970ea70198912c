"""
Hub storage: the one narrow interface the hub's web layer talks to.

:class:`HubStore` is the interface; :class:`SqlHubStore` keeps everything in one SQL
database, a SQLite file (:class:`SqliteHubStore`) or PostgreSQL
(:class:`PostgresHubStore`; :func:`open_store` picks by the ``--db`` given). It is a
thin composition of parts, each a module of its own that is handed the shared
:class:`hub.database.HubDatabase` (engine, schema, clock), and each writing its SQL
once for both engines (hub/engine.py):

==================  ===============================================================
hub/database.py     opening the database; transactions, one writer at a time; snapshots
hub/engine.py       what differs between SQLite (hub/sqlite_engine.py) and PostgreSQL
                    (hub/pg/engine.py)
hub/migrations.py   the layout, as one ordered list keyed by ``PRAGMA user_version``
                    (PostgreSQL's: hub/pg/layout.py)
hub/auth.py         office and admin tokens, roles, dashboard sessions, revoking
hub/audit.py        the audit log: sign-ins, downloads, resolutions, key changes
hub/ingest.py       push: checks, merge (:func:`shared.merge.merge`), receipts, writes
hub/records.py      each record's state and hub seq, mirrored into real tables
hub/pull.py         pull: records by seq, on a snapshot
hub/conflicts.py    the conflict log, and an admin's resolution
hub/rejected.py     changes the hub set aside
hub/history.py      every version of a record the hub took
hub/status.py       what the hub keeps about each office's syncing
hub/health.py       OfficeStatus, and an office's health in one word
hub/report.py       headquarters' figures, read on a snapshot
==================  ===============================================================

A store is a context manager: ``with open_store(db) as store: ...`` closes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import sqlite_utils

from hub import (
    audit,
    auth,
    conflicts,
    history,
    pull,
    records,
    rejected,
    report,
    scopes,
    search,
    status,
)
from hub.audit import Actor
from hub.auth import Admin
from hub.conflicts import ConflictRecord
from hub.database import HubDatabase
from hub.engine import is_url
from hub.epoch import open_epoch
from hub.health import OfficeStatus
from hub.ingest import ALL_RECEIPTS, DEFAULT_MAX_FUTURE_MS, Ingest
from shared.clock import now_ms
from shared.merge import RecordState
from shared.protocol import Change, ConflictPage, PullPage, PushResult, SchemaInfo
from shared.reports import StatusReport
from shared.schema import Schema
from shared.sqlite import table_rows

__all__ = [
    "ALL_RECEIPTS",
    "DEFAULT_MAX_FUTURE_MS",
    "ConflictRecord",
    "HubStore",
    "OfficeStatus",
    "PostgresHubStore",
    "SqlHubStore",
    "SqliteHubStore",
    "open_store",
]


class HubStore(Protocol):
    """What the hub needs from its storage; every back end passes the same tests."""

    @property
    def schema(self) -> Schema: ...

    @property
    def schema_version(self) -> int: ...

    def schema_info(self) -> SchemaInfo: ...

    def add_node(self, name: str) -> str: ...

    def set_scopes(self, node: str, keys: Sequence[str]) -> frozenset[str] | None: ...

    def scopes(self) -> dict[str, list[str] | None]: ...

    def move(self, table: str, key: Sequence[Any], to: str, by: str) -> int: ...

    def authenticate(self, token: str) -> str: ...

    def office_of(self, token: str) -> tuple[str, int]: ...

    def acked(self, node: str) -> int: ...

    @property
    def epoch(self) -> str: ...

    def push(self, node: str, changes: Sequence[Change]) -> PushResult: ...

    def pull(
        self,
        node: str,
        cursor: int,
        limit: int,
        *,
        include_own: bool = False,
        count: bool = False,
        packed: bool = False,
        spliced: bool = False,
        admit: Callable[[int, Schema], None] | None = None,
    ) -> PullPage: ...

    def conflicts(
        self, status: str | Sequence[str] | None = None, limit: int | None = None
    ) -> list[ConflictRecord]: ...

    def conflict_counts(self) -> dict[str, int]: ...

    def lost_edits(self, node: str, after: int, limit: int) -> ConflictPage: ...

    def conflict(self, conflict_id: int) -> ConflictRecord: ...

    def nodes(self) -> list[dict[str, Any]]: ...

    def rejected(self, node: str | None = None) -> list[dict[str, Any]]: ...

    def rows(self, table: str) -> list[dict[str, Any]]: ...

    def resolve(
        self, conflict_id: int, keep: str, by: str, value: Any = None, *, force: bool = False
    ) -> ConflictRecord: ...

    def close(self) -> None: ...

    # -- admins, office status and history -------------------------------------

    def add_admin(self, name: str, role: str = auth.DEFAULT_ROLE) -> str: ...

    def authenticate_admin(self, token: str) -> str: ...

    def identify_admin(self, token: str) -> Admin: ...

    def start_session(self, admin: str) -> tuple[str, str]: ...

    def session(self, token: str) -> tuple[str, str, str] | None: ...

    def audit(self, action: str, actor: Actor, target: str = "", **detail: Any) -> None: ...

    def audit_entries(
        self, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]: ...

    def end_session(self, token: str) -> None: ...

    def record_status(self, node: str, report: StatusReport) -> None: ...

    def note_error(self, node: str, code: str, detail: str) -> None: ...

    def offices(
        self, *, stale_after: timedelta | None = None, now: datetime | None = None
    ) -> list[OfficeStatus]: ...

    def office(
        self,
        name: str,
        *,
        stale_after: timedelta | None = None,
        now: datetime | None = None,
        events: int = 50,
    ) -> OfficeStatus: ...

    def record_history(self, table: str, pk: Sequence[Any]) -> list[dict[str, Any]]: ...

    def record_versions(self, table: str, pk: Sequence[Any]) -> dict[str, Any]: ...

    def find_records(self, text: str, table: str | None = None) -> dict[str, Any]: ...

    def figures(self) -> dict[str, Any]: ...

    def record_state(self, table: str, pk: dict[str, Any]) -> RecordState | None: ...


class SqlHubStore:
    """Hub storage in a SQL database: a SQLite file or a PostgreSQL database."""

    def __init__(
        self,
        db: str | Path,
        schema: Schema | None = None,
        *,
        max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
        now: Callable[[], int] = now_ms,
        create: bool = True,
        serving: bool = True,
    ) -> None:
        """``db``: a file's path or a ``postgresql://`` URL. ``serving``: False for a
        command that does not serve the hub (a backup it opens stays a backup:
        hub/epoch.py)."""
        # The engine, schema and clock every part below is handed.
        self.database = HubDatabase(db, schema, now=now, create=create)
        self.database.serving = serving
        try:
            self._ingest = Ingest(self.database, max_future_ms=max_future_ms)
            with self.database.write() as conn:  # the hub's identity (hub/epoch.py)
                self.database.epoch = open_epoch(conn, serving=serving)
        except BaseException:
            self.database.close()
            raise

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def epoch(self) -> str:
        """The hub's identity (hub/epoch.py): new when its database was put back."""
        return self.database.epoch

    @property
    def where(self) -> str:
        """The database, as messages name it (a file, or a URL without its password)."""
        return self.database.where

    @property
    def schema(self) -> Schema:
        """The schema in use, the newest version (`hub schema apply` in another
        program is seen here at once: the dashboard's pages show new columns)."""
        self.database.current_version()
        return self.database.schema

    @property
    def schema_version(self) -> int:
        """The schema's newest version (`hub schema apply` may store one meanwhile)."""
        return self.database.current_version()

    def schema_info(self) -> SchemaInfo:
        """The schema's newest version and its source (``GET /v1/schema``)."""
        self.database.current_version()
        version, schema = self.database.version_and_schema()
        return SchemaInfo(version, schema.source)

    @property
    def max_future_ms(self) -> int:
        """How far ahead of the hub's clock a change may be stamped."""
        return self._ingest.max_future_ms

    @max_future_ms.setter
    def max_future_ms(self, value: int) -> None:
        self._ingest.max_future_ms = value

    # -- offices and tokens (hub/auth.py) ---------------------------------------------

    def add_node(self, name: str) -> str:
        return auth.add_node(self.database, name)

    def nodes(self) -> list[dict[str, Any]]:
        return auth.nodes(self.database)

    # -- sync scopes (hub/scopes.py) ---------------------------------------------------

    def set_scopes(self, node: str, keys: Sequence[str]) -> frozenset[str] | None:
        return scopes.set_scopes(self.database, node, keys)

    def scopes(self) -> dict[str, list[str] | None]:
        return scopes.all_scopes(self.database)

    def move(self, table: str, key: Sequence[Any], to: str, by: str) -> int:
        return scopes.move(self.database, table, key, to, by)

    def authenticate(self, token: str) -> str:
        return auth.authenticate(self.database, token)

    def office_of(self, token: str) -> tuple[str, int]:
        """The office owning ``token`` and its last change dealt with (one lookup)."""
        return auth.office_of(self.database, token)

    def acked(self, node: str) -> int:
        return auth.acked(self.database, node)

    def add_admin(self, name: str, role: str = auth.DEFAULT_ROLE, by: Actor | None = None) -> str:
        return auth.add_admin(self.database, name, role, by)

    def authenticate_admin(self, token: str) -> str:
        return auth.authenticate_admin(self.database, token)

    def identify_admin(self, token: str) -> Admin:
        return auth.identify_admin(self.database, token)

    def is_admin_token(self, token: str) -> bool:
        return auth.is_admin_token(self.database, token)

    def start_session(self, admin: str) -> tuple[str, str]:
        return auth.start_session(self.database, admin)

    def session(self, token: str) -> tuple[str, str, str] | None:
        return auth.session(self.database, token)

    def end_session(self, token: str) -> None:
        auth.end_session(self.database, token)

    # -- taking keys back, roles, the audit log (hub/auth.py, hub/audit.py) -----------

    def revoke(
        self, name: str, kind: str | None = None, by: Actor | None = None
    ) -> tuple[str, bool]:
        return auth.revoke(self.database, name, kind, by)

    def rotate_token(
        self, name: str, kind: str | None = None, by: Actor | None = None
    ) -> tuple[str, str]:
        return auth.rotate_token(self.database, name, kind, by)

    def set_role(self, name: str, role: str, by: Actor | None = None) -> str:
        return auth.set_role(self.database, name, role, by)

    def admins(self) -> list[dict[str, Any]]:
        return auth.admins(self.database)

    def audit(self, action: str, actor: Actor, target: str = "", **detail: Any) -> None:
        audit.log(self.database, action, actor, target, **detail)

    def audit_entries(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        return audit.entries(self.database, limit, before)

    # -- push and pull (hub/ingest.py, hub/pull.py) -----------------------------------

    def push(self, node: str, changes: Sequence[Change]) -> PushResult:
        return self._ingest.push(node, changes)

    def pull(
        self,
        node: str,
        cursor: int,
        limit: int,
        *,
        include_own: bool = False,
        count: bool = False,
        packed: bool = False,
        spliced: bool = False,
        admit: Callable[[int, Schema], None] | None = None,
    ) -> PullPage:
        return pull.pull(
            self.database,
            node,
            cursor,
            limit,
            include_own=include_own,
            count=count,
            packed=packed,
            spliced=spliced,
            admit=admit,
        )

    def rejected(self, node: str | None = None) -> list[dict[str, Any]]:
        return rejected.rejected(self.database, node)

    # -- conflicts (hub/conflicts.py) -------------------------------------------------

    def conflicts(
        self, status: str | Sequence[str] | None = None, limit: int | None = None
    ) -> list[ConflictRecord]:
        return conflicts.conflicts(self.database, status, limit)

    def conflict_counts(self) -> dict[str, int]:
        return conflicts.conflict_counts(self.database)

    def conflict(self, conflict_id: int) -> ConflictRecord:
        return conflicts.conflict(self.database, conflict_id)

    def lost_edits(self, node: str, after: int, limit: int) -> ConflictPage:
        return conflicts.lost_edits(self.database, node, after, limit)

    def resolve(
        self, conflict_id: int, keep: str, by: str, value: Any = None, *, force: bool = False
    ) -> ConflictRecord:
        return conflicts.resolve(self.database, conflict_id, keep, by, value, force=force)

    # -- office status (hub/status.py) ------------------------------------------------

    def record_status(self, node: str, report: StatusReport) -> None:
        status.record_status(self.database, node, report)

    def note_error(self, node: str, code: str, detail: str) -> None:
        status.note_error(self.database, node, code, detail)

    def offices(
        self, *, stale_after: timedelta | None = None, now: datetime | None = None
    ) -> list[OfficeStatus]:
        return status.offices(self.database, stale_after=stale_after, now=now)

    def office(
        self,
        name: str,
        *,
        stale_after: timedelta | None = None,
        now: datetime | None = None,
        events: int = 50,
    ) -> OfficeStatus:
        return status.office(self.database, name, stale_after=stale_after, now=now, events=events)

    def sync_events(self, node: str, limit: int = 50) -> list[dict[str, Any]]:
        return status.sync_events(self.database, node, limit)

    # -- consolidated data (hub/history.py, hub/report.py) ----------------------------

    def record_history(self, table: str, pk: Sequence[Any]) -> list[dict[str, Any]]:
        return history.record_history(self.database, table, pk)

    def record_versions(self, table: str, pk: Sequence[Any]) -> dict[str, Any]:
        """Every version of a record, marked, and the record now (see hub/history.py)."""
        return history.record_versions(self.database, table, pk)

    def find_records(self, text: str, table: str | None = None) -> dict[str, Any]:
        """Live records with ``text`` in a key or text column (see hub/search.py)."""
        return search.find_records(self.database, text, table)

    def figures(self) -> dict[str, Any]:
        """Consolidated figures for headquarters (see hub/report.py).

        Read on a snapshot of their own: a scan of every table holds up no push.
        """
        with self.database.snapshot() as conn:
            return report.figures(conn, self.database.schema)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every live record of ``table``, ordered by primary key (on a snapshot)."""
        found = self.schema.table(table)
        with self.database.snapshot() as conn:
            return table_rows(conn, found)

    def record_state(self, table: str, pk: dict[str, Any]) -> RecordState | None:
        """One record's values as the hub holds them now (None: never seen)."""
        key = self.schema.table(table).pk_key(pk)
        with self.database.read() as conn:
            found = records.load(conn, self.database.schema, table, key)
        return None if found is None else found[0]


class SqliteHubStore(SqlHubStore):
    """Hub storage in one SQLite file (WAL, synchronous=FULL: an ack means durable)."""

    @property
    def path(self) -> Path:
        """The database file."""
        return self.database.path

    @property
    def db(self) -> sqlite_utils.Database:
        """The writer's connection (guarded by the engine's lock)."""
        return self.database.db


class PostgresHubStore(SqlHubStore):
    """Hub storage in a PostgreSQL database (hub/pg/engine.py): several processes,
    on several machines, may serve one."""


def open_store(db: str | Path, schema: Schema | None = None, **options: Any) -> SqlHubStore:
    """The store for ``db``: a ``postgresql://`` URL or a SQLite file's path."""
    kind = PostgresHubStore if is_url(db) else SqliteHubStore
    return kind(db, schema, **options)
