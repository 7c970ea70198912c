"""Schema versions, backups and restores, and compaction together: a hub restored from
a backup taken before a `hub schema apply`, kept changes of an older version re-sent,
compaction alongside schema changes (a real hub on 127.0.0.1, the CLI, real files)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from hub.compact import Keep
from hub.compactor import Compactor
from hub.scopes import read_scopes
from node.agent import SyncAgent
from node.store import NodeStore
from shared.errors import HubRejectedError, SchemaError
from tests.integration import test_restore
from tests.integration.test_restore import add, put_back, run, tables_of
from tests.integration.test_schema import DEFAULT, WITH_PHONE
from tests.integration.test_sync import write

pytestmark = pytest.mark.integration

hub = test_restore.hub  # a hub that can be stopped and its file put back

WITH_EMAIL = WITH_PHONE.replace("    phone TEXT\n", "    phone TEXT,\n    email TEXT\n")


def apply(hub_path: Path, tmp_path: Path, source: str) -> tuple[int, str]:
    path = tmp_path / f"schema-{abs(hash(source))}.toml"
    path.write_text(source, encoding="utf-8")
    return run("hub", "schema", "apply", path, "--db", hub_path)


def test_a_hub_restored_from_before_an_apply_takes_it_again_and_gets_every_change(
    hub, make_office, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    astana, almaty = make_office("astana"), make_office("almaty")
    add(astana, "c1")
    astana.sync(), almaty.sync()
    backup = tmp_path / "hub-copy.db"
    code, output = run("hub", "backup", "--db", hub.path, backup)
    assert code == 0, output
    write(astana, "UPDATE cases SET notes = 'under version 1' WHERE id = 'c1'")
    add(almaty, "b1")
    astana.sync(), almaty.sync()  # acknowledged, kept, under version 1
    code, output = apply(hub.path, tmp_path, WITH_PHONE)
    assert code == 0, output
    # Changes acknowledged under the new version: then the hub is put back.
    astana.sync()
    write(astana, "UPDATE cases SET phone = '+7' WHERE id = 'c1'")
    add(astana, "c2")
    astana.sync(), almaty.sync()
    before = tables_of(hub.store)
    put_back(hub, backup)

    with pytest.raises(SchemaError, match="apply that schema again"):
        astana.sync()
    assert apply(hub.path, tmp_path, WITH_PHONE)[0] == 0
    for _ in range(2):
        astana.sync(), almaty.sync()
    assert tables_of(hub.store) == before
    assert tables_of(astana.store) == before == tables_of(almaty.store)


def test_a_hub_restored_from_before_two_applies_takes_the_last_schema_once(
    hub, make_office, tmp_path
):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    assert apply(hub.path, tmp_path, WITH_PHONE)[0] == 0
    assert apply(hub.path, tmp_path, WITH_EMAIL)[0] == 0
    astana.sync()
    write(astana, "UPDATE cases SET email = 'a@b.c', phone = '+7' WHERE id = 'c1'")
    astana.sync()
    before = tables_of(hub.store)
    put_back(hub, backup)

    # The admin applies the schema the offices use: the hub is at version 2, the
    # office at 3, with the same schema.
    code, output = apply(hub.path, tmp_path, WITH_EMAIL)
    assert code == 0, output
    for _ in range(2):
        astana.sync()
    assert tables_of(hub.store) == before == tables_of(astana.store)


WITH_FAX = WITH_PHONE.replace("    phone TEXT\n", "    phone TEXT,\n    fax TEXT\n")
WITH_ALL = WITH_FAX.replace("    fax TEXT\n", "    fax TEXT,\n    email TEXT\n")


def test_a_restored_hub_at_the_same_version_number_with_another_schema_is_noticed(
    hub, make_office, tmp_path
):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    assert apply(hub.path, tmp_path, WITH_PHONE)[0] == 0
    assert apply(hub.path, tmp_path, WITH_EMAIL)[0] == 0
    astana.sync()
    write(astana, "UPDATE cases SET email = 'a@b.c' WHERE id = 'c1'")
    astana.sync()
    put_back(hub, backup)
    # Another schema reaches version 3 at the restored hub: not the office's version 3.
    assert apply(hub.path, tmp_path, WITH_PHONE)[0] == 0
    assert apply(hub.path, tmp_path, WITH_FAX)[0] == 0
    with pytest.raises(SchemaError, match="email"):
        astana.sync()
    assert apply(hub.path, tmp_path, WITH_ALL)[0] == 0
    for _ in range(2):
        astana.sync()
    assert hub.store.rows("cases")[0]["email"] == "a@b.c"
    assert tables_of(hub.store) == tables_of(astana.store)


def copy_office(office, out: Path) -> None:
    code, output = run("node", "backup", office.path, out)
    assert code == 0, output


def put_office_back(office, copy: Path) -> None:
    """The office's file replaced by its copy (the agent and store opened again)."""
    office.store.close()
    shutil.copy(copy, office.path)
    for suffix in ("-wal", "-shm"):
        Path(f"{office.path}{suffix}").unlink(missing_ok=True)
    office.store = NodeStore(office.path)
    office.agent = SyncAgent(office.store, office.client)


