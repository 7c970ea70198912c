"""A PostgreSQL hub put back with pg_dump/pg_restore: a new identity, and offices
re-send what the copy lacks (as after `hub restore` of a SQLite hub)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from hub.app import create_app
from hub.store import open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import FieldsyncError
from tests.conftest import serve
from tests.engines import newest_initdb

pytestmark = pytest.mark.integration


def add_cases(path: Path, *ids: str) -> None:
    with sqlite3.connect(path) as conn:
        for case in ids:
            conn.execute(
                "INSERT INTO cases (id, family_name, given_name, status, household_size, office) "
                "VALUES (?, 'Nazarova', 'Dilnoza', 'asylum_seeker', 2, 'astana')",
                [case],
            )
    conn.close()


def test_a_hub_put_back_by_pg_restore_gets_a_new_identity_and_loses_nothing(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    tools = newest_initdb()
    assert tools is not None
    store = open_store(pg_url)
    token = store.add_node("astana")
    store.set_scopes("astana", ["*"])
    first_epoch = store.epoch
    office = NodeStore.init(tmp_path / "astana.db", "astana", "http://127.0.0.1:9", token)
    gen = serve(create_app(store))
    client = HttpHubClient(next(gen), token, node="astana")
    try:
        add_cases(office.path, "c1", "c2", "c3")
        SyncAgent(office, client).sync_once()
        dump = tmp_path / "hub.dump"
        subprocess.run(
            [tools.parent / "pg_dump", "-Fc", "-f", dump, "--dbname", pg_url], check=True
        )
        add_cases(office.path, "c4", "c5")  # acknowledged after the copy was taken
        assert SyncAgent(office, client).sync_once().pushed == 2
    finally:
        gen.close()
        client.close()
        store.close()
    name = pg_cluster.new_database()
    restored_url = pg_cluster.url(name)
    try:
        subprocess.run(
            [tools.parent / "pg_restore", "--no-owner", "--dbname", restored_url, dump], check=True
        )
        with open_store(restored_url, serving=False) as looked:  # a look changes nothing
            assert looked.epoch == first_epoch
            assert [r["id"] for r in looked.rows("cases")] == ["c1", "c2", "c3"]
        restored = open_store(restored_url)
        assert restored.epoch not in ("", first_epoch)
        gen = serve(create_app(restored))
        url = next(gen)
        office.set_hub(url)
        client = HttpHubClient(url, token, node="astana")
        try:
            SyncAgent(office, client).sync_once()
            assert restored.rows("cases") == office.rows("cases")
            assert [r["id"] for r in restored.rows("cases")] == ["c1", "c2", "c3", "c4", "c5"]
            with restored.database.read() as conn:
                note = conn.execute(
                    "SELECT value FROM _fieldsync_meta WHERE key = 'restored_from'"
                ).fetchone()
            assert note is not None and note[0].startswith(first_epoch)
        finally:
            gen.close()
            client.close()
            restored.close()
        with open_store(restored_url) as again:  # served again: the same identity
            assert again.epoch == restored.epoch
    finally:
        office.close()
        pg_cluster.drop_database(name)


def test_a_database_put_back_under_the_running_hub_is_noticed(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    # As a point-in-time recovery would do, with the hub serving all along: its
    # connections break, the next ones find another database, and the hub takes a new
    # identity before it writes there, so the office re-sends what the copy lacks.
    tools = newest_initdb()
    assert tools is not None
    name = unquote(urlsplit(pg_url).path.lstrip("/"))
    store = open_store(pg_url)
    token = store.add_node("astana")
    store.set_scopes("astana", ["*"])
    first_epoch = store.epoch
    office = NodeStore.init(tmp_path / "astana.db", "astana", "http://127.0.0.1:9", token)
    gen = serve(create_app(store))
    client = HttpHubClient(next(gen), token, node="astana")
    try:
        add_cases(office.path, "c1", "c2", "c3")
        SyncAgent(office, client).sync_once()
        dump = tmp_path / "hub.dump"
        subprocess.run(
            [tools.parent / "pg_dump", "-Fc", "-f", dump, "--dbname", pg_url], check=True
        )
        add_cases(office.path, "c4", "c5")  # acknowledged after the copy was taken
        assert SyncAgent(office, client).sync_once().pushed == 2
        pg_cluster.drop_database(name)  # the hub's connections are closed
        pg_cluster.new_database(name=name)
        subprocess.run(
            [tools.parent / "pg_restore", "--no-owner", "--dbname", pg_url, dump], check=True
        )
        synced = False
        for _ in range(10):  # a request on a broken connection fails; the office retries
            try:
                SyncAgent(office, client).sync_once()
            except FieldsyncError:
                continue
            synced = True
            break
        assert synced
        assert [r["id"] for r in store.rows("cases")] == ["c1", "c2", "c3", "c4", "c5"]
        assert store.rows("cases") == office.rows("cases")
        with store.database.read() as conn:
            epoch, note = (
                conn.execute("SELECT value FROM _fieldsync_meta WHERE key = ?", [key]).fetchone()
                for key in ("epoch", "restored_from")
            )
        assert epoch is not None and epoch[0] != first_epoch
        assert note is not None and note[0].startswith(first_epoch)
    finally:
        gen.close()
        client.close()
        store.close()
        office.close()
