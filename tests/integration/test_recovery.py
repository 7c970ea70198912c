"""Recovery: offices restored from old copies, new laptops, lost answers with wrong clocks."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest

from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.clock import now_ms
from shared.errors import HubRejectedError, HubUnavailableError
from tests.faults import FlakyTransport
from tests.integration.test_sync import case, write

pytestmark = pytest.mark.integration


def ids(store, table: str = "cases") -> set[str]:
    return {r["id"] for r in store.rows(table)}


def insert(office, case_id: str) -> None:
    write(office, "INSERT INTO cases (id) VALUES (?)", case_id)


def backup(office, dest: Path) -> Path:
    with sqlite3.connect(office.path) as src, sqlite3.connect(dest) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return dest


def restore(office, copy: Path, hub_url: str, batch_size: int = 1000) -> None:
    """Replace the office database with an older copy, as after a laptop restore."""
    office.client.close()
    office.store.close()
    shutil.copy(copy, office.path)
    for suffix in ("-wal", "-shm"):
        Path(f"{office.path}{suffix}").unlink(missing_ok=True)
    office.store = NodeStore(office.path)
    office.client = HttpHubClient(hub_url, office.store.token, node=office.name)
    office.agent = SyncAgent(office.store, office.client, batch_size=batch_size)


def test_work_saved_after_a_restore_is_never_dropped(hub, make_office, tmp_path):
    astana = make_office("astana", batch_size=2)
    insert(astana, "c1")
    astana.sync()
    insert(astana, "c2")
    insert(astana, "c3")
    copy = backup(astana, tmp_path / "copy.db")  # holds c2 and c3 as pending
    insert(astana, "c4")
    astana.sync()
    restore(astana, copy, hub.url, batch_size=2)
    insert(astana, "new")  # numbered like c4 was
    astana.sync()
    astana.sync()
    assert ids(hub.store) == {"c1", "c2", "c3", "c4", "new"}
    assert ids(astana.store) == ids(hub.store)
    assert astana.store.pending_count() == 0


def test_renumbering_does_not_apply_committed_changes_twice(hub, make_office, tmp_path):
    astana, almaty = make_office("astana"), make_office("almaty")
    insert(astana, "c1")
    astana.sync()
    insert(astana, "x")  # pending in the copy
    copy = backup(astana, tmp_path / "copy.db")
    insert(astana, "lost")
    astana.sync()  # the hub commits x and lost
    almaty.sync()
    write(almaty, "DELETE FROM cases WHERE id = 'x'")  # Almaty saw x and deletes it
    almaty.sync()
    restore(astana, copy, hub.url)
    insert(astana, "new")
    astana.sync()
    almaty.sync()
    astana.sync()
    assert ids(hub.store) == {"c1", "lost", "new"}  # x stays deleted
    assert hub.store.conflicts() == []
    assert astana.store.rows("cases") == hub.store.rows("cases") == almaty.store.rows("cases")


def test_restored_office_with_no_new_work_catches_up(hub, make_office, tmp_path):
    astana, almaty = make_office("astana"), make_office("almaty")
    insert(astana, "c1")
    astana.sync()
    copy = backup(astana, tmp_path / "copy.db")
    insert(astana, "c2")
    astana.sync()
    restore(astana, copy, hub.url)
    astana.sync()
    almaty.sync()
    assert astana.store.rows("cases") == hub.store.rows("cases") == almaty.store.rows("cases")
    insert(astana, "c3")  # and its next change is not mistaken for a replay
    astana.sync()
    assert ids(hub.store) == {"c1", "c2", "c3"}


def test_new_laptop_for_an_existing_office_gets_its_records(hub, make_office, tmp_path):
    astana = make_office("astana")
    for case_id in ("c1", "c2"):
        insert(astana, case_id)
    astana.sync()
    laptop = NodeStore.init(tmp_path / "new-laptop.db", "astana", hub.url, astana.store.token)
    client = HttpHubClient(hub.url, laptop.token, node="astana")
    try:
        write(type("Db", (), {"path": laptop.path}), "INSERT INTO cases (id) VALUES ('c3')")
        SyncAgent(laptop, client).sync_once()
        assert ids(laptop) == {"c1", "c2", "c3"}
        assert ids(hub.store) == {"c1", "c2", "c3"}
    finally:
        client.close()
        laptop.close()


def test_restamping_leaves_changes_the_hub_committed_alone(hub, make_office):
    # Request 1 asks the hub's time, 2 its schema (once: the office learns its version);
    # request 3 is the first push.
    transport = FlakyTransport(lambda n, request: "drop" if n == 3 else "ok")
    astana, almaty = make_office("astana", transport=transport), make_office("almaty")
    astana.store.set_clock_offset(4 * 60_000)  # 4 min off: c1 is re-stamped before its push
    insert(astana, "c1")
    with pytest.raises(HubUnavailableError):
        astana.sync()  # the hub commits c1; the answer is lost
    almaty.sync()
    write(almaty, "DELETE FROM cases WHERE id = 'c1'")
    almaty.sync()
    astana.store.set_clock_offset(10 * 60_000)  # off again: c1 (committed) and c2 re-stamped
    insert(astana, "c2")
    astana.sync()
    almaty.sync()
    assert ids(hub.store) == {"c2"}  # c1's insert was not applied a second time
    assert hub.store.conflicts() == []


@pytest.mark.parametrize("policy_hub", ["merge", "manual"], indirect=True)
def test_a_change_whose_answer_was_lost_keeps_the_stamp_the_hub_committed(policy_hub, tmp_path):
    """Committed, answer lost, then the office's clock is corrected before the replay:
    the change keeps its stamp, so the office's record versions name the hub's, and
    the office's next edit of the record is not taken for a concurrent one."""
    hub, schema = policy_hub
    fates = {"drop": False}

    def plan(n: int, request: httpx.Request) -> str:
        if fates["drop"] and request.url.path.endswith("/push"):
            fates["drop"] = False
            return "drop"
        return "ok"

    token = hub.store.add_node("astana")
    hub.store.set_scopes("astana", ["*"])
    store = NodeStore.init(tmp_path / "astana.db", "astana", hub.url, token, schema)
    transport = FlakyTransport(plan)
    client = HttpHubClient(hub.url, token, client=httpx.Client(transport=transport), node="astana")
    agent = SyncAgent(store, client)
    office = type("Office", (), {"path": store.path})
    try:
        insert(office, "c1")
        agent.sync_once()
        write(office, "UPDATE cases SET notes = 'first' WHERE id = 'c1'")
        fates["drop"] = True
        with pytest.raises(HubUnavailableError):
            agent.sync_once()  # the hub commits the edit; the answer is lost
        store.set_clock_offset(30_000)  # as if learned wrongly: the next sync corrects it
        agent.sync_once()  # the replay passes the receipts
        hub_versions = hub.store.db.conn.execute("SELECT vers FROM _fieldsync_records").fetchone()
        office_versions = store.db.conn.execute("SELECT vers FROM _fieldsync_versions").fetchone()
        assert json.loads(office_versions[0])["notes"] == json.loads(hub_versions[0])["notes"]
        if schema.tables["cases"].policy == "manual":
            write(office, "UPDATE cases SET notes = 'second' WHERE id = 'c1'")
        else:
            write(office, "DELETE FROM cases WHERE id = 'c1'")
        agent.sync_once()
        agent.sync_once()
        assert hub.store.conflicts() == []  # no conflict of the office with itself
        assert store.rows("cases") == hub.store.rows("cases")
        assert [r["notes"] for r in hub.store.rows("cases")] in ([], ["second"])
        assert bool(hub.store.rows("cases")) == (schema.tables["cases"].policy == "manual")
    finally:
        client.close()
        store.close()


