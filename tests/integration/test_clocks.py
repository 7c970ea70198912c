"""
Wrong office clocks, for real: the office runs under libfaketime.

The hub is the ``hub`` fixture (uvicorn on 127.0.0.1, the true clock). The office with
the wrong clock (``astana``) is only ever touched by subprocesses running under
libfaketime, which shifts both Python's ``time.time()`` and SQLite's
``julianday('now')``: its writes (``python -c`` with ``sqlite3``, so the capture
triggers stamp them with the wrong clock) and its syncs and status (the real
``fieldsync`` console script). The other office (``almaty``) has the true clock and
runs in this process. Its database is read in this process only between subprocesses.

Every test checks that the fake clock really was in effect (the stamps of the office's
first writes, or the offset it learns, are as wrong as its clock), so none can pass
vacuously.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import libfaketime
import pytest

from hub.store import ALL_RECEIPTS
from node.store import NodeStore
from shared.clock import Timestamp, now_ms, wall_ms
from shared.schema import Schema
from tests.integration.test_sync import add_case, case, write

pytestmark = pytest.mark.integration

FIELDSYNC = Path(sys.executable).parent / "fieldsync"
FAKETIME = libfaketime.get_reload_information()[1]  # LD_PRELOAD & co, FAKETIME_NO_CACHE=1

HOUR_MS = 3_600_000
MAX_FUTURE_MS = 300_000  # the hub's limit (its default, set explicitly below)
SLACK_MS = 5_000  # subprocess start, HTTP round trips, a slow 2-core machine

# libfaketime's "y" is 365 days: "+10y" is exactly 3650 days.
CLOCKS = {
    "-48h": -48 * HOUR_MS,
    "+262s": 262_000,
    "+48h": 48 * HOUR_MS,
    "+10y": 3650 * 24 * HOUR_MS,
}

_SQL = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10)
with conn:
    for statement in sys.argv[2:]:
        conn.execute(statement)
conn.close()
"""


