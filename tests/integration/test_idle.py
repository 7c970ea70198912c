"""An idle sync is one request (the pull, whose page says what the health check would
have); the full path when the hub's answer changed (restored, another schema version,
the clock's error moved), before any pulled row is applied; the status report sent
only when something in it changed, or when it is due."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from node import status as sync_status
from shared.protocol import SCHEMA_HEADER
from tests.conftest import Hub, Office
from tests.integration.test_schema import apply

pytestmark = [pytest.mark.integration, pytest.mark.engines]


class Counting(httpx.HTTPTransport):
    """A real transport that notes each request as "METHOD /path"."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.cursors: list[str | None] = []  # each request's cursor parameter, if any

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}")
        self.cursors.append(request.url.params.get("cursor"))
        return super().handle_request(request)

    def sync(self, office: Office) -> list[str]:
        """The requests of one sync of ``office``."""
        self.seen.clear()
        self.cursors.clear()
        office.sync()
        return list(self.seen)


def insert(office: Office, key: str) -> None:
    conn = sqlite3.connect(office.path)
    with conn:
        conn.execute("INSERT INTO cases (id, office) VALUES (?, ?)", [key, office.name])
    conn.close()


@pytest.fixture
def counted(make_office: Callable[..., Office]) -> tuple[Office, Counting]:
    wire = Counting()
    office = make_office("astana", transport=wire)
    office.agent.interval_seconds = 60
    insert(office, "c1")
    assert wire.sync(office)[0] == "GET /v1/health"  # the first sync: not idle
    return office, wire


def test_an_idle_sync_is_one_request(hub: Hub, counted: tuple[Office, Counting]) -> None:
    office, wire = counted
    for _ in range(3):
        assert wire.sync(office) == ["GET /v1/pull"]
    # The hub saw each pull (its view of the office's last sync stays fresh).
    (seen,) = hub.store.offices()
    assert seen.health == "ok" and seen.last_pull_at is not None


def test_queued_changes_take_the_full_path(hub: Hub, counted: tuple[Office, Counting]) -> None:
    office, wire = counted
    insert(office, "c2")
    assert wire.sync(office) == [
        "GET /v1/health",
        "POST /v1/push",
        "GET /v1/pull",
        "POST /v1/status",  # something changed: it pushed
    ]
    assert wire.sync(office) == ["GET /v1/pull"]


def test_the_status_report_is_sent_when_it_changed_or_is_due(
    hub: Hub, counted: tuple[Office, Counting], monkeypatch: pytest.MonkeyPatch
) -> None:
    office, wire = counted
    assert wire.sync(office) == ["GET /v1/pull"]
    office.agent.interval_seconds = 30  # in the report: changed
    assert wire.sync(office) == ["GET /v1/pull", "POST /v1/status"]
    assert wire.sync(office) == ["GET /v1/pull"]
    monkeypatch.setattr(sync_status, "REPORT_EVERY_S", 0.0)  # due at once
    assert wire.sync(office) == ["GET /v1/pull", "POST /v1/status"]
    # The hub has every sync, the idle ones not reported alone included.
    assert len(hub.store.sync_events("astana")) == 5


def test_a_failed_sync_is_reported_and_the_next_takes_the_full_path(
    hub: Hub, counted: tuple[Office, Counting]
) -> None:
    office, wire = counted
    hub.store.revoke("astana")  # every request refused
    with pytest.raises(Exception, match="revoked"):
        wire.sync(office)
    assert wire.seen == ["GET /v1/pull", "POST /v1/status"]
    assert not sync_status.last_sync_ok(office.store.db)
    with pytest.raises(Exception, match="revoked"):
        wire.sync(office)
    assert wire.seen[0] == "GET /v1/health"


def test_a_moved_clock_takes_the_full_path(hub: Hub, counted: tuple[Office, Counting]) -> None:
    office, wire = counted
    office.store.set_clock_offset(3_600_000)  # as if the office's clock had moved an hour
    assert wire.sync(office)[:3] == ["GET /v1/pull", "GET /v1/health", "GET /v1/pull"]
    assert abs(office.store.clock_offset_ms) < 1000  # learned again from the health check
    assert wire.sync(office) == ["GET /v1/pull"]


def test_a_restored_hub_is_recovered_from_before_the_pull_is_applied(
    hub: Hub, counted: tuple[Office, Counting]
) -> None:
    office, wire = counted
    with sqlite3.connect(office.path) as conn:  # the hub it knew had another identity
        conn.execute("UPDATE _fieldsync_state SET hub_epoch = 'an-older-hub'")
    conn.close()
    seen = wire.sync(office)
    # The idle pull discarded; the health check, the schema compared by its source (a
    # restored hub may number it otherwise), the kept changes the hub lacks sent again
    # (it lacks none), then everything pulled again from the start.
    assert seen[:4] == ["GET /v1/pull", "GET /v1/health", "GET /v1/schema", "GET /v1/pull"]
    assert wire.cursors[0] != "0" and wire.cursors[3] == "0"  # pulled again from the start
    assert office.store.status().cursor > 0
    assert office.store.db.conn.execute("SELECT hub_restored FROM _fieldsync_state").fetchone()[0]
    assert wire.sync(office) == ["GET /v1/pull"]


def test_a_new_schema_version_is_taken_before_the_pull(
    hub: Hub, counted: tuple[Office, Counting], tmp_path: Path
) -> None:
    office, wire = counted
    assert apply(hub, tmp_path).exit_code == 0
    seen = wire.sync(office)
    # The idle pull refused (the office is behind), then the full path: the new
    # version fetched and taken, then the pull.
    assert seen[:4] == ["GET /v1/pull", "GET /v1/health", "GET /v1/schema", "GET /v1/pull"]
    assert "phone" in office.store.schema.tables["cases"].column_names
    assert office.client._headers[SCHEMA_HEADER] == "2"
    assert wire.sync(office) == ["GET /v1/pull"]
    (seen_office,) = hub.store.offices()
    assert seen_office.health == "ok"  # the refused pull is not shown as a failure