@pytest.mark.parametrize("policy_hub", ["merge", "manual"], indirect=True)
def test_a_restored_copy_keeps_the_stamp_the_hub_committed(policy_hub, tmp_path):
    """A backup taken while an edit was queued; the original sends it and the hub
    commits it; the backup comes back on a laptop whose clock offset differs. The hub
    says, before anything is re-stamped, how far it has this office's changes."""
    hub, schema = policy_hub
    token = hub.store.add_node("astana")
    hub.store.set_scopes("astana", ["*"])
    store = NodeStore.init(tmp_path / "astana.db", "astana", hub.url, token, schema)
    client = HttpHubClient(hub.url, token, node="astana")
    office = type("Office", (), {"path": store.path, "client": client, "name": "astana"})()
    office.store, office.agent = store, SyncAgent(store, client)
    try:
        insert(office, "c1")
        office.agent.sync_once()
        write(office, "UPDATE cases SET notes = 'first' WHERE id = 'c1'")
        copy = backup(office, tmp_path / "copy.db")  # the edit queued, not yet sent
        office.agent.sync_once()  # the original sends it: committed
        restore(office, copy, hub.url)
        office.store.set_clock_offset(30_000)  # this laptop's offset is another
        office.agent.sync_once()
        hub_versions = hub.store.db.conn.execute("SELECT vers FROM _fieldsync_records").fetchone()
        versions = office.store.db.conn.execute("SELECT vers FROM _fieldsync_versions").fetchone()
        assert json.loads(versions[0])["notes"] == json.loads(hub_versions[0])["notes"]
        if schema.tables["cases"].policy == "manual":
            write(office, "UPDATE cases SET notes = 'second' WHERE id = 'c1'")
        else:
            write(office, "DELETE FROM cases WHERE id = 'c1'")
        office.agent.sync_once()
        office.agent.sync_once()
        assert hub.store.conflicts() == []
        assert office.store.rows("cases") == hub.store.rows("cases")
    finally:
        office.client.close()
        office.store.close()


