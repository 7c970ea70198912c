"""
The outbox: the office's queued changes on their way to the hub (the push side).

Changes wait in the change log (``_fieldsync_changes``), numbered by ``seq``, until
the hub acknowledges committing them. The state row keeps two marks:

- ``acked_seq``: the hub has committed every change up to it; those leave the log
  (kept apart as they were sent, for a window: see :func:`keep_sent`);
- ``sent_seq``: changes up to it have gone to the hub, which may have committed them
  even if its answer was lost: they keep the stamps they were sent with.

Reading a batch (:meth:`Outbox.pending`) is on the push's hot path: plain ``sqlite3``
queries, a few per batch, and per change only what building the wire change needs.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import sqlite_utils

from node.capture import hold_clock, log_rows
from node.rejected import forget_rejected, keep_rejected
from node.versions import SAVE_VERSIONS, load_versions, save_versions
from shared.clock import Timestamp
from shared.errors import StoreError
from shared.merge import effect
from shared.protocol import Change, Rejection, loads
from shared.schema import RecordKey, Schema, Table, Versions, quote
from shared.sqlite import write

# The change log keeps its last acknowledged entry (or a marker standing for it)
# so that new changes are numbered after every change the hub has committed:
# pending changes are those numbered above ``acked_seq``.
PENDING = "seq > (SELECT acked_seq FROM _fieldsync_state)"

# At most this many changes or pulled records per write transaction of a sync: other
# programs writing to the office database wait for each one. bench/locks.py measures
# the longest: on the project's 2-core machine, 231 ms with whole 5,000-record pages
# and batches, 65 ms with 500 (medians of 5 runs at N = 100,000, load average 4-6).
ROWS_PER_WRITE = 500

# Acknowledged changes kept for a hub restored from a backup (see keep_sent).
_SENT_ENCODER = msgspec.json.Encoder()
_SENT_DECODER = msgspec.json.Decoder(list[Change])


class Pending(list[Change]):
    """A batch of pending changes, and each record's versions once they are applied;
    ``keys``: each change's record, in order."""

    def __init__(
        self,
        changes: list[Change],
        versions: dict[RecordKey, Versions],
        keys: list[RecordKey] | None = None,
    ) -> None:
        super().__init__(changes)
        self.versions = versions
        self.keys = keys if keys is not None else []
        # By the first change of each of mark_acked's transactions: what it writes
        # when the hub takes the whole batch, worked out ahead (Outbox.prepare_ack).
        self.written: dict[int, tuple[list[tuple[str, str, str]], bytes]] = {}

    def once_each(self) -> bool:
        """Whether each change is to another record (and each one's key is known)."""
        return len(self.versions) == len(self) == len(self.keys)


def pending_keys(conn: sqlite3.Connection) -> set[RecordKey]:
    """The records with queued changes: pulls and put-backs leave them alone."""
    return {
        (tbl, key)
        for tbl, key in conn.execute(
            f"SELECT DISTINCT tbl, pk FROM _fieldsync_changes WHERE {PENDING}"
        )
    }


