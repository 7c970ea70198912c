"""
The real ``fieldsync`` console script, run as a subprocess against a real hub process.

Every test drives the installed executable next to ``sys.executable``; the hub is
``fieldsync hub serve`` on a free loopback port; office databases are real SQLite
files, written with the ``sqlite3`` shell where the point is that any program's writes
are captured. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

FIELDSYNC = Path(sys.executable).parent / "fieldsync"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SQLITE3 = shutil.which("sqlite3")
needs_sqlite3_shell = pytest.mark.skipif(SQLITE3 is None, reason="the sqlite3 shell is missing")


def fieldsync(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the console script and return what it did (never raises on failure)."""
    return subprocess.run(
        [str(FIELDSYNC), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def ok(*args: str | Path) -> str:
    """Run the console script, require exit code 0, return its stdout."""
    result = fieldsync(*args)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 1, a single ``Error: ...`` line on stderr, no traceback anywhere."""
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.1)


class HubProcess:
    """``fieldsync hub serve`` as a child process; can be stopped and started again."""

    def __init__(self, db: Path, log: Path) -> None:
        self.db, self.log, self.port = db, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["hub", "serve", "--db", str(self.db), "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(FIELDSYNC), *command], stdout=log, stderr=subprocess.STDOUT, env=ENV
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail(f"the hub exited at start:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"the hub did not answer /v1/health within 10 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass
class Office:
    """An office database created with ``fieldsync node init``."""

    name: str
    db: Path

    def shell(self, sql: str) -> None:
        """Write with the sqlite3 shell: a program that knows nothing of fieldsync."""
        assert SQLITE3 is not None
        subprocess.run([SQLITE3, str(self.db), sql], check=True, timeout=10)

    def sync(self) -> str:
        lines = ok("node", "sync", self.db).strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    def status(self) -> dict[str, Any]:
        return dict(json.loads(ok("node", "status", self.db, "--json")))

    def value(self, case_id: str, column: str) -> Any:
        rows = query(self.db, f"SELECT {column} FROM cases WHERE id = ?", (case_id,))
        return rows[0][0] if rows else None


def hub_value(hub: HubProcess, case_id: str, column: str) -> Any:
    return query(hub.db, f"SELECT {column} FROM cases WHERE id = ?", (case_id,))[0][0]


def add_node(hub_db: Path, name: str) -> str:
    """Register an office holding every record; return its token (the last line)."""
    return ok("hub", "add-node", name, "--db", hub_db, "--scope", "*").strip().splitlines()[-1]


def init_office(tmp_path: Path, hub: HubProcess, name: str) -> Office:
    token = add_node(hub.db, name)
    db = tmp_path / f"{name}.db"
    out = ok("node", "init", db, "--name", name, "--hub", hub.url, "--token", token)
    assert f"Created office {name!r}" in out
    return Office(name, db)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    server = HubProcess(tmp_path / "hub.db", tmp_path / "hub.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def offices(tmp_path: Path, hub: HubProcess) -> tuple[Office, Office]:
    return init_office(tmp_path, hub, "astana"), init_office(tmp_path, hub, "almaty")


def test_add_node_prints_the_token_last_and_stores_only_its_hash(tmp_path: Path) -> None:
    hub_db = tmp_path / "hub.db"
    out = ok("hub", "add-node", "astana", "--db", hub_db).strip().splitlines()
    token = out[-1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), out
    assert all(token not in line for line in out[:-1])
    stored = query(hub_db, "SELECT token_hash FROM _fieldsync_nodes WHERE name = 'astana'")
    assert stored == [(hashlib.sha256(token.encode()).hexdigest(),)]
    for path in tmp_path.glob("hub.db*"):
        assert token.encode() not in path.read_bytes(), f"the token is readable in {path}"

    again = fieldsync("hub", "add-node", "astana", "--db", hub_db)
    assert_one_line_error(again, "astana", "already registered")
    assert query(hub_db, "SELECT count(*) FROM _fieldsync_nodes") == [(1,)]


@needs_sqlite3_shell
def test_sync_carries_rows_written_by_the_sqlite3_shell(
    hub: HubProcess, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    astana.shell(
        "INSERT INTO cases (id, family_name, given_name, country_of_origin, status) "
        "VALUES ('c1', 'Karimi', 'Farida', 'AFG', 'asylum_seeker');"
        "INSERT INTO assistance (id, case_id, kind, quantity) VALUES ('a1', 'c1', 'cash', 45000)"
    )
    assert astana.status()["pending"] == 2
    line = astana.sync()
    assert re.match(r"Synced astana: pushed 2, pulled 0, conflicts 0 \(", line), line
    assert re.match(r"Synced almaty: pushed 0, pulled 2, conflicts 0 \(", almaty.sync())

    for table in ("cases", "assistance"):
        sql = f"SELECT * FROM {table} ORDER BY id"
        assert query(almaty.db, sql) == query(astana.db, sql) == query(hub.db, sql) != []
    assert almaty.value("c1", "given_name") == "Farida"

    status = almaty.status()
    assert status["node"] == "almaty" and status["hub_url"] == hub.url
    assert status["pending"] == 0 and status["last_error"] is None
    assert status["last_success_at"] is not None
    text = ok("node", "status", almaty.db)
    assert re.search(r"^Pending changes: +0$", text, re.M), text
    assert re.search(r"^Last success: +\d{4}-\d\d-\d\dT", text, re.M), text
    assert "Last error" not in text


@needs_sqlite3_shell
def test_sync_with_the_hub_down_fails_clearly_and_keeps_the_change(
    hub: HubProcess, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    hub.stop()
    astana.shell("INSERT INTO cases (id, family_name) VALUES ('c1', 'Rahmonzoda')")

    line = assert_one_line_error(fieldsync("node", "sync", astana.db), hub.url, "kept")
    assert "1 local change" in line
    status = astana.status()
    assert status["pending"] == 1
    assert status["last_success_at"] is None
    assert hub.url in status["last_error"] and status["last_error_at"] is not None
    text = ok("node", "status", astana.db)
    assert re.search(r"^Pending changes: +1$", text, re.M), text
    assert re.search(r"^Last error: +.*" + re.escape(hub.url), text, re.M), text

    hub.start()
    assert astana.sync().startswith("Synced astana: pushed 1,")
    assert astana.status()["pending"] == 0 and astana.status()["last_error"] is None
    almaty.sync()
    assert almaty.value("c1", "family_name") == "Rahmonzoda"


@needs_sqlite3_shell
def test_sync_with_a_wrong_token_fails_clearly(tmp_path: Path, hub: HubProcess) -> None:
    add_node(hub.db, "astana")
    office = Office("astana", tmp_path / "astana.db")
    init = ("node", "init", office.db, "--name", "astana", "--hub", hub.url, "--token", "not-it")
    assert_one_line_error(fieldsync(*init), "does not accept this token", "--offline")
    assert "Token: not checked with the hub (--offline)." in ok(*init, "--offline")
    office.shell("INSERT INTO cases (id, family_name) VALUES ('c1', 'Safi')")
    line = assert_one_line_error(fieldsync("node", "sync", office.db), "401")
    assert "token" in line
    assert office.status()["pending"] == 1


@needs_sqlite3_shell
def test_same_field_conflict_is_listed_and_resolved_three_ways(
    hub: HubProcess, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    astana.shell(
        "INSERT INTO cases (id, family_name, status, household_size) VALUES "
        "('c-other', 'Noori', 'asylum_seeker', 3), ('c-office', 'Haddad', 'asylum_seeker', 2), "
        "('c-value', 'Melnyk', 'refugee', 4)"
    )
    astana.sync()
    almaty.sync()
    # Neither office sees the other's edit before the hub does.
    almaty.shell(
        "UPDATE cases SET status = 'closed' WHERE id IN ('c-other', 'c-office');"
        "UPDATE cases SET household_size = 5 WHERE id = 'c-value'"
    )
    astana.shell(
        "UPDATE cases SET status = 'refugee' WHERE id IN ('c-other', 'c-office');"
        "UPDATE cases SET household_size = 6 WHERE id = 'c-value'"
    )
    almaty.sync()
    assert "conflicts 3" in astana.sync()

    text = ok("hub", "conflicts", "--db", hub.db)
    assert text.count("field conflict on cases") == 3, text
    for needle in ('"c-other"', "field status", '"refugee"', '"closed"', "astana", "almaty"):
        assert needle in text
    listed = {
        c["pk"]["id"]: c for c in json.loads(ok("hub", "conflicts", "--db", hub.db, "--json"))
    }
    assert set(listed) == {"c-other", "c-office", "c-value"}
    for case_id, column, values in (
        ("c-other", "status", {"refugee", "closed"}),
        ("c-office", "status", {"refugee", "closed"}),
        ("c-value", "household_size", {5, 6}),
    ):
        record = listed[case_id]
        kept, other = record["kept"], record["other"]
        assert (record["kind"], record["column"], record["status"]) == ("field", column, "logged")
        assert {kept["value"], other["value"]} == values
        assert {kept["office"], other["office"]} == {"astana", "almaty"}
        assert kept["time"] and other["time"]
        assert hub_value(hub, case_id, column) == kept["value"]

    loser = listed["c-office"]["other"]
    decided = {
        "c-other": (["--keep", "other"], listed["c-other"]["other"]["value"]),
        "c-office": (["--keep", loser["office"]], loser["value"]),
        "c-value": (["--keep", "value", "--value", "7"], 7),
    }
    for case_id, (keep, value) in decided.items():
        conflict_id = str(listed[case_id]["id"])
        assert "resolved" in ok("hub", "resolve", conflict_id, "--db", hub.db, *keep)
        column = listed[case_id]["column"]
        assert hub_value(hub, case_id, column) == value, case_id

    for office in (astana, almaty):
        office.sync()
    for case_id, (_, value) in decided.items():
        column = listed[case_id]["column"]
        assert astana.value(case_id, column) == almaty.value(case_id, column) == value, case_id
    after = json.loads(ok("hub", "conflicts", "--db", hub.db, "--json", "--status", "resolved"))
    assert len(after) == 3

    again = fieldsync(
        "hub", "resolve", str(listed["c-other"]["id"]), "--db", hub.db, "--keep", "kept"
    )
    assert_one_line_error(again, "already resolved")


def test_resolve_with_bad_choices_fails_in_one_line_and_changes_nothing(
    hub: HubProcess, offices: tuple[Office, Office]
) -> None:
    astana, almaty = offices
    astana.shell("INSERT INTO cases (id, status, household_size) VALUES ('c1', 'refugee', 2)")
    astana.sync()
    almaty.sync()
    almaty.shell("UPDATE cases SET status = 'closed', household_size = 3 WHERE id = 'c1'")
    astana.shell("UPDATE cases SET status = 'rejected', household_size = 4 WHERE id = 'c1'")
    almaty.sync()
    astana.sync()
    listed = {c["column"]: c for c in json.loads(ok("hub", "conflicts", "--db", hub.db, "--json"))}
    status_id, size_id = str(listed["status"]["id"]), str(listed["household_size"]["id"])
    before = hub_value(hub, "c1", "status")
    for args, needle in (
        (["--keep", "value", "--value", "bogus"], "constraint"),
        (["--keep", "nobody"], "kept, other, value"),
        (["--keep", "value"], "needs --value"),
        (["--keep", "other", "--value", "x"], "--value goes with --keep value"),
    ):
        assert_one_line_error(fieldsync("hub", "resolve", status_id, "--db", hub.db, *args), needle)
    result = fieldsync("hub", "resolve", size_id, "--db", hub.db, "--keep", "value", "--value", "x")
    assert_one_line_error(result, "whole numbers")
    assert hub_value(hub, "c1", "status") == before
    assert (
        len(json.loads(ok("hub", "conflicts", "--db", hub.db, "--json", "--status", "logged"))) == 2
    )


@needs_sqlite3_shell
def test_node_init_asks_the_hub_whose_token_it_is(tmp_path: Path, hub: HubProcess) -> None:
    almaty = init_office(tmp_path, hub, "almaty")
    almaty_token = add_node(hub.db, "almaty-2")  # another office's token, for astana
    add_node(hub.db, "astana")
    db = tmp_path / "astana.db"

    def init(token: str, url: str = hub.url, *more: str) -> subprocess.CompletedProcess[str]:
        return fieldsync(
            "node", "init", db, "--name", "astana", "--hub", url, "--token", token, *more
        )

    line = assert_one_line_error(init(almaty_token), "belongs to office 'almaty-2', not 'astana'")
    assert "nothing was created" in line and not db.exists()
    line = assert_one_line_error(init("no-such-token"), "does not accept this token")
    assert "unknown or revoked" in line and not db.exists()
    ok("hub", "revoke", "almaty-2", "--db", hub.db)
    assert_one_line_error(init(almaty_token), "does not accept this token")
    line = assert_one_line_error(init("t", f"http://127.0.0.1:{free_port()}"), "cannot reach")
    assert "--offline" in line and not db.exists()
    out = ok("node", "init", db, "--name", "astana", "--hub", hub.url, "--token", "t", "--offline")
    assert "Created office 'astana'" in out and "not checked with the hub (--offline)" in out
    db.unlink()

    # A stray database syncing with almaty's token is refused, and almaty stays healthy.
    token = add_node(hub.db, "almaty-3")
    ok("node", "init", db, "--name", "astana", "--hub", hub.url, "--token", token, "--offline")
    almaty.sync()
    stray = Office("astana", db)
    stray.shell("INSERT INTO cases (id, family_name) VALUES ('c1', 'Safi')")
    assert_one_line_error(fieldsync("node", "sync", db), "403", "belongs to office 'almaty-3'")
    offices = {o["name"]: o for o in json.loads(ok("hub", "status", "--db", hub.db, "--json"))}
    assert offices["almaty"]["health"] == "ok"
    assert offices["almaty-3"]["health"] == "never synced", (
        offices["almaty-3"]["last_error"],
        offices["almaty-3"]["health_reason"],
    )
    assert offices["almaty-3"]["last_error"] is None


def test_node_init_with_a_bad_hub_url_fails_clearly(tmp_path: Path) -> None:
    db = tmp_path / "astana.db"
    result = fieldsync("node", "init", db, "--name", "astana", "--hub", "hub:8000", "--token", "t")
    assert_one_line_error(result, "http://")
    assert not db.exists()


def test_node_sync_of_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    assert_one_line_error(fieldsync("node", "sync", missing), str(missing), "node init")
    assert not missing.exists()


def test_hub_resolve_of_an_unknown_conflict_fails_clearly(tmp_path: Path) -> None:
    hub_db = tmp_path / "hub.db"
    add_node(hub_db, "astana")
    result = fieldsync("hub", "resolve", "999", "--db", hub_db, "--keep", "other")
    assert_one_line_error(result, "999")


@needs_sqlite3_shell
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_node_run_syncs_until_a_signal_stops_it(
    tmp_path: Path, hub: HubProcess, offices: tuple[Office, Office], signum: signal.Signals
) -> None:
    astana, almaty = offices
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(FIELDSYNC), "node", "run", str(almaty.db), "--interval", "0.5"],
            stdout=stdout,
            stderr=stderr,
            env=ENV,
        )
    try:
        astana.shell("INSERT INTO cases (id, family_name) VALUES ('c1', 'Warsame')")
        astana.sync()
        wait_for(lambda: almaty.value("c1", "family_name") == "Warsame", 10, "the pull")
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err.read_text()
    assert "Stopped." in err.read_text()
    assert re.search(r"^[\d:+ -]+ Synced almaty: pushed 0, pulled 1,", out.read_text(), re.M)


def _digest(db: Path, sql: str, *params: Any) -> tuple[int, str]:
    """Rows and sha256 of the rows ``sql`` selects, as the demo computes them."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        cursor = conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor]
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return len(rows), hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


HELD = re.compile(
    r"^ +(cases|assistance) +astana (\d+) (\w{12}) +almaty (\d+) (\w{12}) +hq (\d+) (\w{12})"
    r" +hub (\d+) (\w{12})$",
    re.M,
)
# The hub's rows in an office's scope, worked out from the values: a case by its office,
# an assistance delivery by its case's office.
IN_SCOPE = {
    "cases": "SELECT * FROM cases WHERE office = ? ORDER BY id",
    "assistance": "SELECT a.* FROM assistance a JOIN cases c ON c.id = a.case_id "
    "WHERE c.office = ? ORDER BY a.id",
}


@pytest.mark.parametrize("keep", [False, True], ids=["temporary", "kept"])
def test_demo_shows_scopes_an_outage_a_conflict_and_a_move(tmp_path: Path, keep: bool) -> None:
    keep_dir = tmp_path / "demo"
    started = time.monotonic()
    result = fieldsync("demo", *(["--keep", str(keep_dir)] if keep else []), timeout=30)
    assert time.monotonic() - started < 30
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    assert "sync failed" in out and "kept" in out
    assert re.search(r"conflict #1 on case .*\n.*field status", out), out
    assert re.search(r"hq +set \"closed\"", out) and re.search(r"astana +set \"refugee\"", out)
    assert re.search(r"kept \"closed\"", out), out  # headquarters' correction came later
    held = {m[0]: m[1:] for m in HELD.findall(out)}
    assert set(held) == {"cases", "assistance"}, out
    for table, (n1, d1, n2, d2, n3, d3, n4, d4) in held.items():
        # astana and almaty hold their own, apart; hq holds all of the hub's
        assert int(n1) + int(n2) == int(n3) == int(n4) > 80 and d3 == d4, table
        assert len({d1, d2, d3}) == 3, table
    moved = re.search(r"id ([0-9a-f-]{36}), moved to almaty:", out)
    assert moved, out
    lines = out.strip().splitlines()
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", lines[-1]), "the admin token is the last line"
    assert re.search(r"dashboard is at http://127\.0\.0\.1:\d+/", out), out
    assert "--serve" in out  # how to keep it up
    if not keep:
        assert "Files are kept" not in out
        return
    assert lines[0] == f"Files are kept in {keep_dir}"
    hub_db = keep_dir / "hub.db"
    for table, (n1, d1, n2, d2, n3, d3, *_) in held.items():
        for name, count, digest in (("astana", n1, d1), ("almaty", n2, d2), ("hq", n3, d3)):
            in_office = _digest(keep_dir / f"{name}.db", f"SELECT * FROM {table} ORDER BY id")
            assert in_office == (int(count), digest), (name, table)
            if name != "hq":
                assert _digest(hub_db, IN_SCOPE[table], name) == in_office, (name, table)
        assert _digest(hub_db, f"SELECT * FROM {table} ORDER BY id") == (int(n3), d3), table
    # The moved case is at almaty with its assistance, and gone from astana.
    case_id = moved[1]
    for name, office in (("almaty", [("almaty",)]), ("hq", [("almaty",)]), ("astana", [])):
        db = keep_dir / f"{name}.db"
        assert query(db, "SELECT office FROM cases WHERE id = ?", (case_id,)) == office, name
        aid = query(db, "SELECT count(*) FROM assistance WHERE case_id = ?", (case_id,))
        assert (aid[0][0] > 0) == bool(office), name
    (conflict,) = json.loads(ok("hub", "conflicts", "--db", hub_db, "--json"))
    assert conflict["column"] == "status"
    assert {conflict["kept"]["office"], conflict["other"]["office"]} == {"astana", "hq"}
