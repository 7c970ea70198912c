"""
Compaction: keeping the hub's file from growing for ever.

**Tombstones.** A deleted record stays in ``_fieldsync_records`` (a tombstone) so that
offices that still hold it learn of the delete when they pull. Once every office that
holds it (an office with ``*``, or whose scopes name the record's key; every office for
a table without a scope) has pulled past the delete's ``seq``, nobody needs it: the
tombstone and every version of the record in the history are purged. A tombstone older
than ``tombstone_days`` (by the time the hub took the delete) is purged all the same,
so that an office not seen for months does not keep everyone's tombstones: each office
holding it that had not pulled past it is marked to resync (``rescope = 1``), so its
next pull is a full pull of its scope that drops what it did not bring (hub/pull.py,
node/inbox.py). Offices never seen hold nothing; revoked offices and offices already
due to resync hold nothing up. A deleted record that live records still follow (a case
with assistance records) is kept: they take their scope from it. Exits
(``_fieldsync_exits``) follow the same rule, by the offices whose scopes name the key
they left, except that offices due to resync hold them up too: an exit is also what
lets an office's edit made offline to a record that left its scopes be merged.

**No resurrection.** The highest stamp purged is kept (``_fieldsync_meta``
``purged_through``): an update to a record the hub no longer holds, made on a copy
whose versions are all at or before it, is an edit of a record deleted and purged,
and is refused (:func:`purge_refusal`, called by hub/ingest.py); the office keeps it
in ``node rejected``. A new record (an insert) is taken as any new record. The highest
seq purged (``purged_seq``) lets hub/pull.py resync an office that pulls from before it
(its database restored from an older copy).

**History.** Versions of live records older than the ``Keep`` (days or versions per
record) are deleted; the latest version of every record is always kept. The conflict
log and the audit log are never touched.

Everything is read on a snapshot and deleted in chunks (at most CHUNK tombstones or
exits, HISTORY_CHUNK versions), each its own short write transaction, so that pushes
keep flowing; the longest is reported. Freed pages are reused by later writes; VACUUM
(``vacuum=True``) gives them back to the disk and leaves the file in incremental
auto-vacuum, after which each compaction gives them back a chunk at a time.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hub.database import HubDatabase
from hub.engine import Conn, dialect_of
from hub.scopes import read_scopes
from hub.times import utcnow
from shared.errors import FieldsyncError
from shared.schema import Schema, Table

log = logging.getLogger("fieldsync.hub")

CHUNK = 500  # tombstones or exits per write transaction
HISTORY_CHUNK = 5000  # history versions deleted per write transaction
DEFAULT_TOMBSTONE_DAYS = 90
DEFAULT_KEEP_DAYS = 365
COMPACT_EVERY = timedelta(days=1)
FIRST_COMPACT_AFTER = timedelta(minutes=5)
RETRY_AFTER = timedelta(hours=1)  # after a failed run (the file busy for long, say)


@dataclass(frozen=True, slots=True)
class Keep:
    """How much record history to keep: versions newer than ``days``, or the newest
    ``versions`` of each record (the latest version of a record is always kept)."""

    days: int | None = DEFAULT_KEEP_DAYS
    versions: int | None = None

    def __str__(self) -> str:
        if self.versions is not None:
            return f"{self.versions} version{'' if self.versions == 1 else 's'} per record"
        return f"{self.days} days"


def parse_keep(text: str) -> Keep:
    """``180d`` (days) or ``5`` (versions per record), as ``--keep-history`` takes."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*(d?)\s*", text)
    if found is None or int(found[1]) < 1:
        raise FieldsyncError(
            f"--keep-history takes a number of days such as 180d, or of versions per "
            f"record such as 5 (at least 1), not {text!r}"
        )
    number = int(found[1])
    return Keep(days=number) if found[2] else Keep(days=None, versions=number)


