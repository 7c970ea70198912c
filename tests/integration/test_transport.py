"""
The link between an office and its hub, with the real console script and a real
``fieldsync hub serve``: TLS with a private CA (a certificate made here with trustme),
plain http refused to another machine unless allowed, forwarded headers believed only
from configured addresses, and keys taken back: a revoked office's sync fails in one
line, keeps its queue, and a running ``node run`` takes a new token without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.integration.test_cli import (
    ENV,
    FIELDSYNC,
    HubProcess,
    add_node,
    assert_one_line_error,
    fieldsync,
    free_port,
    ok,
    query,
    wait_for,
)

pytestmark = pytest.mark.integration

# How each line of `node run` starts: the local time, to the second, with its offset.
STAMPED = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d "


class Served(HubProcess):
    """``fieldsync hub serve`` with extra options, started at once (:meth:`wait` for it)."""

    def __init__(self, tmp_path: Path, *options: str, host: str = "127.0.0.1") -> None:
        super().__init__(tmp_path / "hub.db", tmp_path / "hub.log")
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if '--certfile' in options else 'http'}://{shown}:{self.port}"
        command = ["hub", "serve", "--db", self.db, "--host", host, "--port", self.port]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(FIELDSYNC), *map(str, command), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ENV,
            )

    def wait(self, verify: ssl.SSLContext | bool = True) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", verify=verify, timeout=1).is_success:
                    return
            time.sleep(0.05)
        pytest.fail(f"the hub did not answer within 10 s:\n{self.log.read_text()}")


@contextlib.contextmanager
def served(tmp_path: Path, *options: str, host: str = "127.0.0.1") -> Iterator[Served]:
    hub = Served(tmp_path, *options, host=host)
    try:
        yield hub
    finally:
        hub.stop()


def write_case(db: Path, case_id: str, name: str = "Karimi") -> None:
    """An INSERT by a program that knows nothing of fieldsync (captured by triggers)."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO cases (id, family_name) VALUES (?, ?)", (case_id, name))


