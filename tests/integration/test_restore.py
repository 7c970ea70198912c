"""Backups and restores: `hub backup` while offices push, `hub restore`, a hub put back
from an older copy (stopped, its file replaced, started again on the same port), and
the offices re-sending what it lacks, exactly once."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from click.testing import CliRunner

from fieldsync.cli import cli
from hub.app import create_app
from hub.ingest import ALL_RECEIPTS
from hub.store import SqliteHubStore
from node.outbox import kept_changes
from node.restore import kept
from node.store import NodeStore
from shared.errors import HubUnavailableError
from tests.faults import FlakyTransport
from tests.integration.test_sync import write

pytestmark = pytest.mark.integration


@dataclass
class RestartableHub:
    """A hub on a fixed loopback port that can be stopped and started again."""

    url: str
    store: SqliteHubStore
    path: Path
    port: int
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.store = SqliteHubStore(self.path)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(create_app(self.store), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        self._sock = sock

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()
        self.store.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RestartableHub]:
    """Overrides the shared fixture: the same hub, but one that can be restarted."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    path = tmp_path / "hub.db"
    found = RestartableHub(f"http://127.0.0.1:{port}", None, path, port)  # type: ignore[arg-type]
    found.start()
    yield found
    found.stop()


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def run_with_umask(*args: str | Path) -> tuple[int, str]:
    """:func:`run` under the usual umask (files readable by all unless made 0600)."""
    old = os.umask(0o022)
    try:
        return run(*args)
    finally:
        os.umask(old)


def put_back(hub: RestartableHub, backup: Path, *, plain_copy: bool = False) -> None:
    """Stop the hub, replace its file by ``backup``, start it again on the same port."""
    hub.stop()
    if plain_copy:
        shutil.copy(backup, hub.path)
        for suffix in ("-wal", "-shm"):
            Path(f"{hub.path}{suffix}").unlink(missing_ok=True)
    else:
        code, output = run("hub", "restore", backup, "--db", hub.path)
        assert code == 0, output
        assert "restored" in output
    hub.start()


def hub_count(hub: RestartableHub, sql: str) -> int:
    with sqlite3.connect(hub.path) as conn:
        found = int(conn.execute(sql).fetchone()[0])
    conn.close()
    return found


def receipts(hub: RestartableHub) -> int:
    return hub_count(hub, f"SELECT count(*) FROM ({ALL_RECEIPTS})")


def add(office, case_id: str, name: str = "Nazarova") -> None:
    write(
        office,
        "INSERT INTO cases (id, family_name, given_name, status, household_size, "
        "registered_on) VALUES (?, ?, 'Dilnoza', 'asylum_seeker', 2, '2024-01-01')",
        case_id,
        name,
    )


def tables_of(store) -> dict[str, list[dict]]:
    return {name: store.rows(name) for name in ("cases", "assistance")}


