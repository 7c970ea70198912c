"""Compaction at the hub (hub/compact.py): tombstones and exits purged once no office
needs them (or past their maximum age, the offices behind marked to resync), record
history kept by age or count, conflicts and audit untouched, and no resurrection of a
purged record by an edit of an old copy."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import hub.compact as compaction
from fieldsync.cli import cli
from hub.compact import Keep, Stopped, compact, parse_keep
from hub.compactor import Compactor
from hub.store import SqlHubStore, SqliteHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.errors import FieldsyncError
from shared.protocol import Change, PushResult
from shared.schema import EXISTS, Schema
from tests.engines import Engine

LATER = datetime.now(UTC) + timedelta(days=91)  # past the 90 days of a tombstone


class Hub:
    """A hub store driven as offices would: numbered changes, pulls to the end."""

    def __init__(self, store: SqlHubStore) -> None:
        self.store = store
        self.numbers: dict[str, int] = {}
        self.cursors: dict[str, int] = {}
        self.held: dict[str, dict[str, Any]] = {}  # per office, what it pulled: key -> row
        self.tick = 0

    def add(self, name: str, scopes: list[str] | None = None) -> None:
        self.store.add_node(name)
        if scopes:
            self.store.set_scopes(name, scopes)
        self.held[name] = {}
        self.pull(name)

    def stamp(self, node: str) -> Timestamp:
        self.tick += 1
        return Timestamp((now_ms() << COUNTER_BITS) + self.tick, node)

    def push(
        self, node: str, op: str, case: str, values: dict[str, Any] | None, base: dict[str, str]
    ) -> PushResult:
        self.numbers[node] = self.numbers.get(node, 0) + 1
        change = Change(
            self.numbers[node], "cases", {"id": case}, op, self.stamp(node), values, base
        )
        return self.store.push(node, [change])

    def insert(self, node: str, case: str, office: str) -> None:
        self.push(node, "insert", case, {"id": case, "office": office, "notes": "new"}, {})

    def update(self, node: str, case: str, notes: str) -> PushResult:
        return self.push(node, "update", case, {"notes": notes}, self.versions(case))

    def delete(self, node: str, case: str) -> None:
        self.push(node, "delete", case, None, self.versions(case))

    def versions(self, case: str) -> dict[str, str]:
        state = self.store.record_state("cases", {"id": case})
        assert state is not None
        return dict(state.versions)

    def pull(self, node: str) -> bool:
        """Pull to the end; True if the hub answered resync."""
        while True:
            page = self.store.pull(node, self.cursors.get(node, 0), 100)
            if page.resync:
                return True
            for row in page.rows:
                self.held[node][row.pk["id"]] = row
            self.cursors[node] = page.cursor
            if not page.more:
                return False

    def sync(self, *nodes: str) -> None:
        for node in nodes:
            self.pull(node)


def rows(store: SqlHubStore, sql: str, *params: Any) -> list[Any]:
    with store.database.read() as conn:
        return conn.execute(sql, params).fetchall()


def history_of(store: SqlHubStore, case: str) -> list[Any]:
    return rows(store, "SELECT seq FROM _fieldsync_history WHERE pk = ?", f'["{case}"]')


def rescope(store: SqlHubStore) -> dict[str, int]:
    return dict(rows(store, "SELECT name, rescope FROM _fieldsync_nodes"))


def offices(store: SqlHubStore) -> Hub:
    driver = Hub(store)
    for name in ("astana", "almaty"):
        driver.add(name)  # each holds its own cases
    driver.add("hq", ["*"])
    return driver


@pytest.fixture
def hub(tmp_path: Path, engine: Engine) -> Iterator[Hub]:
    """Three offices on a hub of each engine."""
    with open_store(engine.db(tmp_path)) as store:
        yield offices(store)


@pytest.fixture
def sqlite_hub(tmp_path: Path) -> Iterator[Hub]:
    """The same on a SQLite file: for what is about the file itself."""
    with SqliteHubStore(tmp_path / "hub.db") as store:
        yield offices(store)


def test_a_tombstone_is_purged_once_every_office_holding_it_has_pulled_past_it(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.update("astana", "c1", "seen")
    hub.delete("astana", "c1")
    hub.sync("astana", "hq")  # they get the delete; the hub learns it on their next pull
    assert compact(store.database).tombstones == 0
    assert len(history_of(store, "c1")) == 3
    hub.sync("astana")
    assert compact(store.database).tombstones == 0  # hq holds every case: it waits for hq
    hub.sync("hq")
    # almaty never pulled again, but does not hold astana's cases: it does not hold it up.
    done = compact(store.database)
    assert (done.tombstones, done.versions, done.resync) == (1, 3, [])
    assert store.record_state("cases", {"id": "c1"}) is None
    assert history_of(store, "c1") == []
    assert rescope(store) == {"almaty": 0, "astana": 0, "hq": 0}


def test_a_tombstone_past_its_age_is_purged_and_the_offices_behind_resync(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.sync("hq")
    hub.delete("astana", "c1")
    hub.sync("astana", "astana")  # hq stays away
    assert compact(store.database).tombstones == 0
    done = compact(store.database, now=LATER)
    assert (done.tombstones, done.resync) == (1, ["hq"])
    assert rescope(store)["hq"] == 1
    assert hub.pull("hq") is True  # its next pull is a resync of its scope
    assert compact(store.database, now=LATER).resync == []  # marked once


def test_a_cursor_from_before_a_purge_is_answered_with_a_resync(hub: Hub) -> None:
    # An office database restored from an older copy pulls from an older cursor.
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.sync("hq")
    old = hub.cursors["hq"]
    hub.delete("astana", "c1")
    hub.sync("astana", "astana", "hq", "hq")
    assert compact(store.database).tombstones == 1
    assert store.pull("hq", hub.cursors["hq"], 100).resync is False
    assert store.pull("hq", old, 100).resync is True
    assert store.pull("hq", old, 100).resync is True  # until it pulls from the start
    assert store.pull("hq", 0, 100, include_own=True).resync is False
    assert rescope(store)["hq"] == 0


def test_exits_are_purged_once_the_offices_of_the_key_they_left_pulled_past(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.sync("astana", "almaty", "hq")
    store.move("cases", ["c1"], "almaty", "admin")
    assert rows(store, "SELECT scope FROM _fieldsync_exits") == [("astana",)]
    hub.sync("almaty", "hq", "almaty", "hq")  # hq holds every case: it needs no exits
    assert compact(store.database).exits == 0  # astana has not pulled past it
    hub.sync("astana")
    assert "c1" in hub.held["astana"] and hub.held["astana"]["c1"].gone
    hub.sync("astana")
    done = compact(store.database)
    assert (done.exits, done.tombstones, done.resync) == (1, 0, [])
    assert rows(store, "SELECT * FROM _fieldsync_exits") == []


def test_an_exit_past_its_age_is_purged_and_its_office_resyncs(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.sync("astana")
    store.move("cases", ["c1"], "almaty", "admin")
    done = compact(store.database, now=LATER)
    assert (done.exits, done.resync) == (1, ["astana"])


def test_history_is_kept_by_age_and_the_latest_version_always(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    for n in range(4):
        hub.update("astana", "c1", f"edit {n}")
    hub.insert("astana", "c2", "astana")
    assert len(history_of(store, "c1")) == 5
    assert compact(store.database, keep=Keep(days=30)).versions == 0  # all recent
    done = compact(store.database, keep=Keep(days=30), now=datetime.now(UTC) + timedelta(days=31))
    assert done.versions == 4
    latest = [v["values"] for v in store.record_history("cases", ["c1"])]
    assert latest == [{"notes": "edit 3"}]
    assert len(history_of(store, "c2")) == 1


def test_history_is_kept_by_count_newest_first(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    for n in range(4):
        hub.update("astana", "c1", f"edit {n}")
    done = compact(store.database, keep=Keep(days=None, versions=2))
    assert done.versions == 3
    kept = [v["values"] for v in store.record_history("cases", ["c1"])]
    assert kept == [{"notes": "edit 2"}, {"notes": "edit 3"}]
    assert compact(store.database, keep=Keep(days=None, versions=2)).versions == 0


def test_open_conflicts_and_the_audit_log_are_never_touched(tmp_path: Path) -> None:
    text = Schema.load().source.replace(
        '[tables.cases]\npolicy = "merge"', '[tables.cases]\npolicy = "manual"'
    )
    with SqliteHubStore(tmp_path / "hub.db", Schema.from_toml(text)) as store:
        hub = Hub(store)
        hub.add("hq", ["*"])
        hub.add("hq2", ["*"])
        hub.insert("hq", "c1", "astana")
        base = hub.versions("c1")
        hub.update("hq", "c1", "first")
        hub.push("hq2", "update", "c1", {"notes": "second"}, base)  # concurrent: open
        hub.delete("hq", "c1")
        hub.sync("hq", "hq2", "hq", "hq2")
        conflicts = rows(store, "SELECT * FROM _fieldsync_conflicts")
        audit = rows(store, "SELECT * FROM _fieldsync_audit")
        assert [c[12] for c in conflicts] == ["open"] and audit
        done = compact(store.database, keep=Keep(days=None, versions=1), now=LATER)
        assert done.tombstones == 1
        assert rows(store, "SELECT * FROM _fieldsync_conflicts") == conflicts
        assert rows(store, "SELECT * FROM _fieldsync_audit") == audit


def test_an_edit_of_a_purged_record_is_refused_and_a_new_record_taken(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    stale = hub.versions("c1")  # what hq holds, offline
    hub.delete("astana", "c1")
    hub.sync("astana", "astana")
    assert compact(store.database, now=LATER).tombstones == 1
    result = hub.push("hq", "update", "c1", {"notes": "offline edit"}, stale)
    assert result.applied == 0
    [refused] = result.rejected
    assert "deleted at the hub and purged on" in refused.reason
    assert refused.record is None  # the office drops its copy
    assert store.record_state("cases", {"id": "c1"}) is None
    # An insert of that key is a new record (the office knew it was gone).
    hub.push("astana", "insert", "c1", {"id": "c1", "office": "astana"}, {EXISTS: stale["id"]})
    assert store.record_state("cases", {"id": "c1"}) is not None
    # An edit made after the purge horizon is not refused (a record the hub lacks
    # for another reason, such as a restore).
    later = {"notes": str(hub.stamp("almaty"))}
    assert hub.push("hq", "update", "c9", {"id": "c9", "notes": "x"}, later).rejected == []
    assert hub.push("hq", "update", "c8", {"id": "c8", "notes": "x"}, {}).rejected == []


def test_freed_pages_are_reported_and_vacuum_shrinks_the_file(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    store = hub.store
    for n in range(200):
        hub.insert("astana", f"c{n}", "astana")
    for edit in range(3):
        for n in range(200):
            hub.update("astana", f"c{n}", str(edit) * 500)
    done = compact(store.database, keep=Keep(days=None, versions=1), vacuum=True)
    assert done.versions == 600 and done.bytes_freed > 200_000 and done.vacuumed
    assert done.bytes_after < done.bytes_before / 2
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now
    for n in range(200):
        hub.update("astana", f"c{n}", "y" * 2000)
    with store.database.read() as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    grown = Path(store.path).stat().st_size
    done = compact(store.database, keep=Keep(days=None, versions=1))
    assert not done.vacuumed and Path(store.path).stat().st_size < grown  # a chunk at a time


@pytest.mark.parametrize("text", ["", "0", "0d", "180 days", "-5", "1y", "d"])
def test_a_bad_history_retention_is_one_clear_error(text: str) -> None:
    with pytest.raises(FieldsyncError, match="--keep-history takes a number of days"):
        parse_keep(text)


def test_history_retention_is_days_or_versions() -> None:
    assert parse_keep("180d") == Keep(days=180)
    assert parse_keep("5") == Keep(days=None, versions=5)
    assert str(Keep()) == "365 days"


def test_the_daily_compaction_runs_in_a_thread_and_stops_between_chunks(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.update("astana", "c1", "edit")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):  # the hub shuts down: no chunk more
        compact(store.database, keep=Keep(days=None, versions=1), stop=stop)
    assert len(history_of(store, "c1")) == 2
    compactor = Compactor(store.database, Keep(days=None, versions=1), first=timedelta(0))
    compactor.start()
    deadline = time.monotonic() + 10
    while compactor.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    compactor.stop()
    assert compactor.runs == 1 and compactor.last is not None and compactor.last.versions == 1
    assert len(history_of(store, "c1")) == 1


def test_a_compaction_that_failed_is_tried_again_before_the_next_day(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.update("astana", "c1", "edit")
    store.database.db.conn.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(store.database.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program writing (a long VACUUM, say)
    compactor = Compactor(
        store.database,
        Keep(days=None, versions=1),
        first=timedelta(0),
        retry=timedelta(milliseconds=200),
    )
    compactor.start()
    time.sleep(0.3)
    other.execute("ROLLBACK")
    other.close()
    deadline = time.monotonic() + 10
    while compactor.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    compactor.stop()
    assert compactor.runs == 1 and compactor.last is not None and compactor.last.versions == 1


def test_a_deleted_case_whose_assistance_lives_on_is_kept(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    aid = {"id": "a1", "case_id": "c1", "kind": "food", "quantity": 1}
    hub.numbers["astana"] += 1
    store.push(
        "astana",
        [
            Change(
                hub.numbers["astana"],
                "assistance",
                {"id": "a1"},
                "insert",
                hub.stamp("astana"),
                aid,
            )
        ],
    )
    hub.delete("astana", "c1")
    hub.sync("astana", "astana", "hq", "hq")
    assert compact(store.database, now=LATER).tombstones == 0  # a1 takes its scope from it
    assert rows(store, "SELECT scope FROM _fieldsync_records WHERE tbl = 'assistance'") == [
        ("astana",)
    ]


def test_an_office_due_to_resync_is_marked_once_and_holds_nothing_up(hub: Hub) -> None:
    store = hub.store
    hub.insert("astana", "c1", "astana")
    hub.insert("astana", "c2", "astana")
    hub.sync("hq")
    hub.delete("astana", "c1")
    hub.sync("astana", "astana")
    assert compact(store.database, now=LATER).resync == ["hq"]
    hub.delete("astana", "c2")
    hub.sync("astana", "astana")
    done = compact(store.database)  # not by age: hq, due to resync, needs nothing kept
    assert (done.tombstones, done.resync) == (1, [])


def test_purges_go_in_small_transactions(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction, "CHUNK", 2)
    monkeypatch.setattr(compaction, "HISTORY_CHUNK", 3)
    store = hub.store
    for n in range(5):
        hub.insert("astana", f"c{n}", "astana")
        for edit in range(n):
            hub.update("astana", f"c{n}", f"edit {edit}")
        hub.delete("astana", f"c{n}")
    hub.sync("astana", "astana", "hq", "hq")
    done = compact(store.database)
    assert (done.tombstones, done.versions) == (5, 5 * 2 + sum(range(5)))
    assert rows(store, "SELECT count(*) FROM _fieldsync_history") == [(0,)]
    assert rows(store, "SELECT count(*) FROM _fieldsync_records") == [(0,)]


def test_compact_and_vacuum_through_the_cli_on_either_engine(hub: Hub) -> None:
    """`hub compact --vacuum` on SQLite and PostgreSQL: a tombstone every office holding
    it pulled past is purged with its history; VACUUM runs (PostgreSQL: ``VACUUM
    (ANALYZE)`` outside a transaction, the space kept for the tables' next rows)."""
    store = hub.store
    for n in range(50):
        hub.insert("astana", f"c{n}", "astana")
    for n in range(50):
        hub.update("astana", f"c{n}", "x" * 500)
    hub.delete("astana", "c0")
    hub.sync("astana", "hq")
    hub.sync("astana", "hq")  # the hub learns they pulled past the delete
    result = CliRunner().invoke(
        cli,
        ["hub", "compact", "--db", store.where, "--vacuum", "--keep-history", "1", "--json"],
    )
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert (done["tombstones"], done["versions"], done["resync"]) == (1, 3 + 49, [])
    assert done["vacuumed"] and done["bytes_before"] > 0 and done["bytes_after"] > 0
    assert "VACUUM" in done["locks_ms"]
    assert store.record_state("cases", {"id": "c0"}) is None
    assert history_of(store, "c0") == []
    assert len(rows(store, "SELECT seq FROM _fieldsync_history")) == 49
    hub.insert("astana", "c99", "astana")  # the hub writes on after it
    assert store.record_state("cases", {"id": "c99"}) is not None