@pytest.mark.parametrize("queued", [0, 5])
def test_an_office_put_back_from_its_backup_gets_its_own_records_back(
    hub, make_office, tmp_path, queued
):
    astana, almaty = make_office("astana"), make_office("almaty")
    for i in range(10):
        add(astana, f"a{i}")
    astana.sync()
    for i in range(queued):
        add(astana, f"q{i}")  # queued in the copy, sent after it was made
    copy = tmp_path / "astana-copy.db"
    copy_office(astana, copy)
    astana.sync()
    for i in range(20):
        add(astana, f"later{i}")
    write(astana, "UPDATE cases SET notes = 'seen' WHERE id = 'a1'")
    astana.sync(), almaty.sync()
    before = tables_of(hub.store)

    put_office_back(astana, copy)
    add(astana, "new")  # work done on the copy before its first sync
    for _ in range(2):
        astana.sync(), almaty.sync()
    assert len(tables_of(hub.store)["cases"]) == len(before["cases"]) + 1
    assert tables_of(astana.store) == tables_of(hub.store) == tables_of(almaty.store)
    assert astana.store.pending_count() == 0


def test_an_office_put_back_from_its_backup_keeps_what_a_restored_hub_needs(
    hub, make_office, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    astana, almaty = make_office("astana"), make_office("almaty")
    hub_copy = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, hub_copy)[0] == 0
    for i in range(10):
        add(astana, f"a{i}")
    astana.sync()
    copy = tmp_path / "astana-copy.db"
    copy_office(astana, copy)
    for i in range(5):
        add(astana, f"later{i}")  # on the hub, not in the office's copy
    astana.sync()
    put_office_back(astana, copy)
    add(astana, "new")
    astana.sync(), almaty.sync()
    before = tables_of(hub.store)
    assert len(before["cases"]) == 16

    # Then the hub is put back too, from before all of it.
    put_back(hub, hub_copy)
    for _ in range(2):
        astana.sync(), almaty.sync()
    said = [r.getMessage() for r in caplog.records if "hub restored from a backup" in r.message]
    # a0..a9 and new are kept by the office's copy; later0..4 only by the file replaced.
    assert {c["id"] for c in tables_of(hub.store)["cases"]} == {
        c["id"] for c in before["cases"] if not c["id"].startswith("later")
    }, said
    assert tables_of(astana.store) == tables_of(hub.store) == tables_of(almaty.store)
    assert any("5 changes acknowledged" in line for line in said), said


BY_REGION = DEFAULT.replace(
    'scope = { column = "office" }', 'scope = { column = "region" }'
).replace(
    '    notes TEXT\n) STRICT\n"""\n\n[tables.assistance]',
    '    notes TEXT,\n    region TEXT\n) STRICT\n"""\n\n[tables.assistance]',
)


def in_scope(hub, office: str, table: str) -> set[str]:
    """The keys of the hub's live records of ``table`` in ``office``'s scopes."""
    conn = sqlite3.connect(hub.path)
    stored = conn.execute("SELECT scopes FROM _fieldsync_nodes WHERE name = ?", [office])
    scopes = read_scopes(stored.fetchone()[0], office)
    rows = conn.execute(
        "SELECT pk ->> 0, scope FROM _fieldsync_records WHERE tbl = ? AND deleted = 0", [table]
    ).fetchall()
    conn.close()
    return {pk for pk, scope in rows if scopes is None or scope in scopes}


def ids(office, table: str = "cases") -> set[str]:
    return {row["id"] for row in office.store.rows(table)}


