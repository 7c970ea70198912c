"""Stand-ins for the sync agent's unit tests.

:class:`FakeHub` implements the :class:`node.client.HubClient` protocol in memory: it
answers as a hub that takes everything, and says something else (an error, a page)
where a test scripts it. Every request is kept in :attr:`FakeHub.requests`, so a test
asserts what the agent asked for, not only what it ended with.

:class:`ManualScheduler` stands in for APScheduler's scheduler, on a clock of its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from node.client import HubClock
from shared.clock import now_ms
from shared.protocol import Change, ConflictPage, PullPage, PushResult
from shared.reports import StatusReport

# A scripted answer: an exception to raise, a value to return, a function of the
# request's arguments that does either, or None to answer as usual.
Answer = BaseException | PushResult | PullPage | HubClock | Callable[..., Any] | None


@dataclass(frozen=True, slots=True)
class Request:
    """One request the agent made: ``push`` (its changes), ``pull`` or ``hub_time``."""

    kind: str
    changes: tuple[Change, ...] = ()
    cursor: int | None = None
    include_own: bool = False

    @property
    def seqs(self) -> list[int]:
        return [c.seq for c in self.changes]


@dataclass
class FakeHub:
    """A hub in memory that commits every push, unless told to answer otherwise.

    ``node``: the office its token belongs to. ``acked``: the highest change number
    of that office it has dealt with. ``clock``: its time in milliseconds.
    """

    node: str = "astana"
    acked: int = 0
    clock: Callable[[], int] = now_ms
    requests: list[Request] = field(default_factory=list)
    received: dict[int, Change] = field(default_factory=dict)  # committed, by seq
    reports: list[StatusReport] = field(default_factory=list)
    _script: dict[str, deque[Answer]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, kind: str, *answers: Answer) -> None:
        """Answer the next ``kind`` requests ("push", "pull", "hub_time") with these,
        in order; after them, answer as a hub that takes everything."""
        self._script.setdefault(kind, deque()).extend(answers)

    def pushes(self) -> list[list[int]]:
        """The change numbers of each push, in order."""
        return [r.seqs for r in self.requests if r.kind == "push"]

    def pulls(self) -> list[Request]:
        return [r for r in self.requests if r.kind == "pull"]

    def _scripted(self, kind: str, *args: Any) -> Any:
        """The next scripted answer of ``kind`` (raised if an exception), or None."""
        script = self._script.get(kind)
        if not script:
            return None
        answer = script.popleft()
        if answer is None:
            return None
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(*args)
        return answer

    # -- HubClient --------------------------------------------------------------

    def prepare_push(self, changes: Sequence[Change]) -> bytes:
        return b""  # nothing goes on a wire

    def push(self, changes: Sequence[Change], body: bytes | None = None) -> PushResult:
        with self._lock:
            self.requests.append(Request("push", tuple(changes)))
        scripted = self._scripted("push", changes)
        if scripted is not None:
            assert isinstance(scripted, PushResult)
            return scripted
        fresh = [c for c in changes if c.seq > self.acked]
        self.received.update((c.seq, c) for c in fresh)
        self.acked = max(self.acked, changes[-1].seq)
        return PushResult(self.acked, len(fresh), 0, self.clock(), self.node)

    def pull(
        self, cursor: int, limit: int, *, include_own: bool = False, count: bool = False
    ) -> PullPage:
        with self._lock:
            self.requests.append(Request("pull", cursor=cursor, include_own=include_own))
        scripted = self._scripted("pull", cursor, limit)
        if scripted is not None:
            assert isinstance(scripted, PullPage)
            return scripted
        return PullPage([], cursor, False, self.clock(), self.node, self.acked, 0)

    def lost_edits(self, after: int, limit: int) -> ConflictPage:
        return ConflictPage([], after, False, self.node)

    def hub_time(self) -> HubClock:
        with self._lock:
            self.requests.append(Request("hub_time"))
        scripted = self._scripted("hub_time")
        if scripted is not None:
            assert isinstance(scripted, HubClock)
            return scripted
        return HubClock(self.clock(), self.acked)

    def report_status(self, report: StatusReport) -> bool:
        self.reports.append(report)
        return True

    def traffic(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


class ManualScheduler:
    """Runs the one job it is given as APScheduler's interval trigger would, on a clock
    of its own that jumps from one run to the next: no sleeps, no threads.

    :meth:`start` blocks, as APScheduler's BlockingScheduler does, running the job
    until ``stop`` is set. ``runs`` holds the time of each run, ``moves`` each time the
    job was moved (``modify_job``).
    """

    def __init__(self, stop: threading.Event, start: datetime) -> None:
        self.stop = stop
        self.now = start
        self.job: Callable[[], None] | None = None
        self.options: dict[str, Any] = {}
        self.runs: list[datetime] = []
        self.moves: list[datetime] = []
        self.shutdowns: list[bool] = []
        self._next = start

    def clock(self) -> datetime:
        return self.now

    def add_job(self, func: Callable[[], None], trigger: str, **options: Any) -> None:
        assert trigger == "interval" and self.job is None
        self.job, self.options = func, options
        self._next = options["next_run_time"]

    def modify_job(self, job_id: str, *, next_run_time: datetime) -> None:
        assert job_id == self.options["id"]
        self.moves.append(next_run_time)
        self._next = next_run_time

    def start(self) -> None:
        assert self.job is not None
        while not self.stop.is_set():
            self.now = self._next
            self.runs.append(self.now)
            # As APScheduler does: the next run is due an interval after this one's
            # time, worked out before the job runs (which may move it).
            self._next = self.now + timedelta(seconds=self.options["seconds"])
            self.job()

    def shutdown(self, wait: bool = True) -> None:
        self.shutdowns.append(wait)
