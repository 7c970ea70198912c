"""Field conditions at one office: changes the hub rejects, long offline periods, progress."""

from __future__ import annotations

import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from hub.app import create_app
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import HubUnavailableError
from shared.schema import Schema
from tests.conftest import Hub, Office, serve
from tests.faults import FlakyTransport
from tests.integration.test_sync import add_case, assert_converged, case, sync_all, write

pytestmark = pytest.mark.integration

# The hub's rules are stricter than the offices' (headquarters added a CHECK since).
STRICT_CASES = Schema.load().source.replace(
    "household_size INTEGER,", "household_size INTEGER CHECK (household_size <= 20),"
)


@pytest.fixture
def strict_hub(tmp_path: Path) -> Iterator[Hub]:
    path = tmp_path / "strict-hub.db"
    store = SqliteHubStore(path, Schema.from_toml(STRICT_CASES))
    gen = serve(create_app(store))
    url = next(gen)
    try:
        yield Hub(url, store, path)
    finally:
        gen.close()
        store.close()


@pytest.fixture
def offices(strict_hub: Hub, tmp_path: Path) -> Iterator[list[Office]]:
    made = []
    for name in ("astana", "almaty"):
        token = strict_hub.store.add_node(name)
        strict_hub.store.set_scopes(name, ["*"])
        path = tmp_path / f"{name}.db"
        store = NodeStore.init(path, name, strict_hub.url, token)  # the default schema
        client = HttpHubClient(strict_hub.url, token, node=name)
        made.append(Office(name, store, SyncAgent(store, client), client, path))
    yield made
    for office in made:
        office.client.close()
        office.store.close()


def test_a_change_the_hub_rejects_is_set_aside_and_the_rest_syncs(strict_hub, offices):
    astana, almaty = offices
    add_case(astana, "c1", household_size=3)
    add_case(astana, "c2", household_size=45)  # the hub refuses this one
    add_case(astana, "c3", household_size=4)
    report = astana.agent.sync_once()
    assert (report.pushed, report.rejected) == (2, 1)
    almaty.sync()
    assert [r["id"] for r in almaty.store.rows("cases")] == ["c1", "c3"]
    # Kept at the office, with the hub's reason, and no longer queued.
    [kept] = astana.store.rejected()
    assert (kept["table"], kept["pk"], kept["op"]) == ("cases", {"id": "c2"}, "insert")
    assert kept["values"]["household_size"] == 45 and "CHECK" in kept["reason"]
    assert astana.store.pending_count() == 0
    assert astana.store.status().rejected == 1
    # The office is back in step with the hub (which never had c2).
    assert_converged(strict_hub, astana, almaty)
    # Admins see which office, which record and why; not the values.
    [seen] = strict_hub.store.rejected()
    assert (seen["node"], seen["pk"], seen["seq"]) == ("astana", {"id": "c2"}, kept["seq"])
    assert "45" not in json.dumps({k: v for k, v in seen.items() if k != "created_at"})
    # The queue is not blocked: later work syncs.
    add_case(astana, "c4")
    sync_all(astana, almaty)
    assert case(almaty, "c4") is not None
    assert_converged(strict_hub, astana, almaty)


def test_a_rejected_update_puts_the_record_back_as_the_hub_holds_it(strict_hub, offices):
    astana, almaty = offices
    add_case(astana, "c1", household_size=3, notes="first visit")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET household_size = 99, notes = 'second visit' WHERE id = 'c1'")
    write(astana, "UPDATE cases SET given_name = 'Dilya' WHERE id = 'c1'")  # a later change
    report = astana.agent.sync_once()
    assert report.rejected == 1
    # The refused change is kept whole (both columns it set); the later one applied.
    [kept] = astana.store.rejected()
    assert kept["values"] == {"household_size": 99, "notes": "second visit"}
    assert case(astana, "c1")["household_size"] == 3
    assert case(astana, "c1")["notes"] == "first visit"
    assert case(astana, "c1")["given_name"] == "Dilya"
    sync_all(almaty, astana)
    assert_converged(strict_hub, astana, almaty)


def test_rejected_changes_on_the_command_line(strict_hub, offices):
    astana, _ = offices
    add_case(astana, "c1", household_size=30)
    runner = CliRunner()
    synced = runner.invoke(cli, ["node", "sync", str(astana.path)])
    assert synced.exit_code == 0, synced.output
    assert "rejected 1" in synced.output and "node rejected" in synced.stderr
    listed = runner.invoke(cli, ["node", "rejected", str(astana.path)])
    assert listed.exit_code == 0 and "insert cases id=c1" in listed.output
    assert "CHECK" in listed.output
    status = runner.invoke(cli, ["node", "status", str(astana.path)])
    assert "Rejected changes:  1" in status.output
    on_hub = runner.invoke(cli, ["hub", "rejected", "--db", str(strict_hub.path)])
    assert "astana change" in on_hub.output and '{"id": "c1"}' in on_hub.output
    seq = str(astana.store.rejected()[0]["seq"])
    # Fixed at the office, written again, and this time taken.
    retried = runner.invoke(cli, ["node", "retry", str(astana.path), seq])
    assert retried.exit_code == 0, retried.output
    write(astana, "UPDATE cases SET household_size = 12 WHERE id = 'c1'")
    assert runner.invoke(cli, ["node", "sync", str(astana.path)]).exit_code == 0
    assert case(strict_hub, "c1")["household_size"] == 12
    assert astana.store.rejected() == []
    # drop-change forgets a rejected change
    add_case(astana, "c2", household_size=50)
    astana.sync()
    seq = str(astana.store.rejected()[0]["seq"])
    dropped = runner.invoke(cli, ["node", "drop-change", str(astana.path), seq])
    assert dropped.exit_code == 0 and "Forgot rejected change" in dropped.output
    assert astana.store.rejected() == []
    missing = runner.invoke(cli, ["node", "retry", str(astana.path), "999"])
    assert missing.exit_code == 1 and "no rejected change 999" in missing.output


