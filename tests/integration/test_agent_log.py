"""
What a running ``fieldsync node run`` prints (issue 15, point 8): every line starts
with the local time; a sync that moves nothing prints nothing (but the first), a
heartbeat line comes instead; a sync that moves something is printed. (Failures and
"next try in N s" are in test_transport.py, with a revoked token.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_cli import ENV, FIELDSYNC, add_node, ok, wait_for
from tests.integration.test_transport import STAMPED, served, write_case

pytestmark = pytest.mark.integration


def test_node_run_is_quiet_when_nothing_moves_and_says_when(tmp_path: Path) -> None:
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with served(tmp_path) as hub:
        hub.wait()
        office = tmp_path / "astana.db"
        token = add_node(hub.db, "astana")
        ok("node", "init", office, "--name", "astana", "--hub", hub.url, "--token", token)
        command = ["node", "run", str(office), "--interval", "0.2", "--heartbeat", "1"]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            agent = subprocess.Popen(
                [str(FIELDSYNC), *command], stdout=stdout, stderr=stderr, env=ENV
            )
        try:
            wait_for(lambda: "Still syncing" in out.read_text(), 10, "a heartbeat")
            write_case(office, "c1")
            wait_for(lambda: "pushed 1" in out.read_text(), 10, "the push")
        finally:
            agent.terminate()
            agent.wait(timeout=10)
    lines = out.read_text().splitlines()
    assert all(re.match(STAMPED, line) for line in lines), lines
    assert re.match(STAMPED + "Synced astana: pushed 0, pulled 0,", lines[0]), lines
    quiet = [x for x in lines if "Still syncing" in x]
    assert quiet and all(
        re.search(r"Still syncing astana: \d+ syncs? with nothing to move$", x) for x in quiet
    )
    # At 0.2 s a sync, about 5 quiet syncs a second: one line for them, not five.
    assert len([x for x in lines if "Synced astana: pushed 0, pulled 0," in x]) == 1, lines
    assert re.match(STAMPED + "Synced astana: pushed 1, pulled 0,", lines[-1]), lines
    assert all(re.match(STAMPED, line) for line in err.read_text().splitlines())
