"""Schema versions, backups and restores, and compaction together: a hub restored from
a backup taken before a `hub schema apply`, kept changes of an older version re-sent,
compaction alongside schema changes (a real hub on 127.0.0.1, the CLI, real files)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.errors import SchemaError
from tests.integration import test_restore
from tests.integration.test_restore import add, put_back, run, tables_of
from tests.integration.test_schema import WITH_PHONE
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
