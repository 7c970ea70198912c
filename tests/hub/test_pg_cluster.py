"""The throwaway PostgreSQL the tests run on (tests/engines.py): a database per test,
reachable on its Unix socket, with the settings asked for."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from tests import engines
from tests.engines import ENV, Engine, PgCluster


def test_a_database_per_test_takes_writes(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t VALUES (%s, %s)", [2**63 - 1, "Zoë 🙂"])
        conn.commit()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT id, name FROM t").fetchall() == [(2**63 - 1, "Zoë 🙂")]
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


def test_databases_are_separate(pg_cluster: PgCluster, pg_url: str) -> None:
    other = pg_cluster.url(pg_cluster.new_database())
    assert other != pg_url
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(other) as conn:
        found = conn.execute("SELECT to_regclass('only_here') IS NULL").fetchone()
        assert found == (True,)


def test_the_local_cluster_runs_with_what_was_asked(pg_cluster: PgCluster, pg_url: str) -> None:
    if os.environ.get(ENV):  # a server of the developer's: its settings are theirs
        return
    assert pg_cluster.socket_dir is not None
    assert pg_cluster.socket_dir.startswith("/tmp/fs-pg-")
    assert Path(pg_cluster.socket_dir, ".s.PGSQL.5432").is_socket()
    with psycopg.connect(pg_url) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', "
                "'synchronous_commit', 'full_page_writes', 'listen_addresses', 'lc_collate')"
            ).fetchall()
        )
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "listen_addresses": "",
        "lc_collate": "C.UTF-8",
    }


def test_engine_gives_what_hub_db_takes(engine: Engine, tmp_path: Path) -> None:
    first, second = engine.db(tmp_path), engine.db(tmp_path)
    assert first != second
    if engine.name == "sqlite":
        assert Path(first).parent == tmp_path
    else:
        assert first.startswith("postgresql://")
        with psycopg.connect(first) as conn:
            tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            assert conn.execute(tables).fetchone() == (0,)


def test_a_cluster_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    cluster, server = engines.start_cluster()
    assert server is not None and cluster.socket_dir is not None
    with psycopg.connect(cluster.url(cluster.new_database())) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (engines.SUPERUSER,)
    cluster.close()
    server.stop()
    assert not Path(cluster.socket_dir).exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.admin, connect_timeout=2)


def test_no_postgresql_fails_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(engines, "newest_initdb", lambda: None)
    with pytest.raises(pytest.fail.Exception, match=r"run `make postgres` as root"):
        engines.start_cluster()
