"""
`hub serve`'s compaction (hub/compact.py) in a thread of its own: ``first`` after the
hub starts, then every day; an hour after a run that failed; skipped when another
process serving the same database is compacting it (Busy).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from hub.compact import (
    COMPACT_EVERY,
    DEFAULT_TOMBSTONE_DAYS,
    FIRST_COMPACT_AFTER,
    RETRY_AFTER,
    Busy,
    Compacted,
    Keep,
    Stopped,
    compact,
)
from hub.database import HubDatabase

log = logging.getLogger("fieldsync.hub")


class Compactor:
    """Runs :func:`compact` in a thread of its own: ``first`` after start, then ``every``
    (``retry`` after a run that failed)."""

    def __init__(
        self,
        hub: HubDatabase,
        keep: Keep,
        *,
        tombstone_days: int = DEFAULT_TOMBSTONE_DAYS,
        first: timedelta = FIRST_COMPACT_AFTER,
        every: timedelta = COMPACT_EVERY,
        retry: timedelta = RETRY_AFTER,
    ) -> None:
        self.hub = hub
        self.retry = retry
        self.keep = keep
        self.tombstone_days = tombstone_days
        self.first = first
        self.every = every
        self.runs = 0
        self.last: Compacted | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fieldsync-compact", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        wait = self.first
        while not self._stop.wait(wait.total_seconds()):
            wait = self.every
            try:
                self.last = compact(
                    self.hub, keep=self.keep, tombstone_days=self.tombstone_days, stop=self._stop
                )
                self.runs += 1
                log.info("compaction (history kept: %s): %s", self.keep, self.last.summary())
            except Stopped:
                return
            except Busy:  # another worker's turn: this one looks again tomorrow
                log.info("compaction left to another process serving this hub")
            except Exception:  # the hub goes on serving; tried again before long
                log.exception("compaction failed; trying again in %s", self.retry)
                wait = self.retry
