"""Bad input at the edges: one-line errors on the command line, 4xx from the hub,
nothing made or changed by a command that fails."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from fieldsync.cli import cli
from hub.store import SqliteHubStore
from node.link import check_hub_url, check_token
from node.store import NodeStore
from shared.clock import COUNTER_BITS, now_ms
from shared.protocol import PROTOCOL_VERSION

pytestmark = pytest.mark.integration

BIG = str(2**64)  # past SQLite's integers
FIELDSYNC = Path(sys.executable).parent / "fieldsync"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], result.output


def node_init(
    db: Path, *more: str | Path, name: str = "a", hub: str = "https://h:1", token: str = "t"
) -> Result:
    """``fieldsync node init DB`` with a name, hub URL and token, and ``more`` options
    (``--offline``: no hub answers at the made-up URL)."""
    return run(
        "node", "init", db, "--name", name, "--hub", hub, "--token", token, "--offline", *more
    )


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def settings(path: Path) -> tuple[str, str]:
    """The hub URL and token an office database holds."""
    office = NodeStore(path)
    try:
        return office.hub_url, office.token
    finally:
        office.close()


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- node init and node set --------------------------------------------------------


def test_node_init_refuses_a_hub_database_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    hub = tmp_path / "hub.db"
    SqliteHubStore(hub).close()
    with sqlite3.connect(hub) as conn:
        before = conn.execute("SELECT type, name FROM sqlite_master ORDER BY name").fetchall()
    conn.close()
    result = node_init(hub, name="astana")
    assert_one_line_error(result, "is a hub database, not an office database")
    with sqlite3.connect(hub) as conn:
        after = conn.execute("SELECT type, name FROM sqlite_master ORDER BY name").fetchall()
    conn.close()
    assert after == before


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("ftp://hub:8000", "http:// or https://"),
        ("http://", "names no host"),
        ("http://user:secret@hub:8000", "not in the URL"),
        ("http://hub:8000/?x=1", "query or fragment"),
        ("http://hub:8000/#top", "query or fragment"),
        ("http://hub:8000/\tx", "control characters"),
        ("http://hub:8000\n", "control characters"),
    ],
)
def test_a_hub_url_that_cannot_work_is_refused_before_any_file(
    tmp_path: Path, url: str, needle: str
) -> None:
    result = node_init(tmp_path / "a.db", hub=url)
    assert_one_line_error(result, "invalid hub URL", needle)
    assert files(tmp_path) == []


@pytest.mark.parametrize("token", ["", " ", "two words", "токен", "line\nbreak", "tab\t"])
def test_a_token_that_cannot_be_sent_is_refused(tmp_path: Path, token: str) -> None:
    result = node_init(tmp_path / "a.db", token=token)
    assert_one_line_error(result, "invalid token")
    assert files(tmp_path) == []
    office = NodeStore.init(tmp_path / "b.db", "b", "http://h:1", "good-token_1")
    office.close()
    result = run("node", "set", tmp_path / "b.db", "--token", token, "--hub", "http://h:2")
    if token:  # an empty --token is no token given: only the URL changes
        assert_one_line_error(result, "invalid token")
    assert settings(tmp_path / "b.db")[1] == "good-token_1"


def test_node_set_refuses_a_bad_url_and_keeps_the_old_one(tmp_path: Path) -> None:
    NodeStore.init(tmp_path / "a.db", "a", "http://hub:8000/", "t").close()
    assert_one_line_error(run("node", "set", tmp_path / "a.db", "--hub", "http://[::1"), "IPv6")
    assert settings(tmp_path / "a.db")[0] == "http://hub:8000"


def test_the_url_and_token_checks_pass_what_fieldsync_makes(tmp_path: Path) -> None:
    assert (
        check_hub_url("https://hub.example.org/fieldsync/") == "https://hub.example.org/fieldsync"
    )
    assert check_hub_url("http://[::1]:8000") == "http://[::1]:8000"
    hub = SqliteHubStore(tmp_path / "hub.db")
    try:
        token = hub.add_node("astana")
    finally:
        hub.close()
    assert check_token(token) == token


def test_a_failed_node_init_leaves_no_file(tmp_path: Path) -> None:
    schema = tmp_path / "temp.toml"
    schema.write_text('[tables.x]\ncreate = "CREATE TEMP TABLE x (id TEXT PRIMARY KEY)"\n')
    db = tmp_path / "a.db"
    result = node_init(db, "--schema", schema)
    assert_one_line_error(result, "table x is TEMP")
    assert files(tmp_path) == ["temp.toml"]
    # Adopting a database that was there: a failure leaves it as it was.
    schema.write_text('[tables.x]\ncreate = "CREATE TABLE x (id TEXT PRIMARY KEY, v INTEGER)"\n')
    other = tmp_path / "b.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE x (id TEXT PRIMARY KEY, v TEXT)")  # not the schema's x
        conn.execute("INSERT INTO x VALUES ('k', 'not a number')")
    conn.close()
    before = dump(other)
    result = node_init(other, "--schema", schema, name="b")
    assert result.exit_code == 1, result.output
    assert dump(other) == before  # a file that was there stays, its contents untouched


def test_a_failed_init_never_removes_a_database_another_init_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two inits of one path at once: the one that made the file waits (at the seam
    where it opens it) while the other makes an office in it; the first then fails,
    and the office the other made stays."""
    import node.store as node_store

    path = tmp_path / "office.db"
    other_done = threading.Event()
    real_connect = node_store.connect

    def connect(target: Any, **options: Any) -> Any:
        if threading.current_thread().name == "first":
            other_done.wait(timeout=30)
        return real_connect(target, **options)

    monkeypatch.setattr(node_store, "connect", connect)
    outcome: dict[str, str] = {}

    def init(name: str, office: str) -> None:
        try:
            NodeStore.init(path, office, "http://127.0.0.1:9", "t").close()
            outcome[name] = "made"
        except Exception as exc:
            outcome[name] = str(exc)
        finally:
            if name == "other":
                other_done.set()

    first = threading.Thread(target=init, args=("first", "astana"), name="first")
    first.start()
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:  # the first claimed it
        time.sleep(0.001)
    other = threading.Thread(target=init, args=("other", "almaty"), name="other")
    other.start()
    other.join(timeout=60)
    first.join(timeout=60)
    assert outcome["other"] == "made"
    assert "already a fieldsync office database" in outcome["first"]
    office = NodeStore(path)
    try:
        assert office.node == "almaty"
    finally:
        office.close()


