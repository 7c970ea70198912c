"""Schema versions at the hub: `hub schema apply` on a store (hub/schemas.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hub import schemas
from hub.app import create_app
from hub.audit import Actor
from hub.store import SqliteHubStore
from shared.clock import Timestamp, now_ms
from shared.errors import FieldsyncError, SchemaError
from shared.protocol import PROTOCOL_VERSION, SCHEMA_HEADER, Change, PullPage
from shared.schema import Schema
from tests.asgi import client as asgi_client

ADMIN = Actor("admin", "cli")
DEFAULT = Schema.load().source
# The default schema with a phone column on cases (the example).
WITH_PHONE = Schema.from_toml(
    DEFAULT.replace(
        '    notes TEXT\n) STRICT\n"""\n\n[tables.assistance]',
        '    notes TEXT,\n    phone TEXT\n) STRICT\n"""\n\n[tables.assistance]',
    )
)


def insert(seq: int, key: str, **values: object) -> Change:
    stamp = Timestamp(now_ms() << 16, "kyiv")
    return Change(
        seq, "cases", {"id": key}, "insert", stamp, {"id": key, "office": "kyiv", **values}
    )


def test_a_new_column_is_version_2_and_the_mirrored_table_has_it(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", family_name="Shevchenko")])
        assert store.database.schema_version == 1
        done = schemas.apply(store.database, WITH_PHONE, ADMIN)
        assert done.version == 2 and done.plan is not None
        assert done.plan.lines() == ["new column cases.phone"]
        assert store.database.schema_version == 2
        assert "phone" in store.schema.tables["cases"].column_names
        store.push("kyiv", [insert(2, "c2", phone="+380")])
        assert [r["phone"] for r in store.rows("cases")] == [None, "+380"]
        again = schemas.apply(store.database, WITH_PHONE, ADMIN)
        assert again.version == 2 and again.plan is None
        assert [v["version"] for v in schemas.versions(store.database)] == [1, 2]
        assert store.audit_entries()[0]["action"] == "schema_apply"
    with SqliteHubStore(tmp_path / "hub.db") as store:  # reopened: version 2 in use
        assert store.database.schema_version == 2


def test_another_process_applying_is_taken_at_the_next_write(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as serving:
        serving.add_node("kyiv")
        with SqliteHubStore(tmp_path / "hub.db") as admin:
            schemas.apply(admin.database, WITH_PHONE, ADMIN)
        assert serving.database.schema_version == 1  # nothing written since
        serving.push("kyiv", [insert(1, "c1", phone="+380")])
        assert serving.database.schema_version == 2
        assert serving.rows("cases")[0]["phone"] == "+380"


def test_a_lossy_change_is_refused_with_what_to_do(tmp_path: Path) -> None:
    dropped = Schema.from_toml(DEFAULT.replace("    household_size INTEGER,\n", ""))
    with SqliteHubStore(tmp_path / "hub.db") as store:
        with pytest.raises(SchemaError, match=r"cases\.household_size is dropped.*--allow-loss"):
            schemas.apply(store.database, dropped, ADMIN)
        assert store.database.schema_version == 1
        assert not (tmp_path / "hub.db.before-schema-v2").exists()


def test_allow_loss_backs_up_first_then_rebuilds(tmp_path: Path) -> None:
    dropped = Schema.from_toml(DEFAULT.replace("    household_size INTEGER,\n", ""))
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", family_name="Bondar", household_size=4)])
        done = schemas.apply(store.database, dropped, ADMIN, allow_loss=True)
        assert done.backup == tmp_path / "hub.db.before-schema-v2"
        assert os.stat(done.backup).st_mode & 0o777 == 0o600
        kept = sqlite3.connect(done.backup).execute("SELECT household_size FROM cases").fetchall()
        assert kept == [(4,)]
        row = store.rows("cases")[0]
        assert row["family_name"] == "Bondar" and "household_size" not in row
        state = store.record_state("cases", {"id": "c1"})
        assert state is not None and "household_size" not in state.values


def test_rows_breaking_a_rebuild_change_nothing(tmp_path: Path) -> None:
    strict = Schema.from_toml(
        DEFAULT.replace("    case_number TEXT,", "    case_number TEXT NOT NULL,")
    )
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1")])
        with pytest.raises(SchemaError, match="rows of cases break the new schema"):
            schemas.apply(store.database, strict, ADMIN, allow_loss=True)
        assert store.database.schema_version == 1
        assert len(store.rows("cases")) == 1


def test_a_scope_change_recomputes_keys_and_marks_every_office(tmp_path: Path) -> None:
    unscoped = DEFAULT.replace(
        'scope = { column = "office" }                      # a case belongs to its office\n', ""
    ).replace(
        'scope = { column = "case_id", parent = "cases" }   # and its assistance follows it\n', ""
    )
    with SqliteHubStore(tmp_path / "hub.db", Schema.from_toml(unscoped)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", office="kyiv")])
        done = schemas.apply(store.database, Schema.load(), ADMIN)
        assert done.plan is not None and done.plan.rescope
        with store.database.read() as conn:
            assert conn.execute("SELECT scope FROM _fieldsync_records").fetchall() == [("kyiv",)]
            assert conn.execute("SELECT rescope FROM _fieldsync_nodes").fetchall() == [(1,)]


def test_a_column_added_by_hand_is_named_and_adopted_when_empty(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as store:
        with store.database.write() as conn:
            conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
        with pytest.raises(FieldsyncError, match="table cases has a column phone"):
            schemas.check_declared(store.database)
        assert schemas.apply(store.database, WITH_PHONE, ADMIN).version == 2
        schemas.check_declared(store.database)


def test_a_column_added_by_hand_with_values_is_not_adopted(tmp_path: Path) -> None:
    with SqliteHubStore(tmp_path / "hub.db") as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1")])
        with store.database.write() as conn:
            conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
            conn.execute("UPDATE cases SET phone = 'x'")
        with pytest.raises(SchemaError, match="already has a column phone"):
            schemas.apply(store.database, WITH_PHONE, ADMIN)
        assert store.database.schema_version == 1


class ApplyDuringPull(SqliteHubStore):
    """A real store; another connection applies a schema version as its pull begins,
    after the app checked the office's version (the moment a serving hub can meet)."""

    def pull(self, *args: Any, **kwargs: Any) -> PullPage:
        with SqliteHubStore(self.database.path) as admin:
            schemas.apply(admin.database, WITH_PHONE, ADMIN)
        return super().pull(*args, **kwargs)


def test_a_version_applied_during_a_pull_is_refused_to_an_office_behind(tmp_path: Path) -> None:
    with ApplyDuringPull(tmp_path / "hub.db") as store:
        token = store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1")])
        client = asgi_client(create_app(store))
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Fieldsync-Protocol": str(PROTOCOL_VERSION),
            SCHEMA_HEADER: "1",
        }
        answer = client.get("/v1/pull", params={"cursor": 0, "scopes": "1"}, headers=headers)
        client.close()
        # The page was read under version 2 (its rows may carry phone): not for version 1.
        assert answer.status_code == 409, answer.text
        assert "takes the new version at its next sync" in answer.json()["detail"]