def pending(db: Path) -> int:
    return int(json.loads(ok("node", "status", db, "--json"))["pending"])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path, Path]:
    """The CA's certificate, and the hub's certificate and key (for 127.0.0.1, ::1 and
    localhost), as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    paths = tmp_path / "ca.pem", tmp_path / "hub-cert.pem", tmp_path / "hub-key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


# -- TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_an_office_with_the_private_ca_syncs_over_https_and_one_without_fails_clearly(
    tmp_path: Path, ca: trustme.CA, tls_files: tuple[Path, Path, Path], host: str
) -> None:
    ca_pem, cert, key = tls_files
    bind = "127.0.0.1" if host == "localhost" else host
    with served(tmp_path, "--certfile", str(cert), "--keyfile", str(key), host=bind) as hub:
        url = hub.url.replace(bind, host) if host == "localhost" else hub.url
        hub.wait(ssl.create_default_context(cafile=str(ca_pem)))
        assert "on https://" in hub.log.read_text()
        token = add_node(hub.db, "astana")
        office = tmp_path / "astana.db"
        init = ["--name", "astana", "--hub", url, "--token", token]
        ok("node", "init", office, *init, "--ca-file", ca_pem)
        write_case(office, "c1")
        assert ok("node", "sync", office).startswith("Synced astana: pushed 1,")
        assert query(hub.db, "SELECT family_name FROM cases") == [("Karimi",)]
        assert re.search(
            r"^Link: +https, verified with the CA in ", ok("node", "status", office), re.M
        )

        # Without the CA file: the public CAs do not know the hub's certificate.
        write_case(office, "c2")
        assert "no CA file" in ok("node", "set", office, "--no-ca-file")
        line = assert_one_line_error(fieldsync("node", "sync", office), url, "kept")
        assert "TLS certificate is not trusted" in line and "--ca-file" in line
        assert "certificate verify failed" in line or "local issuer" in line, line

        # Another CA's certificate: refused the same way.
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        assert "CA file now" in ok("node", "set", office, "--ca-file", other)
        line = assert_one_line_error(fieldsync("node", "sync", office), "not trusted")
        assert pending(office) == 1
        assert query(hub.db, "SELECT count(*) FROM cases") == [(1,)]

        ok("node", "set", office, "--ca-file", ca_pem)
        assert ok("node", "sync", office).startswith("Synced astana: pushed 1,")


def test_an_office_that_speaks_https_to_a_plain_http_hub_is_told_so(tmp_path: Path) -> None:
    with served(tmp_path) as hub:
        hub.wait()
        token = add_node(hub.db, "astana")
        office = tmp_path / "astana.db"
        url = hub.url.replace("http://", "https://")
        init = ("node", "init", office, "--name", "astana", "--hub", url, "--token", token)
        line = assert_one_line_error(fieldsync(*init), "TLS handshake failed", "https")
        assert "--offline" in line and not office.exists()
        ok(*init, "--offline")
        assert_one_line_error(fieldsync("node", "sync", office), "TLS handshake failed", "https")


def test_a_certificate_for_another_name_is_refused_in_one_line(
    tmp_path: Path, ca: trustme.CA, tls_files: tuple[Path, Path, Path]
) -> None:
    ca_pem, _, _ = tls_files
    other = ca.issue_cert("hub.example.org")
    cert, key = tmp_path / "other-cert.pem", tmp_path / "other-key.pem"
    other.private_key_and_cert_chain_pem.write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    with served(tmp_path, "--certfile", str(cert), "--keyfile", str(key)) as hub:
        hub.wait(verify=False)
        token = add_node(hub.db, "astana")
        office = tmp_path / "astana.db"
        init = ["--name", "astana", "--hub", hub.url, "--token", token, "--ca-file", ca_pem]
        assert_one_line_error(fieldsync("node", "init", office, *init), "for another name")
        ok("node", "init", office, *init, "--offline")
        line = assert_one_line_error(fieldsync("node", "sync", office), "for another name")
        assert "127.0.0.1" in line and "--ca-file" not in line


def test_hub_serve_refuses_a_key_that_is_not_the_certificates(
    tmp_path: Path, ca: trustme.CA, tls_files: tuple[Path, Path, Path]
) -> None:
    _, cert, _ = tls_files
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    db = tmp_path / "hub.db"
    port = str(free_port())
    result = fieldsync(
        "hub", "serve", "--db", db, "--port", port, "--certfile", cert, "--keyfile", other_key
    )
    assert_one_line_error(result, "cannot serve TLS", str(cert))
    result = fieldsync("hub", "serve", "--db", db, "--port", port, "--certfile", cert)
    assert result.returncode == 2 and "--keyfile" in result.stderr
    assert not db.exists()


# -- plain http ----------------------------------------------------------------------


def test_plain_http_to_another_machine_needs_allow_http(tmp_path: Path) -> None:
    db = tmp_path / "astana.db"
    init = ["--name", "astana", "--token", "tok"]
    result = fieldsync("node", "init", db, *init, "--hub", "http://hub.example.org:8000")
    assert_one_line_error(
        result, "refusing http://hub.example.org:8000", "unencrypted", "--allow-http"
    )
    assert not db.exists()

    ok(
        "node",
        "init",
        db,
        *init,
        "--hub",
        "http://hub.example.org:8000",
        "--allow-http",
        "--offline",
    )
    status = json.loads(ok("node", "status", db, "--json"))
    assert (status["unencrypted"], status["allow_http"]) == (True, True)
    assert re.search(r"^Link: +UNENCRYPTED", ok("node", "status", db), re.M)

    # Refused again: a URL set before keeps working, a new one is checked.
    ok("node", "set", db, "--no-allow-http", "--hub", "https://hub.example.org")
    result = fieldsync("node", "set", db, "--hub", "http://10.0.0.5:8000")
    assert_one_line_error(result, "unencrypted")
    status = json.loads(ok("node", "status", db, "--json"))
    assert status["hub_url"] == "https://hub.example.org" and not status["unencrypted"]
    assert "Link:" not in ok("node", "status", db)

    # This machine's own addresses need no flag: nothing crosses a network.
    for n, url in enumerate(
        ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"]
    ):
        local = tmp_path / f"local{n}.db"
        ok("node", "init", local, *init, "--hub", url, "--offline")
        assert json.loads(ok("node", "status", local, "--json"))["unencrypted"] is False
        assert "hub URL now" in ok("node", "set", local, "--hub", url.replace("8000", "8001"))


# -- forwarded headers ---------------------------------------------------------------


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "proxy-trusted"])
def test_forwarded_for_is_believed_only_from_configured_addresses(
    tmp_path: Path, trusted: bool
) -> None:
    options = ("--forwarded-allow-ips", "127.0.0.1") if trusted else ()
    with served(tmp_path, *options) as hub:
        hub.wait()
        answer = httpx.get(
            f"{hub.url}/v1/openapi.json",
            headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
        )
        assert answer.status_code == 200
        wait_for(lambda: "/v1/openapi.json" in hub.log.read_text(), 5, "the access log line")
    (line,) = [x for x in hub.log.read_text().splitlines() if "/v1/openapi.json" in x]
    if trusted:
        assert "203.0.113.7" in line, line
    else:  # uvicorn's default would believe any process on the hub's own machine
        assert "203.0.113.7" not in line and "127.0.0.1:" in line, line


# -- keys taken back -------------------------------------------------------------------


def register_token(hub_db: Path, name: str, token: str) -> None:
    """Give office ``name`` a new token, as the hub stores it (its hash)."""
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    with contextlib.closing(sqlite3.connect(hub_db)) as conn, conn:
        conn.execute(
            "UPDATE _fieldsync_nodes SET token_hash = ?, revoked_at = NULL WHERE name = ?",
            (digest, name),
        )


def revoke(hub_db: Path, name: str) -> None:
    with contextlib.closing(sqlite3.connect(hub_db)) as conn, conn:
        conn.execute(
            "UPDATE _fieldsync_nodes SET revoked_at = '2026-12-01T09:00:00+00:00' WHERE name = ?",
            (name,),
        )


def test_node_set_token_is_checked_with_the_hub(tmp_path: Path) -> None:
    with served(tmp_path) as hub:
        hub.wait()
        astana_token, almaty_token = add_node(hub.db, "astana"), add_node(hub.db, "almaty")
        office = tmp_path / "astana.db"
        ok("node", "init", office, "--name", "astana", "--hub", hub.url, "--token", astana_token)

        result = fieldsync("node", "set", office, "--token", almaty_token)
        assert_one_line_error(
            result, "belongs to office 'almaty', not 'astana'", "nothing was changed"
        )
        result = fieldsync("node", "set", office, "--token", "not-a-token-of-this-hub")
        assert_one_line_error(result, "does not accept this token", "--offline")
        assert query(office, "SELECT token FROM _fieldsync_state") == [(astana_token,)]

        register_token(hub.db, "astana", "rotated-token-1")
        out = ok("node", "set", office, "--token", "rotated-token-1")
        assert out.strip() == "Office astana: token replaced (the hub accepts it as astana's)."
        assert "rotated-token-1" not in out

        out = ok("node", "set", office, "--token", "typed-offline", "--offline")
        assert out.strip() == "Office astana: token replaced."
    # The hub cannot be reached: the token is set, and the office is told it was not checked.
    out = ok("node", "set", office, "--token", "rotated-token-1")
    assert out.startswith("Office astana: token replaced (not checked: cannot reach"), out
    assert query(office, "SELECT token FROM _fieldsync_state") == [("rotated-token-1",)]


def test_a_revoked_office_keeps_its_queue_and_a_running_agent_takes_the_new_token(
    tmp_path: Path,
) -> None:
    with served(tmp_path) as hub:
        hub.wait()
        token = add_node(hub.db, "astana")
        office = tmp_path / "astana.db"
        ok("node", "init", office, "--name", "astana", "--hub", hub.url, "--token", token)
        revoke(hub.db, "astana")
        for n in range(3):
            write_case(office, f"c{n}")

        # One sync: one line with the hub's reason and what to do; nothing lost.
        line = assert_one_line_error(fieldsync("node", "sync", office), "401", "revoked")
        assert f"fieldsync node set {office} --token NEW" in line
        assert "3 local changes are kept" in line
        assert pending(office) == 3

        out, err = tmp_path / "run.out", tmp_path / "run.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            agent = subprocess.Popen(
                [str(FIELDSYNC), "node", "run", str(office), "--interval", "0.5"],
                stdout=stdout,
                stderr=stderr,
                env=ENV,
            )
        try:
            # Backing off: 1, 2, 4, 8 s... after four failures the next try is 8 s away.
            wait_for(lambda: err.read_text().count("Sync failed") >= 4, 15, "four failures")
            assert pending(office) == 3
            assert query(hub.db, "SELECT count(*) FROM cases") == [(0,)]
            assert f"node set {office} --token NEW" in err.read_text()
            # Each line says when; a failure says when the next try comes, as does status.
            failed = [x for x in err.read_text().splitlines() if "Sync failed" in x]
            assert all(re.match(STAMPED + r"Sync failed: .*next try in \d+ s$", x) for x in failed)
            assert [int(x.rsplit(" ", 2)[1]) for x in failed[:4]] == [1, 2, 4, 8], failed
            status = json.loads(ok("node", "status", office, "--json"))
            assert status["next_try_at"] is not None
            assert "Next try:" in ok("node", "status", office)

            register_token(hub.db, "astana", "new-token-for-astana")
            set_at = time.monotonic()
            said = ok("node", "set", office, "--token", "new-token-for-astana")
            assert "token replaced (the hub accepts it as astana's)" in said
            wait_for(lambda: pending(office) == 0, 10, "the push with the new token")
            assert time.monotonic() - set_at < 4, "the agent waited out its back-off"
            assert query(hub.db, "SELECT count(*) FROM cases") == [(3,)]
            assert agent.poll() is None, "the agent restarted or stopped"
            assert json.loads(ok("node", "status", office, "--json"))["next_try_at"] is None
        finally:
            agent.terminate()
            agent.wait(timeout=10)
    assert "Traceback" not in err.read_text()
    assert re.search(r"^[\d:+ -]+ Synced astana: pushed 3,", out.read_text(), re.M)
