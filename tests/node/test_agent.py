"""SyncAgent: back-off, one sync at a time, and the scheduled loop.

The loop's decisions (when to run next, when to stop) are driven tick by tick on a
ManualScheduler's clock (tests/fakes.py) against an in-memory hub; two tests keep
APScheduler's real timing, with short intervals.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from node.agent import SyncAgent
from node.client import HttpHubClient
from node.schedule import JOB_ID, Backoff, backoff_seconds, schedule
from node.store import HubSettings, NodeStore
from shared.errors import AuthError, FieldsyncError, HubUnavailableError, StoreError
from tests.fakes import FakeHub, ManualScheduler

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        pytest.param(0, 60, id="no-failure-normal-interval"),
        pytest.param(1, 120, id="doubles"),
        pytest.param(3, 480, id="keeps-doubling"),
        pytest.param(7, 3600, id="capped"),
        pytest.param(10_000, 3600, id="no-overflow"),
    ],
)
def test_backoff_doubles_up_to_the_cap(failures, expected):
    assert backoff_seconds(failures, 60, 3600) == expected


def test_backoff_counts_failures_in_a_row_and_adds_jitter():
    backoff = Backoff(60, 300, jitter_seconds=6, uniform=lambda low, high: high)
    assert [backoff.failed() for _ in range(4)] == [126, 246, 306, 306]
    backoff.succeeded()
    assert backoff.failed() == 126


def test_schedule_adds_one_job_that_never_overlaps_or_bursts():
    scheduler = BackgroundScheduler()  # never started: nothing runs
    schedule(scheduler, lambda: None, 60, jitter_seconds=6, first_run=T0)
    [job] = scheduler.get_jobs()
    assert (job.id, job.max_instances, job.coalesce) == (JOB_ID, 1, True)
    assert (job.trigger.interval, job.trigger.jitter) == (timedelta(seconds=60), 6)
    assert job.next_run_time == T0


@pytest.fixture
def quiet_office(tmp_path):
    """An office with nothing to push, synced with a FakeHub."""
    store = NodeStore.init(tmp_path / "almaty.db", "almaty", "http://127.0.0.1:9", "token")
    yield store
    store.close()


def run_ticks(store, hub, ticks, **options):
    """Run the agent on a ManualScheduler until ``ticks`` syncs have reported."""
    stop = threading.Event()
    scheduler = ManualScheduler(stop, T0)
    errors: list[Exception | None] = []

    def on_report(report, error):
        assert (report is None) != (error is None)
        errors.append(error)
        if len(errors) == ticks:
            stop.set()

    agent = SyncAgent(store, hub)
    agent.run(
        60, stop=stop, on_report=on_report, scheduler=scheduler, now=scheduler.clock, **options
    )
    return scheduler, errors


def at(*seconds: float) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in seconds]


def test_run_backs_off_doubling_to_the_cap_and_the_first_success_resets_it(quiet_office):
    hub, down = FakeHub(node="almaty"), HubUnavailableError("hub down")
    revoked = AuthError("token revoked", "unauthorized", 401)
    hub.answer("hub_time", None, down, revoked, down, down, None, down, None)
    scheduler, errors = run_ticks(quiet_office, hub, 8, jitter_seconds=0, max_backoff_seconds=300)

    assert errors == [None, down, revoked, down, down, None, down, None]
    # Waits: the interval, then 120, 240, 300 (capped) and 300 s; after the success
    # the interval, and 120 s again after the next failure.
    assert scheduler.runs == at(0, 60, 180, 420, 720, 1020, 1080, 1200)
    assert scheduler.moves == at(180, 420, 720, 1020, 1200)
    assert scheduler.options["max_instances"] == 1 and scheduler.options["coalesce"]
    assert scheduler.shutdowns == [True]
    assert quiet_office.status().last_success_at is not None


def test_run_default_jitter_is_a_tenth_of_the_interval(quiet_office):
    scheduler, errors = run_ticks(quiet_office, FakeHub(node="almaty"), 1)
    assert errors == [None]
    assert scheduler.options["jitter"] == 6


def test_a_local_error_neither_backs_off_nor_forgets_the_failures_before_it(quiet_office):
    hub, down = FakeHub(node="almaty"), HubUnavailableError("hub down")
    hub.answer("hub_time", down, StoreError("disk full"), down, None)
    scheduler, errors = run_ticks(quiet_office, hub, 4, jitter_seconds=0)
    assert [type(e) for e in errors] == [
        HubUnavailableError,
        StoreError,
        HubUnavailableError,
        type(None),
    ]
    # 120 s after the first failure; the interval after the local error; 240 s after
    # the second failure of the hub.
    assert scheduler.runs == at(0, 120, 180, 420)


def test_run_stopped_during_a_failed_sync_does_not_move_the_job(quiet_office):
    hub, down = FakeHub(node="almaty"), HubUnavailableError("hub down")
    hub.answer("hub_time", down)
    scheduler, errors = run_ticks(quiet_office, hub, 1, jitter_seconds=0)
    assert errors == [down]
    assert scheduler.runs == at(0)
    assert scheduler.moves == []
    assert scheduler.shutdowns == [True]


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def office(tmp_path):
    store = NodeStore.init(tmp_path / "astana.db", "astana", dead_url(), "token")
    client = HttpHubClient(store.hub_url, store.token, timeout_seconds=2)
    yield store, client
    client.close()
    store.close()


def test_unreachable_hub_keeps_changes_and_records_the_error(office):
    store, client = office
    store.db.conn.execute("INSERT INTO cases (id) VALUES ('c1')")
    with pytest.raises(HubUnavailableError, match="cannot reach http://127.0.0.1"):
        SyncAgent(store, client).sync_once()
    status = store.status()
    assert status.pending == 1
    assert "cannot reach" in status.last_error
    assert status.last_success_at is None


def test_second_sync_of_the_same_database_is_refused(office, tmp_path):
    store, client = office
    other_store = NodeStore(tmp_path / "astana.db")
    first, second = SyncAgent(store, client), SyncAgent(other_store, client)
    first._lock.acquire()
    try:
        with pytest.raises(StoreError, match="another sync"):
            second.sync_once()
    finally:
        first._lock.release()
        other_store.close()


def test_run_backs_off_while_the_hub_is_unreachable_and_stops_cleanly(office):
    store, client = office
    agent = SyncAgent(store, client)
    stop = threading.Event()
    moments: list[float] = []
    errors: list[Exception] = []

    def on_report(report, error):
        moments.append(time.monotonic())
        errors.append(error)
        if len(moments) == 4:
            stop.set()

    runner = threading.Thread(
        target=agent.run,
        args=(0.05,),
        kwargs={"jitter_seconds": 0, "stop": stop, "on_report": on_report},
    )
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "the agent did not stop"
    assert all(isinstance(e, HubUnavailableError) for e in errors)
    gaps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
    # Waits of about 0.1, 0.2 and 0.4 s: each clearly longer than the one before.
    assert gaps[1] > gaps[0] * 1.3 and gaps[2] > gaps[1] * 1.3, gaps


@pytest.mark.parametrize("error", [StoreError("refused"), HubUnavailableError("hub down")])
def test_stop_during_a_failing_sync_returns(office, error):
    """A sync that fails just as the agent is stopped must not hang the stop."""
    store, client = office
    stop, started = threading.Event(), threading.Event()
    reports: list[Exception] = []

    class Failing(SyncAgent):
        def sync_once(self):
            started.set()
            stop.wait(5)
            time.sleep(0.2)  # it fails just after the stop was asked for
            raise error

    agent = Failing(store, client)
    runner = threading.Thread(
        target=agent.run,
        args=(60,),
        kwargs={"stop": stop, "on_report": lambda report, exc: reports.append(exc)},
        daemon=True,
    )
    runner.start()
    assert started.wait(5)
    stop.set()
    runner.join(10)
    assert not runner.is_alive(), "run() did not return after stop"
    assert reports == [error]


def test_the_client_is_made_once_and_again_only_when_the_settings_change(quiet_office, caplog):
    made: list[HubSettings] = []
    first = FakeHub(node="almaty")

    def connect(settings: HubSettings) -> FakeHub:
        made.append(settings)
        return FakeHub(node="almaty")

    agent = SyncAgent(quiet_office, first, connect=connect)
    for _ in range(3):
        agent.sync_once()
    assert made == [] and agent.client is first and len(first.requests) > 0
    assert not agent.settings_changed()

    quiet_office.set_hub(token="the-new-token")
    assert agent.settings_changed()
    with caplog.at_level(logging.INFO, logger="fieldsync.agent"):
        agent.sync_once()
        agent.sync_once()
    assert made == [HubSettings("http://127.0.0.1:9", "the-new-token", None)]
    assert agent.client is not first and len(agent.client.requests) > 0
    assert "token replaced" in caplog.text and "the-new-token" not in caplog.text

    quiet_office.set_hub("https://hub.example.org", ca_file="/etc/ca.pem")
    agent.sync_once()
    assert made[-1] == HubSettings("https://hub.example.org", "the-new-token", "/etc/ca.pem")
    assert len(made) == 2


def test_a_client_that_cannot_be_made_fails_the_sync_and_is_recorded(quiet_office):
    def connect(settings: HubSettings) -> FakeHub:
        raise FieldsyncError(f"cannot use the CA file {settings.ca_file}: No such file")

    agent = SyncAgent(quiet_office, FakeHub(node="almaty"), connect=connect)
    quiet_office.set_hub(ca_file="/gone/ca.pem")
    with pytest.raises(FieldsyncError, match="/gone/ca.pem"):
        agent.sync_once()
    assert "/gone/ca.pem" in (quiet_office.status().last_error or "")


def test_settings_are_not_compared_while_a_sync_runs(quiet_office):
    agent = SyncAgent(quiet_office, FakeHub(node="almaty"), connect=lambda s: FakeHub())
    quiet_office.set_hub(token="another")
    with agent._lock:
        assert not agent.settings_changed()
    assert agent.settings_changed()
    assert not SyncAgent(quiet_office, FakeHub(node="almaty")).settings_changed()


def test_status_shows_the_next_try_while_backing_off(quiet_office):
    hub, down = FakeHub(node="almaty"), HubUnavailableError("hub down")
    hub.answer("hub_time", down)
    run_ticks(quiet_office, hub, 1, jitter_seconds=0)
    waits = datetime.fromisoformat(quiet_office.status().next_try_at or "") - datetime.now(UTC)
    assert timedelta(seconds=100) < waits <= timedelta(seconds=120)  # 2 x the 60 s interval
    run_ticks(quiet_office, hub, 1, jitter_seconds=0)  # a success: no wait any more
    assert quiet_office.status().next_try_at is None
