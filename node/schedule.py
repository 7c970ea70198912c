"""
Running the sync agent on a schedule: the only module that imports APScheduler.

:func:`run_agent` syncs now and then every interval until told to stop (what
``fieldsync node run`` does); :func:`schedule` adds the job, :class:`SyncJob` is what the
scheduler runs and :class:`Backoff` decides the waits after failures, so that tests run
syncs one by one on a clock of their own, with no real sleeps.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from shared.errors import FieldsyncError, HubRejectedError, HubUnavailableError

if TYPE_CHECKING:
    from node.agent import SyncAgent, SyncReport

    # on_report(report, error): after each scheduled sync, one of the two is None.
    OnReport = Callable[[SyncReport | None, FieldsyncError | None], None]

log = logging.getLogger("fieldsync.agent")

# The scheduler's id of the sync job.
JOB_ID = "fieldsync-sync"
# While backing off, how often to look for new hub settings, at most.
WATCH_SECONDS = 5.0


def local_now() -> datetime:
    """The time now, in the local zone, as APScheduler takes it."""
    return datetime.now().astimezone()


def backoff_seconds(failures: int, interval_seconds: float, max_seconds: float) -> float:
    """How long to wait after ``failures`` failed syncs in a row: doubling, capped."""
    if failures <= 0:
        return interval_seconds
    return float(min(interval_seconds * 2 ** min(failures, 32), max_seconds))


def run_agent(
    agent: SyncAgent,
    interval_seconds: float,
    *,
    jitter_seconds: float | None = None,
    max_backoff_seconds: float = 3600.0,
    stop: threading.Event | None = None,
    on_report: OnReport | None = None,
    scheduler: BaseScheduler | None = None,
    now: Callable[[], datetime] = local_now,
) -> None:
    """Run ``agent.sync_once`` now and then every ``interval_seconds`` until ``stop``
    is set (see :meth:`node.agent.SyncAgent.run`)."""
    stop = stop or threading.Event()
    jitter = interval_seconds / 10 if jitter_seconds is None else jitter_seconds
    if scheduler is None:
        scheduler = BackgroundScheduler()

    # Rescheduling while the scheduler shuts down would deadlock inside APScheduler
    # (shutdown waits for this job while holding the lock modify_job needs).
    reschedule = threading.Lock()

    def later(delay: float) -> None:
        with reschedule:
            if not stop.is_set():
                scheduler.modify_job(JOB_ID, next_run_time=now() + timedelta(seconds=delay))

    job = SyncJob(agent, Backoff(interval_seconds, max_backoff_seconds, jitter), later, on_report)
    schedule(scheduler, job, interval_seconds, jitter_seconds=jitter, first_run=now())
    scheduler.start()
    try:
        # While backing off, new settings (`node set --token`, `--hub`, `--ca-file`) may
        # cure the failure: look every interval (at most every WATCH_SECONDS), and if so
        # sync now rather than at the end of the wait.
        while not stop.wait(min(interval_seconds, WATCH_SECONDS)):
            if job.backoff.failures and agent.settings_changed():
                log.info("hub settings changed; syncing now")
                job.backoff.succeeded()
                later(0)
    finally:
        stop.set()
        with reschedule:  # no job is between its check of stop and modify_job
            pass
        scheduler.shutdown(wait=True)


def schedule(
    scheduler: BaseScheduler,
    job: Callable[[], None],
    interval_seconds: float,
    *,
    jitter_seconds: float,
    first_run: datetime,
) -> None:
    """Run ``job`` on ``scheduler`` at ``first_run``, then every ``interval_seconds``.

    ``max_instances=1``: a slow sync is never overlapped by the next. ``coalesce``: an
    office waking from a long sleep runs one sync, not a burst.
    """
    scheduler.add_job(
        job,
        "interval",
        seconds=interval_seconds,
        jitter=jitter_seconds,
        id=JOB_ID,
        max_instances=1,
        coalesce=True,
        replace_existing=True,
        next_run_time=first_run,
    )


@dataclass(slots=True)
class Backoff:
    """How long to wait after a failed sync: ``interval_seconds`` doubled for each
    failure in a row, up to ``max_seconds``, plus up to ``jitter_seconds`` at random
    (``uniform``) so that offices cut off together do not all come back at once."""

    interval_seconds: float
    max_seconds: float
    jitter_seconds: float = 0.0
    uniform: Callable[[float, float], float] = random.uniform
    failures: int = 0

    def failed(self) -> float:
        """Count one more failure; return the wait before the next try."""
        self.failures += 1
        wait = backoff_seconds(self.failures, self.interval_seconds, self.max_seconds)
        return wait + self.uniform(0, self.jitter_seconds)

    def succeeded(self) -> None:
        self.failures = 0


class SyncJob:
    """What the scheduler runs: one sync, reported, then when to run the next.

    A failure that waiting may cure (the hub unreachable, or refusing until someone
    fixes something) asks ``later`` to move the next run :meth:`Backoff.failed`
    seconds away; after a success the scheduler's own interval goes on.
    """

    def __init__(
        self,
        agent: SyncAgent,
        backoff: Backoff,
        later: Callable[[float], None],
        on_report: OnReport | None = None,
    ) -> None:
        self.agent = agent
        self.backoff = backoff
        self.later = later
        self.on_report = on_report
        # With a report callback the caller tells people; the log keeps the details.
        self._level = logging.DEBUG if on_report else logging.INFO

    def __call__(self) -> None:
        try:
            report = self.agent.sync_once()
        except (HubUnavailableError, HubRejectedError) as exc:
            delay = self.backoff.failed()
            log.log(self._level, "%s; next try in %.0f s", exc, delay)
            self.agent.backing_off(delay)
            self._report(None, exc)
            self.later(delay)
            return
        except FieldsyncError as exc:
            log.log(self._level, "%s", exc)
            self.agent.next_try_seconds = None
            self._report(None, exc)
            return
        self.backoff.succeeded()
        self.agent.next_try_seconds = None
        log.log(self._level, "sync: %s", report.summary())
        self._report(report, None)

    def _report(self, report: SyncReport | None, error: FieldsyncError | None) -> None:
        if self.on_report:
            self.on_report(report, error)
