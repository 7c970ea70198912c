"""
SyncAgent: one sync is one :meth:`SyncAgent.sync_once` (push everything pending, in
acknowledged batches, then pull every page); :meth:`SyncAgent.run` calls it on an
APScheduler interval with jitter, backing off exponentially while the hub cannot be
reached (node/schedule.py, the only module that imports APScheduler).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from node import restore, schema_sync, status as sync_status
from node.client import HubClient, HubClock
from node.compact import compact_if_due
from node.inbox import Checked
from node.schedule import local_now, run_agent
from node.store import HubSettings, NodeStore
from shared.clock import now_ms
from shared.errors import (
    ClockSkewError,
    DivergedError,
    FieldsyncError,
    HubRejectedError,
    HubUnavailableError,
    ProtocolError,
    StoreError,
    error_code,
)
from shared.protocol import PullPage, PushResult
from shared.reports import StatusReport

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from node.schedule import OnReport

log = logging.getLogger("fieldsync.agent")

# Changes per push and records per pull page. Fewer, larger requests cost much less per
# change (one durable commit at the hub per batch); 5,000 case changes are about 330 KB
# on the wire. On a very slow or often-cut link, `node sync --batch-size` sends less.
DEFAULT_BATCH_SIZE = 5000
DEFAULT_PAGE_SIZE = 5000
# The first batch of a push holds at most this many changes: the hub starts on it
# while the office reads and encodes the next one, rather than waiting for a whole
# batch to be read first (30,000 changes: the first request leaves after about 20 ms
# rather than 60).
FIRST_BATCH_SIZE = 1000
# A larger clock error than this is shown by `node status`.
LARGE_OFFSET_MS = 60_000


@dataclass(slots=True)
class SyncReport:
    """What one sync did (so far, while it runs)."""

    pushed: int = 0
    pulled: int = 0
    conflicts: int = 0
    seconds: float = 0.0
    rejected: int = 0
    lost: int = 0  # this office's edits the hub newly told of as lost
    resolved: int = 0  # of those it told of before, how many an admin resolved since

    def summary(self) -> str:
        rejected = f", rejected {self.rejected}" if self.rejected else ""
        told = []
        if self.lost:
            told.append(f"{self.lost} of this office's edits lost")
        if self.resolved:
            told.append(f"{self.resolved} resolved by an admin")
        lost = f" ({', '.join(told)}: see `fieldsync node conflicts`)" if told else ""
        return (
            f"pushed {self.pushed}, pulled {self.pulled}, conflicts {self.conflicts}"
            f"{lost}{rejected} ({self.seconds:.1f} s)"
        )


# progress(phase, done, total): phase is "push" or "pull"; total may grow while pulling.
Progress = Callable[[str, int, int], None]


class SyncAgent:
    """Moves one office's changes to the hub and everyone else's back."""

    def __init__(
        self,
        store: NodeStore,
        client: HubClient,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        page_size: int = DEFAULT_PAGE_SIZE,
        now: Callable[[], int] = now_ms,
        connect: Callable[[HubSettings], HubClient] | None = None,
    ) -> None:
        """``connect``: how to make a client from the office's stored settings. With it,
        each sync reads them first and, if `node set` changed them, makes a new
        client (the one before is closed); without it ``client`` is kept for good."""
        if batch_size < 1 or page_size < 1:
            raise ValueError(
                f"batch_size and page_size must be positive, got {batch_size}, {page_size}"
            )
        self.store = store
        self.client = client
        self.batch_size = batch_size
        self.page_size = page_size
        self._now = now
        self.interval_seconds: float | None = None  # set by run(), reported to the hub
        self._connect = connect
        # Set by the schedule while it backs off: the wait before the next try.
        self.next_try_seconds: float | None = None
        self._settings = store.hub_settings() if connect else None
        # Never two syncs of one database at once, in this process or another one.
        self._lock = FileLock(f"{store.path}-sync.lock", thread_local=False)
        self._watch: restore.Watch | None = None  # the hub's identity (node/restore.py)
        # The last status report the hub accepted, and when (node/status.py: report_due).
        self._reported: tuple[StatusReport, float] | None = None
        # Whether this sync shows its progress: only then is the hub asked to count
        # what is left to pull (a query over every record after the cursor).
        self._counting = False

    def sync_once(self, progress: Progress | None = None) -> SyncReport:
        """Push every pending change, then pull until the hub has nothing more.

        Each acknowledged batch and each applied page is saved at once, so a sync
        cut at any point resumes where it stopped. On failure the error is recorded
        for `node status` and raised.
        """
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(
                f"another sync of {self.store.path} is running; try again when it ends"
            ) from None
        try:
            self._reconnect()
            self._counting = progress is not None
            report = self._sync(progress or (lambda phase, done, total: None))
            compact_if_due(self.store.db, self.store.schema, self.store.path)
            return report
        except sqlite3.Error as exc:
            # sqlite3 quotes undecodable text in its message: never pass that on.
            detail = str(exc).split(" with text ", 1)[0]
            error = StoreError(f"cannot sync {self.store.path}: local database error: {detail}")
            with contextlib.suppress(sqlite3.Error):
                self.store.record_sync(
                    pushed=0, pulled=0, conflicts=0, error=str(error), error_code=error_code(error)
                )
            raise error from exc
        finally:
            self._lock.release()

    def settings_changed(self) -> bool:
        """Whether `node set` changed the hub link's settings since the last sync (False
        while a sync runs, or when the agent keeps one client for good). Safe to call
        from another thread than the syncing one."""
        if self._connect is None or self._lock.is_locked:
            return False
        return self.store.hub_settings(own_connection=True) != self._settings

    def backing_off(self, seconds: float) -> None:
        """A running agent waits ``seconds`` before its next try, after a failed sync
        (whose record cleared the time before); `node status` shows when."""
        self.next_try_seconds = seconds
        at = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="seconds")
        with contextlib.suppress(sqlite3.Error):  # shown to people only
            self.store.note_next_try(at)

    def _reconnect(self) -> None:
        """Make a new client if the stored settings changed (see ``connect``)."""
        if self._connect is None:
            return
        settings = self.store.hub_settings()
        if settings == self._settings:
            return
        try:
            client = self._connect(settings)
        except FieldsyncError as exc:  # a CA file that cannot be read: recorded, kept
            self.store.record_sync(
                pushed=0, pulled=0, conflicts=0, error=str(exc), error_code=error_code(exc)
            )
            raise
        self.client.close()
        before, self.client, self._settings = self._settings, client, settings
        self._reported = None  # perhaps another hub: told at the end of this sync
        log.info("hub settings changed: %s", settings.changes_from(before))

    def _sync(self, progress: Progress) -> SyncReport:
        started = time.monotonic()
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        sent, received = self.client.traffic()
        report = SyncReport()

        def record(error: FieldsyncError | None = None) -> None:
            report.seconds = time.monotonic() - started
            now_sent, now_received = self.client.traffic()
            self.store.record_sync(
                pushed=report.pushed,
                pulled=report.pulled,
                conflicts=report.conflicts,
                rejected=report.rejected,
                error=None if error is None else str(error),
                error_code=None if error is None else error_code(error),
                started_at=started_at,
                seconds=report.seconds,
                bytes_sent=now_sent - sent,
                bytes_received=now_received - received,
            )

        try:
            first = self._idle_start()
            if first is None:
                clock = self._correct_clock()
                # Before anything moves: the office's tables as the hub's schema version.
                schema_sync.catch_up(self.store, self.client, clock.schema_version, clock.epoch)
                self._watch = restore.begin(
                    self.store.db, self.store.node, clock, self.client, self.batch_size
                )
                self._push_all(report, progress)
            assert self._watch is not None
            mark = self._pull_all(report, progress, first)
            self._learn_lost(mark, report)
            self._watch.done()
        except FieldsyncError as exc:
            record(exc)
            if not isinstance(exc, HubUnavailableError):
                self._report_status()
            raise
        record()
        self._report_status()
        return report

    def _idle_start(self) -> tuple[PullPage, int] | None:
        """An idle sync in one request: with nothing queued and the last sync a success,
        the health check is left out and the first pull page tells what it would have
        (the hub's time, ``acked``, epoch and schema version). Returns that page and
        when it was asked for, to be applied; or None (nothing asked, or the page
        discarded unapplied) when the sync must take the full path: the hub restored
        (another epoch), another schema version, the clock's error moved, the hub
        holding other changes of this office than it knows of."""
        if self.store.pending_count() or not sync_status.last_sync_ok(self.store.db):
            return None
        mine = schema_sync.stored_version(self.store.db.conn)
        if mine == 0:  # never took the hub's version: the health check says which
            return None
        schema_sync.catch_up(self.store, self.client, mine)  # columns added by hand
        sent = self._now()
        try:
            page = self.client.pull(
                self.store.cursor,
                self.page_size,
                include_own=self.store.repull,
                count=self._counting,
            )
        except HubRejectedError as exc:
            if exc.code != "refused":  # another schema version at the hub: full path
                raise
            log.debug("full sync: %s", exc)
            return None
        self._check_identity(page.node)
        watch = restore.Watch(self.store.db, self.store.node, page.epoch)
        if (
            watch.new
            or page.acked != self.store.last_seq()
            or (page.schema_version and page.schema_version != mine)
            or self._offset_moved(sent, page.hub_time_ms)
        ):
            # Changes made since the sync began count too (acked below last_seq).
            log.debug("full sync: the hub's answer to an idle pull changed")
            return None
        clock = HubClock(page.hub_time_ms, page.acked, page.epoch, page.schema_version)
        self._watch = restore.begin(
            self.store.db, self.store.node, clock, self.client, self.batch_size
        )
        return page, sent

    def _offset_moved(self, sent_ms: int, hub_time_ms: int) -> bool:
        """Whether an answer to a request sent at ``sent_ms`` would change the clock's
        offset (see :meth:`_learn_offset`)."""
        received = self._now()
        offset = hub_time_ms - (sent_ms + received) // 2
        return abs(offset - self.store.clock_offset_ms) > max(1000, (received - sent_ms))

    def _report_status(self) -> None:
        """Tell the hub how this office is, with the syncs it has not heard of yet, if
        anything changed since the last report it accepted or that is old
        (node/status.py: ``report_due``).

        Best effort: a report that does not arrive is sent with the next one.
        """
        try:
            report = self.store.status_report(self.interval_seconds)
            last, at = self._reported or (None, 0.0)
            if not sync_status.report_due(report, last, time.monotonic() - at):
                return
            if self.client.report_status(report):
                self._reported = (report, time.monotonic())
                if report.events:
                    self.store.mark_reported(report.events[-1].id)
        except (FieldsyncError, sqlite3.Error) as exc:  # the sync itself is done
            log.debug("could not report this office's status to the hub: %s", exc)

    def _correct_clock(self) -> HubClock:
        """Learn the clock's error from the hub and, if it changed, re-stamp queued work.

        Done before pushing, so that no change stamped by a wrong clock reaches the
        hub while the office could know better.
        """
        sent = self._now()
        clock = self.client.hub_time()
        hub_now, acked = clock.time_ms, clock.acked
        if acked is not None:
            # Committed by the hub, whether or not this copy of the database heard so
            # (a lost answer, a restored backup): they keep the stamps the hub holds.
            self.store.note_sent(acked)
        before = self.store.clock_offset_ms
        moved = self._learn_offset(sent, hub_now)
        if self.store.clock_offset_ms != before:
            large = abs(self.store.clock_offset_ms) >= LARGE_OFFSET_MS
            log.log(
                logging.WARNING if large else logging.INFO,
                "the clock of %s is %.0f s %s the hub's; %d queued changes re-stamped",
                self.store.path,
                abs(self.store.clock_offset_ms) / 1000,
                "behind" if self.store.clock_offset_ms > 0 else "ahead of",
                moved,
            )
        return clock

    def _learn_lost(self, mark: int, report: SyncReport) -> None:
        """Fetch this office's lost edits the hub logged or resolved since the last
        ones stored, if the pull's ``mark`` says there are any (no request otherwise)."""
        after = self.store.conflicts_mark()
        while mark > after:
            page = self.client.lost_edits(after, self.page_size)
            self._check_identity(page.node)
            if not page.conflicts:
                break
            new, settled = self.store.store_lost(page.conflicts)
            report.lost += new
            report.resolved += settled
            after = page.cursor
            if not page.more:
                break

    def _pull_all(
        self, report: SyncReport, progress: Progress, first: tuple[PullPage, int] | None = None
    ) -> int:
        """Pull pages until the hub has nothing more, counting into ``report``; returns
        the newest mark of this office's lost edits the pages carried. ``first``: the
        first page, already asked for (see :meth:`_idle_start`), and when."""
        checked = resynced = False
        total = 0
        mark = 0
        # Two threads: the next page is asked for as soon as the page before arrives,
        # while that one is still checked (see _fetch_page).
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fieldsync-pull") as pool:
            ahead: tuple[Future[PullPage], Future[Checked | None], int] | None = None
            while True:
                plans: Future[Checked | None] | None = None
                if first is not None:
                    page, sent = first
                    first = None
                elif ahead is not None:
                    arrived, plans, sent = ahead
                    page = arrived.result()
                else:
                    sent = self._now()
                    page = self.client.pull(
                        self.store.cursor,
                        self.page_size,
                        include_own=self.store.repull,
                        count=not checked and self._counting,
                    )
                ahead = None
                self._check_identity(page.node, page.epoch)
                self._learn_offset(sent, page.hub_time_ms)
                mark = max(mark, page.conflicts)
                if page.resync:
                    # The office's scope changed: pull it whole again (once a sync).
                    if resynced:
                        raise ProtocolError("the hub asked for a second resync in one sync")
                    resynced = True
                    self.store.start_resync()
                    log.info("the scope of office %s changed: pulling it again", page.node)
                    continue
                if not checked and page.acked > self.store.last_seq():
                    # The hub holds changes of ours this database never made: it is
                    # an older copy. Number new work past them and rebuild from the hub.
                    self.store.renumber_after(page.acked)
                    log.warning("%s is an older copy of office %s", self.store.path, page.node)
                    checked = True
                    continue
                checked = True
                if page.more:  # fetch the next page while this one is applied
                    repull = self.store.repull
                    coming: Future[PullPage] = Future()
                    checking = pool.submit(self._fetch_page, page.cursor, repull, coming)
                    ahead = (coming, checking, self._now())
                total = max(total, page.remaining or 0)
                report.pulled += self.store.apply_page(page, plans.result() if plans else None)
                progress("pull", report.pulled, max(total, report.pulled))
                if not page.more:
                    break
        return mark

    def _fetch_page(
        self, cursor: int, include_own: bool, arrived: Future[PullPage]
    ) -> Checked | None:
        """Ask for the pull page after ``cursor`` (ahead, while the page before is
        written), hand it over through ``arrived`` as soon as it comes, then check it
        (None: the check failed; it is made again, and the page refused, in its turn,
        after the checks that come first)."""
        try:
            page = self.client.pull(cursor, self.page_size, include_own=include_own)
        except BaseException as exc:
            arrived.set_exception(exc)
            raise
        arrived.set_result(page)
        try:
            return self.store.check_page(page)
        except Exception:  # whatever it is, met again when the page is applied
            return None

    def _push_all(self, report: SyncReport, progress: Progress) -> None:
        """Push what was pending when the sync began, counting into ``report``.

        Changes made while it runs wait for the next sync, so steady typing at the
        office cannot keep the agent from pulling.
        """
        stop_at = self.store.last_seq()
        total = self.store.pending_count()
        done = 0
        batch_size = self.batch_size
        restamped = renumbered = False
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fieldsync-push") as pool:
            batch = self.store.pending(min(batch_size, FIRST_BATCH_SIZE))
            request: Future[PushResult] | None = None
            sent = 0
            while batch and batch[0].seq <= stop_at:
                if request is None:
                    self.store.note_sent(batch[-1].seq)
                    sent = self._now()
                    request = pool.submit(self.client.push, batch)
                # Read and encode the next batch while the hub works on this one.
                ahead = None
                body = None
                if batch[-1].seq < stop_at:
                    try:
                        ahead = self.store.pending(batch_size, batch)
                    except StoreError:
                        pass  # met again, and reported, when it is that batch's turn
                    if ahead and ahead[0].seq <= stop_at:
                        body = self.client.prepare_push(ahead)
                # And what acknowledging this one will write, so that little is left
                # once the hub answers (after the last batch, the sync waits for that).
                self.store.prepare_ack(batch)
                try:
                    result = request.result()
                except ClockSkewError as exc:
                    if restamped or exc.hub_time_ms is None:
                        raise
                    # Our clock is wrong: learn by how much, re-stamp, send again. The
                    # hub committed nothing after ``acked``: those may be re-stamped.
                    acked = exc.details.get("acked")
                    self.store.not_committed_after(acked if isinstance(acked, int) else 0)
                    self._learn_offset(sent, exc.hub_time_ms)
                    self.store.restamp(exc.hub_time_ms, 0)  # any still past the hub's time
                    restamped = True
                    log.warning("%s; re-stamped the queued changes with the hub's time", exc)
                    batch = self.store.pending(batch_size)
                    continue
                except DivergedError as exc:
                    acked, first = exc.details.get("acked"), exc.details.get("diverged_at")
                    if renumbered or not isinstance(acked, int) or not isinstance(first, int):
                        raise
                    # Changes before the first reused number are the hub's own receipts:
                    # committed. The rest are new work and get fresh numbers.
                    self.store.mark_acked(first - 1, [c for c in batch if c.seq < first])
                    moved = self.store.renumber_after(acked)
                    stop_at = self.store.last_seq()
                    renumbered = True
                    log.warning("%s: %d queued changes renumbered", exc, moved)
                    batch = self.store.pending(batch_size)
                    continue
                except HubRejectedError as exc:
                    if exc.code != "too_large" and exc.status != 413:  # 413: maybe a proxy
                        raise
                    if len(batch) > 1:
                        batch_size = max(1, len(batch) // 2)  # send smaller requests
                        batch = self.store.pending(batch_size)
                        continue
                    raise HubRejectedError(
                        f"change {batch[0].seq} ({batch[0].table} {batch[0].pk}) is larger "
                        f"than the hub accepts in one request: {exc}",
                        exc.code,
                        exc.status,
                    ) from exc
                finally:
                    request = None
                self._check_identity(result.node, result.epoch)
                answered = (sent, result.hub_time_ms)
                if (
                    ahead
                    and ahead[0].seq <= stop_at
                    and not result.rejected
                    and result.acked >= batch[-1].seq
                ):
                    # The hub took the whole batch: send the next one now, and save
                    # the acknowledgement while the hub works on it. Its bases already
                    # count this batch's effects; a crash in between only makes the
                    # next sync send both again, which the hub's receipts pass.
                    self.store.note_sent(ahead[-1].seq)
                    sent = self._now()
                    request = pool.submit(self.client.push, ahead, body)
                # After the next batch is on its way: re-stamping spares what was sent.
                self._learn_offset(*answered)
                self.store.mark_acked(result.acked, batch, result.rejected)
                for rejection in result.rejected:
                    log.warning("the hub rejected change %d: %s", rejection.seq, rejection.reason)
                report.pushed += result.applied
                report.conflicts += result.conflicts
                report.rejected += len(result.rejected)
                done += sum(1 for c in batch if c.seq <= result.acked)
                progress("push", done, max(total, done))
                if result.acked < batch[-1].seq:
                    raise HubRejectedError(
                        f"the hub acknowledged changes up to {result.acked} of "
                        f"{batch[-1].seq}; the rest stay queued"
                    )
                if ahead is None or result.rejected:
                    # Rejected records were put back as the hub holds them: read again.
                    ahead = self.store.pending(batch_size)
                batch = ahead

    def _check_identity(self, node: str, epoch: str = "") -> None:
        if self._watch is not None:
            self._watch.check(epoch)
        if node != self.store.node:
            raise HubRejectedError(
                f"the token of {self.store.path} belongs to office {node!r}, but this "
                f"database is office {self.store.node!r}; use that office's token",
                "forbidden",
                403,
            )

    def _learn_offset(self, sent_ms: int, hub_time_ms: int) -> int:
        """Learn the clock's offset from the hub's time in an answer to a request sent
        at ``sent_ms``; if it changed, queued changes not yet sent are re-stamped by
        the difference (they were stamped under the old one). Returns how many."""
        received = self._now()
        offset = hub_time_ms - (sent_ms + received) // 2
        if abs(offset - self.store.clock_offset_ms) > max(1000, (received - sent_ms)):
            return self.store.set_clock_offset(offset, hub_time_ms)
        return 0

    def run(
        self,
        interval_seconds: float,
        *,
        jitter_seconds: float | None = None,
        max_backoff_seconds: float = 3600.0,
        stop: threading.Event | None = None,
        on_report: OnReport | None = None,
        scheduler: BaseScheduler | None = None,
        now: Callable[[], datetime] = local_now,
    ) -> None:
        """Sync now and then every ``interval_seconds`` until ``stop`` is set.

        While the hub is unreachable the wait doubles after each failure, up to
        ``max_backoff_seconds``; the first success returns to the normal interval.
        A sync in progress is never overlapped by the next, and finishes before
        this returns.

        ``scheduler`` (an APScheduler ``BackgroundScheduler`` unless given) and
        ``now`` (its clock, for the back-off) are for tests that run the syncs
        one by one on a clock of their own.
        """
        self.interval_seconds = interval_seconds
        run_agent(
            self,
            interval_seconds,
            jitter_seconds=jitter_seconds,
            max_backoff_seconds=max_backoff_seconds,
            stop=stop,
            on_report=on_report,
            scheduler=scheduler,
            now=now,
        )
