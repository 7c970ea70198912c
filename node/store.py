"""
NodeStore: an office's SQLite database, its change log and its sync state.

``NodeStore`` opens the database (upgrading one made by an older fieldsync) and is
the one door the agent and the CLI use; each concept behind it has a module:

- ``node/capture.py``: the triggers that log every write to a synced table, and the
  hybrid logical clock they stamp changes with, in SQL;
- ``node/migrations.py``: the tables fieldsync owns and their history, numbered in
  ``_fieldsync_version``;
- ``node/outbox.py``: queued changes on their way to the hub (pending, acknowledged,
  renumbered, re-stamped, sent);
- ``node/inbox.py``: records pulled from the hub, applied with the cursor;
- ``node/versions.py``: each record's versions, from which a change's base comes;
- ``node/rejected.py``: changes the hub rejected, kept aside;
- ``node/status.py``: the outcome of each sync, for ``node status`` and the hub;
- ``node/conflicts.py``: this office's edits that lost at the hub.

A store is a context manager: ``with NodeStore(path) as store: ...`` closes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlite_utils import Database

from node import conflicts as lost, inbox, migrations, status as sync_status
from node._times import utcnow
from node.capture import start_capture, trigger_sql
from node.link import check_hub_url, check_token
from node.outbox import Outbox, Pending, restamp
from node.rejected import rejected_changes, retry_rejected
from node.status import NodeStatus
from shared.clock import check_node_name
from shared.errors import StoreError
from shared.protocol import Change, PullPage, Rejection
from shared.schema import Schema
from shared.sqlite import Checkpointer, connect, create_tables, table_rows, write

__all__ = ["HubSettings", "NodeStatus", "NodeStore", "Pending", "trigger_sql"]

P = ParamSpec("P")
R = TypeVar("R")


def _on_db(func: Callable[Concatenate[Database, P], R]) -> Callable[Concatenate[NodeStore, P], R]:
    """``func(db, ...)`` as a method of NodeStore: ``store.name(...)``."""

    @functools.wraps(func)
    def method(self: NodeStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return func(self.db, *args, **kwargs)

    return method


@dataclass(frozen=True, slots=True)
class HubSettings:
    """How the office reaches its hub, as stored: what its HTTP client is made from."""

    hub_url: str
    token: str
    ca_file: str | None = None  # a private CA's certificate (PEM) to verify the hub with

    def changes_from(self, before: HubSettings | None) -> str:
        """What changed since ``before``, in words (never the token itself)."""
        said = []
        if before is None or before.hub_url != self.hub_url:
            said.append(f"hub URL now {self.hub_url}")
        if before is None or before.token != self.token:
            said.append("token replaced")
        if before is None or before.ca_file != self.ca_file:
            said.append(f"CA file now {self.ca_file}" if self.ca_file else "no CA file")
        return ", ".join(said)


def read_hub_settings(conn: sqlite3.Connection) -> HubSettings:
    url, token, ca_file = conn.execute(
        "SELECT hub_url, token, ca_file FROM _fieldsync_state"
    ).fetchone()
    return HubSettings(str(url), str(token), ca_file)


class NodeStore:
    """An office's database: synced tables, change log and sync state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist; create it with `fieldsync node init`")
        self.db = connect(self.path)
        conn = self.db.conn
        row = source = None
        with contextlib.suppress(sqlite3.Error):
            row = conn.execute("SELECT node, hub_url, token FROM _fieldsync_state").fetchone()
        if row is not None:
            source = migrations.schema_source(conn)
        if row is None or source is None:
            self.db.conn.close()
            raise StoreError(
                f"{self.path} is not a fieldsync office database; "
                "create one with `fieldsync node init`"
            )
        self.node, self.hub_url, self.token = str(row[0]), str(row[1]), str(row[2])
        self._checkpointer = Checkpointer(self.db, self.path, synchronous="NORMAL")
        self.schema = Schema.from_toml(source, f"the schema stored in {self.path}")
        migrations.upgrade(self.db, self.schema)
        self.outbox = Outbox(self.db, self.schema, self.node, self.path)

    @classmethod
    def init(
        cls,
        path: str | Path,
        node: str,
        hub_url: str,
        token: str,
        schema: Schema | None = None,
        *,
        ca_file: str | None = None,
        allow_http: bool = False,
    ) -> NodeStore:
        """Create (or adopt) an office database: tables, capture triggers, state.

        Rows already in a synced table are logged as inserts, so they reach the hub.
        ``ca_file`` and ``allow_http``: the link's settings (see :meth:`set_hub`).
        """
        check_node_name(node)
        hub_url = check_hub_url(hub_url)
        check_token(token)
        schema = schema or Schema.load()
        try:  # claimed here, or made by someone else: only a file made here is removed
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            made = True
        except FileExistsError:
            made = False
        db = connect(path)
        try:
            with write(db) as conn:
                names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
                if "_fieldsync_state" in names:
                    raise StoreError(f"{path} is already a fieldsync office database")
                if "_fieldsync_meta" in names or "_fieldsync_nodes" in names:
                    raise StoreError(f"{path} is a hub database, not an office database")
                migrations.create(conn)
                create_tables(conn, schema)
                conn.execute(
                    "INSERT INTO _fieldsync_state (id, node, hub_url, token, created_at, "
                    "ca_file, allow_http) VALUES (1, ?, ?, ?, ?, ?, ?)",
                    [node, hub_url, token, utcnow(), ca_file, int(allow_http)],
                )
                conn.execute(
                    "INSERT INTO _fieldsync_schema (id, source) VALUES (1, ?)", [schema.source]
                )
                for table in schema.tables.values():
                    start_capture(conn, table)
        except BaseException:
            try:  # what others committed meanwhile, this one's transaction rolled back
                empty = not db.conn.execute("SELECT 1 FROM sqlite_master").fetchone()
            except sqlite3.Error:
                empty = False
            db.conn.close()
            if made and empty:  # nothing of a failed init is left behind
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{path}{suffix}")
            raise
        db.conn.close()
        return cls(path)

    def close(self) -> None:
        self._checkpointer.close()
        self.db.conn.close()

    def __enter__(self) -> NodeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def set_hub(
        self,
        hub_url: str | None = None,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        allow_http: bool | None = None,
    ) -> None:
        """Point the office at another hub URL or token, CA file (``""``: none, the
        usual public CAs) or choice about plain http (None: unchanged). A running agent
        takes them on its next sync (see :meth:`hub_settings`)."""
        if hub_url:
            hub_url = check_hub_url(hub_url)
        if token:
            check_token(token)
        with write(self.db) as conn:
            if hub_url:
                conn.execute("UPDATE _fieldsync_state SET hub_url = ?", [hub_url])
                self.hub_url = hub_url
            if token:
                conn.execute("UPDATE _fieldsync_state SET token = ?", [token])
                self.token = token
            if ca_file is not None:
                conn.execute("UPDATE _fieldsync_state SET ca_file = ?", [ca_file or None])
            if allow_http is not None:
                conn.execute("UPDATE _fieldsync_state SET allow_http = ?", [int(allow_http)])

    def hub_settings(self, *, own_connection: bool = False) -> HubSettings:
        """The hub link's settings as stored now (`node set` may have changed them).

        ``own_connection``: read on a connection of its own, for a thread other than
        the one syncing (the store's connection is the sync's).
        """
        if not own_connection:
            return read_hub_settings(self.db.conn)
        uri = f"{self.path.absolute().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            return read_hub_settings(conn)

    @property
    def allow_http(self) -> bool:
        """Whether plain http:// to another machine was allowed on purpose."""
        return bool(self.db.conn.execute("SELECT allow_http FROM _fieldsync_state").fetchone()[0])

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of a synced table, ordered by primary key."""
        return table_rows(self.db.conn, self.schema.table(table))

    # -- push side: node/outbox.py ----------------------------------------------

    def pending_count(self) -> int:
        return self.outbox.count()

    def pending(self, limit: int, after: Pending | None = None) -> Pending:
        """The oldest ``limit`` unacknowledged changes (see :meth:`Outbox.pending`)."""
        return self.outbox.pending(limit, after)

    def mark_acked(
        self, acked: int, changes: Sequence[Change], rejected: Sequence[Rejection] = ()
    ) -> None:
        """Forget the changes the hub has dealt with (see :meth:`Outbox.mark_acked`)."""
        self.outbox.mark_acked(acked, changes, rejected)
        if changes:
            self._checkpointer.poke()

    def prepare_ack(self, changes: Sequence[Change]) -> None:
        """Work out ahead what acknowledging ``changes`` writes (see :meth:`Outbox.prepare_ack`)."""
        self.outbox.prepare_ack(changes)

    def drop_change(self, seq: int) -> bool:
        """Discard one queued or rejected change (see :meth:`Outbox.drop_change`)."""
        return self.outbox.drop_change(seq)

    def last_seq(self) -> int:
        """The highest change-log number this database has given out (or had acknowledged)."""
        return self.outbox.last_seq()

    def renumber_after(self, acked: int) -> int:
        """Give pending changes numbers above ``acked`` (see :meth:`Outbox.renumber_after`)."""
        return self.outbox.renumber_after(acked)

    def note_sent(self, seq: int) -> None:
        """Remember that changes up to ``seq`` go to the hub now (see :meth:`Outbox.note_sent`)."""
        self.outbox.note_sent(seq)

    def not_committed_after(self, acked: int) -> None:
        """The hub committed none of this office's changes after ``acked``."""
        self.outbox.not_committed_after(acked)

    def restamp(self, hub_now_ms: int, shift_ms: int, *, every: bool = False) -> int:
        """Move queued changes not yet sent by ``shift_ms`` (see :meth:`Outbox.restamp`)."""
        return self.outbox.restamp(hub_now_ms, shift_ms, every=every)

    # -- rejected changes: node/rejected.py -------------------------------------

    def rejected(self) -> list[dict[str, Any]]:
        """Changes the hub rejected, oldest first, with their values and the reason."""
        return rejected_changes(self.db.conn, self.schema)

    def retry_rejected(self, seq: int) -> None:
        """Write a rejected change again, as a new local change (see node/rejected.py)."""
        retry_rejected(self.db, self.schema, self.path, seq)

    # -- pull side: node/inbox.py -----------------------------------------------

    @property
    def cursor(self) -> int:
        return inbox.cursor(self.db)

    @property
    def repull(self) -> bool:
        """True while the office rebuilds its copy from the hub, its own records included."""
        return inbox.repulling(self.db)

    def start_resync(self) -> None:
        """Pull the whole scope again and drop what it no longer brings (see inbox)."""
        inbox.start_resync(self.db)

    def check_page(self, page: PullPage) -> inbox.Checked:
        """Check a pulled page whole, touching no database (see :func:`inbox.check_page`)."""
        return inbox.check_page(self.schema, page)

    def apply_page(self, page: PullPage, checked: inbox.Checked | None = None) -> int:
        """Apply pulled records and save the next cursor (see :func:`inbox.apply_page`);
        ``checked``: what :meth:`check_page` made of ``page``, if it was called."""
        applied = inbox.apply_page(self.db, self.schema, page, checked)
        self._checkpointer.poke()
        return applied

    # -- clock ------------------------------------------------------------------

    @property
    def clock_offset_ms(self) -> int:
        return int(self.db.conn.execute("SELECT offset_ms FROM _fieldsync_state").fetchone()[0])

    def set_clock_offset(self, offset_ms: int, hub_now_ms: int | None = None) -> int:
        """Remember how far the local clock is behind the hub's (negative: ahead).

        With ``hub_now_ms`` (the hub's time when the offset was learned), the queued
        changes not yet sent, stamped under the offset known before, are moved by
        the difference in the same transaction (see :meth:`restamp`); returns how
        many were moved.
        """
        with write(self.db) as conn:
            before = conn.execute("SELECT offset_ms FROM _fieldsync_state").fetchone()[0]
            conn.execute("UPDATE _fieldsync_state SET offset_ms = ?", [offset_ms])
            if hub_now_ms is None or offset_ms == before:
                return 0
            return restamp(conn, self.node, hub_now_ms, offset_ms - before, every=True)

    # -- status: node/status.py, on the store's database -------------------------
    record_sync = _on_db(sync_status.record_sync)
    status_report = _on_db(sync_status.status_report)
    mark_reported = _on_db(sync_status.mark_reported)
    note_next_try = _on_db(sync_status.note_next_try)
    status = _on_db(sync_status.read_status)

    # -- this office's lost edits: node/conflicts.py -----------------------------
    conflicts_mark = _on_db(lost.mark)
    store_lost = _on_db(lost.store_lost)
    lost_edits = _on_db(lost.lost_edits)
