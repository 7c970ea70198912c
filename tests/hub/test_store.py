"""The hub store as a whole: opening, its layout version, closing, and reads that never
wait for the writer."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hub.migrations import MIGRATIONS
from hub.store import SqliteHubStore
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.errors import FieldsyncError, InvalidChangeError, SchemaError
from shared.protocol import Change
from shared.schema import Schema


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def test_a_new_hub_has_every_layout_step(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("astana")
    assert user_version(tmp_path / "hub.db") == len(MIGRATIONS)


def test_a_hub_without_a_layout_version_is_brought_up_to_date(tmp_path: Path) -> None:
    # Hubs before the migration list kept no user_version; their tables are today's.
    with SqliteHubStore(tmp_path / "hub.db") as store:
        token = store.add_node("astana")
    with sqlite3.connect(tmp_path / "hub.db") as conn:
        conn.execute("PRAGMA user_version = 0")
    with SqliteHubStore(tmp_path / "hub.db") as store:
        assert store.authenticate(token) == "astana"
    assert user_version(tmp_path / "hub.db") == len(MIGRATIONS)


def test_a_hub_from_a_later_fieldsync_is_refused(tmp_path: Path) -> None:
    SqliteHubStore(tmp_path / "hub.db").close()
    with sqlite3.connect(tmp_path / "hub.db") as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(FieldsyncError, match="newer than this fieldsync knows"):
        SqliteHubStore(tmp_path / "hub.db")


def test_the_store_is_a_context_manager_that_closes(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as store:
        assert isinstance(store, SqliteHubStore)
    with pytest.raises(sqlite3.ProgrammingError):
        store.db.conn.execute("SELECT 1")


def lags(offices: list[Any]) -> dict[str, int]:
    return {office.name: office.lag for office in offices}


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        pytest.param(lambda store: lags(store.offices()), {"almaty": 3, "astana": 0}, id="lag"),
        pytest.param(lambda store: store.figures()["tables"][0]["records"], 3, id="figures"),
        pytest.param(lambda store: len(store.rows("cases")), 3, id="rows"),
        pytest.param(
            lambda store: [v["op"] for v in store.record_history("cases", ["c1"])],
            ["insert"],
            id="record-history",
        ),
    ],
)
def test_long_reads_do_not_wait_for_the_hubs_writes(
    tmp_path: Path, read: Callable[[SqliteHubStore], Any], expected: Any
) -> None:
    # Each reads as many records as a table holds (or an office is behind): on a
    # snapshot of its own, it neither waits for a push holding the store nor holds one up.
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("astana")
        store.set_scopes("astana", ["*"])
        store.add_node("almaty")
        store.set_scopes("almaty", ["*"])
        stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
        store.push(
            "astana",
            [
                Change(i, "cases", {"id": f"c{i}"}, "insert", stamp, {"id": f"c{i}"})
                for i in range(1, 4)
            ],
        )
        found: list[Any] = []
        with store.database.write():  # as a push holds it while it commits
            reader = threading.Thread(target=lambda: found.append(read(store)), daemon=True)
            reader.start()
            reader.join(timeout=30)
            assert not reader.is_alive(), "the read waited for the store's lock"
        assert found == [expected]


def test_a_merge_function_that_cannot_load_leaves_a_new_hub_file_empty(tmp_path: Path) -> None:
    source = Schema.load().source
    broken = source.replace('policy = "merge"', 'policy = "custom:no_such_module:merge"', 1)
    assert broken != source
    with pytest.raises(SchemaError, match="cannot load the merge function"):
        SqliteHubStore(tmp_path / "hub.db", Schema.from_toml(broken, "broken.toml"))
    # Corrected, the same file takes the new schema (nothing of the failed one was kept).
    with SqliteHubStore(tmp_path / "hub.db", Schema.load()) as store:
        assert store.schema.source == source


def test_a_hub_of_layout_3_numbers_its_logged_conflicts_for_the_offices(tmp_path: Path) -> None:
    # Conflicts logged before step 4 get their id as their change; a resolution after
    # the upgrade comes after them all, so an office that has them learns it.
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("astana")
        store.add_node("almaty")
    with sqlite3.connect(tmp_path / "hub.db") as conn:
        conn.execute("DROP INDEX _fieldsync_conflicts_office")
        conn.execute("DROP INDEX _fieldsync_conflicts_changed")
        conn.execute("DROP INDEX _fieldsync_conflicts_overridden")
        conn.execute("ALTER TABLE _fieldsync_conflicts DROP COLUMN changed")
        for case, loser in (("c1", "astana"), ("c2", "almaty"), ("c3", "astana")):
            conn.execute(
                "INSERT INTO _fieldsync_conflicts (created_at, tbl, pk, kind, col, kept_value, "
                "kept_version, kept_node, other_value, other_version, other_node, status, "
                "state_after) VALUES ('2026-12-01T09:00:00+00:00', 'cases', ?, 'field', "
                "'notes', '\"won\"', ?, 'hq', '\"lost\"', ?, ?, 'logged', '')",
                [f'["{case}"]', "0000000000000002-hq", f"0000000000000001-{loser}", loser],
            )
        conn.execute("PRAGMA user_version = 3")
    with SqliteHubStore(tmp_path / "hub.db") as store:
        page = store.lost_edits("astana", 0, 10)
        # The records are not on the hub, so not in astana's scope: "won" is withheld.
        assert [(e.id, e.change, e.value, e.winner_value, e.hidden) for e in page.conflicts] == [
            (1, 1, "lost", None, True),
            (3, 3, "lost", None, True),
        ]
        assert [e.id for e in store.lost_edits("almaty", 0, 10).conflicts] == [2]
        assert store.lost_edits("astana", 3, 10).conflicts == []
    assert user_version(tmp_path / "hub.db") == len(MIGRATIONS)


def test_a_push_and_a_pull_write_the_office_row_before_its_stats_row(tmp_path: Path) -> None:
    """One order for an office's two rows in every write transaction: its
    _fieldsync_nodes row, then its _fieldsync_office_stats row (PostgreSQL, which locks
    rows, deadlocks a push and a pull of one office taking them in opposite orders)."""
    statements: list[str] = []
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("astana")
        store.db.conn.set_trace_callback(statements.append)
        try:
            stamp = Timestamp(now_ms() << COUNTER_BITS, "astana")
            case = {"id": "c1", "office": "astana"}
            store.push("astana", [Change(1, "cases", {"id": "c1"}, "insert", stamp, case)])
            store.pull("astana", 0, 10)
        finally:
            store.db.conn.set_trace_callback(None)
    transactions: list[list[str]] = []
    for statement in statements:
        if statement.startswith("BEGIN"):
            transactions.append([])
        elif transactions:
            transactions[-1].append(statement)
    both = 0
    for statements_of_one in transactions:
        nodes = [i for i, s in enumerate(statements_of_one) if "_fieldsync_nodes" in s]
        stats = [i for i, s in enumerate(statements_of_one) if "_fieldsync_office_stats" in s]
        if nodes and stats:
            both += 1
            assert max(nodes) < min(stats), statements_of_one
    assert both == 2  # the push, and the note of the pull


CHECKED = '''
[tables.visits]
create = """CREATE TABLE visits (id TEXT PRIMARY KEY, people INTEGER, cost REAL,
    CHECK (cost IS NULL OR cost <= people * 100))"""
'''


def test_a_resolution_breaking_a_table_check_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    def stamp(n: int, office: str) -> Timestamp:
        return Timestamp((now_ms() << COUNTER_BITS) + n, office)

    with SqliteHubStore(tmp_path / "hub.db", Schema.from_toml(CHECKED)) as store:
        store.add_node("astana")
        store.add_node("almaty")
        first = stamp(1, "astana")
        visit = {"id": "v1", "people": 2, "cost": 50.0}
        store.push("astana", [Change(1, "visits", {"id": "v1"}, "insert", first, visit)])
        seen = {"cost": str(first)}
        for n, office, cost in ((2, "astana", 70.0), (3, "almaty", 60.0)):
            change = Change(
                n, "visits", {"id": "v1"}, "update", stamp(n, office), {"cost": cost}, seen
            )
            store.push(office, [change])
        [conflict] = store.conflicts()
        before = store.record_state("visits", {"id": "v1"})
        with pytest.raises(InvalidChangeError, match="breaks a constraint of visits"):
            store.resolve(conflict.id, "value", "ops", 1000.0)
        assert store.conflict(conflict.id).status == conflict.status
        assert store.record_state("visits", {"id": "v1"}) == before