def test_a_scope_changed_by_a_schema_apply_after_a_purge_leaves_each_office_its_scope(
    hub, make_office, tmp_path
):
    kyiv, lviv = make_office("kyiv", scopes=("kyiv",)), make_office("lviv", scopes=("lviv",))
    hq = make_office("hq")
    for office, key in ((kyiv, "k"), (lviv, "l")):
        for i in range(3):
            write(office, "INSERT INTO cases (id, office) VALUES (?, ?)", f"{key}{i}", office.name)
        write(office, "INSERT INTO assistance (id, case_id) VALUES (?, ?)", f"{key}0-a", f"{key}0")
    for office in (kyiv, lviv, hq, kyiv, lviv, hq):
        office.sync()
    write(kyiv, "DELETE FROM cases WHERE id = 'k2'")
    kyiv.sync()
    code, output = run("hub", "compact", "--db", hub.path, "--tombstone-age", "0d")
    assert code == 0, output
    write(lviv, "UPDATE cases SET notes = 'offline' WHERE id = 'l1'")  # lviv offline

    code, output = apply(hub.path, tmp_path, BY_REGION)
    assert code == 0, output
    hq.sync()
    write(hq, "UPDATE cases SET region = 'lviv' WHERE id IN ('k0', 'k1')")
    write(hq, "UPDATE cases SET region = 'kyiv' WHERE id IN ('l0', 'l1')")
    write(hq, "UPDATE cases SET region = 'lviv' WHERE id = 'l2'")
    hq.sync(), kyiv.sync()
    # A compaction before lviv is back keeps where records left (lviv has not pulled).
    code, output = run("hub", "compact", "--db", hub.path)
    assert code == 0, output
    for office in (hq, kyiv, lviv, hq, kyiv, lviv):
        office.sync()
    for office in (kyiv, lviv, hq):
        for table in ("cases", "assistance"):
            assert ids(office, table) == in_scope(hub, office.name, table), (office.name, table)
    assert ids(kyiv) == {"l0", "l1"} and ids(lviv) == {"k0", "k1", "l2"}
    assert lviv.store.rejected() == [], lviv.store.rejected()
    assert {r["notes"] for r in hq.store.rows("cases") if r["id"] == "l1"} == {"offline"}


def test_changes_queued_before_a_column_is_dropped_are_taken_without_it(hub, make_office, tmp_path):
    assert apply(hub.path, tmp_path, WITH_PHONE)[0] == 0
    kyiv, lviv = make_office("kyiv"), make_office("lviv")
    add(kyiv, "c1")
    add(kyiv, "c2")
    kyiv.sync(), lviv.sync()
    write(kyiv, "UPDATE cases SET notes = 'both', phone = '+380' WHERE id = 'c1'")
    write(kyiv, "UPDATE cases SET notes = 'notes only' WHERE id = 'c2'")
    add(kyiv, "c3")  # an insert, queued
    write(kyiv, "UPDATE cases SET phone = '+381' WHERE id = 'c3'")
    (tmp_path / "default.toml").write_text(DEFAULT, encoding="utf-8")
    code, output = run(
        "hub", "schema", "apply", tmp_path / "default.toml", "--db", hub.path, "--allow-loss"
    )
    assert code == 0, output
    kyiv.sync(), lviv.sync()
    assert kyiv.store.rejected() == []
    notes = {r["id"]: r["notes"] for r in hub.store.rows("cases")}
    assert notes == {"c1": "both", "c2": "notes only", "c3": None}
    assert tables_of(kyiv.store) == tables_of(hub.store) == tables_of(lviv.store)


def test_a_hub_restored_from_before_a_purge_converges_with_no_deleted_record_back(
    hub, make_office, tmp_path
):
    astana, almaty = make_office("astana"), make_office("almaty")
    for i in range(6):
        add(astana, f"a{i}")
    astana.sync(), almaty.sync()
    backup = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    write(astana, "DELETE FROM cases WHERE id IN ('a0', 'a1')")
    write(almaty, "UPDATE cases SET notes = 'kept' WHERE id = 'a2'")
    astana.sync(), almaty.sync(), astana.sync(), almaty.sync()
    code, output = run("hub", "compact", "--db", hub.path, "--tombstone-age", "0d", "--vacuum")
    assert code == 0, output
    add(almaty, "b0")
    almaty.sync(), astana.sync()
    before = tables_of(hub.store)
    assert {c["id"] for c in before["cases"]} == {"a2", "a3", "a4", "a5", "b0"}

    put_back(hub, backup)
    for _ in range(2):
        astana.sync(), almaty.sync()
    assert tables_of(hub.store) == before
    assert tables_of(astana.store) == before == tables_of(almaty.store)


