"""Schema versions at the hub: `hub schema apply` on a store (hub/schemas.py), on both
engines (PostgreSQL's DDL: hub/pg/schema_change.py)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from hub import schemas
from hub.app import create_app
from hub.audit import Actor
from hub.store import SqlHubStore, SqliteHubStore, open_store
from shared.clock import Timestamp, now_ms
from shared.errors import FieldsyncError, SchemaError
from shared.protocol import PROTOCOL_VERSION, SCHEMA_HEADER, Change, PullPage
from shared.schema import Schema
from tests.asgi import client as asgi_client
from tests.engines import Engine

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


def test_a_new_column_is_version_2_and_the_mirrored_table_has_it(
    tmp_path: Path, engine: Engine
) -> None:
    db = engine.db(tmp_path)
    with open_store(db) as store:
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
    with open_store(db) as store:  # reopened: version 2 in use
        assert store.database.schema_version == 2
        assert store.rows("cases")[1]["phone"] == "+380"


def test_another_process_applying_is_taken_at_the_next_write(
    tmp_path: Path, engine: Engine
) -> None:
    db = engine.db(tmp_path)
    with open_store(db) as serving:
        serving.add_node("kyiv")
        serving.push("kyiv", [insert(1, "c0")])
        for _ in range(8):  # read often enough for psycopg to prepare the statement
            assert [r["id"] for r in serving.rows("cases")] == ["c0"]
        with open_store(db) as admin:
            schemas.apply(admin.database, WITH_PHONE, ADMIN)
        assert serving.database.schema_version == 1  # nothing written since
        serving.push("kyiv", [insert(2, "c1", phone="+380")])
        assert serving.database.schema_version == 2
        assert [r["phone"] for r in serving.rows("cases")] == [None, "+380"]


def table_names(store: SqlHubStore) -> set[str]:
    with store.database.read() as conn:
        return store.database.dialect.table_names(conn)


def test_a_lossy_change_is_refused_with_what_to_do(tmp_path: Path, engine: Engine) -> None:
    dropped = Schema.from_toml(DEFAULT.replace("    household_size INTEGER,\n", ""))
    with open_store(engine.db(tmp_path)) as store:
        with pytest.raises(SchemaError, match=r"cases\.household_size is dropped.*--allow-loss"):
            schemas.apply(store.database, dropped, ADMIN)
        assert store.database.schema_version == 1
        assert not list(tmp_path.glob("*.before-schema-v2"))
        assert not {name for name in table_names(store) if "backup" in name}


def test_allow_loss_backs_up_first_then_rebuilds(tmp_path: Path, engine: Engine) -> None:
    """SQLite copies the file first; PostgreSQL copies the table that loses data to a
    table beside it, in the same transaction."""
    dropped = Schema.from_toml(DEFAULT.replace("    household_size INTEGER,\n", ""))
    with open_store(engine.db(tmp_path)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", family_name="Bondar", household_size=4)])
        done = schemas.apply(store.database, dropped, ADMIN, allow_loss=True)
        if engine.name == "sqlite":
            assert done.backup == tmp_path / "hub.db.before-schema-v2"
            assert os.stat(done.backup).st_mode & 0o777 == 0o600
            with sqlite3.connect(done.backup) as backup:
                kept = backup.execute("SELECT household_size FROM cases").fetchall()
            backup.close()
            assert done.backup_tables == ()
        else:
            assert done.backup is None
            assert done.backup_tables == ("_fieldsync_backup_v2_cases",)
            with store.database.read() as conn:
                kept = conn.execute(
                    "SELECT household_size FROM _fieldsync_backup_v2_cases"
                ).fetchall()
        assert [tuple(row) for row in kept] == [(4,)]
        row = store.rows("cases")[0]
        assert row["family_name"] == "Bondar" and "household_size" not in row
        state = store.record_state("cases", {"id": "c1"})
        assert state is not None and "household_size" not in state.values


def test_rows_breaking_a_rebuild_change_nothing(tmp_path: Path, engine: Engine) -> None:
    strict = Schema.from_toml(
        DEFAULT.replace("    case_number TEXT,", "    case_number TEXT NOT NULL,")
    )
    with open_store(engine.db(tmp_path)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1")])
        before = table_names(store)
        with pytest.raises(SchemaError, match="rows of cases break the new schema") as refused:
            schemas.apply(store.database, strict, ADMIN, allow_loss=True)
        assert "case_number" in str(refused.value) or engine.name == "sqlite"
        assert store.database.schema_version == 1
        assert len(store.rows("cases")) == 1
        assert table_names(store) == before  # no backup table left either


def test_a_scope_change_recomputes_keys_and_marks_every_office(
    tmp_path: Path, engine: Engine
) -> None:
    unscoped = DEFAULT.replace(
        'scope = { column = "office" }                      # a case belongs to its office\n', ""
    ).replace(
        'scope = { column = "case_id", parent = "cases" }   # and its assistance follows it\n', ""
    )
    with open_store(engine.db(tmp_path), Schema.from_toml(unscoped)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", office="kyiv")])
        done = schemas.apply(store.database, Schema.load(), ADMIN)
        assert done.plan is not None and done.plan.rescope
        with store.database.read() as conn:
            scopes = conn.execute("SELECT scope FROM _fieldsync_records").fetchall()
            marks = conn.execute("SELECT rescope FROM _fieldsync_nodes").fetchall()
        assert [tuple(row) for row in scopes] == [("kyiv",)]
        assert [tuple(row) for row in marks] == [(1,)]


def test_a_column_added_by_hand_is_named_and_adopted_when_empty(
    tmp_path: Path, engine: Engine
) -> None:
    with open_store(engine.db(tmp_path)) as store:
        with store.database.write() as conn:
            conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
        with pytest.raises(FieldsyncError, match="table cases has a column phone"):
            schemas.check_declared(store.database)
        assert schemas.apply(store.database, WITH_PHONE, ADMIN).version == 2
        schemas.check_declared(store.database)


def test_a_column_added_by_hand_with_values_is_not_adopted(tmp_path: Path, engine: Engine) -> None:
    with open_store(engine.db(tmp_path)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1")])
        with store.database.write() as conn:
            conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
            conn.execute("UPDATE cases SET phone = 'x'")
        with pytest.raises(SchemaError, match="already has a column phone"):
            schemas.apply(store.database, WITH_PHONE, ADMIN)
        assert store.database.schema_version == 1


class ApplyDuringPull(SqlHubStore):
    """A real store (either engine); another one applies a schema version as its pull
    begins, after the app checked the office's version (the moment a serving hub can
    meet)."""

    def pull(self, *args: Any, **kwargs: Any) -> PullPage:
        with open_store(self.database.where) as admin:
            schemas.apply(admin.database, WITH_PHONE, ADMIN)
        return super().pull(*args, **kwargs)


def test_a_version_applied_during_a_pull_is_refused_to_an_office_behind(
    tmp_path: Path, engine: Engine
) -> None:
    with ApplyDuringPull(engine.db(tmp_path)) as store:
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
        # Refused before the pull is noted: the office has not pulled anything.
        (office,) = [n for n in store.nodes() if n["name"] == "kyiv"]
        assert office["last_pull_at"] is None


# -- carrying changes out on either engine ---------------------------------------------

WITH_INDEX = DEFAULT.replace(
    '"""\n\n[tables.assistance]',
    '"""\nindexes = ["CREATE INDEX cases_by_name ON cases (family_name, given_name)"]'
    "\n\n[tables.assistance]",
)
WIDER = WITH_INDEX.replace("'rejected', 'closed')", "'rejected', 'closed', 'resettled')")
WITH_VISITS = (
    WIDER
    + """
[tables.visits]
scope = { column = "office" }
create = \"\"\"
CREATE TABLE visits (
    id TEXT PRIMARY KEY NOT NULL,
    office TEXT,
    day TEXT CHECK (length(day) = 10),
    people INTEGER NOT NULL DEFAULT 1
)
\"\"\"
indexes = ["CREATE INDEX visits_by_day ON visits (day)"]
"""
)


