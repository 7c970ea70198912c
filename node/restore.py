"""
A hub restored from a backup: how an office notices, and re-sends what it lacks.

The hub has an identity, its *epoch* (hub/epoch.py), that every health check, pull
page and push answer carries and that a restored backup changes. The office keeps the
one it last saw (``hub_epoch`` in the state row). When a sync begins and the hub
answers with another one (and one was kept), the hub was restored from a backup and
may lack changes it had acknowledged. Then, before anything else is pushed:

1. the acknowledged changes the office still keeps (``_fieldsync_sent``: each as it
   was sent, for ``keep_acked_s``, by default 30 days; node/outbox.py keeps them)
   numbered above what the restored hub holds of this office (``acked`` of its health
   check) are sent again, exactly as first sent, in order: the hub's receipts make
   this exactly-once, like any retried push; one the restored hub refuses (its scopes
   as they were, say) is kept in ``node rejected`` with the reason, as any refusal;
2. the office pulls everything again from cursor 0 (the resync sweep of
   node/inbox.py, records with queued changes kept), so that it gets what it missed
   and drops what the restored hub lacks (until its owner sends it again);
3. only once that sync has completed is the new epoch kept: a sync cut half way does
   it again (what was re-sent is then below the hub's ``acked``, and not sent twice).

This is apart from an *office* restored from an older copy (the hub holds more of its
changes than it knows: ``acked`` above its numbers, node/agent.py renumbers): here the
hub's ``acked`` is below the office's, and nothing is renumbered.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass

import sqlite_utils

from node._times import utcnow
from node.client import HubClient, HubClock
from node.inbox import start_resync
from node.outbox import kept_changes, pending_keys, prune_sent
from node.rejected import keep_rejected
from shared.backup import count_rows, tables
from shared.errors import HubRejectedError, ProtocolError, StoreError
from shared.protocol import Rejection
from shared.schema import Schema
from shared.sqlite import write

log = logging.getLogger("fieldsync.agent")

DEFAULT_KEEP_ACKED_S = 30 * 86400  # as the state row's column default
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``3600s`` (or a number of days) as seconds; ValueError."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*([smhd]?)\s*", text.lower())
    if found is None:
        raise ValueError(f"{text!r} is not a time such as 30d, 12h or 90m")
    return int(found[1]) * _UNITS[found[2] or "d"]


def window_text(seconds: int) -> str:
    """A window in the largest unit that divides it: ``30d``, ``12h``."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def set_window(db: sqlite_utils.Database, seconds: int) -> None:
    """Keep acknowledged changes for ``seconds`` from now on (`node set --keep-acked`)."""
    with write(db) as conn:
        conn.execute("UPDATE _fieldsync_state SET keep_acked_s = ?", [seconds])


@dataclass(frozen=True, slots=True)
class Kept:
    """What `node status` shows of this: the window, what is kept, the last restore."""

    keep_seconds: int
    kept: int
    hub_epoch: str
    hub_restored: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "keep_acked_seconds": self.keep_seconds,
            "kept_acked": self.kept,
            "hub_epoch": self.hub_epoch,
            "hub_restored": self.hub_restored,
        }


def kept(db: sqlite_utils.Database) -> Kept:
    seconds, epoch, restored = db.conn.execute(
        "SELECT keep_acked_s, hub_epoch, hub_restored FROM _fieldsync_state"
    ).fetchone()
    count = db.conn.execute("SELECT total(count) FROM _fieldsync_sent").fetchone()[0]
    return Kept(int(seconds), int(count), str(epoch), restored)


