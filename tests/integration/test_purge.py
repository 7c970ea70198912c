"""Purge with no resurrection, against a real uvicorn hub and real office files; and the
``hub compact``, ``node compact`` and ``hub serve --keep-history`` commands."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.compact import compact
from hub.store import SqliteHubStore
from node.compact import compact_node
from tests.conftest import Hub, Office
from tests.hub.test_compact import Hub as Driver
from tests.integration.test_cli import free_port

pytestmark = pytest.mark.integration

FIELDSYNC = Path(sys.executable).parent / "fieldsync"


def fieldsync(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FIELDSYNC), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def write(office: Office, sql: str, *params: Any) -> None:
    with contextlib.closing(sqlite3.connect(office.path)) as conn, conn:
        conn.execute(sql, params)


def add_case(office: Office, case_id: str) -> None:
    write(
        office, "INSERT INTO cases (id, family_name, office) VALUES (?, 'Nazarova', 'A')", case_id
    )


def ids(where: Office | Hub) -> set[str]:
    return {row["id"] for row in where.store.rows("cases")}


def sync(*offices: Office, rounds: int = 2) -> None:
    # Twice: the hub learns an office has a page when it pulls after it.
    for _ in range(rounds):
        for office in offices:
            office.sync()


def test_an_office_offline_across_a_purge_does_not_bring_deleted_records_back(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    a, b, c = make_office("A"), make_office("B"), make_office("C")
    for case in ("R", "S", "T"):
        add_case(a, case)
    sync(a, b, c)
    assert ids(c) == {"R", "S", "T"}
    # C goes offline and edits R there; meanwhile A deletes R and S.
    write(c, "UPDATE cases SET notes = 'seen at home visit' WHERE id = 'R'")
    write(a, "DELETE FROM cases WHERE id IN ('R', 'S')")
    sync(a, b)
    kept = fieldsync("hub", "compact", "--db", hub.path)
    assert "Purged 0 deleted record(s)" in kept.stdout, kept.stdout + kept.stderr  # C holds them
    purged = fieldsync("hub", "compact", "--db", hub.path, "--tombstone-age", "0d")
    assert purged.returncode == 0, purged.stderr
    assert "Purged 2 deleted record(s)" in purged.stdout
    assert "pull their whole scope again: C." in purged.stdout
    # C comes back: its edit of R is refused and kept aside, and S goes too.
    c.sync()
    assert ids(c) == {"T"}
    [rejected] = c.store.rejected()
    assert rejected["pk"] == {"id": "R"} and rejected["values"] == {"notes": "seen at home visit"}
    assert "deleted at the hub and purged on" in rejected["reason"]
    assert hub.store.record_state("cases", {"id": "R"}) is None
    sync(a, b, c)
    assert ids(a) == ids(b) == ids(c) == ids(hub) == {"T"}
    # The refusal is shown at the office, in one line per change.
    listed = fieldsync("node", "rejected", c.path)
    assert "deleted at the hub and purged" in listed.stdout, listed.stdout + listed.stderr


def test_offices_that_pulled_the_delete_let_it_be_purged_without_a_resync(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    a, b = make_office("A"), make_office("B")
    add_case(a, "R")
    for n in range(3):
        write(a, "UPDATE cases SET notes = ? WHERE id = 'R'", f"edit {n}")
    sync(a, b)
    write(a, "DELETE FROM cases WHERE id = 'R'")
    sync(a, b)
    out = fieldsync("hub", "compact", "--db", hub.path, "--json")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert (done["tombstones"], done["versions"], done["resync"]) == (1, 5, [])
    # A new record under the same key is a new record.
    add_case(b, "R")
    sync(b, a)
    assert ids(a) == ids(hub) == {"R"}


def test_node_compact_drops_the_versions_of_records_deleted_long_ago(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    a = make_office("A")
    add_case(a, "R")
    add_case(a, "S")
    sync(a)
    write(a, "DELETE FROM cases WHERE id = 'R'")
    sync(a)
    out = fieldsync("node", "compact", a.path)
    assert out.returncode == 0 and "versions of 0 record(s)" in out.stdout, out.stderr
    later = (time.time_ns() // 1_000_000) + 91 * 86_400_000
    done = compact_node(a.store.db, a.store.schema, a.path, now_ms=later)
    assert done.versions == 1
    with contextlib.closing(sqlite3.connect(a.path)) as conn:
        assert conn.execute("SELECT pk FROM _fieldsync_versions").fetchall() == [('["S"]',)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("hub", "compact", "--keep-history", "forever"), "--keep-history takes"),
        (("hub", "compact", "--keep-history", "0d"), "--keep-history takes"),
        (("hub", "compact", "--tombstone-age", "-1"), "--tombstone-age takes"),
        (("hub", "serve", "--keep-history", "1y"), "--keep-history takes"),
    ],
)
def test_a_bad_duration_is_one_clear_line(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    SqliteHubStore(tmp_path / "hub.db").close()
    result = fieldsync(*args, "--db", tmp_path / "hub.db")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and needle in line


def test_hub_serve_keeps_history_as_told(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with SqliteHubStore(path) as store:
        driver = Driver(store)
        driver.add("A")
        driver.insert("A", "R", "A")
        for n in range(4):
            driver.update("A", "R", f"edit {n}")
    port = free_port()
    log = tmp_path / "hub.log"
    command = ["hub", "serve", "--db", path, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(FIELDSYNC), *map(str, command), "--keep-history", "2", "--compact-after", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "compaction (history kept: 2 versions per record)" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM _fieldsync_history").fetchone()[0] == 2
    # and from the command line at once: one version each
    done = fieldsync("hub", "compact", "--db", path, "--keep-history", "1", "--vacuum")
    assert "Removed 1 history version(s)" in done.stdout and "(vacuumed)" in done.stdout
    with SqliteHubStore(path) as store:
        assert compact(store.database).versions == 0