def test_a_schema_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    schema = tmp_path / "latin1.toml"
    schema.write_bytes(b'\xff[tables.x]\ncreate = "CREATE TABLE x (id TEXT PRIMARY KEY)"\n')
    result = node_init(tmp_path / "a.db", "--schema", schema)
    assert_one_line_error(result, "latin1.toml", "not UTF-8")


# -- numbers out of range ------------------------------------------------------------


def test_numbers_past_sqlites_integers_are_usage_errors(tmp_path: Path) -> None:
    hub = tmp_path / "hub.db"
    SqliteHubStore(hub).close()
    office = tmp_path / "a.db"
    NodeStore.init(office, "a", "http://h:1", "t").close()
    for args in (
        ("hub", "resolve", BIG, "--db", hub, "--keep", "kept"),
        ("hub", "resolve", "0", "--db", hub, "--keep", "kept"),
        ("node", "retry", office, BIG),
        ("node", "drop-change", office, BIG),
        ("node", "run", office, "--interval", "inf"),
        ("node", "run", office, "--interval", "nan"),
        ("node", "run", office, "--interval", "1e308"),
        ("hub", "status", "--db", hub, "--stale-after", BIG),
        ("hub", "serve", "--db", hub, "--port", "1", "--max-future-seconds", "-5"),
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value" in result.output and "Traceback" not in result.output, args


def test_the_stores_answer_no_such_row_for_numbers_sqlite_cannot_hold(tmp_path: Path) -> None:
    hub = SqliteHubStore(tmp_path / "hub.db")
    office = NodeStore.init(tmp_path / "a.db", "a", "http://h:1", "t")
    try:
        for number in (2**63, 2**64, -1, 0):
            with pytest.raises(Exception, match="there is no conflict"):
                hub.conflict(number)
            with pytest.raises(Exception, match="there is no rejected change"):
                office.retry_rejected(number)
            with pytest.raises(Exception, match="there is no queued change"):
                office.drop_change(number)
    finally:
        hub.close()
        office.close()


# -- the hub's answers ------------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, -3, 2**63, 2**64 - 1])
def test_a_pushed_seq_out_of_range_is_a_400_and_changes_nothing(hub, seq: int) -> None:
    token = hub.store.add_node("fresh")
    change = {
        "seq": seq,
        "table": "cases",
        "pk": {"id": "z"},
        "op": "insert",
        "ts": now_ms() << COUNTER_BITS,
        "values": {"notes": "x"},
    }
    response = httpx.post(
        f"{hub.url}/v1/push",
        json={"protocol": PROTOCOL_VERSION, "changes": [change]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 400, response.text
    assert "seq must be a positive 64-bit integer" in response.json()["detail"]
    assert hub.store.rows("cases") == []
    (office,) = [o for o in hub.store.offices() if o.name == "fresh"]
    assert "older copy" not in office.health_reason  # not mistaken for a restored office


def test_admin_routes_answer_404_for_ids_and_offices_that_cannot_exist(hub) -> None:
    admin = hub.store.add_admin("root", "owner")
    headers = {"Authorization": f"Bearer {admin}"}
    for number in (2**63, 2**64):
        got = httpx.get(f"{hub.url}/v1/admin/conflicts/{number}", headers=headers)
        assert got.status_code == 404, got.text
        assert got.json()["error"] == "not_found"
        posted = httpx.post(
            f"{hub.url}/v1/admin/conflicts/{number}/resolve", json={"keep": "kept"}, headers=headers
        )
        assert posted.status_code == 404, posted.text
    got = httpx.get(f"{hub.url}/v1/admin/rejected", params={"office": "nobody"}, headers=headers)
    assert got.status_code == 404 and "nobody" in got.json()["detail"], got.text
    assert httpx.get(f"{hub.url}/v1/admin/rejected", headers=headers).json() == {"rejected": []}


def test_hub_rejected_names_an_unknown_office(tmp_path: Path) -> None:
    hub = tmp_path / "hub.db"
    SqliteHubStore(hub).close()
    assert_one_line_error(
        run("hub", "rejected", "--db", hub, "--office", "nobody"), "there is no office 'nobody'"
    )


# -- hub serve ----------------------------------------------------------------------------


def test_hub_serve_on_a_port_in_use_is_a_one_line_error_and_makes_no_database(
    tmp_path: Path,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [str(FIELDSYNC), "hub", "serve", "--db", str(tmp_path / "hub.db"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in done.stderr
    assert files(tmp_path) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_hub_serve_listens_where_it_is_told(tmp_path: Path, host: str) -> None:
    """localhost is served on IPv4, as uvicorn itself binds it."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen(
        [
            FIELDSYNC,
            "hub",
            "serve",
            "--db",
            tmp_path / "hub.db",
            "--host",
            host,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        answer = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert answer is not None and answer.status_code == 200, process.poll()
        process.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit code 0
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


# -- resolving with a value ---------------------------------------------------------------


def test_resolve_value_takes_a_json_string_for_text(hub, make_office) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    astana.store.db.conn.execute("INSERT INTO cases (id, notes) VALUES ('c1', 'start')")
    astana.sync()
    almaty.sync()
    astana.store.db.conn.execute("UPDATE cases SET notes = 'astana' WHERE id = 'c1'")
    almaty.store.db.conn.execute("UPDATE cases SET notes = 'almaty' WHERE id = 'c1'")
    astana.sync()
    almaty.sync()
    (conflict,) = hub.store.conflicts()
    result = run(
        "hub", "resolve", str(conflict.id), "--db", hub.path, "--keep", "value", "--value", '"null"'
    )
    assert result.exit_code == 0, result.output
    (row,) = hub.store.rows("cases")
    assert row["notes"] == "null"  # the text, not NULL, and without its quotes
