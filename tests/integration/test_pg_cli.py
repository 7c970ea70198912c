"""The hub's commands given a PostgreSQL database: as on a file, and one line when not."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from tests.processes import ENV, FIELDSYNC, free_port

pytestmark = pytest.mark.integration


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_hub_commands_take_a_postgresql_url(pg_url: str, tmp_path: Path) -> None:
    added = run("hub", "add-node", "astana", "--db", pg_url, "--scope", "astana")
    assert added.exit_code == 0, added.output
    status = run("hub", "status", "--db", pg_url, "--json")
    assert status.exit_code == 0 and '"astana"' in status.output
    shown = run("hub", "schema", "show", "--db", pg_url)
    assert shown.exit_code == 0 and "cases" in shown.output
    backup = run("hub", "backup", "--db", pg_url, str(tmp_path / "copy.db"))
    assert backup.exit_code == 1 and "pg_dump" in backup.output
    assert not (tmp_path / "copy.db").exists()


def test_a_database_that_is_not_a_hub_or_cannot_be_reached_is_one_line(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE payroll (id bigint)")
    taken = run("hub", "add-node", "astana", "--db", pg_url)
    assert taken.exit_code == 1
    assert "is not a fieldsync hub database" in taken.output and "Traceback" not in taken.output
    gone = run("hub", "status", "--db", "postgresql://nobody@/nodb?host=/nonexistent")
    assert gone.exit_code == 1 and len(gone.output.strip().splitlines()) == 1
    assert "cannot open postgresql://nobody@/nodb" in gone.output


def test_the_password_in_a_url_is_never_printed(pg_url: str, tmp_path: Path) -> None:
    secret = pg_url.replace("fieldsync@", "fieldsync:s3cret-pw@", 1)
    assert "s3cret-pw" in secret
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        hub = subprocess.Popen(
            [FIELDSYNC, "hub", "serve", "--db", secret, "--port", str(free_port())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        for _ in range(300):  # bounded: at most 30 s for the first line
            if b"fieldsync hub" in log.read_bytes() or hub.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        hub.terminate()
        hub.wait(timeout=15)
    text = log.read_text()
    assert "fieldsync hub" in text and "postgresql://fieldsync@" in text
    assert "s3cret-pw" not in text


def test_postgresqls_own_errors_are_one_line(pg_url: str) -> None:
    # A hub's layout half there (made by hand, a failed tool): PostgreSQL's own error.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE _fieldsync_meta (key text PRIMARY KEY, value text)")
        conn.execute("INSERT INTO _fieldsync_meta VALUES ('layout', '6')")
    broken = run("hub", "status", "--db", pg_url)
    assert broken.exit_code == 1, broken.output
    assert broken.output.startswith("Error: PostgreSQL: ")
    assert len(broken.output.strip().splitlines()) == 1 and "Traceback" not in broken.output
