"""
Hub storage: the one narrow interface the hub's web layer talks to.

:class:`HubStore` is the interface; :class:`SqliteHubStore` keeps everything in one
SQLite file. Per record it stores the current values and column versions
(``_fieldsync_records``, tombstones included) and mirrors live records into real
tables named as in the schema, so headquarters can query them with any SQLite tool.

Every change a push carries is run through :func:`shared.merge.merge` and gets the
next hub ``seq``; pulls serve records ordered by ``seq``. A record whose last change
came from office X, applied exactly as X already has it, is marked with origin X and
not sent back to X.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from hub import report
from hub.monitor import (
    MONITOR_TABLES,
    MonitorStore,
    OfficeStatus,
    count_pull,
    count_push,
    hash_token,
    new_token,
    stamp_time,
    upgrade_history,
    utcnow,
)
from shared.clock import COUNTER_BITS, HybridClock, Timestamp, check_node_name, now_ms
from shared.errors import (
    AuthError,
    ClockSkewError,
    FieldsyncError,
    HubRejectedError,
    InvalidChangeError,
)
from shared.merge import Conflict, Outcome, RecordState, merge
from shared.protocol import (
    Change,
    PullPage,
    PullRow,
    PushResult,
    Rejection,
    StatusReport,
    dumps_text,
    loads,
)
from shared.schema import EXISTS, Schema, Table, load_custom
from shared.sqlite import (
    Checkpointer,
    connect,
    create_tables,
    put_rows,
    read_snapshot,
    table_rows,
    write,
)

DEFAULT_MAX_FUTURE_MS = 5 * 60 * 1000

log = logging.getLogger("fieldsync.hub")

_HUB_TABLES = """
CREATE TABLE IF NOT EXISTS _fieldsync_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_nodes (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    last_seen_at TEXT,
    last_push_at TEXT,
    last_pull_at TEXT,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS _fieldsync_records (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    seq INTEGER NOT NULL UNIQUE,
    origin TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    vals TEXT NOT NULL,
    vers TEXT NOT NULL,
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE IF NOT EXISTS _fieldsync_receipts (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    PRIMARY KEY (node, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _fieldsync_receipt_batches (
    node TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    receipts TEXT NOT NULL,
    PRIMARY KEY (node, last_seq)
);
CREATE TABLE IF NOT EXISTS _fieldsync_conflicts (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    kind TEXT NOT NULL,
    col TEXT,
    kept_value TEXT,
    kept_version TEXT,
    kept_node TEXT,
    other_value TEXT,
    other_version TEXT NOT NULL,
    other_node TEXT NOT NULL,
    status TEXT NOT NULL,
    resolved_by TEXT,
    resolved_at TEXT,
    resolution TEXT,
    merged TEXT,
    state_after TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _fieldsync_rejected (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    op TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS _fieldsync_conflicts_status ON _fieldsync_conflicts (status);
"""


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """One entry of the hub's conflict log, as admins see it."""

    id: int
    created_at: str
    table: str
    pk: dict[str, Any]
    kind: str  # field, record or delete
    column: str | None
    kept_value: Any
    kept_version: str | None
    kept_node: str | None
    other_value: Any
    other_version: str
    other_node: str
    status: str  # logged (settled by policy), open (waits for an admin), resolved
    resolved_by: str | None
    resolved_at: str | None
    resolution: Any
    merged: Any = None  # kind custom: what the custom function chose
    state_after: str = ""  # the record's versions right after; a changed record is stale

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "table": self.table,
            "pk": self.pk,
            "kind": self.kind,
            "column": self.column,
            "kept": {
                "value": self.kept_value,
                "office": self.kept_node,
                "version": self.kept_version,
                "time": stamp_time(self.kept_version),
            },
            "other": {
                "value": self.other_value,
                "office": self.other_node,
                "version": self.other_version,
                "time": stamp_time(self.other_version),
            },
            **({"merged": self.merged} if self.kind == "custom" else {}),
            "status": self.status,
            "resolved_by": self.resolved_by,
            "resolved_at": self.resolved_at,
            "resolution": self.resolution,
        }


# A record to write: table, key text, key, state, hub seq, origin office (or None),
# and the JSON text of the state's values if already made (or None).
_Write = tuple[Table, str, dict[str, Any], RecordState, int, str | None, str | None]


def _check_hub_file(path: Path, create: bool) -> None:
    """Refuse to turn a database that is not a hub into one (read-only look first)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:  # unreadable, or no room for its -shm file
        raise FieldsyncError(f"cannot open {path} ({exc})") from None
    except sqlite3.Error as exc:
        raise FieldsyncError(f"{path} is not a fieldsync hub database ({exc})") from None
    if "_fieldsync_meta" in tables:
        return
    if "_fieldsync_state" in tables:
        raise FieldsyncError(f"{path} is an office database, not a hub database")
    if tables or not create:
        raise FieldsyncError(f"{path} is not a fieldsync hub database")


def _fingerprint(state: RecordState, column: str | None) -> str:
    """What must not change for a conflict's resolution to be safe to write."""
    if column is not None:
        return json.dumps([state.deleted, state.versions.get(column)])
    return json.dumps([state.deleted, state.versions], sort_keys=True)


def _check_unchanged(conflict_id: int, record: ConflictRecord, current: RecordState) -> None:
    """Raise unless the record is as it was right after the conflict was logged."""
    if _fingerprint(current, record.column) == record.state_after:
        return
    since = "it was deleted since"
    if not current.deleted:
        latest = (
            current.versions.get(record.column)
            if record.column is not None
            else max(current.versions.values(), default=None)
        )
        stamp = Timestamp.parse(latest) if latest else None
        since = f"{stamp.node} changed it at {stamp_time(latest)}" if stamp else "it changed"
    raise FieldsyncError(
        f"conflict {conflict_id}: the record changed after the conflict was logged "
        f"({since}); check it, then resolve again with --force to apply anyway"
    )


class HubStore(Protocol):
    """What the hub needs from its storage; every back end passes the same tests."""

    schema: Schema

    def add_node(self, name: str) -> str: ...

    def authenticate(self, token: str) -> str: ...

    def acked(self, node: str) -> int: ...

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
    ) -> PullPage: ...

    def conflicts(
        self, status: str | Sequence[str] | None = None, limit: int | None = None
    ) -> list[ConflictRecord]: ...

    def conflict_counts(self) -> dict[str, int]: ...

    def conflict(self, conflict_id: int) -> ConflictRecord: ...

    def nodes(self) -> list[dict[str, Any]]: ...

    def rejected(self, node: str | None = None) -> list[dict[str, Any]]: ...

    def rows(self, table: str) -> list[dict[str, Any]]: ...

    def resolve(
        self, conflict_id: int, keep: str, by: str, value: Any = None, *, force: bool = False
    ) -> ConflictRecord: ...

    def close(self) -> None: ...

    # -- admins, office status and history (see hub/monitor.py) ---------------

    def add_admin(self, name: str) -> str: ...

    def authenticate_admin(self, token: str) -> str: ...

    def start_session(self, admin: str) -> tuple[str, str]: ...

    def session(self, token: str) -> tuple[str, str] | None: ...

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

    def figures(self) -> dict[str, Any]: ...


class SqliteHubStore(MonitorStore):
    """Hub storage in one SQLite file (WAL, synchronous=FULL: an ack means durable)."""

    def __init__(
        self,
        path: str | Path,
        schema: Schema | None = None,
        *,
        max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
        now: Any = now_ms,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FieldsyncError(
                f"{path} does not exist; create the hub database by registering an office: "
                f"`fieldsync hub add-node NAME --db {path}`"
            )
        if self.path.exists():
            _check_hub_file(self.path, create)
        self.db = connect(self.path, synchronous="FULL")
        self._checkpointer = Checkpointer(self.db, self.path, synchronous="FULL")
        self._lock = threading.Lock()
        self._now = now
        self.max_future_ms = max_future_ms
        self.clock = HybridClock("hub", now)
        with self._lock, write(self.db) as conn:
            upgrade_history(conn)
            for statement in (_HUB_TABLES + MONITOR_TABLES).split(";"):
                if statement.strip():
                    conn.execute(statement)
            stored = conn.execute(
                "SELECT value FROM _fieldsync_meta WHERE key = 'schema'"
            ).fetchone()
            if stored is None:
                self.schema = schema or Schema.load()
                conn.execute(
                    "INSERT INTO _fieldsync_meta (key, value) VALUES ('schema', ?)",
                    [self.schema.source],
                )
            else:
                self.schema = Schema.from_toml(stored[0], f"the schema stored in {path}")
                if schema is not None and schema.source != stored[0]:
                    raise FieldsyncError(
                        f"hub database {path} already uses another schema; "
                        "omit --schema to use the stored one"
                    )
            create_tables(conn, self.schema)
            self._custom = {
                t.name: load_custom(t.policy)
                for t in self.schema.tables.values()
                if t.policy.startswith("custom:")
            }
            row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'hlc'").fetchone()
            if row is not None:
                self.clock.observe(int(row[0]))

    def close(self) -> None:
        self._checkpointer.close()
        with self._lock:
            self.db.conn.close()

    # -- offices and tokens ---------------------------------------------------

    def add_node(self, name: str) -> str:
        """Register an office and return its new token (only its hash is stored)."""
        check_node_name(name)
        if name == "hub":
            raise ValueError("the office name 'hub' is reserved")
        with self._lock, write(self.db) as conn:
            return new_token(
                conn, "_fieldsync_nodes", name, f"office {name!r} is already registered"
            )

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self.db.conn.execute(
                "SELECT name, created_at, acked_seq, last_seen_at, last_push_at, last_pull_at, "
                "revoked_at FROM _fieldsync_nodes ORDER BY name"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def authenticate(self, token: str) -> str:
        """Return the office that owns ``token``; raise AuthError otherwise."""
        with self._lock:
            row = self.db.conn.execute(
                "SELECT name, revoked_at FROM _fieldsync_nodes WHERE token_hash = ?",
                [hash_token(token)],
            ).fetchone()
        if row is None and self.is_admin_token(token):
            raise AuthError(
                "an admin token cannot push or pull; the office syncs with its own token",
                "forbidden",
                403,
            )
        if row is None or row[1] is not None:
            raise AuthError("unknown or revoked token", "unauthorized", 401)
        return str(row[0])

    def acked(self, node: str) -> int:
        """The number of ``node``'s last change the hub has dealt with (0: none)."""
        with self._lock:
            row = self.db.conn.execute(
                "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
            ).fetchone()
        if row is None:
            raise FieldsyncError(f"there is no office {node!r}")
        return int(row[0])

    # -- push -----------------------------------------------------------------

    def _check_change(self, change: Change) -> Table:
        """Return the change's table; raise InvalidChangeError if the schema cannot take it."""
        table = self.schema.tables.get(change.table) or self.schema.table(change.table)
        table.check_pk(change.pk)
        if change.values is not None:
            table.check_values(change.values)
            for name in table.primary_key:
                if change.values.get(name, change.pk[name]) != change.pk[name]:
                    raise InvalidChangeError(
                        f"values of {change.table} contradict its primary key {name}"
                    )
        for name in change.base:
            if name != EXISTS:
                table.check_value(name, None)  # the column exists
        return table

    def push(self, node: str, changes: Sequence[Change]) -> PushResult:
        """Apply a batch; changes already acknowledged are skipped (and checked).

        The batch commits as one transaction, and only once it is durable does the
        hub answer. A change the hub cannot take (a value the schema refuses, a
        broken constraint) does not stop the others: it is set aside as rejected,
        with its reason, and reported back with the record as the hub holds it.
        Records are merged in memory and written once per batch; only when that
        write breaks a constraint is the batch redone change by change, to find
        the culprits.
        """
        skew: ClockSkewError | None = None
        with self._lock:
            with write(self.db) as conn:
                conn.execute("SAVEPOINT batch")
                try:
                    outcome = self._push(conn, node, changes, per_change=False)
                    conn.execute("RELEASE batch")
                except sqlite3.IntegrityError:
                    conn.execute("ROLLBACK TO batch")
                    conn.execute("RELEASE batch")
                    outcome = self._push(conn, node, changes, per_change=True)
                acked, applied, conflicts, rejected, skew = outcome
        self._checkpointer.poke()
        if skew is not None:
            # What came before the skewed change is committed: its acked says so.
            raise skew
        return PushResult(acked, applied, conflicts, self._now(), node, rejected)

    def _push(
        self, conn: sqlite3.Connection, node: str, changes: Sequence[Change], *, per_change: bool
    ) -> tuple[int, int, int, list[Rejection], ClockSkewError | None]:
        acked = conn.execute(
            "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
        ).fetchone()[0]
        seq = self._last_seq(conn)
        hub_now = self._now()
        future = hub_now + self.max_future_ms  # a change stamped past it is refused
        replays = [c for c in changes if c.seq <= acked]
        receipts, earlier_rejections = self._receipts(conn, node, replays)
        keys = self._keys(changes)
        fresh = [k for k, c in zip(keys, changes, strict=True) if c.seq > acked]
        seqs: dict[tuple[str, str], int] = {}
        states = self._load_many(conn, fresh, seqs)
        dirty: dict[tuple[str, str], _Write] = {}
        conflict_rows: list[list[Any]] = []
        new_receipts: list[tuple[int, int]] = []
        history: list[_Version] = []
        rejected: list[tuple[Change, str]] = []
        applied = conflicts = newest = 0
        now = utcnow()
        skew: ClockSkewError | None = None
        for index, change in enumerate(changes):
            if change.seq <= acked:
                self._check_replay(node, change, acked, receipts)
                if change.seq in earlier_rejections:
                    rejected.append((change, earlier_rejections[change.seq]))
                continue
            if change.ts.hlc >> COUNTER_BITS > future:
                try:
                    self._check_clock(node, change, hub_now, acked)
                except ClockSkewError as exc:
                    skew = exc
                    break
            try:
                table = self._check_change(change)
            except InvalidChangeError as exc:
                rejected.append((change, str(exc)))
                new_receipts.append((change.seq, change.receipt))
                acked = change.seq
                continue
            ref = keys[index] or (table.name, table.pk_key(change.pk))
            key = ref[1]
            entry = dirty.get(ref)
            current = entry[3] if entry else states.get(ref)
            prev = entry[4] if entry else seqs.get(ref)
            stamp = str(change.ts)
            outcome = self._merge(table, current, change, stamp)
            found = [
                self._conflict_row(table.name, key, c, outcome.state) for c in outcome.conflicts
            ]
            seq += 1
            origin = node if outcome.exact else None
            vals = None if change.values is None else dumps_text(change.values)
            # A record new to the hub holds just the change's values: the same text.
            same = vals if current is None else None
            if per_change:
                conn.execute("SAVEPOINT change")
                try:
                    self._write_records(
                        conn, [(table, key, change.pk, outcome.state, seq, origin, same)]
                    )
                    self._write_conflicts(conn, found)
                    conn.execute("RELEASE change")
                except sqlite3.IntegrityError as exc:
                    conn.execute("ROLLBACK TO change")
                    conn.execute("RELEASE change")
                    seq -= 1
                    reason = f"the record would break a constraint of table {table.name} ({exc})"
                    rejected.append((change, reason))
                    new_receipts.append((change.seq, change.receipt))
                    acked = change.seq
                    continue
            else:
                conflict_rows.extend(found)
            dirty[ref] = (table, key, change.pk, outcome.state, seq, origin, same)
            history.append((seq, prev, table.name, key, node, stamp, change.op, vals, now))
            conflicts += len(found)
            applied += 1
            acked = change.seq
            newest = max(newest, change.ts.hlc)
            new_receipts.append((change.seq, change.receipt))
        self.clock.observe(newest)
        if not per_change:
            self._write_records(conn, dirty.values())
            self._write_conflicts(conn, conflict_rows)
        _write_receipts(conn, node, new_receipts)
        _write_history(conn, history)
        count_push(conn, node, applied)
        conn.executemany(
            "INSERT OR IGNORE INTO _fieldsync_rejected (node, seq, tbl, pk, op, reason, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (node, c.seq, c.table, json.dumps(list(c.pk.values())), c.op, reason, now)
                for c, reason in rejected
            ],
        )
        conn.execute(
            "UPDATE _fieldsync_nodes SET acked_seq = ?, last_seen_at = ?, last_push_at = ? "
            "WHERE name = ?",
            [acked, now, now, node],
        )
        self._save_meta(conn, seq)
        return acked, applied, conflicts, self._rejections(conn, rejected), skew

    def _rejections(
        self, conn: sqlite3.Connection, rejected: list[tuple[Change, str]]
    ) -> list[Rejection]:
        """Each rejected change, with its record as the hub now holds it (None: unknown)."""
        found = []
        for change, reason in rejected:
            record = None
            table = self.schema.tables.get(change.table)
            if table is not None:
                try:
                    key = table.pk_key(table.check_pk(change.pk))
                except InvalidChangeError:
                    key = None
                row = (
                    conn.execute(
                        "SELECT seq, deleted, vals, vers FROM _fieldsync_records "
                        "WHERE tbl = ? AND pk = ?",
                        [table.name, key],
                    ).fetchone()
                    if key is not None
                    else None
                )
                if row is not None:
                    record = self._pull_row(table, change.pk, *row)
            found.append(Rejection(change.seq, reason, record))
        return found

    def _merge(
        self, table: Table, current: RecordState | None, change: Change, stamp: str
    ) -> Outcome:
        custom = self._custom.get(table.name)
        decided = None
        if custom is not None and current is not None:
            # A value the function decides is the hub's write, stamped after the change.
            self.clock.observe(change.ts.hlc)
            decided = str(self.clock.tick())
        try:
            outcome = merge(
                current, change, table.policy, custom, stamp=stamp, decided_stamp=decided
            )
        except Exception as exc:
            if custom is None:
                raise
            # The hub's own merge function failed: nothing of the batch is applied and
            # the office retries later; the message names the function, not the data.
            raise FieldsyncError(
                f"the custom merge function of table {table.name} ({table.policy}) failed "
                f"with {type(exc).__name__}; fix it on the hub"
            ) from exc
        if custom is not None:
            for name, value in outcome.state.values.items():
                try:
                    table.check_value(name, value)
                except InvalidChangeError as exc:
                    raise FieldsyncError(
                        f"the custom merge function of table {table.name} returned a bad "
                        f"record: {exc}; fix it on the hub"
                    ) from None
        return outcome

    def _receipts(
        self, conn: sqlite3.Connection, node: str, replays: Sequence[Change]
    ) -> tuple[dict[int, int], dict[int, str]]:
        """Receipts and earlier rejections of the replayed changes, by seq."""
        if not replays:
            return {}, {}
        low, high = min(c.seq for c in replays), max(c.seq for c in replays)
        receipts = dict(
            conn.execute(
                "SELECT seq, hlc FROM _fieldsync_receipts WHERE node = ? AND seq BETWEEN ? AND ?",
                [node, low, high],
            ).fetchall()
        )
        for (text,) in conn.execute(
            "SELECT receipts FROM _fieldsync_receipt_batches "
            "WHERE node = ? AND last_seq >= ? AND first_seq <= ?",
            [node, low, high],
        ):
            receipts.update((seq, hlc) for seq, hlc in loads(text) if low <= seq <= high)
        rejections = dict(
            conn.execute(
                "SELECT seq, reason FROM _fieldsync_rejected "
                "WHERE node = ? AND seq BETWEEN ? AND ?",
                [node, low, high],
            ).fetchall()
        )
        return receipts, rejections

    def _keys(self, changes: Sequence[Change]) -> list[tuple[str, str] | None]:
        """Each change's (table, key text); None where the table or key is bad."""
        found: list[tuple[str, str] | None] = []
        for change in changes:
            table = self.schema.tables.get(change.table)
            try:
                found.append((table.name, table.pk_key(change.pk)) if table else None)
            except (KeyError, TypeError, ValueError):
                found.append(None)  # rejected when the change is checked
        return found

    def _load_many(
        self,
        conn: sqlite3.Connection,
        keys: Sequence[tuple[str, str] | None],
        seqs: dict[tuple[str, str], int] | None = None,
    ) -> dict[tuple[str, str], RecordState]:
        """The stored state of each record named by (table, key text), in a few queries.

        ``seqs``, if given, gets each found record's hub seq.
        """
        wanted: dict[str, set[str]] = {}
        for ref in keys:
            if ref is not None:
                wanted.setdefault(ref[0], set()).add(ref[1])
        found: dict[tuple[str, str], RecordState] = {}
        for name, names in wanted.items():
            listed = sorted(names)
            for start in range(0, len(listed), 500):
                chunk = listed[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                unpack = self.schema.tables[name].unpack_versions
                for pk, vals, vers, deleted, seq in conn.execute(
                    "SELECT pk, vals, vers, deleted, seq FROM _fieldsync_records "
                    f"WHERE tbl = ? AND pk IN ({marks})",
                    [name, *chunk],
                ):
                    found[(name, pk)] = RecordState(loads(vals), unpack(vers), bool(deleted))
                    if seqs is not None:
                        seqs[(name, pk)] = seq
        return found

    def _write_records(
        self,
        conn: sqlite3.Connection,
        records: Iterable[_Write],
    ) -> None:
        """Store records' states and mirror them into the real tables."""
        rows = []
        mirrored: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
        for table, key, pk, state, seq, origin, vals in records:
            rows.append(
                (
                    table.name,
                    key,
                    seq,
                    origin,
                    int(state.deleted),
                    dumps_text(state.values) if vals is None else vals,
                    table.pack_versions(state.versions),
                )
            )
            mirrored.setdefault(table.name, []).append(
                (pk, None if state.deleted else state.values)
            )
        conn.executemany(
            "INSERT INTO _fieldsync_records (tbl, pk, seq, origin, deleted, vals, vers) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tbl, pk) DO UPDATE SET "
            "seq = excluded.seq, origin = excluded.origin, deleted = excluded.deleted, "
            "vals = excluded.vals, vers = excluded.vers",
            rows,
        )
        for name, records_of_table in mirrored.items():  # one entry per record
            put_rows(conn, self.schema.tables[name], records_of_table)

    def _check_clock(self, node: str, change: Change, hub_now: int, acked: int) -> None:
        if change.ts.wall_ms <= hub_now + self.max_future_ms:
            return
        ahead_s = (change.ts.wall_ms - hub_now) / 1000
        raise ClockSkewError(
            f"change {change.seq} is stamped {ahead_s:.0f} s ahead of the hub's clock; "
            f"the clock of office {node} is wrong (the limit is "
            f"{self.max_future_ms / 1000:.0f} s); the changes stay queued on the office",
            "clock_skew",
            422,
            details={"acked": acked},
        )

    def _check_replay(
        self, node: str, change: Change, acked: int, receipts: dict[int, int]
    ) -> None:
        """Pass a change the hub already committed; raise if its number was reused."""
        if receipts.get(change.seq) == change.receipt:
            return
        # Same number, other change: the office database was restored from an older
        # copy and numbers its new changes as the hub has already seen them.
        raise HubRejectedError(
            f"change {change.seq} of office {node} is not the change {change.seq} the hub "
            "committed: the office database was restored from an older copy; its queued "
            "changes must be renumbered (fieldsync does this by itself)",
            "diverged",
            409,
            details={"acked": acked, "diverged_at": change.seq},
        )

    def _last_seq(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0

    def _save_meta(self, conn: sqlite3.Connection, seq: int) -> None:
        conn.execute(
            "INSERT INTO _fieldsync_meta (key, value) VALUES ('seq', ?), ('hlc', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [str(seq), str(self.clock.last)],
        )

    def _load(self, conn: sqlite3.Connection, table: str, pk: str) -> RecordState | None:
        return self._load_many(conn, [(table, pk)]).get((table, pk))

    def _conflict_row(
        self, table: str, key: str, conflict: Conflict, state: RecordState
    ) -> list[Any]:
        return [
            utcnow(),
            table,
            key,
            conflict.kind,
            conflict.column,
            json.dumps(conflict.kept_value, ensure_ascii=False),
            conflict.kept_version,
            Timestamp.parse(conflict.kept_version).node if conflict.kept_version else None,
            json.dumps(conflict.other_value, ensure_ascii=False),
            conflict.other_version,
            Timestamp.parse(conflict.other_version).node,
            "open" if conflict.open else "logged",
            json.dumps(conflict.merged, ensure_ascii=False) if conflict.kind == "custom" else None,
            _fingerprint(state, conflict.column),
        ]

    def _write_conflicts(self, conn: sqlite3.Connection, rows: Sequence[list[Any]]) -> None:
        conn.executemany(
            "INSERT INTO _fieldsync_conflicts (created_at, tbl, pk, kind, col, kept_value, "
            "kept_version, kept_node, other_value, other_version, other_node, status, "
            "merged, state_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # -- pull -----------------------------------------------------------------

    def pull(
        self,
        node: str,
        cursor: int,
        limit: int,
        *,
        include_own: bool = False,
        count: bool = False,
        packed: bool = False,
    ) -> PullPage:
        """Records changed after ``cursor``, except those ``node`` already has.

        ``include_own`` sends those too: for an office rebuilding its copy. ``count``
        adds how many records the office has left to pull. ``packed``: a record whose
        columns all carry one version gets that version alone (see PullRow).
        """
        # The page, and what is left after it (as many records as the office is behind),
        # are read on a snapshot of their own, so a long read holds up no push; only
        # the note of the pull waits for the store.
        with read_snapshot(self.path) as conn:
            last = self._last_seq(conn)
            if cursor > last:
                # A cursor from the future: this hub was restored from an older
                # backup. Serve everything again so the office converges.
                log.warning("office %s pulls from %d, past the last seq %d", node, cursor, last)
                cursor = 0
            rows = conn.execute(
                "SELECT tbl, pk, seq, deleted, vals, vers FROM _fieldsync_records "
                "WHERE seq > ? AND (origin IS NULL OR origin != ?) ORDER BY seq LIMIT ?",
                [cursor, "" if include_own else node, limit + 1],
            ).fetchall()
            acked = conn.execute(
                "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
            ).fetchone()[0]
            remaining = None
            if count:
                remaining = conn.execute(
                    "SELECT count(*) FROM _fieldsync_records "
                    "WHERE seq > ? AND (origin IS NULL OR origin != ?)",
                    [cursor, "" if include_own else node],
                ).fetchone()[0]
        more = len(rows) > limit
        rows = rows[:limit]
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE _fieldsync_nodes SET last_seen_at = ?, last_pull_at = ? WHERE name = ?",
                [utcnow(), utcnow(), node],
            )
            count_pull(conn, node, len(rows), rows[-1][2] if more else last)
        page_rows = []
        for tbl, pk, seq, deleted, vals, vers in rows:
            table = self.schema.table(tbl)
            pk_dict = dict(zip(table.primary_key, loads(pk), strict=True))
            page_rows.append(self._pull_row(table, pk_dict, seq, deleted, vals, vers, packed))
        next_cursor = rows[-1][2] if more else last
        return PullPage(page_rows, next_cursor, more, self._now(), node, acked, remaining)

    def _pull_row(
        self,
        table: Table,
        pk: dict[str, Any],
        seq: int,
        deleted: int,
        vals: str,
        vers: str,
        packed: bool = False,
    ) -> PullRow:
        values = None
        if not deleted:
            stored = loads(vals)
            columns = table.column_names
            # Stored values name known columns only: all of them when as many.
            values = stored if len(stored) == len(columns) else {c: stored.get(c) for c in columns}
        # Stored versions are packed already (Table.pack_versions).
        versions = loads(vers) if packed else table.unpack_versions(vers)
        return PullRow(seq, table.name, pk, values, versions)

    # -- rejected changes -----------------------------------------------------

    def rejected(self, node: str | None = None) -> list[dict[str, Any]]:
        """Changes the hub set aside, newest first: office, number, record key, reason.

        ``node``: only that office's (FieldsyncError if there is no such office).

        The values stay at the office that made them; only the key and the reason
        are kept here.
        """
        sql = (
            "SELECT node, seq, tbl, pk, op, reason, created_at FROM _fieldsync_rejected"
            + (" WHERE node = ?" if node else "")
            + " ORDER BY created_at DESC, node, seq DESC"
        )
        with self._lock:
            if (
                node
                and not self.db.conn.execute(
                    "SELECT 1 FROM _fieldsync_nodes WHERE name = ?", [node]
                ).fetchone()
            ):
                raise FieldsyncError(f"there is no office {node!r}")
            rows = self.db.conn.execute(sql, [node] if node else []).fetchall()
        found = []
        for office, seq, tbl, pk, op, reason, created_at in rows:
            table = self.schema.tables.get(tbl)
            keys = table.primary_key if table else ()
            values = json.loads(pk)
            found.append(
                {
                    "node": office,
                    "seq": seq,
                    "table": tbl,
                    "pk": dict(zip(keys, values, strict=False)) if keys else values,
                    "op": op,
                    "reason": reason,
                    "created_at": created_at,
                }
            )
        return found

    # -- conflicts ------------------------------------------------------------

    def conflicts(
        self, status: str | Sequence[str] | None = None, limit: int | None = None
    ) -> list[ConflictRecord]:
        """The conflict log, newest first; ``status`` filters (logged, open, resolved;
        one or several), ``limit`` keeps the newest ones."""
        sql = "SELECT * FROM _fieldsync_conflicts"
        params: list[Any] = []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            params.extend(statuses)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self.db.conn.execute(sql, params).fetchall()
        return [self._conflict(row) for row in rows]

    def conflict_counts(self) -> dict[str, int]:
        """How many conflicts the log holds, by status (open, logged, resolved)."""
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT status, count(*) FROM _fieldsync_conflicts GROUP BY status"
            ).fetchall()
        return {"open": 0, "logged": 0, "resolved": 0, **dict(rows)}

    def conflict(self, conflict_id: int) -> ConflictRecord:
        if not 0 < conflict_id < 2**63:  # past SQLite's integers: no such row either
            raise FieldsyncError(f"there is no conflict {conflict_id}")
        with self._lock:
            row = self.db.conn.execute(
                "SELECT * FROM _fieldsync_conflicts WHERE id = ?", [conflict_id]
            ).fetchone()
        if row is None:
            raise FieldsyncError(f"there is no conflict {conflict_id}")
        return self._conflict(row)

    def _conflict(self, row: Sequence[Any]) -> ConflictRecord:
        table = self.schema.tables.get(row[2])
        keys = table.primary_key if table else ("pk",)
        return ConflictRecord(
            id=row[0],
            created_at=row[1],
            table=row[2],
            pk=dict(zip(keys, json.loads(row[3]), strict=False)),
            kind=row[4],
            column=row[5],
            kept_value=json.loads(row[6]) if row[6] is not None else None,
            kept_version=row[7],
            kept_node=row[8],
            other_value=json.loads(row[9]) if row[9] is not None else None,
            other_version=row[10],
            other_node=row[11],
            status=row[12],
            resolved_by=row[13],
            resolved_at=row[14],
            resolution=json.loads(row[15]) if row[15] is not None else None,
            merged=json.loads(row[16]) if row[16] is not None else None,
            state_after=row[17],
        )

    def resolve(
        self, conflict_id: int, keep: str, by: str, value: Any = None, *, force: bool = False
    ) -> ConflictRecord:
        """Settle a conflict: keep the ``kept`` side, the ``other`` side, or a ``value``.

        The decision is written as a new hub change with a fresh stamp, so it reaches
        every office on its next pull. If the record changed since the conflict was
        logged, writing the decision would silently undo that newer change, so it is
        refused unless ``force`` is given.
        """
        if keep not in ("kept", "other", "value"):
            raise ValueError(f"keep must be 'kept', 'other' or 'value', not {keep!r}")
        record = self.conflict(conflict_id)
        if record.status == "resolved":
            raise FieldsyncError(
                f"conflict {conflict_id} was already resolved by {record.resolved_by} "
                f"at {record.resolved_at}"
            )
        table = self.schema.table(record.table)
        if keep == "value":
            if record.column is None:
                raise FieldsyncError(
                    f"conflict {conflict_id} is about a whole record; keep 'kept' or 'other'"
                )
            table.check_value(record.column, value)
        key = table.pk_key(record.pk)
        try:
            self._resolve(conflict_id, record, table, key, keep, by, value, force)
        except sqlite3.IntegrityError as exc:
            raise InvalidChangeError(
                f"cannot resolve conflict {conflict_id} that way: the value breaks a "
                f"constraint of {table.name} ({exc}); nothing was changed"
            ) from exc
        return self.conflict(conflict_id)

    def _resolve(
        self,
        conflict_id: int,
        record: ConflictRecord,
        table: Table,
        key: str,
        keep: str,
        by: str,
        value: Any,
        force: bool,
    ) -> None:
        with self._lock, write(self.db) as conn:
            status = conn.execute(
                "SELECT status, resolved_by FROM _fieldsync_conflicts WHERE id = ?", [conflict_id]
            ).fetchone()
            if status[0] == "resolved":  # by someone else since we looked
                raise FieldsyncError(f"conflict {conflict_id} was just resolved by {status[1]}")
            current = self._load(conn, table.name, key)
            if current is None:
                raise FieldsyncError(f"the record of conflict {conflict_id} is gone")
            writes = keep != "kept" or record.kind == "custom"
            if writes and not force:
                _check_unchanged(conflict_id, record, current)
            for version in current.versions.values():
                self.clock.observe(Timestamp.parse(version).hlc)
            ts = str(self.clock.tick())
            state = RecordState(dict(current.values), dict(current.versions), current.deleted)
            chosen: dict[str, Any] = {}
            if record.column is not None and writes:
                sides = {"value": value, "other": record.other_value, "kept": record.kept_value}
                chosen = {record.column: sides[keep]}
            elif keep == "other" and isinstance(record.other_value, dict):
                chosen = record.other_value  # a whole record
            elif keep == "other" and record.kind == "delete":
                state.deleted = True
                state.versions[EXISTS] = ts
            for col, val in chosen.items():
                state.values[col] = val
                state.versions[col] = ts
            if chosen and state.deleted:  # writing a value brings the record back
                state.deleted = False
                state.versions[EXISTS] = ts
            if state != current:
                prev = conn.execute(
                    "SELECT seq FROM _fieldsync_records WHERE tbl = ? AND pk = ?",
                    [table.name, key],
                ).fetchone()[0]
                seq = self._last_seq(conn) + 1
                self._write_records(conn, [(table, key, record.pk, state, seq, None, None)])
                self._save_meta(conn, seq)
                change = {"deleted": True} if state.deleted else chosen
                _write_history(
                    conn,
                    [
                        (
                            seq,
                            prev,
                            table.name,
                            key,
                            f"admin {by}",
                            ts,
                            "resolve",
                            dumps_text(change),
                            utcnow(),
                        )
                    ],
                )
            resolution = {"keep": keep, "value": value} if keep == "value" else {"keep": keep}
            conn.execute(
                "UPDATE _fieldsync_conflicts SET status = 'resolved', resolved_by = ?, "
                "resolved_at = ?, resolution = ? WHERE id = ?",
                [by, utcnow(), json.dumps(resolution, ensure_ascii=False), conflict_id],
            )

    # -- consolidated data ----------------------------------------------------

    def record_history(self, table: str, pk: Sequence[Any]) -> list[dict[str, Any]]:
        """Every version of one record the hub took, oldest first: who, when, what."""
        found = self.schema.table(table)
        if len(pk) != len(found.primary_key):
            raise InvalidChangeError(
                f"the key of {table} has {len(found.primary_key)} part(s): "
                f"{', '.join(found.primary_key)}"
            )
        return self._history(table, found.pk_key(dict(zip(found.primary_key, pk, strict=True))))

    def figures(self) -> dict[str, Any]:
        """Consolidated figures for headquarters (see hub/report.py)."""
        with self._lock:
            return report.figures(self.db.conn, self.schema)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every live record of ``table``, ordered by primary key."""
        with self._lock:
            return table_rows(self.db.conn, self.schema.table(table))


# A version of a record for its history: hub seq, the seq of the record's version before
# (None: the first), table, key, who, stamp, op, the values the change set, time received.
_Version = tuple[int, int | None, str, str, str, str, str, str | None, str]


# Every receipt, either way it is kept: (office, change number, stamp as captured).
ALL_RECEIPTS = (
    "SELECT node, seq, hlc FROM _fieldsync_receipts UNION ALL "
    "SELECT b.node, r.value ->> 0, r.value ->> 1 "
    "FROM _fieldsync_receipt_batches AS b, json_each(b.receipts) AS r"
)


def _write_receipts(
    conn: sqlite3.Connection, node: str, receipts: Sequence[tuple[int, int]]
) -> None:
    """Keep the (number, stamp as captured) of each change of a batch the hub dealt with.

    One row per batch: a row per change cost the hub about 4% of its CPU per pushed
    change. Hubs before it kept them a row each in _fieldsync_receipts, still read.
    """
    if receipts:
        conn.execute(
            "INSERT INTO _fieldsync_receipt_batches (node, last_seq, first_seq, receipts) "
            "VALUES (?, ?, ?, ?)",
            [node, receipts[-1][0], receipts[0][0], dumps_text(receipts)],
        )


def _write_history(conn: sqlite3.Connection, rows: Sequence[_Version]) -> None:
    """Keep each version a record went through (see _Version)."""
    conn.executemany(
        "INSERT INTO _fieldsync_history (seq, prev, tbl, pk, actor, ts, op, vals, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