def index_names(store: SqlHubStore) -> set[str]:
    """The indexes the schema declared that the database holds."""
    with store.database.read() as conn:
        if store.database.dialect.name == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        else:
            sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        return {str(row[0]) for row in conn.execute(sql)} & {"cases_by_name", "visits_by_day"}


def test_an_index_a_wider_check_list_and_a_new_table(tmp_path: Path, engine: Engine) -> None:
    """Version 2 adds an index; 3 widens a CHECK list (the table is rebuilt: rows and
    the index kept); 4 adds a table with its own index. Offices push under each."""
    with open_store(engine.db(tmp_path)) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", family_name="Bondar", status="refugee")])
        done = schemas.apply(store.database, Schema.from_toml(WITH_INDEX), ADMIN)
        assert done.plan is not None
        assert done.plan.lines() == ["cases: index cases_by_name added"]
        assert index_names(store) == {"cases_by_name"}
        refused = store.push("kyiv", [insert(2, "c2", status="resettled")])
        assert len(refused.rejected) == 1  # not allowed yet
        done = schemas.apply(store.database, Schema.from_toml(WIDER), ADMIN)
        assert done.plan is not None and done.plan.losses == ()
        assert "table cases rebuilt (created anew, rows copied)" in done.plan.lines()
        assert index_names(store) == {"cases_by_name"}
        assert store.push("kyiv", [insert(3, "c3", status="resettled")]).applied == 1
        assert [(r["id"], r["status"]) for r in store.rows("cases")] == [
            ("c1", "refugee"),
            ("c3", "resettled"),
        ]
        assert store.rows("cases")[0]["family_name"] == "Bondar"
        done = schemas.apply(store.database, Schema.from_toml(WITH_VISITS), ADMIN)
        assert done.plan is not None and "new table visits" in done.plan.lines()
        assert index_names(store) == {"cases_by_name", "visits_by_day"}
        visit = Change(
            4,
            "visits",
            {"id": "v1"},
            "insert",
            Timestamp(now_ms() << 16, "kyiv"),
            {"id": "v1", "office": "kyiv", "day": "2026-12-03", "people": 3},
        )
        assert store.push("kyiv", [visit]).applied == 1
        assert store.rows("visits") == [
            {"id": "v1", "office": "kyiv", "day": "2026-12-03", "people": 3}
        ]
        assert store.database.schema_version == 4


