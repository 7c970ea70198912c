"""`fieldsync hub migrate`: a serving SQLite hub moved to PostgreSQL, offices syncing on."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from hub.ingest import all_receipts
from hub.store import open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.protocol import PROTOCOL_VERSION
from tests.processes import HubProcess

pytestmark = pytest.mark.integration

HUB_TABLES = ("cases", "assistance")


class Site:
    def __init__(self, tmp: Path, name: str, url: str, token: str) -> None:
        self.name, self.path, self.token = name, tmp / f"{name}.db", token
        self.store = NodeStore.init(self.path, name, url, token)
        self.client = HttpHubClient(url, token, node=name)

    def sync(self, url: str | None = None) -> Any:
        if url is not None:
            self.client.close()
            self.store.set_hub(url)
            self.client = HttpHubClient(url, self.token, node=self.name)
        return SyncAgent(self.store, self.client).sync_once()

    def write(self, sql: str, *params: Any) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute(sql, params)
        conn.close()

    def close(self) -> None:
        self.client.close()
        self.store.close()


def add_case(site: Site, case_id: str, **values: Any) -> None:
    row = {"id": case_id, "family_name": "Nazarova", "given_name": "Dilnoza"}
    row |= {"status": "asylum_seeker", "household_size": 2, "office": site.name} | values
    marks = ", ".join("?" for _ in row)
    site.write(f"INSERT INTO cases ({', '.join(row)}) VALUES ({marks})", *row.values())


def snapshot(db: str) -> dict[str, Any]:
    """What offices and admins see of a hub, on either engine."""
    with open_store(db, create=False, serving=False) as store:
        return {
            "rows": {t: store.rows(t) for t in HUB_TABLES},
            "history": [store.record_history("cases", [f"c{i}"]) for i in range(1, 6)],
            "conflicts": [c.to_json() for c in store.conflicts()],
            "nodes": store.nodes(),
            "scopes": store.scopes(),
            "audit": store.audit_entries(),
            "epoch": store.epoch,
            "acked": {n: store.acked(n) for n in ("astana", "almaty")},
            "version": store.schema_version,
        }


@pytest.fixture
def moved(tmp_path: Path, pg_url: str) -> Any:
    """Two offices sync with a SQLite hub (conflicts, a delete, a resolution); the hub
    stops and is moved; the same offices and their old cursors are handed over."""
    source = tmp_path / "hub.db"
    with open_store(str(source)) as store:
        tokens = {n: store.add_node(n) for n in ("astana", "almaty")}
        for name in tokens:
            store.set_scopes(name, ["*"])
        store.add_admin("ops", "owner")
    hub = HubProcess(source, tmp_path / "hub.log")
    hub.start()
    sites = [Site(tmp_path, n, hub.url, t) for n, t in tokens.items()]
    astana, almaty = sites
    try:
        for i in range(1, 6):
            add_case(astana, f"c{i}")
        astana.sync()
        almaty.sync()
        astana.write("UPDATE cases SET given_name = 'Dina' WHERE id = 'c1'")
        almaty.write("UPDATE cases SET given_name = 'Dilya' WHERE id = 'c1'")
        almaty.write("DELETE FROM cases WHERE id = 'c5'")
        for site in (astana, almaty, astana, almaty):
            site.sync()
        with open_store(str(source)) as store:
            [conflict] = store.conflicts()
            store.resolve(conflict.id, "other", "ops")
        for site in (astana, almaty):
            site.sync()
        hub.stop()
        before = snapshot(str(source))
        with open_store(str(source)) as store, store.database.read() as conn:
            receipts = [r for r in all_receipts(conn) if r[0] == "astana"]
        yield source, pg_url, sites, before, receipts, tmp_path
    finally:
        hub.stop()
        for site in sites:
            site.close()


def test_a_moved_hub_serves_every_office_on_from_where_it_was(moved: Any) -> None:
    source, url, sites, before, receipts, tmp_path = moved
    astana, almaty = sites
    result = CliRunner().invoke(cli, ["hub", "migrate", "--from", str(source), "--to", url])
    assert result.exit_code == 0, result.output
    assert "checked (counts and SHA-256)" in result.output
    after = snapshot(url)
    assert after == before  # records, history, conflicts, offices, audit, epoch, cursors
    # The file is marked: hub commands refuse it and name where the hub went.
    refused = CliRunner().invoke(cli, ["hub", "status", "--db", str(source)])
    assert refused.exit_code == 1 and "moved to postgresql://" in refused.output
    hub = HubProcess(url, tmp_path / "pg.log")
    hub.start()
    try:
        # Nothing pulled twice, nothing pushed again: the cursors and acks carried over.
        for site in sites:
            report = site.sync(hub.url)
            assert (report.pushed, report.pulled) == (0, 0), site.name
        # No restore noticed (same epoch): the offices still keep what they sent.
        assert httpx.get(f"{hub.url}/v1/health").json()["epoch"] == before["epoch"]
        # A change acknowledged by the SQLite hub, sent again, is a replay: taken once.
        _, seq, ts = receipts[0]
        change = {"seq": seq, "table": "cases", "pk": {"id": "c1"}, "op": "insert", "ts": ts}
        change |= {"values": {"id": "c1", "family_name": "Replayed"}, "base": {}}
        again = httpx.post(
            f"{hub.url}/v1/push",
            headers={"Authorization": f"Bearer {astana.token}"},
            json={"protocol": PROTOCOL_VERSION, "changes": [change]},
        )
        assert again.status_code == 200, again.text
        assert (again.json()["applied"], again.json()["acked"]) == (0, before["acked"]["astana"])
        assert snapshot(url)["rows"] == before["rows"]
        # New work flows both ways.
        add_case(almaty, "c9", office="almaty")
        astana.write("UPDATE cases SET household_size = 7 WHERE id = 'c2'")
        almaty.write("UPDATE cases SET given_name = 'Aida' WHERE id = 'c3'")
        astana.write("UPDATE cases SET given_name = 'Alia' WHERE id = 'c3'")  # a conflict
        for site in (almaty, astana, almaty):
            site.sync()
        with open_store(url) as store:  # ids go on from the highest copied
            store.add_admin("hq", "viewer")
            ids = [c.id for c in store.conflicts()]
            assert len(ids) == 2 and max(ids) > max(c["id"] for c in before["conflicts"])
            assert len(store.audit_entries()) > len(before["audit"])
        for site in sites:
            assert site.store.rows("cases") == snapshot(url)["rows"]["cases"]
        assert {r["id"] for r in snapshot(url)["rows"]["cases"]} == {"c1", "c2", "c3", "c4", "c9"}
    finally:
        hub.stop()


def test_a_move_refuses_a_database_in_use_a_target_not_empty_and_a_second_move(
    moved: Any, pg_cluster: Any
) -> None:
    source, url, _, _, _, _ = moved
    with open_store(url):  # a hub in it already
        pass
    taken = CliRunner().invoke(cli, ["hub", "migrate", "--from", str(source), "--to", url])
    assert taken.exit_code == 1 and "is not empty" in taken.output
    other = pg_cluster.url(pg_cluster.new_database())
    try:
        first = CliRunner().invoke(cli, ["hub", "migrate", "--from", str(source), "--to", other])
        assert first.exit_code == 0, first.output
        second = CliRunner().invoke(cli, ["hub", "migrate", "--from", str(source), "--to", url])
        assert second.exit_code == 1 and "was moved to" in second.output
    finally:
        pg_cluster.drop_database(other.rsplit("/", 1)[1].split("?")[0])


def test_a_move_that_fails_leaves_the_target_empty_and_the_source_as_it_was(
    moved: Any,
) -> None:
    source, url, _, before, _, _ = moved
    with sqlite3.connect(source) as conn:  # a text PostgreSQL cannot hold (a NUL in it)
        conn.execute("UPDATE cases SET given_name = 'Di' || char(0) || 'na' WHERE id = 'c2'")
    conn.close()
    failed = CliRunner().invoke(cli, ["hub", "migrate", "--from", str(source), "--to", url])
    assert failed.exit_code == 1, failed.output
    assert "cannot copy cases" in failed.output and "nothing was moved" in failed.output
    with sqlite3.connect(source) as conn:
        assert (
            conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'moved_to'").fetchall()
            == []
        )
    conn.close()
    import psycopg

    with psycopg.connect(url) as pg:
        tables = pg.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)