def test_a_rejection_whose_answer_was_lost_is_not_lost(strict_hub, tmp_path):
    token = strict_hub.store.add_node("astana")
    path = tmp_path / "astana.db"
    store = NodeStore.init(path, "astana", strict_hub.url, token)
    pushes: list[int] = []

    def plan(n: int, request: httpx.Request) -> str:
        if request.url.path.endswith("/push"):
            pushes.append(n)
            return "drop" if len(pushes) == 1 else "ok"
        return "ok"

    transport = FlakyTransport(plan)
    client = HttpHubClient(
        strict_hub.url, token, client=httpx.Client(transport=transport), node="astana"
    )
    try:
        agent = SyncAgent(store, client)
        add_case(Office("astana", store, agent, client, path), "c1", household_size=70)
        with pytest.raises(HubUnavailableError):
            agent.sync_once()  # the hub rejected it, but the answer never came
        assert store.pending_count() == 1
        report = agent.sync_once()  # sent again: reported rejected again, and kept
        assert report.rejected == 1
        assert [r["pk"] for r in store.rejected()] == [{"id": "c1"}]
        assert store.pending_count() == 0
    finally:
        client.close()
        store.close()


# -- long offline periods -----------------------------------------------------------


def test_weeks_offline_50000_changes_sync_in_batches_and_resume_where_cut(hub, make_office):
    requests: list[str] = []

    def cut(kind: str, at: int) -> FlakyTransport:
        """The link drops once, at request number ``at`` of that kind."""
        seen = [0]

        def plan(n: int, request: httpx.Request) -> str:
            if not request.url.path.endswith(kind):
                return "ok"
            requests.append(kind)
            seen[0] += 1
            return "refuse" if seen[0] == at else "ok"

        return FlakyTransport(plan)

    astana = make_office("astana", transport=cut("push", 20))
    almaty = make_office("almaty", transport=cut("pull", 30))
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO cases (id, family_name, household_size) VALUES (?, ?, ?)",
            [(f"c{i:05}", f"family {i % 700}", i % 9) for i in range(40_000)],
        )
        conn.execute("UPDATE cases SET status = 'refugee' WHERE household_size = 3")
        conn.execute("DELETE FROM cases WHERE household_size = 8")
    conn.close()
    queued = astana.store.pending_count()
    assert queued > 48_000
    progress: list[tuple[str, int, int]] = []
    with pytest.raises(HubUnavailableError):
        astana.agent.sync_once(lambda *p: progress.append(p))
    # 19 batches of 1,000 were acknowledged before the cut and are not sent again.
    assert astana.store.pending_count() == queued - 19_000
    assert progress[-1] == ("push", 19_000, queued)
    requests.clear()
    progress.clear()
    astana.agent.sync_once(lambda *p: progress.append(p))
    assert requests.count("push") == (queued - 19_000 + 999) // 1000
    assert astana.store.pending_count() == 0
    pushed = [p for p in progress if p[0] == "push"]
    assert pushed[-1][1] == pushed[-1][2] == queued - 19_000
    assert all(a[1] < b[1] for a, b in zip(pushed, pushed[1:], strict=False))
    # The other office pulls them in pages of 1,000 (deleted records travel as
    # tombstones); cut after 29 pages, it resumes at page 30.
    records = hub.store.db.conn.execute("SELECT count(*) FROM _fieldsync_records").fetchone()[0]
    requests.clear()
    with pytest.raises(HubUnavailableError):
        almaty.sync()
    cursor = almaty.store.cursor
    assert 0 < len(almaty.store.rows("cases")) <= 29_000 and cursor > 0
    requests.clear()
    progress.clear()
    almaty.agent.sync_once(lambda *p: progress.append(p))
    assert requests.count("pull") == -(-(records - 29_000) // 1000)
    pulled = [p for p in progress if p[0] == "pull"]
    assert pulled[0][2] == records - 29_000  # the hub said how many were left
    assert_converged(hub, astana, almaty)


def test_node_sync_shows_a_progress_bar(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn:
        conn.executemany("INSERT INTO cases (id) VALUES (?)", [(f"c{i}",) for i in range(2500)])
    conn.close()
    # On a terminal: a bar that fills up, with counts and the time left.
    exe = Path(sys.executable).parent / "fieldsync"
    main, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [exe, "node", "sync", str(astana.path)],
            stderr=secondary,
            stdout=subprocess.PIPE,
            timeout=120,
            check=True,
        )
        os.close(secondary)
        screen = b""
        while select.select([main], [], [], 0.5)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(main)
    assert b"Synced astana: pushed 2500" in done.stdout
    assert b"Pushing changes" in screen and b"2500/2500" in screen and b"#" in screen
    # Elsewhere (a log file), only when asked for, one line per step.
    for i in range(2500, 3700):
        add_case(astana, f"c{i}")
    logged = CliRunner().invoke(
        cli, ["node", "sync", str(astana.path), "--progress", "--batch-size", "1000"]
    )
    assert logged.exit_code == 0, logged.output
    assert "Pushing changes: 1000/1200\nPushing changes: 1200/1200" in logged.stderr
    # its own records are not pulled back, nor counted as left to pull
    assert "Pulling records: 0/0" in logged.stderr
    quiet = CliRunner().invoke(cli, ["node", "sync", str(astana.path)])
    assert "Pushing" not in quiet.stderr and "Synced astana" in quiet.output