def test_apply_and_show_through_the_cli(tmp_path: Path, engine: Engine) -> None:
    """`hub schema apply --allow-loss` says where the rows from before are kept: a file
    (SQLite) or a table, with how to drop it (PostgreSQL); `hub schema show` lists the
    versions."""
    db = engine.db(tmp_path)
    with open_store(db) as store:
        store.add_node("kyiv")
        store.push("kyiv", [insert(1, "c1", household_size=4)])
    dropped = tmp_path / "dropped.toml"
    dropped.write_text(DEFAULT.replace("    household_size INTEGER,\n", ""))
    runner = CliRunner()
    refused = runner.invoke(cli, ["hub", "schema", "apply", str(dropped), "--db", db])
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1 and "--allow-loss" in refused.stderr
    done = runner.invoke(cli, ["hub", "schema", "apply", str(dropped), "--db", db, "--allow-loss"])
    assert done.exit_code == 0, done.output
    if engine.name == "sqlite":
        assert f"Backed up the hub to {db}.before-schema-v2 first." in done.stdout
    else:
        assert (
            "Kept the rows from before in table _fieldsync_backup_v2_cases (drop it when no "
            'longer needed: DROP TABLE "_fieldsync_backup_v2_cases";).'
        ) in done.stdout
    assert "Schema version 2 applied" in done.stdout
    shown = runner.invoke(cli, ["hub", "schema", "show", "--db", db, "--json"])
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.stdout)
    assert found["version"] == 2 and found["undeclared"] == []
    assert [v["version"] for v in found["versions"]] == [1, 2]
    columns = [c["name"] for c in found["tables"]["cases"]["columns"]]
    assert "household_size" not in columns and "family_name" in columns


# -- rescope and dropped columns, worked out in Python: the same as SQLite's JSON SQL ---