class Watch:
    """One sync's view of the hub's identity: the epoch it began with, and whether
    that is a restored hub to recover from."""

    def __init__(self, db: sqlite_utils.Database, node: str, epoch: str) -> None:
        self.db = db
        self.node = node
        self.epoch = epoch
        stored = db.conn.execute("SELECT hub_epoch FROM _fieldsync_state").fetchone()[0]
        # A hub that says nothing of its identity (older) is never taken as restored.
        self.restored = bool(stored and epoch and epoch != stored)
        self.new = bool(epoch and epoch != stored)

    def check(self, epoch: str) -> None:
        """An answer during the sync: another epoch means the hub was replaced meanwhile."""
        if epoch and self.epoch and epoch != self.epoch:
            raise ProtocolError(
                "the hub was replaced during this sync (restored from a backup?); "
                "the next sync re-sends what it lacks"
            )

    def recover(self, client: HubClient, acked: int | None, batch_size: int) -> int:
        """The hub was restored: re-send the kept changes it lacks, then pull
        everything again (see the module's text); returns how many were re-sent."""
        if acked is None:  # a hub with an epoch always says
            raise ProtocolError("the hub did not say how far it holds this office's changes")
        with write(self.db) as conn:
            pruned, window = conn.execute(
                "SELECT sent_pruned_seq, keep_acked_s FROM _fieldsync_state"
            ).fetchone()
            rejected = conn.execute(
                "SELECT count(*) FROM _fieldsync_rejected WHERE seq > ? AND seq <= ?",
                [acked, pruned],
            ).fetchone()[0]
        resent = 0
        kept = list(kept_changes(self.db.conn, acked))
        refused: dict[int, Rejection] = {}
        for start in range(0, len(kept), batch_size):
            changes = kept[start : start + batch_size]
            result = client.push(changes)
            if result.node != self.node:
                raise HubRejectedError(
                    f"the hub answered for office {result.node!r}, not {self.node!r}",
                    "forbidden",
                    403,
                )
            self.check(result.epoch)
            if result.acked < changes[-1].seq:
                raise HubRejectedError(
                    f"the restored hub took this office's changes up to {result.acked} of "
                    f"{changes[-1].seq}; the rest are sent again next sync"
                )
            for rejection in result.rejected:
                log.warning(
                    "the restored hub rejected change %d sent again: %s",
                    rejection.seq,
                    rejection.reason,
                )
                refused[rejection.seq] = rejection
            resent += result.applied
        if refused:  # kept with the reason, as any change the hub refuses (`node rejected`)
            with write(self.db) as conn:
                source = conn.execute("SELECT source FROM _fieldsync_schema").fetchone()[0]
                schema = Schema.from_toml(source, "this office's schema")
                aside = [c for c in kept if c.seq in refused]
                keep_rejected(conn, schema, aside, refused, pending_keys(conn))
        start_resync(self.db)
        said = f"hub restored from a backup: re-sent {resent} changes, pulling everything again"
        # Numbers past the hub's mark that were dropped, or never kept by this copy.
        lost = max(0, pruned - acked - rejected - sum(1 for c in kept if c.seq <= pruned))
        if lost:
            said += (
                f"; {lost} changes acknowledged before the {window_text(window)} window "
                "could not be re-sent (no longer kept here)"
            )
        log.warning("%s", said)
        with write(self.db) as conn:
            conn.execute("UPDATE _fieldsync_state SET hub_restored = ?", [f"{utcnow()}: {said}"])
        return resent

    def done(self) -> None:
        """The sync completed: keep the hub's epoch (a restore is then recovered from)."""
        if self.new:
            with write(self.db) as conn:
                conn.execute("UPDATE _fieldsync_state SET hub_epoch = ?", [self.epoch])
            self.new = self.restored = False


def begin(
    db: sqlite_utils.Database, node: str, clock: HubClock, client: HubClient, batch_size: int
) -> Watch:
    """At the start of a sync, once the hub's health check is in: drop kept changes past
    the window and, if the hub was restored, recover (see :meth:`Watch.recover`)."""
    prune(db)
    watch = Watch(db, node, clock.epoch)
    if watch.restored:
        watch.recover(client, clock.acked, batch_size)
    return watch


def prune(db: sqlite_utils.Database) -> int:
    """Drop kept acknowledged changes older than the window (at each sync)."""
    with write(db) as conn:
        window = conn.execute("SELECT keep_acked_s FROM _fieldsync_state").fetchone()[0]
        return prune_sent(conn, int(window))


def count_office(conn: sqlite3.Connection) -> dict[str, int]:
    """What an office database holds: records, queued and kept changes, the highest
    change number. StoreError if it is not an office database."""
    found = tables(conn)
    if "_fieldsync_meta" in found:
        raise StoreError("is a hub database, not an office database")
    if not {"_fieldsync_state", "_fieldsync_changes", "_fieldsync_versions"} <= found:
        raise StoreError("is not a fieldsync office database")
    acked, node = conn.execute("SELECT acked_seq, node FROM _fieldsync_state").fetchone()
    if not node:
        raise StoreError("is not a fieldsync office database (no office name)")
    top = conn.execute("SELECT max(seq) FROM _fieldsync_changes").fetchone()[0]
    return {
        "records": count_rows(conn, "_fieldsync_versions"),
        "queued changes": int(
            conn.execute(
                "SELECT count(*) FROM _fieldsync_changes WHERE seq > ?", [acked]
            ).fetchone()[0]
        ),
        "highest seq": max(int(top or 0), int(acked)),
    }