def test_a_restored_hub_gets_every_change_back_exactly_once(hub, make_office, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    astana = make_office("astana", batch_size=20)
    almaty = make_office("almaty", batch_size=20)
    for i in range(40):
        add(astana, f"a{i}")
        add(almaty, f"b{i}")
    astana.sync(), almaty.sync(), astana.sync()

    # A backup while both offices push.
    stop = threading.Event()
    errors: list[BaseException] = []

    def push(office, prefix: str) -> None:
        try:
            i = 0
            while not stop.is_set():
                add(office, f"{prefix}{i}")
                office.sync()
                i += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    pushers = [
        threading.Thread(target=push, args=(astana, "pa")),
        threading.Thread(target=push, args=(almaty, "pb")),
    ]
    for thread in pushers:
        thread.start()
    time.sleep(0.3)
    backup = tmp_path / "backups" / "hub-copy.db"
    backup.parent.mkdir()
    code, output = run("hub", "backup", "--db", hub.path, backup)
    time.sleep(0.2)
    stop.set()
    for thread in pushers:
        thread.join()
    assert not errors
    assert code == 0, output
    assert "verified" in output
    # One moment of the hub: each office's acknowledged mark and its receipts agree.
    with sqlite3.connect(backup) as conn:
        for node, acked in conn.execute("SELECT name, acked_seq FROM _fieldsync_nodes"):
            top = conn.execute(
                f"SELECT max(seq) FROM ({ALL_RECEIPTS}) WHERE node = ?", [node]
            ).fetchone()[0]
            assert top == acked
        assert (
            conn.execute("SELECT count(*) FROM _fieldsync_records").fetchone()[0]
            == (
                conn.execute("SELECT count(DISTINCT tbl || pk) FROM _fieldsync_history").fetchone()[
                    0
                ]
            )
        )
    conn.close()
    astana.sync(), almaty.sync()

    # 100 more changes, acknowledged: inserts, updates (own and older records), a delete.
    for i in range(30):
        add(astana, f"after-a{i}")
        add(almaty, f"after-b{i}")
    for i in range(10):
        write(astana, "UPDATE cases SET household_size = ? WHERE id = ?", 3 + i, f"after-a{i}")
        write(almaty, "UPDATE cases SET household_size = ? WHERE id = ?", 3 + i, f"after-b{i}")
    for i in range(9):
        write(astana, "UPDATE cases SET notes = 'seen' WHERE id = ?", f"b{i}")
        write(almaty, "UPDATE cases SET notes = 'seen' WHERE id = ?", f"a{i}")
    write(astana, "DELETE FROM cases WHERE id = 'a30'")
    write(almaty, "DELETE FROM cases WHERE id = 'b30'")
    astana.sync(), almaty.sync(), astana.sync(), almaty.sync()
    before = tables_of(hub.store)
    versions, kept_receipts = (
        hub_count(hub, "SELECT count(*) FROM _fieldsync_history"),
        receipts(hub),
    )
    assert hub_count(hub, "SELECT count(*) FROM _fieldsync_conflicts") == 0
    assert astana.store.pending_count() == almaty.store.pending_count() == 0

    put_back(hub, backup)
    assert tables_of(hub.store) != before  # the backup lacks them
    for _ in range(2):
        astana.sync(), almaty.sync()

    assert tables_of(hub.store) == before
    assert tables_of(astana.store) == before
    assert tables_of(almaty.store) == before
    # Nothing applied twice, and the re-send logged no conflict.
    assert hub_count(hub, "SELECT count(*) FROM _fieldsync_history") == versions
    assert receipts(hub) == kept_receipts
    assert hub_count(hub, "SELECT count(*) FROM _fieldsync_conflicts") == 0
    said = [r.getMessage() for r in caplog.records if "hub restored from a backup" in r.message]
    assert len(said) == 2, said  # once per office
    assert all("could not be re-sent" not in line for line in said)
    code, output = run("node", "status", astana.path)
    assert "Hub restored:" in output and "re-sent" in output

    # Sent again as they were, changes the hub holds are passed by its receipts.
    kept = list(kept_changes(astana.store.db.conn, 0))
    assert len(kept) > 50
    result = astana.client.push(kept)
    assert result.applied == 0 and result.acked >= kept[-1].seq
    assert hub_count(hub, "SELECT count(*) FROM _fieldsync_history") == versions


def test_the_same_backup_restored_twice_is_noticed_twice(hub, make_office, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    add(astana, "c2")
    astana.sync()
    put_back(hub, backup, plain_copy=True)  # a plain cp of the backup
    astana.sync()
    assert {r["id"] for r in hub.store.rows("cases")} == {"c1", "c2"}
    add(astana, "c3")
    astana.sync()
    put_back(hub, backup, plain_copy=True)  # the same copy again
    astana.sync()
    astana.sync()
    assert {r["id"] for r in hub.store.rows("cases")} == {"c1", "c2", "c3"}
    said = [r.message for r in caplog.records if "hub restored from a backup" in r.message]
    assert len(said) == 2
    assert "re-sent 1 changes" in said[0] and "re-sent 2 changes" in said[1]


def test_an_office_whose_window_expired_is_warned(hub, make_office, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    code, output = run("node", "set", astana.path, "--keep-acked", "0s")
    assert code == 0, output
    assert "no longer kept" in output
    for case_id in ("c2", "c3"):
        add(astana, case_id)
    astana.sync()
    put_back(hub, backup)
    astana.sync()  # kept nothing: c2 and c3 cannot be re-sent
    said = [r.message for r in caplog.records if "hub restored from a backup" in r.message]
    assert len(said) == 1
    assert "re-sent 0 changes" in said[0]
    assert "2 changes acknowledged before the 0s window could not be re-sent" in said[0]
    code, output = run("node", "status", astana.path)
    assert "kept 0s" in output and "could not be re-sent" in output


def test_hub_backup_is_private_and_verified(hub, make_office, tmp_path):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    out = tmp_path / "copy.db"
    code, output = run_with_umask("hub", "backup", "--db", hub.path, out)
    assert code == 0, output
    assert output.startswith(f"{out}: ") and "records 1" in output and "verified" in output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not Path(f"{out}-wal").exists()
    # A whole hub: opened as one, it holds what the hub held.
    with SqliteHubStore(tmp_path / "copy.db") as copy:
        assert copy.rows("cases") == hub.store.rows("cases")
        assert copy.epoch and copy.epoch != hub.store.epoch

    code, output = run("hub", "backup", "--db", hub.path, out)
    assert code == 1 and "exists" in output and "--force" in output
    assert len(output.strip().splitlines()) == 1
    assert run("hub", "backup", "--db", hub.path, out, "--force")[0] == 0
    code, output = run("hub", "backup", "--db", tmp_path / "nowhere.db", tmp_path / "x.db")
    assert code == 1 and "does not exist" in output and len(output.strip().splitlines()) == 1
    code, output = run("hub", "backup", "--db", astana.path, tmp_path / "x.db")
    assert code == 1 and "is an office database, not a hub database" in output
    (tmp_path / "junk").write_text("not a database")
    code, output = run("hub", "backup", "--db", tmp_path / "junk", tmp_path / "x.db")
    assert code == 1 and "is not a fieldsync database" in output
    assert not (tmp_path / "x.db").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_node_backup_is_private_and_verified(hub, make_office, tmp_path):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    add(astana, "c2")  # queued
    out = tmp_path / "laptop.db"
    code, output = run_with_umask("node", "backup", astana.path, out)
    assert code == 0, output
    assert "records 1" in output and "queued changes 1" in output and "verified" in output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with NodeStore(out) as copy:
        assert copy.rows("cases") == astana.store.rows("cases")
        assert copy.pending_count() == 1
    code, output = run("node", "backup", astana.path, out)
    assert code == 1 and "exists" in output
    code, output = run("node", "backup", hub.path, tmp_path / "y.db")
    assert code == 1 and "is a hub database, not an office database" in output


def test_restore_refuses_a_hub_in_use_and_keeps_the_file_replaced(hub, make_office, tmp_path):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    hub.stop()
    # Another program has the hub database open, as `hub serve` would.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('SELECT count(*) FROM _fieldsync_meta').fetchone(); "
            "print('open', flush=True); sys.stdin.read()",
            str(hub.path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        code, output = run("hub", "restore", backup, "--db", hub.path)
        assert code == 1 and "is in use" in output
    finally:
        holder.communicate("", timeout=10)
    code, output = run("hub", "restore", tmp_path / "nowhere.db", "--db", hub.path)
    assert code == 1 and "does not exist" in output
    code, output = run("hub", "restore", astana.path, "--db", hub.path)
    assert code == 1 and "not a hub database" in output
    assert hub.path.exists()
    code, output = run("hub", "restore", backup, "--db", hub.path)
    assert code == 0, output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("hub.db.replaced-")]
    assert aside and aside[0].name.endswith(aside[0].name.split("-", 1)[1])
    hub.start()
    assert {r["id"] for r in hub.store.rows("cases")} == {"c1"}


def test_a_recovery_cut_half_way_is_done_again(hub, make_office, tmp_path):
    cut: dict[str, str] = {}  # path -> fate of its next request
    transport = FlakyTransport(lambda number, request: cut.pop(request.url.path, "ok"))
    astana = make_office("astana", transport=transport)
    almaty = make_office("almaty")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    add(astana, "c2"), add(astana, "c3"), add(almaty, "d1")
    almaty.sync(), astana.sync()
    before = kept(astana.store.db).hub_epoch
    put_back(hub, backup)

    cut["/v1/push"] = "drop"  # the hub takes the re-sent changes; the answer is lost
    with pytest.raises(HubUnavailableError):
        astana.sync()
    assert kept(astana.store.db).hub_epoch == before  # not recovered yet
    cut["/v1/pull"] = "refuse"  # re-sent already: the pull from 0 is cut
    with pytest.raises(HubUnavailableError):
        astana.sync()
    assert kept(astana.store.db).hub_epoch == before
    astana.sync()
    assert kept(astana.store.db).hub_epoch == hub.store.epoch != before
    assert {r["id"] for r in hub.store.rows("cases")} == {"c1", "c2", "c3"}
    assert hub_count(hub, "SELECT count(*) FROM _fieldsync_history") == 3  # each once
    assert astana.store.rows("cases") == hub.store.rows("cases")  # d1 gone until re-sent
    almaty.sync(), astana.sync()
    assert {r["id"] for r in astana.store.rows("cases")} == {"c1", "c2", "c3", "d1"}
