"""SyncAgent: back-off, one sync at a time, and the scheduled loop."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from node.agent import SyncAgent, backoff_seconds
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import HubUnavailableError, StoreError


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