BY_COUNTRY = DEFAULT.replace(
    'scope = { column = "office" }', 'scope = { column = "country_of_origin" }'
)
FOLLOWING_NOTHING = DEFAULT.replace(
    'scope = { column = "case_id", parent = "cases" }   # and its assistance follows it\n', ""
)


def _old_rescope(conn: sqlite3.Connection, schema: Schema) -> None:
    """hub/schemas.py's rescope and note_exits as SQLite's JSON SQL did them (the oracle)."""
    conn.execute(
        "CREATE TEMP TABLE _fieldsync_old_scopes AS SELECT tbl, pk, scope "
        "FROM _fieldsync_records WHERE deleted = 0 AND scope != ''"
    )
    for table in schema.tables.values():
        scope = table.scope
        if scope is None:
            conn.execute(
                "UPDATE _fieldsync_records SET scope = NULL, parent = NULL WHERE tbl = ?",
                [table.name],
            )
            continue
        path = '$."' + scope.column + '"'
        if scope.parent is None:
            conn.execute(
                "UPDATE _fieldsync_records SET parent = NULL, scope = CASE WHEN "
                "json_type(vals, ?) = 'text' THEN vals ->> ? ELSE '' END WHERE tbl = ?",
                [path, path, table.name],
            )
            continue
        conn.execute(
            "UPDATE _fieldsync_records SET "
            "parent = CASE WHEN vals ->> ? IS NULL THEN NULL ELSE json_array(vals ->> ?) END, "
            "scope = coalesce((SELECT p.scope FROM _fieldsync_records AS p "
            "WHERE p.tbl = ? AND p.pk = json_array(_fieldsync_records.vals ->> ?)), '') "
            "WHERE tbl = ?",
            [path, path, scope.parent, path, table.name],
        )
    moved = conn.execute(
        "SELECT o.tbl, o.pk, o.scope, r.scope FROM temp._fieldsync_old_scopes AS o "
        "JOIN _fieldsync_records AS r ON r.tbl = o.tbl AND r.pk = o.pk "
        "WHERE r.scope IS NOT o.scope ORDER BY r.seq"
    ).fetchall()
    (top,) = conn.execute("SELECT CAST(value AS INTEGER) FROM _fieldsync_meta WHERE key = 'seq'")
    conn.executemany(
        "INSERT INTO _fieldsync_exits (tbl, pk, scope, seq) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (tbl, pk, scope) DO UPDATE SET seq = excluded.seq",
        [(tbl, pk, old, top[0] + i) for i, (tbl, pk, old, _) in enumerate(moved, 1)],
    )
    conn.executemany(
        "DELETE FROM _fieldsync_exits WHERE tbl = ? AND pk = ? AND scope = ?",
        [(tbl, pk, new) for tbl, pk, _, new in moved if new],
    )
    conn.execute(
        "UPDATE _fieldsync_meta SET value = ? WHERE key = 'seq'", [str(top[0] + len(moved))]
    )


def _old_drop(conn: sqlite3.Connection, table: str, column: str) -> None:
    path = '$."' + column + '"'
    conn.execute(
        "UPDATE _fieldsync_records SET vals = json_remove(vals, ?), "
        "vers = CASE WHEN json_type(vers) = 'object' THEN json_remove(vers, ?) "
        "ELSE vers END WHERE tbl = ?",
        [path, path, table],
    )


def _change(
    seq: int,
    table: str,
    key: str,
    op: str = "insert",
    base: dict[str, str] | None = None,
    **values: object,
) -> Change:
    stamp = Timestamp((now_ms() << 16) + seq, "hq")
    full = None if op == "delete" else {"id": key, **values}
    return Change(seq, table, {"id": key}, op, stamp, full, base or {})