@dataclass(slots=True)
class Compacted:
    """What one compaction removed, and the file's size around it."""

    tombstones: int = 0
    versions: int = 0
    exits: int = 0
    resync: list[str] = field(default_factory=list)  # offices marked to resync
    bytes_before: int = 0
    bytes_after: int = 0
    bytes_freed: int = 0  # pages freed inside the file (reused by later writes)
    longest_lock_ms: float = 0.0
    locks_ms: dict[str, float] = field(default_factory=dict)  # the longest, by what it did
    seconds: float = 0.0
    vacuumed: bool = False
    stop: threading.Event | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "tombstones": self.tombstones,
            "versions": self.versions,
            "exits": self.exits,
            "resync": sorted(self.resync),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_freed": self.bytes_freed,
            "longest_lock_ms": round(self.longest_lock_ms, 1),
            "locks_ms": {k: round(v, 1) for k, v in sorted(self.locks_ms.items())},
            "seconds": round(self.seconds, 2),
            "vacuumed": self.vacuumed,
        }

    def held(self, what: str, ms: float) -> None:
        """Note a write transaction (or VACUUM) of ``ms`` milliseconds."""
        self.longest_lock_ms = max(self.longest_lock_ms, ms)
        self.locks_ms[what] = max(self.locks_ms.get(what, 0.0), ms)

    def summary(self) -> str:
        offices = ", ".join(sorted(self.resync)) or "none"
        return (
            f"purged {self.tombstones} tombstone(s), {self.exits} exit(s), "
            f"{self.versions} history version(s); offices to resync: {offices}; "
            f"{_mb(self.bytes_freed)} freed in the file; file {_mb(self.bytes_before)} -> "
            f"{_mb(self.bytes_after)}; longest write lock {self.longest_lock_ms:.0f} ms"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@dataclass(slots=True)
class _Office:
    name: str
    scopes: frozenset[str] | None  # None: every record
    pulled: int
    revoked: bool  # does not hold a purge up (marked all the same)
    due: bool  # marked to resync already: needs nothing kept

    def holds(self, scope: str | None) -> bool:
        return scope is None or self.scopes is None or scope in self.scopes


def compact(
    hub: HubDatabase,
    *,
    keep: Keep | None = None,
    tombstone_days: int = DEFAULT_TOMBSTONE_DAYS,
    vacuum: bool = False,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> Compacted:
    """Purge tombstones and exits no office needs, and history beyond ``keep``; one
    compaction at a time on a database, whatever process or worker runs it (Busy)."""
    with hub.exclusive("compact") as mine:
        if not mine:
            raise Busy(
                "a compaction of this hub is running already (`hub serve` runs one "
                "daily); try again when it is done"
            )
        return _compact(
            hub, keep=keep, tombstone_days=tombstone_days, vacuum=vacuum, now=now, stop=stop
        )


def _compact(
    hub: HubDatabase,
    *,
    keep: Keep | None = None,
    tombstone_days: int = DEFAULT_TOMBSTONE_DAYS,
    vacuum: bool = False,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> Compacted:
    """Purge tombstones and exits no office needs, and history beyond ``keep``.

    ``stop``: once set, the compaction ends after its current chunk (Stopped)."""
    keep = keep or Keep()
    now = now or datetime.now(UTC)
    started = time.monotonic()
    done = Compacted(bytes_before=_file_size(hub), stop=stop)
    free_before = _free_bytes(hub)
    with hub.snapshot() as conn:
        aged = _seq_before(conn, (now - timedelta(days=tombstone_days)).isoformat("T", "seconds"))
        exits = conn.execute(
            "SELECT tbl, pk, scope, seq FROM _fieldsync_exits ORDER BY seq"
        ).fetchall()
    _purge_tombstones(hub, aged, done)
    _purge_exits(hub, exits, aged, done)
    _trim_history(hub, keep, now, done)
    done.bytes_freed = max(0, _free_bytes(hub) - free_before)
    if vacuum:
        _vacuum(hub, done)
    else:
        _incremental_vacuum(hub, done)
    done.bytes_after = _file_size(hub)
    done.seconds = time.monotonic() - started
    return done


class Stopped(Exception):
    """The compaction was told to stop (the hub shuts down)."""


class Busy(FieldsyncError):
    """Another process (another worker, `hub compact`) is compacting the database."""


@contextmanager
def _timed_write(hub: HubDatabase, done: Compacted, what: str) -> Iterator[Conn]:
    if done.stop is not None and done.stop.is_set():
        raise Stopped
    with hub.write() as conn:
        began = time.monotonic()
        yield conn
    hub.after_write()  # SQLite: the WAL back into the file, as after a push
    # From the lock taken to the commit done.
    done.held(what, (time.monotonic() - began) * 1000)


def _offices(conn: Conn, scoped: bool) -> list[_Office]:
    """Every office that has pulled once (one that never did holds nothing)."""
    rows = conn.execute(
        "SELECT name, scopes, pulled_seq, revoked_at, rescope FROM _fieldsync_nodes "
        "WHERE last_seen_at IS NOT NULL"
    ).fetchall()
    return [
        _Office(
            name,
            read_scopes(text, name) if scoped else None,
            pulled,
            revoked is not None,
            bool(rescope),
        )
        for name, text, pulled, revoked, rescope in rows
    ]


def _verdict(
    offices: Sequence[_Office], scope: str | None, seq: int, aged: int, *, due_hold: bool = False
) -> list[str] | None:
    """None: keep an entry at ``seq`` of key ``scope``; otherwise purge it, and mark the
    offices listed (those holding it that had not pulled past it) to resync.

    ``due_hold``: offices already due to resync hold it up too (an exit: it lets such
    an office's edit made offline to the record that left be merged, hub/scopes.py)."""
    behind = [o for o in offices if (due_hold or not o.due) and o.holds(scope) and o.pulled < seq]
    if any(not o.revoked for o in behind) and seq > aged:
        return None
    return [o.name for o in behind]


def _mark(conn: Conn, offices: list[_Office], names: set[str], done: Compacted) -> None:
    if not names:
        return
    conn.executemany(
        "UPDATE _fieldsync_nodes SET rescope = 1 WHERE name = ?", [(n,) for n in names]
    )
    for office in offices:
        if office.name in names:
            office.due = True
    done.resync = sorted(set(done.resync) | names)
    log.info("compaction: office(s) %s will pull their scope again", ", ".join(sorted(names)))


def _purge_tombstones(hub: HubDatabase, aged: int, done: Compacted) -> None:
    after = 0
    while True:
        # CHUNK tombstones at a time, in seq order, with each version of them along its
        # chain, read on a snapshot: the chain below a tombstone never changes.
        with hub.snapshot() as conn:
            chunk = conn.execute(
                "SELECT tbl, pk, seq, scope, vers FROM _fieldsync_records "
                "WHERE deleted = 1 AND seq > ? ORDER BY seq LIMIT ?",
                [after, CHUNK],
            ).fetchall()
            if not chunk:
                return
            after = chunk[-1][2]
            chains = _chains(conn, [seq for _, _, seq, _, _ in chunk])
        # A transaction deletes at most HISTORY_CHUNK versions (beyond that, the rest
        # of a long history goes in transactions of its own).
        batch: list[Any] = []
        count = 0
        for tombstone in chunk:
            batch.append(tombstone)
            count += len(chains[tombstone[2]])
            if count >= HISTORY_CHUNK:
                _purge_batch(hub, batch, chains, aged, done)
                batch, count = [], 0
        _purge_batch(hub, batch, chains, aged, done)


def _purge_batch(
    hub: HubDatabase, batch: list[Any], chains: dict[int, list[int]], aged: int, done: Compacted
) -> None:
    if not batch:
        return
    later: list[tuple[int]] = []
    with _timed_write(hub, done, "tombstones") as conn:
        offices = _offices(conn, hub.schema.scoped)
        marked: set[str] = set()
        top = ""
        purged_seq = 0
        room = HISTORY_CHUNK
        for tbl, pk, seq, scope, vers in batch:
            behind = _verdict(offices, scope, seq, aged)
            if behind is None or _followed(conn, hub.schema, tbl, pk):
                continue
            gone = conn.execute(
                "DELETE FROM _fieldsync_records WHERE tbl = ? AND pk = ? AND seq = ? "
                "AND deleted = 1",
                [tbl, pk, seq],
            ).rowcount
            if not gone:  # written again since the snapshot
                continue
            versions = [(s,) for s in chains[seq]]
            now, rest = versions[: max(room, 1)], versions[max(room, 1) :]
            conn.executemany("DELETE FROM _fieldsync_history WHERE seq = ?", now)
            room -= len(now)
            later += rest
            done.tombstones += 1
            done.versions += len(versions)
            marked.update(behind)
            top = max(top, _newest(hub.schema.tables.get(tbl), vers))
            purged_seq = max(purged_seq, seq)
        _mark(conn, offices, marked, done)
        if purged_seq:
            _save_horizon(conn, top, purged_seq)
    for at in range(0, len(later), HISTORY_CHUNK):
        with _timed_write(hub, done, "tombstones") as conn:
            conn.executemany(
                "DELETE FROM _fieldsync_history WHERE seq = ?", later[at : at + HISTORY_CHUNK]
            )


def _followed(conn: Conn, schema: Schema, tbl: str, pk: str) -> bool:
    """Whether live records follow this one (kept: they take their scope from it)."""
    tables = [t.name for t in schema.tables.values() if t.scope and t.scope.parent == tbl]
    if not tables:
        return False
    marks = ", ".join("?" * len(tables))
    return (
        conn.execute(
            f"SELECT 1 FROM _fieldsync_records WHERE parent = ? AND tbl IN ({marks}) "
            "AND deleted = 0 LIMIT 1",
            [pk, *tables],
        ).fetchone()
        is not None
    )


def _newest(table: Table | None, vers: str) -> str:
    """The newest stamp's clock part (16 hex digits) among a record's stored versions."""
    if table is None:
        return ""
    return max((v[:16] for v in table.unpack_versions(vers).values()), default="")


def _save_horizon(conn: Conn, top: str, seq: int) -> None:
    """Raise the purge horizon: the newest stamp and the highest seq purged, and when."""
    stored = dict(
        conn.execute(
            "SELECT key, value FROM _fieldsync_meta WHERE key IN ('purged_through', 'purged_seq')"
        ).fetchall()
    )
    rows = [
        ("purged_through", max(top, stored.get("purged_through", ""))),
        ("purged_seq", str(max(seq, int(stored.get("purged_seq", 0))))),
        ("purged_at", utcnow()),
    ]
    conn.executemany(
        "INSERT INTO _fieldsync_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        rows,
    )


def _chains(conn: Conn, seqs: list[int]) -> dict[int, list[int]]:
    """Each record's versions in the history, from its current ``seq`` back."""
    found: dict[int, list[int]] = {}
    for head in seqs:
        found[head] = [
            row[0]
            for row in conn.execute(
                "WITH RECURSIVE chain (seq) AS (SELECT CAST(? AS BIGINT) UNION ALL "
                "SELECT h.prev FROM _fieldsync_history AS h JOIN chain ON h.seq = chain.seq "
                "WHERE h.prev IS NOT NULL) "
                "SELECT chain.seq FROM chain JOIN _fieldsync_history AS h ON h.seq = chain.seq",
                [head],
            )
        ]
    return found


def _purge_exits(hub: HubDatabase, exits: list[Any], aged: int, done: Compacted) -> None:
    scoped = hub.schema.scoped
    for start in range(0, len(exits), CHUNK):
        chunk = exits[start : start + CHUNK]
        with _timed_write(hub, done, "exits") as conn:
            # Offices holding every record are served no exits: only those naming keys.
            offices = [o for o in _offices(conn, scoped) if o.scopes is not None]
            marked: set[str] = set()
            purged_seq = 0
            for tbl, pk, scope, seq in chunk:
                behind = _verdict(offices, scope, seq, aged, due_hold=True)
                if behind is None:
                    continue
                done.exits += conn.execute(
                    "DELETE FROM _fieldsync_exits WHERE tbl = ? AND pk = ? AND scope = ? "
                    "AND seq = ?",
                    [tbl, pk, scope, seq],
                ).rowcount
                marked.update(behind)
                purged_seq = max(purged_seq, seq)
            _mark(conn, offices, marked, done)
            if purged_seq:
                _save_horizon(conn, "", purged_seq)


def _seq_before(conn: Conn, when: str) -> int:
    """The highest history seq the hub took by ``when`` (0: none), by bisection:
    versions are written with the time they are taken, in seq order."""
    low = conn.execute("SELECT min(seq) FROM _fieldsync_history").fetchone()[0]
    high = conn.execute("SELECT max(seq) FROM _fieldsync_history").fetchone()[0]
    if low is None:
        return 0
    best = 0
    while low <= high:
        middle = (low + high) // 2
        row = conn.execute(
            "SELECT seq, at FROM _fieldsync_history WHERE seq >= ? ORDER BY seq LIMIT 1",
            [middle],
        ).fetchone()
        if row is None or row[0] > high:
            high = middle - 1
        elif row[1] <= when:
            best = row[0]
            low = row[0] + 1
        else:
            high = middle - 1
    return int(best)


def _trim_history(hub: HubDatabase, keep: Keep, now: datetime, done: Compacted) -> None:
    """Delete versions beyond ``keep``, never a record's latest one."""
    if keep.days is not None:
        with hub.snapshot() as conn:
            upto = _seq_before(conn, (now - timedelta(days=keep.days)).isoformat("T", "seconds"))
            first = conn.execute("SELECT min(seq) FROM _fieldsync_history").fetchone()[0] or 0
        step = HISTORY_CHUNK
        for low in range(first - 1, upto, step):
            with _timed_write(hub, done, "history") as conn:
                done.versions += conn.execute(
                    "DELETE FROM _fieldsync_history WHERE seq > ? AND seq <= ? AND NOT EXISTS "
                    "(SELECT 1 FROM _fieldsync_records AS r WHERE r.seq = _fieldsync_history.seq)",
                    [low, min(low + step, upto)],
                ).rowcount
        return
    assert keep.versions is not None
    with hub.snapshot() as conn:
        heads = [row[0] for row in conn.execute("SELECT seq FROM _fieldsync_records ORDER BY seq")]
    for start in range(0, len(heads), CHUNK):
        chunk = heads[start : start + CHUNK]
        with hub.snapshot() as conn:
            old = [
                (s,)
                for chain in _chains(conn, chunk).values()
                for s in sorted(chain, reverse=True)[keep.versions :]
            ]
        for at in range(0, len(old), HISTORY_CHUNK):
            with _timed_write(hub, done, "history") as conn:
                conn.executemany(
                    "DELETE FROM _fieldsync_history WHERE seq = ?", old[at : at + HISTORY_CHUNK]
                )
        done.versions += len(old)


def _file_size(hub: HubDatabase) -> int:
    with hub.read() as conn:
        return dialect_of(conn).storage_bytes(conn)


def _free_bytes(hub: HubDatabase) -> int:
    with hub.read() as conn:
        return dialect_of(conn).free_bytes(conn)


def _vacuum(hub: HubDatabase, done: Compacted) -> None:
    """Give the freed pages back to the disk: VACUUM (it holds the writer for its
    length), leaving the file in incremental auto-vacuum so later compactions shrink
    it in short steps."""
    began = time.monotonic()
    with hub.read() as conn:
        dialect_of(conn).vacuum(conn)
    done.held("VACUUM", (time.monotonic() - began) * 1000)
    done.vacuumed = True


def _incremental_vacuum(hub: HubDatabase, done: Compacted) -> None:
    """In a file in incremental auto-vacuum, give free pages back a chunk at a time."""
    with hub.read() as conn:
        if not dialect_of(conn).reclaims_in_steps(conn):
            return
    left = None
    while left != 0:
        with _timed_write(hub, done, "incremental vacuum") as conn:
            before, left = left, dialect_of(conn).reclaim_step(conn)
        if before is not None and left >= before:  # no progress: leave the rest
            break
    with hub.read() as conn:
        dialect_of(conn).checkpoint(conn)


def purge_refusal(conn: Conn, table: Table, base: dict[str, str]) -> str | None:
    """Why an update to a record the hub does not hold is refused (None: it is not).

    Refused when the hub has purged tombstones and every base version of the change
    is at or before the newest stamp purged: the office edited a copy of a record
    deleted and purged since (an update with no base is a record new to the hub)."""
    if not base:
        return None
    stored = dict(
        conn.execute(
            "SELECT key, value FROM _fieldsync_meta WHERE key IN ('purged_through', 'purged_at')"
        ).fetchall()
    )
    horizon = stored.get("purged_through", "")
    if not horizon or any(v[:16] > horizon for v in base.values()):
        return None
    day = stored.get("purged_at", "")[:10]
    return (
        f"this {table.name} record was deleted at the hub and purged on or before {day}: "
        "the edit was made to a copy from before the delete, and is not taken as a new "
        "record (write it again as a new record if it is still wanted)"
    )


def purged_seq(conn: Conn) -> int:
    """The highest seq of a tombstone or exit purged (0: none)."""
    row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'purged_seq'").fetchone()
    return int(row[0]) if row else 0
