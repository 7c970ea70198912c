"""`hub serve --workers 2`: several processes serving one database, one of them killed.

Offices push and pull through whichever worker answers; a worker killed mid-sync is
started again by the supervisor; every change arrives exactly once and every office
ends holding what the hub holds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from hub.store import open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import FieldsyncError
from tests.engines import Engine
from tests.processes import HubProcess

pytestmark = pytest.mark.integration

OFFICES = ("astana", "almaty", "shymkent")
ROUNDS = 20
PER_ROUND = 5


def _insert(path: Path, office: str, n: int) -> None:
    with sqlite3.connect(path) as conn:
        for i in range(PER_ROUND):
            conn.execute(
                "INSERT INTO cases (id, family_name, given_name, status, household_size) "
                "VALUES (?, 'Nazarova', 'Dilnoza', 'asylum_seeker', ?)",
                [f"{office}-{n}-{i}", i + 1],
            )
        if n:  # and an edit of a case of the round before
            conn.execute(
                "UPDATE cases SET household_size = household_size + 10 WHERE id = ?",
                [f"{office}-{n - 1}-0"],
            )
    conn.close()


def test_two_workers_one_killed_while_offices_sync_lose_and_double_nothing(
    tmp_path: Path, engine: Engine
) -> None:
    hub_db = engine.db(tmp_path)
    hub = HubProcess(hub_db, tmp_path / "hub.log", workers=2)
    hub.start()
    try:
        with open_store(hub_db) as admin:
            tokens = {name: admin.add_node(name) for name in OFFICES}
            for name in OFFICES:
                admin.set_scopes(name, ["*"])
        agents: dict[str, tuple[NodeStore, SyncAgent, HttpHubClient, Path]] = {}
        for name in OFFICES:
            path = tmp_path / f"{name}.db"
            store = NodeStore.init(path, name, hub.url, tokens[name])
            client = HttpHubClient(hub.url, tokens[name], node=name)
            agents[name] = (store, SyncAgent(store, client), client, path)
        first = hub.worker_pids()
        assert len(first) == 2, f"expected 2 workers, found {first}"
        failed: list[str] = []
        errors: list[BaseException] = []
        half_way = threading.Event()

        def office(name: str) -> None:
            store, agent, _, path = agents[name]
            try:
                for n in range(ROUNDS):
                    if n == ROUNDS // 2:
                        half_way.set()
                    _insert(path, name, n)
                    try:
                        agent.sync_once()
                    except FieldsyncError as exc:  # the worker killed under it
                        failed.append(f"{name}: {exc}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=office, args=(name,)) for name in OFFICES]
        for thread in threads:
            thread.start()
        assert half_way.wait(timeout=60)
        os.kill(first[0], signal.SIGKILL)  # while the offices go on syncing
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        # The supervisor started another worker in place of the one killed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(hub.worker_pids()) < 2:
            time.sleep(0.1)
        now = hub.worker_pids()
        assert len(now) == 2 and first[0] not in now, (first, now)
        # Everyone syncs until nothing is pending (bounded).
        for _ in range(3):
            for name in OFFICES:
                agents[name][1].sync_once()
        with open_store(hub_db) as admin:
            expected = admin.rows("cases")
            history = {(r["id"]): len(admin.record_history("cases", [r["id"]])) for r in expected}
        assert len(expected) == len(OFFICES) * ROUNDS * PER_ROUND
        # Exactly once: each case's history holds its insert and at most one edit.
        edited = {f"{o}-{n}-0" for o in OFFICES for n in range(ROUNDS - 1)}
        assert history == {k: 2 if k in edited else 1 for k in history}
        for name in OFFICES:
            store = agents[name][0]
            assert store.rows("cases") == expected, f"{name} differs from the hub"
            assert store.pending_count() == 0
    finally:
        for store, _, client, _ in locals().get("agents", {}).values():
            client.close()
            store.close()
        hub.stop()

