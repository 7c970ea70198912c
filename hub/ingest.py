"""
Push: how the hub takes a batch of an office's changes.

Each change is checked against the schema and the hub's clock, run through
:func:`shared.merge.merge` against the record as the hub holds it, and gets the next
hub ``seq``. A record whose last change came from office X, applied exactly as X
already has it, is marked with origin X and not sent back to X.

A push is idempotent, keyed on the office and its change numbers: the hub keeps a
receipt (number, stamp as captured) of every change it dealt with, so a retried batch
applies nothing twice, and a reused number (an office restored from an older copy)
is told apart from a retry.

This is the benchmark's hot path: records are merged in memory and written with one
statement per batch and table (plain SQL, no per-change statement), so keep
per-change work out of anything added here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hub import records
from hub.compact import purge_refusal
from hub.conflicts import conflict_row, write_conflicts
from hub.database import HubDatabase
from hub.engine import Conn, dialect_of
from hub.epoch import read_epoch
from hub.history import Version, write_history
from hub.rejected import write_rejected
from hub.schemas import without_dropped
from hub.scopes import UNASSIGNED, Gate, Move, exits_and_followers
from hub.status import count_push
from hub.times import utcnow
from shared.clock import COUNTER_BITS
from shared.errors import ClockSkewError, FieldsyncError, HubRejectedError, InvalidChangeError
from shared.merge import Outcome, RecordState, merge
from shared.protocol import Change, PushResult, Rejection, dumps_text, loads
from shared.schema import EXISTS, RecordKey, Table

DEFAULT_MAX_FUTURE_MS = 5 * 60 * 1000

# Every receipt, either way it is kept: (office, change number, stamp as captured).
# SQLite's SQL, for tools and tests reading a hub file; all_receipts reads any engine.
ALL_RECEIPTS = (
    "SELECT node, seq, hlc FROM _fieldsync_receipts UNION ALL "
    "SELECT b.node, r.value ->> 0, r.value ->> 1 "
    "FROM _fieldsync_receipt_batches AS b, json_each(b.receipts) AS r"
)

_Outcome = tuple[int, int, int, list[Rejection], ClockSkewError | None]


def all_receipts(conn: Conn) -> list[tuple[str, int, int]]:
    """Every receipt, either way it is kept: (office, change number, stamp as captured)."""
    found = [
        (str(node), int(seq), int(hlc))
        for node, seq, hlc in conn.execute("SELECT node, seq, hlc FROM _fieldsync_receipts")
    ]
    for node, text in conn.execute("SELECT node, receipts FROM _fieldsync_receipt_batches"):
        found.extend((str(node), int(seq), int(hlc)) for seq, hlc in loads(text))
    return found


class Ingest:
    """Takes pushes into ``hub``; refuses changes stamped past ``max_future_ms`` ahead."""

    def __init__(self, hub: HubDatabase, *, max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> None:
        self.hub = hub
        self.max_future_ms = max_future_ms

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
        with self.hub.write() as conn:
            conn.execute("SAVEPOINT batch")
            try:
                outcome = self._push(conn, node, changes, per_change=False)
                conn.execute("RELEASE batch")
            except dialect_of(conn).integrity_errors:
                conn.execute("ROLLBACK TO batch")
                conn.execute("RELEASE batch")
                outcome = self._push(conn, node, changes, per_change=True)
            acked, applied, conflicts, rejected, skew = outcome
            epoch = read_epoch(conn)  # the hub's identity (hub/epoch.py)
        self.hub.after_write()
        if skew is not None:
            # What came before the skewed change is committed: its acked says so.
            raise skew
        return PushResult(acked, applied, conflicts, self.hub.now(), node, rejected, epoch=epoch)

    def _push(
        self, conn: Conn, node: str, changes: Sequence[Change], *, per_change: bool
    ) -> _Outcome:
        schema, clock = self.hub.schema, self.hub.clock
        dialect = dialect_of(conn)
        # The office's row first, locked to the end (PostgreSQL): then its stats row, in
        # this order in every transaction that writes both (no deadlock with a pull).
        acked = conn.execute(
            "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?" + dialect.for_update, [node]
        ).fetchone()[0]
        seq = records.last_seq(conn)
        hub_now = self.hub.now()
        future = hub_now + self.max_future_ms  # a change stamped past it is refused
        replays = [c for c in changes if c.seq <= acked]
        receipts, earlier_rejections = _receipts(conn, node, replays)
        keys = self._keys(changes)
        fresh = [k for k, c in zip(keys, changes, strict=True) if c.seq > acked]
        seqs: dict[RecordKey, int] = {}
        states = records.load_many(conn, schema, fresh, seqs)
        gate = Gate(conn, schema, node, [k for k in fresh if k is not None])
        if gate.active:
            gate.locator.prefetch(
                (schema.tables[c.table], c.values)
                for c in changes
                if c.seq > acked and c.table in schema.tables
            )
        moves: dict[RecordKey, Move] = {}  # each scoped record written: where it was, is
        out_of_scope: set[int] = set()
        dirty: dict[RecordKey, records.RecordWrite] = {}
        conflict_rows: list[list[Any]] = []
        new_receipts: list[tuple[int, int]] = []
        history: list[Version] = []
        rejected: list[tuple[Change, str]] = []
        applied = conflicts = newest = 0
        last_stamp = ""
        now = utcnow()
        skew: ClockSkewError | None = None
        for index, change in enumerate(changes):
            if change.seq <= acked:
                _check_replay(node, change, acked, receipts)
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
                try:
                    table = self._check_change(change)
                except InvalidChangeError:
                    # Columns a schema change dropped, in a change made before: left out.
                    fewer = without_dropped(conn, schema, change)
                    if fewer is change:
                        raise
                    change = fewer
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
            if current is None and change.op == "update" and change.base:
                # An edit of a copy of a record deleted and purged: not brought back.
                purged = purge_refusal(conn, table, change.base)
                if purged is not None:
                    rejected.append((change, purged))
                    new_receipts.append((change.seq, change.receipt))
                    acked = change.seq
                    continue
            if gate.active:
                refused = (
                    gate.allows_new(table, gate.locator.place(table, change.values or {}))
                    if current is None
                    else gate.refuse(table, ref, True)
                )
                if refused is not None:
                    rejected.append((change, refused))
                    out_of_scope.add(change.seq)
                    new_receipts.append((change.seq, change.receipt))
                    acked = change.seq
                    continue
            stamp = str(change.ts)
            outcome = self._merge(table, current, change, stamp)
            found = [conflict_row(table.name, key, c, outcome.state) for c in outcome.conflicts]
            seq += 1
            origin = node if outcome.exact else None
            vals = None if change.values is None else dumps_text(change.values)
            # A record new to the hub holds just the change's values: the same text.
            same = vals if current is None else None
            scope = parent = None
            if gate.active:
                scope, parent = gate.locator.place(table, outcome.state.values)
            if scope is not None:
                gate.locator.batch[ref] = scope
                before = moves[ref][2] if ref in moves else gate.before.get(ref)
                moves[ref] = (table, key, before, scope, seq)
            if per_change:
                conn.execute("SAVEPOINT change")
                try:
                    records.write_records(
                        conn,
                        schema,
                        [(table, key, change.pk, outcome.state, seq, origin, same, scope, parent)],
                    )
                    write_conflicts(conn, found)
                    conn.execute("RELEASE change")
                except dialect.integrity_errors as exc:
                    conn.execute("ROLLBACK TO change")
                    conn.execute("RELEASE change")
                    seq -= 1
                    reason = (
                        f"the record would break a constraint of table {table.name} "
                        f"({dialect.describe(exc)})"
                    )
                    rejected.append((change, reason))
                    new_receipts.append((change.seq, change.receipt))
                    acked = change.seq
                    if scope is not None:  # where it was before this change
                        gate.locator.batch.pop(ref, None)
                        if entry is not None and entry[7] is not None:
                            gate.locator.batch[ref] = entry[7]
                    continue
            else:
                conflict_rows.extend(found)
            dirty[ref] = (table, key, change.pk, outcome.state, seq, origin, same, scope, parent)
            last_stamp = stamp
            history.append((seq, prev, table.name, key, node, stamp, change.op, vals, now))
            conflicts += len(found)
            applied += 1
            acked = change.seq
            newest = max(newest, change.ts.hlc)
            new_receipts.append((change.seq, change.receipt))
        clock.observe(newest)
        if not per_change:
            records.write_records(conn, schema, dirty.values())
            write_conflicts(conn, conflict_rows)
        if moves:
            final = [
                (t, k, before, dirty[ref][7] or UNASSIGNED, dirty[ref][4])
                for ref, (t, k, before, _, _) in moves.items()
                if ref in dirty
            ]
            seq = exits_and_followers(
                conn,
                schema,
                final,
                gate.returned,
                seq,
                history,
                actor=node,
                stamp=last_stamp,
                now=now,
            )
        _write_receipts(conn, node, new_receipts)
        write_history(conn, history)
        write_rejected(conn, node, rejected, now)
        conn.execute(
            "UPDATE _fieldsync_nodes SET acked_seq = ?, last_seen_at = ?, last_push_at = ? "
            "WHERE name = ?",
            [acked, now, now, node],
        )
        count_push(conn, node, applied)  # after the office's row (see above)
        records.save_meta(conn, seq, clock)
        return acked, applied, conflicts, self._rejections(conn, rejected, out_of_scope), skew

    def _check_change(self, change: Change) -> Table:
        """Return the change's table; raise InvalidChangeError if the schema cannot take it."""
        schema = self.hub.schema
        table = schema.tables.get(change.table) or schema.table(change.table)
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

    def _rejections(
        self,
        conn: Conn,
        rejected: list[tuple[Change, str]],
        out_of_scope: set[int],
    ) -> list[Rejection]:
        """Each rejected change, with its record as the hub now holds it (None: unknown,
        or outside the office's scope: the office drops its copy)."""
        found = []
        for change, reason in rejected:
            record = None
            table = self.hub.schema.tables.get(change.table)
            if table is not None and change.seq not in out_of_scope:
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
                    record = records.pull_row(table, change.pk, *row)
            found.append(Rejection(change.seq, reason, record))
        return found

    def _merge(
        self, table: Table, current: RecordState | None, change: Change, stamp: str
    ) -> Outcome:
        custom = self.hub.custom.get(table.name)
        decided = None
        if custom is not None and current is not None:
            # A value the function decides is the hub's write, stamped after the change.
            self.hub.clock.observe(change.ts.hlc)
            decided = str(self.hub.clock.tick())
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

    def _keys(self, changes: Sequence[Change]) -> list[RecordKey | None]:
        """Each change's (table, key text); None where the table or key is bad."""
        found: list[RecordKey | None] = []
        tables = self.hub.schema.tables
        for change in changes:
            table = tables.get(change.table)
            try:
                found.append((table.name, table.pk_key(change.pk)) if table else None)
            except (KeyError, TypeError, ValueError):
                found.append(None)  # rejected when the change is checked
        return found

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


def _check_replay(node: str, change: Change, acked: int, receipts: dict[int, int]) -> None:
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


def _receipts(
    conn: Conn, node: str, replays: Sequence[Change]
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
            "SELECT seq, reason FROM _fieldsync_rejected WHERE node = ? AND seq BETWEEN ? AND ?",
            [node, low, high],
        ).fetchall()
    )
    return receipts, rejections


def _write_receipts(conn: Conn, node: str, receipts: Sequence[tuple[int, int]]) -> None:
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