def run_at(clock: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a program with the wall clock shifted by ``clock`` (libfaketime syntax)."""
    env = {**os.environ, **FAKETIME, "FAKETIME": clock, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=30, env=env
    )


def office_sql(clock: str, path: Path, *statements: str) -> None:
    """Write to the office database, in one transaction, as a program there would."""
    result = run_at(clock, sys.executable, "-c", _SQL, path, *statements)
    assert result.returncode == 0, result.stderr


def fieldsync_at(clock: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = run_at(clock, FIELDSYNC, *args)
    assert result.returncode == 0, f"fieldsync {args} at {clock}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def sync_at(clock: str, path: Path) -> subprocess.CompletedProcess[str]:
    return fieldsync_at(clock, "node", "sync", path)


def clock_line(clock: str, path: Path) -> str | None:
    """The "Clock:" line of `fieldsync node status`, run with the office's clock."""
    out = fieldsync_at(clock, "node", "status", path).stdout
    lines = [line for line in out.splitlines() if line.startswith("Clock:")]
    assert len(lines) <= 1, out
    return lines[0] if lines else None


def new_office(hub: Any, tmp_path: Path, name: str, clock: str) -> Path:
    """Register an office and create its database with `fieldsync node init`, run with
    the office's clock (so even its first stamp comes from that clock)."""
    path = tmp_path / f"{name}.db"
    token = hub.store.add_node(name)
    hub.store.set_scopes(name, ["*"])
    fieldsync_at(clock, "node", "init", path, "--name", name, "--hub", hub.url, "--token", token)
    return path


def office_state(path: Path) -> tuple[int, int]:
    """(learned clock offset in ms, pending changes) of an office database."""
    store = NodeStore(path)
    try:
        return store.clock_offset_ms, store.pending_count()
    finally:
        store.close()


def pending_stamps(path: Path) -> list[int]:
    with closing(sqlite3.connect(path)) as conn:
        return [
            hlc
            for (hlc,) in conn.execute(
                "SELECT hlc FROM _fieldsync_changes "
                "WHERE seq > (SELECT acked_seq FROM _fieldsync_state) ORDER BY seq"
            )
        ]


def hub_query(hub: Any, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{hub.path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, params).fetchall()


def hub_version(hub: Any, case_id: str, column: str) -> Timestamp:
    """The stamp of the write that set ``column`` of case ``case_id`` on the hub."""
    [(vers,)] = hub_query(
        hub,
        "SELECT vers FROM _fieldsync_records WHERE tbl = 'cases' AND pk = ?",
        json.dumps([case_id]),
    )
    return Timestamp.parse(Schema.load().table("cases").unpack_versions(vers)[column])


def receipts(hub: Any, node: str) -> list[tuple[int, int]]:
    """(seq, stamp as captured) of every change of ``node`` the hub committed."""
    return [
        (seq, hlc)
        for seq, hlc in hub_query(
            hub, f"SELECT seq, hlc FROM ({ALL_RECEIPTS}) WHERE node = ? ORDER BY seq", node
        )
    ]


def assert_replicas_equal(hub: Any, *paths: Path) -> None:
    """Every synced table of every office database equals the hub's."""
    for path in paths:
        store = NodeStore(path)
        try:
            for table in store.schema.tables:
                assert store.rows(table) == hub.store.rows(table), f"{path.name}: {table}"
        finally:
            store.close()


def assert_real_time(stamp: Timestamp, made_between: tuple[int, int], what: str) -> None:
    low, high = made_between
    assert low - SLACK_MS <= stamp.wall_ms <= high + SLACK_MS, (
        f"{what} was made at real time {low}..{high} ms but stamped {stamp.wall_ms} ms "
        f"({(stamp.wall_ms - high) / 1000:+.0f} s)"
    )


def _set(case_id: str, **values: str) -> str:
    sets = ", ".join(f"{column} = '{value}'" for column, value in values.items())
    return f"UPDATE cases SET {sets} WHERE id = '{case_id}'"


@pytest.mark.parametrize("clock", list(CLOCKS))
def test_wrong_clock_is_learned_and_corrected_and_never_wins_unfairly(
    hub: Any, make_office: Any, tmp_path: Path, clock: str
) -> None:
    offset = CLOCKS[clock]
    hub.store.max_future_ms = MAX_FUTURE_MS
    almaty = make_office("almaty")
    astana = new_office(hub, tmp_path, "astana", clock)
    add_case(almaty, "c1")
    add_case(almaty, "c2")
    almaty.sync()

    # Astana works with its wrong clock before it ever syncs: its stamps are wrong.
    before = now_ms()
    office_sql(clock, astana, "INSERT INTO cases (id, family_name) VALUES ('c3', 'Abenova')")
    [captured] = pending_stamps(astana)
    assert abs(wall_ms(captured) - before - offset) < SLACK_MS, "the fake clock was not used"

    # One `node sync`: it learns the clock error from the hub before pushing and
    # re-stamps its queued work with the real time, so the hub never sees a wrong
    # stamp (and has nothing to refuse).
    first = sync_at(clock, astana)
    assert "Synced astana: pushed 1, pulled 2" in first.stdout
    assert "clock_skew" not in first.stderr
    told = re.search(r"is (\d+) s (ahead of|behind) the hub's; 1 queued changes", first.stderr)
    assert told, first.stderr
    assert abs(int(told[1]) * 1000 - abs(offset)) < SLACK_MS + 2000
    learned, pending = office_state(astana)
    assert abs(learned + offset) < SLACK_MS, f"learned offset {learned} ms for a clock {clock}"
    assert pending == 0, "a change is left queued"
    assert case(hub, "c3") is not None and case(hub, "c3")["family_name"] == "Abenova"
    # The office's report reaches the hub in the hub's time, whatever its clock says.
    office = hub.store.office("astana")
    assert office.clock_offset_ms is not None and abs(office.clock_offset_ms + offset) < SLACK_MS
    [event] = office.events
    reported = datetime.fromisoformat(event["started_at"]).timestamp() * 1000
    assert before - SLACK_MS < reported < now_ms() + SLACK_MS, event["started_at"]
    # The hub keeps the stamp the change was captured with in its receipt...
    assert receipts(hub, "astana") == [(1, captured)]
    # ...and applied it re-stamped with its real time, whichever way the clock was off.
    assert_real_time(hub_version(hub, "c3", "family_name"), (before, now_ms()), "c3")

    # `node status`, with the same wrong clock, shows how wrong it is.
    line = clock_line(clock, astana)
    assert line is not None, f"no Clock: line for a clock {clock}"
    shown = re.fullmatch(r"Clock:\s+(\d+) s (ahead of|behind) the hub \(.*\)", line)
    assert shown, line
    assert shown[2] == ("ahead of" if offset > 0 else "behind"), line
    assert abs(int(shown[1]) * 1000 - abs(offset)) < SLACK_MS, line

    # Concurrent edits of c1.status after astana learned its clock: neither office
    # sees the other's. The one made later in real time must win. A clock ahead
    # would make astana's earlier edit win, a clock behind its later edit lose.
    edits = [
        ("astana", "closed", lambda: office_sql(clock, astana, _set("c1", status="closed"))),
        ("almaty", "refugee", lambda: write(almaty, _set("c1", status="refugee"))),
    ]
    if offset < 0:
        edits.reverse()
    made: dict[str, tuple[int, int]] = {}
    for i, (name, _, edit) in enumerate(edits):
        time.sleep(i)  # the second edit comes 1 s after the first
        start = now_ms()
        edit()
        made[name] = (start, now_ms())
    (earlier, earlier_value, _), (later, later_value, _) = edits

    # Causality: an edit made after seeing another office's edit of the same field
    # wins over it, both ways (c2.status: almaty then astana; c2.notes: the reverse).
    write(almaty, _set("c2", status="refugee"))
    almaty.sync()  # c1 and c2
    almaty_status = hub_version(hub, "c2", "status")
    sync_at(clock, astana)  # pushes c1 (the conflict), pulls c2
    start = now_ms()
    office_sql(clock, astana, _set("c2", status="closed", notes="seen by astana"))
    made["astana c2"] = (start, now_ms())
    sync_at(clock, astana)
    astana_notes = hub_version(hub, "c2", "notes")
    almaty.sync()
    write(almaty, _set("c2", notes="seen by almaty"))
    almaty.sync()
    sync_at(clock, astana)

    assert case(hub, "c2")["status"] == "closed"
    assert case(hub, "c2")["notes"] == "seen by almaty"
    assert hub_version(hub, "c2", "status") > almaty_status
    assert hub_version(hub, "c2", "notes") > astana_notes
    assert_replicas_equal(hub, almaty.path, astana)
    learned, pending = office_state(astana)
    assert pending == 0 and abs(learned + offset) < SLACK_MS
    # Every same-field conflict is logged: exactly the one on c1.status.
    [conflict] = hub.store.conflicts()
    assert (conflict.table, conflict.pk, conflict.kind, conflict.column) == (
        "cases",
        {"id": "c1"},
        "field",
        "status",
    )
    versions = {
        conflict.kept_node: conflict.kept_version,
        conflict.other_node: conflict.other_version,
    }
    assert set(versions) == {"astana", "almaty"}
    # The edit made later in real time won; the earlier one is logged.
    off = {n: (Timestamp.parse(v).wall_ms - made[n][1]) / 1000 for n, v in versions.items()}
    assert (conflict.kept_node, conflict.kept_value) == (later, later_value), (
        f"{earlier}'s edit, made 1 s before {later}'s, won: stamped {off[earlier]:+.0f} s "
        f"from real time, {later}'s {off[later]:+.0f} s"
    )
    assert (conflict.other_node, conflict.other_value) == (earlier, earlier_value)
    assert case(hub, "c1")["status"] == later_value
    # After its first sync astana stamps with the corrected clock: its real time.
    assert_real_time(Timestamp.parse(versions["astana"]), made["astana"], "astana's c1 edit")
    assert_real_time(hub_version(hub, "c2", "status"), made["astana c2"], "astana's c2 edit")


def test_small_clock_error_is_learned_but_not_shown(hub: Any, tmp_path: Path) -> None:
    astana = new_office(hub, tmp_path, "astana", "+30s")
    office_sql("+30s", astana, "INSERT INTO cases (id) VALUES ('c1')")
    [captured] = pending_stamps(astana)
    assert abs(wall_ms(captured) - now_ms() - 30_000) < SLACK_MS, "the fake clock was not used"
    sync_at("+30s", astana)
    learned, pending = office_state(astana)
    assert abs(learned + 30_000) < SLACK_MS and pending == 0
    assert clock_line("+30s", astana) is None  # under a minute: not worth a line


def test_clock_jumping_back_an_hour_mid_run(hub: Any, make_office: Any, tmp_path: Path) -> None:
    almaty = make_office("almaty")
    astana = new_office(hub, tmp_path, "astana", "+0")
    add_case(almaty, "c1")
    almaty.sync()

    # A right clock first.
    office_sql("+0", astana, "INSERT INTO cases (id) VALUES ('c2')", _set("c2", notes="one"))
    sync_at("+0", astana)
    assert abs(office_state(astana)[0]) < SLACK_MS
    assert clock_line("+0", astana) is None

    # Then the office clock jumps back an hour (a bad NTP step, a dead CMOS battery).
    write(almaty, _set("c1", status="refugee"))
    almaty.sync()
    office_sql("-1h", astana, "INSERT INTO cases (id) VALUES ('c3')", _set("c2", notes="two"))
    jumped = pending_stamps(astana)
    assert len(jumped) == 2
    first = receipts(hub, "astana")
    # The hybrid clock never goes back: the new stamps follow the old ones.
    assert min(jumped) > max(hlc for _, hlc in first)
    assert wall_ms(min(jumped)) > now_ms() - 600_000, "stamped with the clock an hour back"
    sync_at("-1h", astana)  # learns the new error; pulls almaty's c1.status
    learned, pending = office_state(astana)
    assert abs(learned - HOUR_MS) < SLACK_MS and pending == 0
    line = clock_line("-1h", astana)
    assert line is not None and re.match(r"Clock:\s+(359\d|360\d) s behind the hub", line), line

    # Causality across the jump: astana saw almaty's c1.status, so its edit wins.
    refugee = hub_version(hub, "c1", "status")
    start = now_ms()
    office_sql("-1h", astana, _set("c1", status="closed"), _set("c2", notes="three"))
    made = (start, now_ms())
    sync_at("-1h", astana)
    almaty.sync()

    assert case(hub, "c1")["status"] == "closed"
    closed = hub_version(hub, "c1", "status")
    assert closed > refugee and closed.node == "astana"
    assert_real_time(closed, made, "astana's edit after the jump")
    assert case(hub, "c2")["notes"] == "three"
    assert hub.store.conflicts() == []
    stamps = [hlc for _, hlc in receipts(hub, "astana")]
    assert len(stamps) == 6
    assert stamps == sorted(set(stamps)), "the office's stamps went backwards"
    assert_replicas_equal(hub, almaty.path, astana)
