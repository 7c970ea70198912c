"""Changing the schema while offices work, some offline (README: "Changing the schema"):
a real hub on 127.0.0.1, real office files, `hub schema apply` through the CLI."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from fieldsync.cli import cli
from shared.errors import SchemaError
from shared.schema import Schema
from tests.conftest import Hub, Office

pytestmark = pytest.mark.integration

DEFAULT = Schema.load().source
WITH_PHONE = DEFAULT.replace(
    '    notes TEXT\n) STRICT\n"""\n\n[tables.assistance]',
    '    notes TEXT,\n    phone TEXT\n) STRICT\n"""\n\n[tables.assistance]',
)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def apply(hub: Hub, tmp_path: Path, source: str = WITH_PHONE) -> Result:
    path = tmp_path / "new-schema.toml"
    path.write_text(source, encoding="utf-8")
    return run("hub", "schema", "apply", path, "--db", hub.db)


def write(office: Office, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(office.path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def cases(office: Office) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in office.store.rows("cases")}


def test_a_column_added_while_one_office_is_offline(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    kyiv, lviv = make_office("kyiv"), make_office("lviv")
    write(kyiv, "INSERT INTO cases (id, family_name, office) VALUES ('c1', 'Bondar', 'kyiv')")
    kyiv.sync()
    lviv.sync()
    # lviv goes offline and works under version 1
    write(lviv, "UPDATE cases SET given_name = 'Olena' WHERE id = 'c1'")
    write(lviv, "INSERT INTO cases (id, family_name, office) VALUES ('c2', 'Koval', 'lviv')")

    result = apply(hub, tmp_path)
    assert result.exit_code == 0, result.output
    assert "new column cases.phone" in result.output
    assert "Schema version 2 applied" in result.output
    assert "already at version 2" in apply(hub, tmp_path).output

    kyiv.sync()  # online: migrates, then sets a phone
    write(kyiv, "UPDATE cases SET phone = '+380 44 000' WHERE id = 'c1'")
    kyiv.sync()

    lviv.sync()  # back: migrates, its queued changes are taken, the phone arrives
    assert kyiv.store.pending_count() == lviv.store.pending_count() == 0
    got = cases(lviv)
    assert got["c1"]["phone"] == "+380 44 000" and got["c1"]["given_name"] == "Olena"
    kyiv.sync()
    assert cases(kyiv)["c2"]["family_name"] == "Koval"
    assert cases(kyiv)["c1"]["given_name"] == "Olena"
    assert not hub.store.rejected() and not hub.store.conflicts()

    exported = run("hub", "export", "cases", "--db", hub.path, "--format", "csv")
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(exported.output))}
    assert rows["c1"]["phone"] == "'+380 44 000"  # a leading + is quoted against formulas
    shown = run("hub", "schema", "show", "--db", hub.path)
    assert "schema version 2" in shown.output and "phone  TEXT" in shown.output