class Outbox:
    """The queued changes of the office database ``db``, as ``node`` made them."""

    def __init__(self, db: sqlite_utils.Database, schema: Schema, node: str, path: Path) -> None:
        self.db = db
        self.schema = schema
        self.node = node
        self.path = path  # named in messages

    def count(self) -> int:
        """How many changes are queued."""
        return int(
            self.db.conn.execute(
                f"SELECT count(*) FROM _fieldsync_changes WHERE {PENDING}"
            ).fetchone()[0]
        )

    def pending(self, limit: int, after: Pending | None = None) -> Pending:
        """The oldest ``limit`` unacknowledged changes, each with its base versions.

        An insert is sent with the record's values as they are now (the trigger
        logs none), or, for a record deleted since, as the delete logged them.

        ``after``: the batch before, still on its way to the hub; this one follows it
        and its bases take the effects of that batch into account.
        """
        # Text as SQLite gives it; only where some is not UTF-8 (a CSV imported in
        # another encoding) as bytes, decoded here, so that the message names the
        # change, never its contents.
        sql = (
            "SELECT seq, tbl, {pk}, op, hlc, captured, {vals} FROM _fieldsync_changes "
            f"WHERE {PENDING} AND seq > ? ORDER BY seq LIMIT ?"
        )
        params = [after[-1].seq if after else 0, limit]
        rows: list[Any]
        try:
            rows = self.db.conn.execute(sql.format(pk="pk", vals="vals"), params).fetchall()
            if not rows:
                return Pending([], {})
            inserted = self._inserted_values(rows[0][0], rows[-1][0], as_bytes=False)
        except sqlite3.OperationalError:  # text that is not UTF-8
            rows = self.db.conn.execute(
                sql.format(pk="CAST(pk AS BLOB)", vals="CAST(vals AS BLOB)"), params
            ).fetchall()
            if not rows:
                return Pending([], {})
            inserted = self._inserted_values(rows[0][0], rows[-1][0])
        # Per change only what the wire change needs: each record's key text read
        # once (kept for mark_acked), each table looked up once.
        keys = [
            (tbl, raw_key if type(raw_key) is str else raw_key.decode("utf-8", "replace"))
            for _, tbl, raw_key, *_ in rows
        ]
        carried = after.versions if after else {}
        versions = load_versions(self.db.conn, self.schema, {k for k in keys if k not in carried})
        versions.update({k: dict(carried[k]) for k in keys if k in carried})
        changes = Pending([], versions, keys)
        tables: dict[str, Table] = {}
        node = self.node
        for (seq, tbl, raw_key, op, hlc, captured, raw), record in zip(rows, keys, strict=True):
            table = tables.get(tbl) or tables.setdefault(tbl, self.schema.table(tbl))
            key = record[1]
            try:
                if type(raw_key) is not str:
                    key = raw_key.decode("utf-8")
                if op == "delete":
                    values = None
                elif raw is not None:
                    values = loads(raw)
                elif seq in inserted:
                    values = inserted[seq]
                else:  # deleted since: as it was when deleted
                    values = self._deleted_values(tbl, key.encode("utf-8"), seq)
                    if values is None:
                        op = "delete"
            except UnicodeDecodeError:
                raise self._not_utf8(seq, tbl) from None
            base = versions.get(record, {})
            ts = Timestamp(hlc, node)
            changes.append(
                Change(seq, tbl, table.pk_dict(key), op, ts, values, base, captured or hlc)
            )
            # A new dict: the change keeps ``base`` as it is.
            versions[record] = effect(base, op, values, f"{hlc:016x}-{node}")
        return changes

    def _deleted_values(self, tbl: str, raw_key: bytes, seq: int) -> dict[str, Any] | None:
        """The record as the first delete after change ``seq`` logged it (None: none)."""
        row = self.db.conn.execute(
            "SELECT CAST(vals AS BLOB) FROM _fieldsync_changes WHERE seq > ? AND tbl = ? "
            "AND CAST(pk AS BLOB) = ? AND op = 'delete' ORDER BY seq LIMIT 1",
            [seq, tbl, raw_key],
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return dict(json.loads(row[0].decode("utf-8")))

    def _inserted_values(
        self, first: int, last: int, *, as_bytes: bool = True
    ) -> dict[int, dict[str, Any]]:
        """The current values of records logged as inserts without values, by seq.

        ``as_bytes``: text is read as bytes and decoded here (see pending); otherwise
        text that is not UTF-8 raises sqlite3.OperationalError.
        """
        found: dict[int, dict[str, Any]] = {}
        for table in self.schema.tables.values():
            join = " AND ".join(
                f"t.{quote(c)} = json_extract(c.pk, '$[{i}]')"
                for i, c in enumerate(table.primary_key)
            )
            cols = ", ".join(
                f"CASE typeof(t.{quote(c)}) WHEN 'text' THEN CAST(t.{quote(c)} AS BLOB) "
                f"ELSE t.{quote(c)} END"
                if as_bytes
                else f"t.{quote(c)}"
                for c in table.column_names
            )
            cursor = self.db.conn.execute(
                f"SELECT c.seq, {cols} FROM _fieldsync_changes AS c "
                f"JOIN {quote(table.name)} AS t ON {join} "
                "WHERE c.seq BETWEEN ? AND ? AND c.tbl = ? AND c.op = 'insert' "
                "AND c.vals IS NULL",
                [first, last, table.name],
            ).fetchall()
            names = table.column_names
            if not as_bytes:
                for seq, *values in cursor:
                    found[seq] = dict(zip(names, values, strict=True))
                continue
            for seq, *values in cursor:
                try:
                    found[seq] = {
                        name: value.decode("utf-8") if type(value) is bytes else value
                        for name, value in zip(names, values, strict=True)
                    }
                except UnicodeDecodeError:
                    raise self._not_utf8(seq, table.name) from None
        return found

    def _not_utf8(self, seq: int, tbl: str) -> StoreError:
        return StoreError(
            f"change {seq} to table {tbl} holds text that is not UTF-8 (imported in "
            "another encoding?); re-enter that record's text as UTF-8, then run "
            f"`fieldsync node drop-change {self.path} {seq}` to discard the bad change"
        )

    def drop_change(self, seq: int) -> bool:
        """Discard one queued change that can never be pushed, or one the hub rejected.

        A queued change's record is then logged again as it is now, whole, so the
        hub still gets every column the dropped change carried (once fixed). Returns
        True for a queued change, False for a rejected one.
        """
        if not 0 < seq < 2**63:
            raise StoreError(f"there is no queued change {seq} in {self.path}")
        with write(self.db) as conn:
            if forget_rejected(conn, seq):
                return False
            row = conn.execute(
                f"SELECT tbl, CAST(pk AS BLOB) FROM _fieldsync_changes WHERE seq = ? AND {PENDING}",
                [seq],
            ).fetchone()
            if row is None:
                raise StoreError(f"there is no queued change {seq} in {self.path}")
            hold_clock(conn)
            conn.execute("DELETE FROM _fieldsync_changes WHERE seq = ?", [seq])
            table = self.schema.table(row[0])
            # The record as it is now (if it still exists), whole.
            last = conn.execute("SELECT max(seq) FROM _fieldsync_changes").fetchone()[0]
            log_rows(conn, table, "update", "WHERE CAST(json_array({pk}) AS BLOB) = ?", [row[1]])
            # Numbered after every change sent, not with the number just dropped (the
            # log numbers from its end): a number sent may be the hub's already.
            conn.execute(
                "UPDATE _fieldsync_changes SET seq = (SELECT sent_seq + 1 FROM _fieldsync_state) "
                "WHERE seq > ? AND seq <= (SELECT sent_seq FROM _fieldsync_state)",
                [last or 0],
            )
            return True

    def mark_acked(
        self, acked: int, changes: Sequence[Change], rejected: Sequence[Rejection] = ()
    ) -> None:
        """Forget the changes of ``changes`` the hub has dealt with (seq <= ``acked``).

        Only changes that were sent are forgotten: a hub that has acknowledged more
        (from an older copy of this database) says nothing about the rest. Changes
        the hub ``rejected`` are kept aside with the hub's reason (see
        ``NodeStore.rejected``), and each such record, unless edited again since, is put
        back as the hub holds it, so the office stays in step with the hub.
        """
        if not changes:
            return
        acked = min(acked, changes[-1].seq)
        refused = {r.seq: r for r in rejected if r.seq <= acked}
        done = [c for c in changes if c.seq <= acked]
        if isinstance(changes, Pending) and len(changes.keys) == len(changes):
            keys = changes.keys[: len(done)]  # in seq order: those done come first
        else:
            keys = [(c.table, self.schema.table(c.table).pk_key(c.pk)) for c in done]
        # The versions worked out when the batch was read hold when each record was
        # changed once: then each chunk below saves those of its own records, packed
        # with its kept copy before the write (see prepare_ack).
        whole = (
            isinstance(changes, Pending)
            and len(done) == len(changes)
            and not refused
            and changes.once_each()
        )
        # In transactions of at most ROWS_PER_WRITE changes, in seq order, so that other
        # programs wait less for the write lock: each forgets its changes with the
        # versions they leave, and acked_seq advances only past the changes it covers.
        for start in range(0, max(len(done), 1), ROWS_PER_WRITE):  # once when none
            end = start + ROWS_PER_WRITE
            chunk, chunk_keys = done[start:end], keys[start:end]
            upto = acked if end >= len(done) else chunk[-1].seq
            if whole:
                assert isinstance(changes, Pending)
                packed, kept = self._written(changes, start)
                with write(self.db) as conn:
                    conn.executemany(SAVE_VERSIONS, packed)
                    self._forget_sent(conn, chunk, upto, kept)
                continue
            with write(self.db) as conn:
                self._forget(conn, chunk, chunk_keys, upto, refused)

    def prepare_ack(self, changes: Sequence[Change]) -> None:
        """Work out, while the hub works on ``changes``, what :meth:`mark_acked` writes
        if the hub takes them all: so that little is left to do once it answers."""
        if isinstance(changes, Pending) and changes.once_each():
            for start in range(0, len(changes), ROWS_PER_WRITE):
                self._written(changes, start)

    def _written(self, changes: Pending, start: int) -> tuple[list[tuple[str, str, str]], bytes]:
        """What the transaction of :meth:`mark_acked` that forgets the ROWS_PER_WRITE
        changes from ``start`` on writes, when the hub took the whole batch: each
        record's versions, packed (a record changed once in the batch), and the kept
        copy of the changes (see :func:`keep_sent`)."""
        found = changes.written.get(start)
        if found is None:
            end = start + ROWS_PER_WRITE
            versions = changes.versions
            packed = [
                (tbl, key, self.schema.table(tbl).pack_versions(versions[(tbl, key)]))
                for tbl, key in changes.keys[start:end]
            ]
            found = changes.written[start] = (packed, sent_copy(changes[start:end]))
        return found

    def _forget(
        self,
        conn: sqlite3.Connection,
        done: Sequence[Change],
        keys: Sequence[RecordKey],
        acked: int,
        refused: dict[int, Rejection],
    ) -> None:
        """One transaction of :meth:`mark_acked`: ``done`` (of ``keys``), up to ``acked``."""
        set_aside = [c for c in done if c.seq in refused]
        versions = load_versions(conn, self.schema, list(keys))
        for change, key in zip(done, keys, strict=True):
            if change.seq in refused:
                continue
            versions[key] = effect(versions.get(key, {}), change.op, change.values, str(change.ts))
        save_versions(conn, self.schema, versions)
        sent = [c for c in done if c.seq not in refused] if refused else done
        self._forget_sent(conn, sent, acked, sent_copy(sent) if sent else b"")
        if set_aside:
            keep_rejected(conn, self.schema, set_aside, refused, pending_keys(conn))

    @staticmethod
    def _forget_sent(
        conn: sqlite3.Connection, sent: Sequence[Change], acked: int, kept: bytes
    ) -> None:
        """The end of a transaction of :meth:`mark_acked`: acknowledged up to ``acked``,
        ``sent`` kept as sent (``kept``, their :func:`sent_copy`), forgotten."""
        conn.execute("UPDATE _fieldsync_state SET acked_seq = MAX(acked_seq, ?)", [acked])
        keep_sent(conn, sent, kept)
        forget_acked(conn)

    def last_seq(self) -> int:
        """The highest change-log number this database has given out (or had acknowledged)."""
        row = self.db.conn.execute(
            "SELECT max((SELECT max(seq) FROM _fieldsync_changes), acked_seq) FROM _fieldsync_state"
        ).fetchone()
        return int(row[0] or 0)

    def renumber_after(self, acked: int) -> int:
        """Give pending changes numbers above ``acked``; return how many.

        The hub holds other changes under numbers this database uses: it is a copy
        restored from an older backup, and its newer changes reuse numbers the hub
        already committed. Renumbered, they are sent as new.
        """
        with write(self.db) as conn:
            rows = conn.execute(
                f"SELECT seq FROM _fieldsync_changes WHERE {PENDING} ORDER BY seq"
            ).fetchall()
            mine = conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
            hold_clock(conn)
            conn.execute(f"DELETE FROM _fieldsync_changes WHERE NOT {PENDING}")
            # Above every number in use, so no renumbered change collides with another.
            start = max(acked, rows[-1][0] if rows else 0)
            conn.executemany(
                "UPDATE _fieldsync_changes SET seq = ? WHERE seq = ?",
                [(start + i + 1, seq) for i, (seq,) in enumerate(rows)],
            )
            # Records this office sent since that copy was made are on the hub but no
            # longer here: pull everything again, its own records included.
            conn.execute(
                "UPDATE _fieldsync_state SET acked_seq = ?, sent_seq = ?, cursor = 0, repull = 1",
                [acked, acked],
            )
            forget_acked(conn)
            # Those kept up to this copy's own mark are the very changes the hub holds
            # under their numbers (a hub restored from an older backup needs them
            # again); any above it would be other changes: never to re-send. Those the
            # hub holds past this copy's mark are not here: counted as not kept.
            conn.execute("DELETE FROM _fieldsync_sent WHERE seq > ?", [mine])
            conn.execute(
                "UPDATE _fieldsync_state SET sent_pruned_seq = MAX(sent_pruned_seq, ?)", [acked]
            )
            return len(rows)

    def note_sent(self, seq: int) -> None:
        """Remember that changes up to ``seq`` go to the hub now.

        Called before each push request. Whether the hub commits them is known only
        from its answer, which may be lost: until the hub says otherwise, they keep
        the stamps they were sent with (see :meth:`restamp`).
        """
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET sent_seq = MAX(sent_seq, ?)", [seq])

    def not_committed_after(self, acked: int) -> None:
        """The hub has said it committed none of this office's changes after ``acked``
        (nothing of it is on its way): they may be re-stamped again."""
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET sent_seq = MIN(sent_seq, ?)", [acked])

    def restamp(self, hub_now_ms: int, shift_ms: int, *, every: bool = False) -> int:
        """Move queued changes not yet sent by ``shift_ms``, the error of the office's clock.

        A wrong clock stamps changes wrongly: too far ahead and the hub refuses them;
        a little ahead and they would win conflicts they should lose; behind and they
        would lose ones they should win. Once the office knows how wrong its clock
        was (``shift_ms``, the change in its learned offset), the changes it has not
        yet sent get the stamps they should have had: their real time, kept in
        order, later than every stamp seen from other offices, and never past the
        hub's time. Only changes in the hub's future are moved, unless ``every``.
        The office's clock is set back too, so that it stamps the right time again.
        Returns how many changes were moved.

        Changes already sent (see :meth:`note_sent`) keep their stamps: the hub may
        have committed them with those, and the office's record versions must name
        the stamps the hub holds.
        """
        with write(self.db) as conn:
            return restamp(conn, self.node, hub_now_ms, shift_ms, every)


def restamp(
    conn: sqlite3.Connection, node: str, hub_now_ms: int, shift_ms: int, every: bool
) -> int:
    """:meth:`Outbox.restamp`, inside the transaction of ``conn``."""
    limit = hub_now_ms << 16
    after_seq = conn.execute("SELECT sent_seq FROM _fieldsync_state").fetchone()[0]
    bad = conn.execute(
        "SELECT seq, hlc FROM _fieldsync_changes "
        f"WHERE (hlc > ? OR ?) AND seq > ? AND {PENDING} ORDER BY seq",
        [limit, every, after_seq],
    ).fetchall()
    if not bad and not every:
        return 0
    seen = conn.execute(
        "SELECT max(substr(j.value, 1, 16)) FROM _fieldsync_versions AS v, "
        "json_each(v.vers) AS j WHERE substr(j.value, 18) != ?",
        [node],
    ).fetchone()[0]
    kept = conn.execute(
        "SELECT max(hlc) FROM _fieldsync_changes WHERE hlc <= ? AND NOT (seq > ? AND "
        f"{PENDING} AND (hlc > ? OR ?))",
        [limit, after_seq, limit, every],
    ).fetchone()[0]
    floor = max(kept or 0, int(seen, 16) if seen else 0)
    stamps = []
    for seq, hlc in bad:
        floor = max(floor + 1, min(hlc + (shift_ms << 16), limit))
        stamps.append((floor, seq))
    conn.executemany(
        "UPDATE _fieldsync_changes SET captured = CASE captured WHEN 0 THEN hlc "
        "ELSE captured END, hlc = ? WHERE seq = ?",
        stamps,
    )
    conn.execute("UPDATE _fieldsync_state SET hlc = ?", [floor])
    return len(bad)


def sent_copy(changes: Sequence[Change]) -> bytes:
    """``changes`` as :func:`keep_sent` keeps them: compressed (about 1 µs a change)."""
    return zlib.compress(_SENT_ENCODER.encode(changes), 1)


def keep_sent(
    conn: sqlite3.Connection, changes: Sequence[Change], copy: bytes | None = None
) -> None:
    """Keep acknowledged ``changes`` as they were sent, so that a hub restored from a
    backup can be sent exactly the same changes again (node/restore.py; dropped after
    the window, see :func:`prune_sent`): one row, their :func:`sent_copy` (``copy``, if
    it was made already)."""
    if changes:
        conn.execute(
            "INSERT OR REPLACE INTO _fieldsync_sent (seq, first, count, changes, acked_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                changes[-1].seq,
                changes[0].seq,
                len(changes),
                sent_copy(changes) if copy is None else copy,
                int(time.time()),
            ],
        )