def test_an_offset_learned_mid_sync_moves_the_edits_stamped_under_the_old_one(hub, make_office):
    """The office's clock jumps 4 minutes ahead between two pages of a pull, and the
    user saves an edit then. The offset learned from the next page re-stamps that
    edit, so it does not beat a later edit made at another office.

    (The jump is simulated: the agent's clock moves, and the edit is stamped under an
    offset 4 minutes off, as the trigger would stamp it after the jump.)"""
    jump = 4 * 60_000
    astana, almaty = make_office("astana", page_size=1), make_office("almaty")
    insert(astana, "c1")
    astana.sync()
    almaty.sync()
    for n in range(4):  # pages for astana to pull
        insert(almaty, f"b{n}")
    almaty.sync()
    pull = astana.client.pull
    calls = []

    def jumping_pull(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # between the first and second page
            conn = sqlite3.connect(astana.path)
            with conn:
                conn.execute("UPDATE _fieldsync_state SET offset_ms = offset_ms + ?", [jump])
                conn.execute("UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
                conn.execute("UPDATE _fieldsync_state SET offset_ms = offset_ms - ?", [jump])
            conn.close()
            astana.agent._now = lambda: now_ms() + jump
        return pull(*args, **kwargs)

    astana.client.pull = jumping_pull
    astana.sync()
    assert len(calls) >= 3
    assert astana.store.clock_offset_ms < -jump + 5_000  # learned: 4 minutes ahead
    (edit,) = astana.store.pending(10)
    assert abs(edit.ts.wall_ms - now_ms()) < 5_000  # re-stamped to the real time
    write(almaty, "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")  # later, truly
    almaty.sync()
    astana.sync()
    almaty.sync()
    assert case(hub, "c1")["status"] == "rejected"
    (conflict,) = hub.store.conflicts()
    assert (conflict.kept_node, conflict.other_node) == ("almaty", "astana")


def test_413_from_a_proxy_also_splits_the_batch(tmp_path):
    sizes: list[int] = []

    def proxy(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/health"):
            return httpx.Response(200, json={"status": "ok", "hub_time_ms": now_ms()})
        if request.url.path.endswith("/push"):  # not the status report after the sync
            sizes.append(len(request.content))
        return httpx.Response(413, text="<html><body>413 Request Entity Too Large</body></html>")

    node = NodeStore.init(tmp_path / "a.db", "astana", "http://127.0.0.1:9", "t")
    node.db.conn.executemany("INSERT INTO cases (id) VALUES (?)", [(f"c{i}",) for i in range(8)])
    client = HttpHubClient(
        "http://127.0.0.1:9", "t", client=httpx.Client(transport=httpx.MockTransport(proxy))
    )
    try:
        with pytest.raises(HubRejectedError, match="larger than the hub accepts"):
            SyncAgent(node, client).sync_once()
    finally:
        client.close()
        node.close()
    assert len(sizes) == 4  # 8, 4, 2, 1 changes
    assert sizes == sorted(sizes, reverse=True)


def test_restored_copy_of_a_restamped_change_is_not_applied_twice(hub, make_office, tmp_path):
    astana, almaty = make_office("astana"), make_office("almaty")
    astana.store.set_clock_offset(10 * 60_000)  # the laptop clock is 10 min fast
    insert(astana, "c1")
    copy = backup(astana, tmp_path / "copy.db")  # c1 queued, with its fast stamp
    astana.sync()  # refused, re-stamped, committed
    almaty.sync()
    write(almaty, "DELETE FROM cases WHERE id = 'c1'")  # Almaty saw c1 and deletes it
    almaty.sync()
    restore(astana, copy, hub.url)
    astana.sync()
    almaty.sync()
    astana.sync()
    assert ids(hub.store) == set()  # c1 stays deleted
    assert hub.store.conflicts() == []
    assert astana.store.rows("cases") == hub.store.rows("cases") == almaty.store.rows("cases")


def test_restored_copy_with_more_new_work_than_it_lost(hub, make_office, tmp_path):
    astana, almaty = make_office("astana"), make_office("almaty")
    insert(astana, "c1")
    astana.sync()
    copy = backup(astana, tmp_path / "copy.db")
    insert(astana, "c2")  # pushed, then lost with the laptop
    astana.sync()
    restore(astana, copy, hub.url)
    for new in ("c3", "c4", "c5"):  # more new work than the copy lost
        insert(astana, new)
    astana.sync()
    almaty.sync()
    assert ids(hub.store) == {"c1", "c2", "c3", "c4", "c5"}
    # The restored office gets back what it had sent after the copy was made.
    assert astana.store.rows("cases") == hub.store.rows("cases") == almaty.store.rows("cases")