def test_a_change_the_restored_hub_refuses_when_sent_again_is_kept_in_node_rejected(
    hub, make_office, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    kyiv, lviv = make_office("kyiv", scopes=("kyiv",)), make_office("lviv", scopes=("lviv",))
    write(lviv, "INSERT INTO cases (id, office) VALUES ('l1', 'lviv')")
    lviv.sync(), kyiv.sync()
    backup = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    hub.store.set_scopes("kyiv", ["kyiv", "lviv"])  # after the backup: not in it
    kyiv.sync()
    write(kyiv, "UPDATE cases SET notes = 'seen by kyiv' WHERE id = 'l1'")
    kyiv.sync()
    put_back(hub, backup)

    kyiv.sync()
    # The restored hub gives kyiv its own scope only: the edit it refuses is kept.
    [kept] = kyiv.store.rejected()
    assert kept["pk"] == {"id": "l1"} and kept["values"]["notes"] == "seen by kyiv"
    assert "outside its scope" in kept["reason"]
    assert ids(kyiv) == set()


def test_compaction_schema_applies_and_pushes_at_once_lose_nothing(hub, make_office, tmp_path):
    """The serving hub compacts every few milliseconds (as `hub serve --keep-history`
    does daily) while another connection applies three schema versions and two offices
    push inserts, updates and deletes."""
    astana, almaty = make_office("astana"), make_office("almaty")
    compactor = Compactor(
        hub.store.database,
        Keep(days=None, versions=1),
        tombstone_days=0,
        first=timedelta(0),
        every=timedelta(milliseconds=20),
    )
    compactor.start()
    errors: list[BaseException] = []
    live: set[str] = set()
    stop = threading.Event()

    def work(office, prefix: str) -> None:
        try:
            i = 0
            while not stop.is_set():
                key = f"{prefix}{i}"
                add(office, key)
                write(office, "UPDATE cases SET household_size = ? WHERE id = ?", i, key)
                if i % 3 == 0:
                    write(office, "DELETE FROM cases WHERE id = ?", key)
                else:
                    live.add(key)
                try:
                    office.sync()
                except HubRejectedError as exc:
                    # An apply between its health check and its pull: the next sync
                    # takes the new version.
                    assert "takes the new version at its next sync" in str(exc)
                i += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [
        threading.Thread(target=work, args=(astana, "a")),
        threading.Thread(target=work, args=(almaty, "b")),
    ]
    for thread in workers:
        thread.start()
    try:
        for source in (
            WITH_PHONE,
            WITH_EMAIL,
            WITH_EMAIL.replace("email TEXT", "email TEXT, fax TEXT"),
        ):
            time.sleep(0.3)
            code, output = apply(hub.path, tmp_path, source)
            assert code == 0, output
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in workers:
            thread.join()
        compactor.stop()
    assert not errors, errors
    assert compactor.runs > 3
    for _ in range(2):
        astana.sync(), almaty.sync()
    assert tables_of(astana.store) == tables_of(hub.store) == tables_of(almaty.store)
    assert {c["id"] for c in tables_of(hub.store)["cases"]} == live
    assert astana.store.pending_count() == almaty.store.pending_count() == 0
    assert astana.store.rejected() == almaty.store.rejected() == []


def test_a_backup_looked_at_then_put_in_place_twice_is_noticed_twice(hub, make_office, tmp_path):
    astana = make_office("astana")
    add(astana, "c1")
    astana.sync()
    backup = tmp_path / "hub-copy.db"
    assert run("hub", "backup", "--db", hub.path, backup)[0] == 0
    code, output = run("hub", "status", "--db", backup)  # an admin looks at it first
    assert code == 0, output
    put_back(hub, backup, plain_copy=True)
    add(astana, "c2")
    astana.sync()
    assert {c["id"] for c in tables_of(hub.store)["cases"]} == {"c1", "c2"}

    put_back(hub, backup, plain_copy=True)  # the same backup again
    for _ in range(2):
        astana.sync()
    assert {c["id"] for c in tables_of(hub.store)["cases"]} == {"c1", "c2"}
    assert tables_of(astana.store) == tables_of(hub.store)