def kept_changes(conn: sqlite3.Connection, after: int) -> Iterator[Change]:
    """The kept acknowledged changes numbered after ``after``, in order, as sent."""
    rows = conn.execute(
        "SELECT changes FROM _fieldsync_sent WHERE seq > ? ORDER BY seq", [after]
    ).fetchall()
    for (blob,) in rows:
        for change in _SENT_DECODER.decode(zlib.decompress(blob)):
            if change.seq > after:
                yield change


def prune_sent(conn: sqlite3.Connection, keep_seconds: int, now: float | None = None) -> int:
    """Drop kept changes acknowledged more than ``keep_seconds`` ago; return how many
    rows (each a write's changes).

    Walks from the oldest (kept in the order acknowledged) to the first one still in
    the window: the cost is the rows dropped, not the rows kept.
    """
    cutoff = int(time.time() if now is None else now) - keep_seconds
    first_kept = conn.execute(
        "SELECT seq FROM _fieldsync_sent WHERE acked_at > ? ORDER BY seq LIMIT 1", [cutoff]
    ).fetchone()
    below = first_kept[0] if first_kept else 2**63 - 1
    top = conn.execute("SELECT max(seq) FROM _fieldsync_sent WHERE seq < ?", [below]).fetchone()[0]
    if top is None:
        return 0
    dropped = conn.execute("DELETE FROM _fieldsync_sent WHERE seq <= ?", [top]).rowcount
    conn.execute("UPDATE _fieldsync_state SET sent_pruned_seq = MAX(sent_pruned_seq, ?)", [top])
    return int(dropped)


def forget_acked(conn: sqlite3.Connection) -> None:
    """Delete acknowledged changes, keeping a marker numbered ``acked_seq`` when the log
    would otherwise end below it (so the next change is numbered after it)."""
    hold_clock(conn)
    acked = conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
    conn.execute("DELETE FROM _fieldsync_changes WHERE seq <= ?", [acked])
    conn.execute(
        "INSERT INTO _fieldsync_changes (seq, tbl, pk, op, hlc, captured) "
        "SELECT ?, '', '[]', 'acked', 0, 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM _fieldsync_changes WHERE seq > ?)",
        [acked, acked],
    )
