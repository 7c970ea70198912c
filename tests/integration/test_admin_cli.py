"""``fieldsync hub add-admin``, ``hub status`` and ``demo --serve``: the real console script."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hub.auth import hash_token
from tests.integration.test_cli import (
    ENV,
    FIELDSYNC,
    HubProcess,
    assert_one_line_error,
    fieldsync,
    free_port,
    init_office,
    ok,
    query,
)

pytestmark = pytest.mark.integration


def test_add_admin_prints_the_token_last_and_stores_only_its_hash(tmp_path: Path) -> None:
    hub_db = tmp_path / "hub.db"
    lines = ok("hub", "add-admin", "ops", "--db", hub_db).strip().splitlines()
    token = lines[-1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), lines
    assert query(hub_db, "SELECT name, token_hash FROM _fieldsync_admins") == [
        ("ops", hash_token(token))
    ]
    for path in tmp_path.glob("hub.db*"):
        assert token.encode() not in path.read_bytes(), f"the token is readable in {path}"
    assert_one_line_error(fieldsync("hub", "add-admin", "ops", "--db", hub_db), "already exists")
    assert_one_line_error(fieldsync("hub", "add-admin", "no way", "--db", hub_db), "name")


def test_hub_status_shows_every_office_and_what_to_do(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub.db", tmp_path / "hub.log")
    hub.start()
    try:
        astana = init_office(tmp_path, hub, "astana")
        init_office(tmp_path, hub, "almaty")  # registered, never synced
        astana.sync()
    finally:
        hub.stop()
    out = ok("hub", "status", "--db", hub.db)
    lines = out.splitlines()
    assert lines[0].split() == [
        "OFFICE", "HEALTH", "LAST", "SYNC", "PENDING", "LAG", "CONFLICTS", "REJECTED"
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert re.match(r"almaty +never synced +never +\? +0 +0 +0$", rows["almaty"]), out
    assert re.match(r"astana +ok +(just now|\d+ seconds ago) +0 +0 +0 +0$", rows["astana"]), out
    assert "almaty: never synced: has not synced yet" in out
    # A stale office, with the advice, when the limit is short.
    time.sleep(1.1)
    stale = ok("hub", "status", "--db", hub.db, "--stale-after", "1")
    assert re.search(r"astana +stale", stale) and "What to do:" in stale, stale
    data = json.loads(ok("hub", "status", "--db", hub.db, "--json"))
    assert [o["name"] for o in data] == ["almaty", "astana"]
    assert data[1]["pushed"] == 0 and data[1]["health"] == "ok" and data[1]["version"]
    assert_one_line_error(fieldsync("hub", "status", "--db", tmp_path / "none.db"), "none.db")
    assert_one_line_error(fieldsync("hub", "status", "--db", astana.db), "office database")


def test_demo_serve_keeps_the_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    command = [str(FIELDSYNC), "demo", "--serve", "--port", str(port), "--keep", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not (lines and lines[-1].startswith("   Sign in with the admin token")):
            line = proc.stdout.readline().decode()
            assert line and time.monotonic() < deadline, (
                "".join(lines) + proc.stderr.read().decode()
            )
            lines.append(line.rstrip("\n"))
        token = proc.stdout.readline().decode().strip()
        assert f"dashboard is at http://127.0.0.1:{port}/" in "\n".join(lines)
        auth = {"Authorization": f"Bearer {token}"}
        offices = httpx.get(f"http://127.0.0.1:{port}/v1/admin/offices", headers=auth).json()
        assert [o["name"] for o in offices["offices"]] == ["almaty", "astana", "hq"]
        assert all(o["health"] == "ok" for o in offices["offices"])
        conflicts = httpx.get(f"http://127.0.0.1:{port}/v1/admin/conflicts", headers=auth)
        assert len(conflicts.json()["conflicts"]) == 1  # the demo's conflict waits for review
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
