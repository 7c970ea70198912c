"""Office-side compaction (node/compact.py): versions of records deleted long ago go,
by `node compact` or after every COMPACT_EVERY_SYNCS-th sync; nothing else does."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.agent import SyncAgent
from node.compact import COMPACT_EVERY_SYNCS, compact_node
from node.store import NodeStore
from shared.clock import COUNTER_BITS, now_ms
from tests.fakes import FakeHub

OLD = f"{(now_ms() - 100 * 86_400_000) << COUNTER_BITS:016x}-almaty"
NEW = f"{now_ms() << COUNTER_BITS:016x}-almaty"


@pytest.fixture
def office(tmp_path: Path) -> Iterator[NodeStore]:
    store = NodeStore.init(tmp_path / "almaty.db", "almaty", "http://127.0.0.1:9", "token")
    with store.db.conn as conn:
        conn.execute("INSERT INTO cases (id, office) VALUES ('live', 'almaty')")
        conn.execute("INSERT INTO cases (id, office) VALUES ('queued', 'almaty')")
        conn.execute("DELETE FROM cases WHERE id = 'queued'")  # its delete is not pushed
        conn.execute("DELETE FROM _fieldsync_changes WHERE pk != '[\"queued\"]'")
        conn.executemany(
            "INSERT OR REPLACE INTO _fieldsync_versions (tbl, pk, vers) VALUES ('cases', ?, ?)",
            [
                ('["old"]', f'{{"id": "{OLD}", "~": "{OLD}"}}'),  # deleted 100 days ago
                ('["recent"]', f'{{"id": "{OLD}", "~": "{NEW}"}}'),  # deleted today
                ('["live"]', f'{{"id": "{OLD}", "~": "{OLD}"}}'),  # inserted again since
                ('["queued"]', f'{{"id": "{OLD}", "~": "{OLD}"}}'),  # its delete queued
                ('["plain"]', f'"{OLD}"'),  # never deleted
            ],
        )
    yield store
    store.close()


def kept(store: NodeStore) -> set[str]:
    return {row[0] for row in store.db.conn.execute("SELECT pk FROM _fieldsync_versions")}


def test_only_the_versions_of_records_deleted_long_ago_and_acknowledged_go(
    office: NodeStore,
) -> None:
    pending = office.pending_count()
    done = compact_node(office.db, office.schema, office.path)
    assert done.versions == 1
    assert kept(office) == {'["recent"]', '["live"]', '["queued"]', '["plain"]'}
    assert office.pending_count() == pending == 2  # the change log is not touched


def test_the_agent_compacts_after_every_thousandth_sync(office: NodeStore) -> None:
    with office.db.conn as conn:
        conn.execute(
            "INSERT INTO _fieldsync_sync_log (id, started_at, seconds, outcome, pushed, pulled, "
            "conflicts, rejected, bytes_sent, bytes_received) "
            "VALUES (?, '2026-12-01', 0, 'ok', 0, 0, 0, 0, 0, 0)",
            [COMPACT_EVERY_SYNCS - 2],
        )
    agent = SyncAgent(office, FakeHub(node="almaty"))
    agent.sync_once()  # the 999th
    assert '["old"]' in kept(office)
    agent.sync_once()  # the 1000th
    assert '["old"]' not in kept(office)
    assert sqlite3.connect(office.path).execute("SELECT count(*) FROM cases").fetchone() == (1,)