def test_an_office_of_an_older_fieldsync_is_refused_in_one_line(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    token = hub.store.add_node("old")
    headers = {"Authorization": f"Bearer {token}"}
    pull = f"{hub.url}/v1/pull?scopes=1"
    assert httpx.get(pull, headers=headers).status_code == 200  # version 1: served
    assert apply(hub, tmp_path).exit_code == 0
    answer = httpx.get(pull, headers=headers)
    assert answer.status_code == 409
    assert answer.json()["error"] == "upgrade_required"
    assert "too old for this hub's schema version 2" in answer.json()["detail"]
    schema = httpx.get(f"{hub.url}/v1/schema", headers=headers).json()
    assert schema == {"version": 2, "source": WITH_PHONE}
    assert httpx.get(f"{hub.url}/v1/health").json()["schema_version"] == 2
    current = httpx.get(pull, headers={**headers, "Fieldsync-Schema": "2"})
    assert current.status_code == 200 and current.json()["schema_version"] == 2
    behind = httpx.get(pull, headers={**headers, "Fieldsync-Schema": "1"})
    assert behind.status_code == 409 and "takes the new version" in behind.json()["detail"]
    ahead = httpx.post(
        f"{hub.url}/v1/push",
        json={"protocol": 2, "changes": []},
        headers={**headers, "Fieldsync-Schema": "3"},
    )
    assert ahead.status_code == 409 and "apply that schema again" in ahead.json()["detail"]


def test_a_column_added_by_hand_stops_sync_until_the_hub_declares_it(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    kyiv = make_office("kyiv")
    write(kyiv, "INSERT INTO cases (id, office) VALUES ('c1', 'kyiv')")
    kyiv.sync()
    write(kyiv, "ALTER TABLE cases ADD COLUMN phone TEXT")
    write(kyiv, "UPDATE cases SET phone = '+380 67' WHERE id = 'c1'")
    with pytest.raises(SchemaError, match=r"table cases has a column phone .*hub schema apply"):
        kyiv.sync()
    assert apply(hub, tmp_path).exit_code == 0
    kyiv.sync()  # adopted, and the value set by hand is sent
    assert hub.store.rows("cases")[0]["phone"] == "+380 67"


def test_an_office_made_with_a_newer_file_keeps_its_cases(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    kyiv = make_office("kyiv", schema=Schema.from_toml(WITH_PHONE))
    write(kyiv, "INSERT INTO cases (id, office, phone) VALUES ('c1', 'kyiv', '+380')")
    with pytest.raises(SchemaError, match=r"this office's schema has cases\.phone, which the hub"):
        kyiv.sync()
    assert list(cases(kyiv)) == ["c1"] and kyiv.store.pending_count() == 1
    assert not hub.store.rows("cases")
    assert apply(hub, tmp_path).exit_code == 0
    kyiv.sync()
    assert hub.store.rows("cases")[0]["phone"] == "+380"
    assert list(cases(kyiv)) == ["c1"]


def test_a_hub_behind_its_offices_stops_them_keeping_every_change(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    kyiv = make_office("kyiv")
    assert apply(hub, tmp_path).exit_code == 0
    kyiv.sync()
    # as if the hub were restored from a backup taken before the apply
    conn = sqlite3.connect(hub.path)
    with conn:
        conn.execute("DELETE FROM _fieldsync_schemas WHERE version = 2")
    conn.close()
    write(kyiv, "INSERT INTO cases (id, office, phone) VALUES ('c1', 'kyiv', '+380')")
    with pytest.raises(SchemaError, match="apply that schema again at the hub"):
        kyiv.sync()
    assert kyiv.store.pending_count() == 1 and list(cases(kyiv)) == ["c1"]


def test_the_dashboard_shows_a_new_column_at_once(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    kyiv = make_office("kyiv")
    write(kyiv, "INSERT INTO cases (id, office) VALUES ('c1', 'kyiv')")
    kyiv.sync()
    token = hub.store.add_admin("ops", "owner")
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert web.post("/login", data={"token": token, "next": "/"}).status_code == 303
        assert "phone" not in web.get("/records/cases", params={"id": "c1"}).text
        assert apply(hub, tmp_path).exit_code == 0  # by another program: the CLI's store
        kyiv.sync()
        write(kyiv, "UPDATE cases SET phone = '0671234' WHERE id = 'c1'")
        kyiv.sync()
        page = web.get("/records/cases", params={"id": "c1"}).text
        assert "phone" in page and "0671234" in page
        download = web.get("/export/cases.csv")
        assert download.status_code == 200 and "phone" in download.text.splitlines()[0]
        found = web.get("/records", params={"q": "0671234"})
        assert found.status_code == 200


def test_schema_show_names_a_column_added_by_hand_at_the_hub(hub: Hub) -> None:
    conn = sqlite3.connect(hub.path)
    with conn:
        conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
    conn.close()
    shown = run("hub", "schema", "show", "--db", hub.path, "--json")
    assert shown.exit_code == 0, shown.output
    assert '"undeclared": [\n    "cases.phone"\n  ]' in shown.output
    text = run("hub", "schema", "show", "--db", hub.path).output
    assert "not declared: cases.phone" in text


def test_a_hub_with_a_column_added_by_hand_refuses_to_serve(tmp_path: Path) -> None:
    from tests.integration.test_cli import assert_one_line_error, fieldsync, free_port, ok

    path = tmp_path / "hub.db"
    ok("hub", "add-node", "kyiv", "--db", path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("ALTER TABLE cases ADD COLUMN phone TEXT")
    conn.close()
    served = fieldsync("hub", "serve", "--db", path, "--port", str(free_port()), timeout=20)
    assert_one_line_error(served, "table cases has a column phone", "hub schema apply")
