"""An office taking the hub's schema versions (node/schema_sync.py), on real files; the
hub's side of the seam is a stand-in that answers GET /v1/schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node import schema_sync
from node.store import NodeStore
from shared.errors import SchemaError
from shared.protocol import SchemaInfo
from shared.schema import Schema

DEFAULT = Schema.load().source
WITH_PHONE = DEFAULT.replace(
    '    notes TEXT\n) STRICT\n"""\n\n[tables.assistance]',
    '    notes TEXT,\n    phone TEXT\n) STRICT\n"""\n\n[tables.assistance]',
)
NARROWER = DEFAULT.replace("'rejected', 'closed'", "'rejected'")


class SchemaHub:
    """What catch_up asks of a hub client: its schema, and the version to send."""

    def __init__(self, version: int, source: str) -> None:
        self.info = SchemaInfo(version, source)
        self.sent: int | None = None

    def schema(self) -> SchemaInfo:
        return self.info

    def use_schema_version(self, version: int) -> None:
        self.sent = version


@pytest.fixture
def office(tmp_path: Path) -> NodeStore:
    store = NodeStore.init(tmp_path / "kyiv.db", "kyiv", "http://127.0.0.1:9", "tok")
    store.db.conn.execute("INSERT INTO cases (id, office, status) VALUES ('c1', 'kyiv', 'closed')")
    return store


def columns(store: NodeStore) -> list[str]:
    return [row[1] for row in store.db.conn.execute("PRAGMA table_info(cases)")]


def test_a_new_version_is_taken_in_one_transaction_and_captured(office: NodeStore) -> None:
    schema_sync.catch_up(office, SchemaHub(1, DEFAULT), 1)  # learns it is at version 1
    assert schema_sync.stored_version(office.db.conn) == 1
    hub = SchemaHub(2, WITH_PHONE)
    assert schema_sync.catch_up(office, hub, 2)
    assert hub.sent == 2 and schema_sync.stored_version(office.db.conn) == 2
    assert "phone" in columns(office) and "phone" in office.schema.tables["cases"].column_names
    before = office.pending_count()
    office.db.conn.execute("UPDATE cases SET phone = '+380' WHERE id = 'c1'")
    assert office.pending_count() == before + 1  # the new column is captured
    batch = office.pending(100)
    assert batch[-1].values == {"phone": "+380"}
    reopened = NodeStore(office.path)  # the stored schema is the new one
    assert "phone" in reopened.schema.tables["cases"].column_names
    reopened.close()


def test_a_version_the_rows_break_changes_nothing(office: NodeStore) -> None:
    schema_sync.catch_up(office, SchemaHub(1, DEFAULT), 1)
    triggers = office.db.conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    ).fetchall()
    with pytest.raises(SchemaError, match="rows of cases break the new schema"):
        schema_sync.catch_up(office, SchemaHub(2, NARROWER), 2)
    assert schema_sync.stored_version(office.db.conn) == 1
    assert office.schema.source == DEFAULT
    assert office.rows("cases")[0]["status"] == "closed"
    assert (
        office.db.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        ).fetchall()
        == triggers
    )


def test_a_column_added_by_hand_stops_the_sync_in_one_line(office: NodeStore) -> None:
    office.db.conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
    with pytest.raises(SchemaError, match=r"table cases has a column phone .* hub schema apply"):
        schema_sync.catch_up(office, SchemaHub(1, DEFAULT), 1)
    with pytest.raises(SchemaError, match="table cases has a column phone"):
        schema_sync.catch_up(office, SchemaHub(1, DEFAULT), None)  # a hub without versions


def test_a_column_added_by_hand_with_another_type_is_not_adopted(office: NodeStore) -> None:
    office.db.conn.execute("ALTER TABLE cases ADD COLUMN phone INTEGER")
    with pytest.raises(SchemaError, match="of type INTEGER added outside fieldsync"):
        schema_sync.catch_up(office, SchemaHub(2, WITH_PHONE), 2)
    assert schema_sync.stored_version(office.db.conn) == 0


def test_an_office_ahead_of_its_hub_stops(office: NodeStore) -> None:
    schema_sync.catch_up(office, SchemaHub(1, DEFAULT), 1)
    schema_sync.catch_up(office, SchemaHub(2, WITH_PHONE), 2)
    with pytest.raises(SchemaError, match="the hub has only version 1"):
        schema_sync.catch_up(office, SchemaHub(1, DEFAULT), 1)


def test_an_unversioned_office_with_more_than_the_hub_is_stopped(tmp_path: Path) -> None:
    store = NodeStore.init(
        tmp_path / "k.db", "kyiv", "http://127.0.0.1:9", "tok", Schema.from_toml(WITH_PHONE)
    )
    with pytest.raises(SchemaError, match=r"this office's schema has cases\.phone"):
        schema_sync.catch_up(store, SchemaHub(1, DEFAULT), 1)
    assert "phone" in columns(store)
    store.close()


def test_the_office_layout_step_adds_the_version(tmp_path: Path) -> None:
    store = NodeStore.init(tmp_path / "k.db", "kyiv", "http://127.0.0.1:9", "tok")
    store.close()
    conn = sqlite3.connect(tmp_path / "k.db")
    assert conn.execute("SELECT version FROM _fieldsync_schema").fetchone() == (0,)
    conn.close()