def _scoped_hub(path: Path) -> SqliteHubStore:
    """A hub of several offices' cases, with assistance following them, and the odd ones:
    no office, an empty one, a case deleted, assistance of no case or of an unknown one."""
    store = SqliteHubStore(path)
    for name in ("kyiv", "lviv", "hq"):
        store.add_node(name)
    store.set_scopes("hq", ["*"])
    cases = [
        ("c1", "kyiv", "UKR"),
        ("c2", "lviv", "POL"),
        ("c3", None, "UKR"),
        ("c4", "kyiv", None),
        ("c5", "", "SYR"),
        ("c6", "lviv", "UKR"),
        ("c7", "lviv", "kyiv"),  # a country that is also an office: stays in kyiv's scope
    ]
    changes = [
        _change(i, "cases", key, office=office, country_of_origin=country, household_size=i)
        for i, (key, office, country) in enumerate(cases, 1)
    ]
    helped = [("a1", "c1"), ("a2", "c2"), ("a3", "c3"), ("a4", None), ("a5", "c9"),
              ("a6", "c4"), ("a7", "c6"), ("a8", "c1"), ("a9", "c7")]  # fmt: skip
    changes += [
        _change(10 + i, "assistance", key, case_id=case, quantity=i / 10, kind="food")
        for i, (key, case) in enumerate(helped)
    ]
    assert store.push("hq", changes).applied == len(changes)

    def seen(table: str, key: str) -> dict[str, str]:
        state = store.record_state(table, {"id": key})
        assert state is not None
        return dict(state.versions)

    later = [
        _change(30, "cases", "c6", "delete", seen("cases", "c6")),
        _change(31, "assistance", "a8", "delete", seen("assistance", "a8")),
        # c1's name changed apart: its versions are kept per column, not packed into one
        _change(32, "cases", "c1", "update", seen("cases", "c1"), family_name="Bondar"),
    ]
    assert store.push("hq", later).applied == len(later)
    deleted = [s.deleted for s in (store.record_state("cases", {"id": "c6"}),) if s]
    assert deleted == [True]
    return store


def _state(path: Path) -> dict[str, list[Any]]:
    with sqlite3.connect(path) as conn:
        return {
            "records": conn.execute(
                "SELECT tbl, pk, scope, parent, vals, vers FROM _fieldsync_records ORDER BY tbl, pk"
            ).fetchall(),
            "exits": conn.execute(
                "SELECT * FROM _fieldsync_exits ORDER BY tbl, pk, scope"
            ).fetchall(),
            "seq": conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'seq'").fetchall(),
        }


@pytest.mark.parametrize(
    ("source", "by_country"),
    [
        (BY_COUNTRY, True),
        (FOLLOWING_NOTHING, False),
        (BY_COUNTRY.replace("    household_size INTEGER,\n", ""), True),
    ],
    ids=["cases-by-country", "assistance-unscoped", "by-country-and-a-column-dropped"],
)
def test_rescope_and_dropped_columns_in_python_match_the_json_sql(
    tmp_path: Path, source: str, by_country: bool
) -> None:
    new = Schema.from_toml(source)
    with _scoped_hub(tmp_path / "hub.db") as store:
        with (
            sqlite3.connect(tmp_path / "hub.db") as live,
            sqlite3.connect(tmp_path / "ref.db") as ref,
        ):
            live.backup(ref)
        done = schemas.apply(store.database, new, ADMIN, allow_loss=True)
        assert done.plan is not None and done.plan.rescope
    with sqlite3.connect(tmp_path / "ref.db") as ref:
        for name, column in done.plan.dropped_columns():
            _old_drop(ref, name, column)
        _old_rescope(ref, new)
    got, want = _state(tmp_path / "hub.db"), _state(tmp_path / "ref.db")
    assert got == want
    # and the case is not trivial: keys moved, followers took their parent's new key
    scopes = {(tbl, pk): scope for tbl, pk, scope, *_ in got["records"]}
    if by_country:
        assert scopes[("cases", '["c1"]')] == "UKR" and scopes[("assistance", '["a1"]')] == "UKR"
        assert scopes[("cases", '["c4"]')] == "" and scopes[("assistance", '["a6"]')] == ""
        assert len(got["exits"]) >= 5
    else:
        assert scopes[("assistance", '["a1"]')] is None
    if "household_size" not in source:
        assert all("household_size" not in vals + vers for *_, vals, vers in got["records"])
