"""Edge cases found in review: exact numbers, odd names, big batches, admins racing."""

from __future__ import annotations

import sqlite3
import time

import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from hub.app import create_app
from hub.conflicts import write_resolution
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import FieldsyncError, HubRejectedError, SchemaError, StoreError
from shared.schema import Schema
from tests.conftest import Hub, Office, serve
from tests.faults import FlakyTransport
from tests.integration.test_sync import add_case, assert_converged, case, sync_all, write

pytestmark = pytest.mark.integration


def test_real_numbers_travel_exactly(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    quantities = {"a1": 0.1 + 0.2, "a2": 1 / 3, "a3": 1e300, "a4": -2.5e-7, "a5": 2.0}
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO assistance (id, case_id, kind, quantity) VALUES (?, 'c1', 'cash', ?)",
            list(quantities.items()),
        )
    conn.close()
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    got = {r["id"]: r["quantity"] for r in almaty.store.rows("assistance")}
    assert got == quantities


def test_infinite_number_is_refused_at_the_office_with_a_clear_message(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn, pytest.raises(sqlite3.IntegrityError) as info:
        conn.execute("INSERT INTO assistance (id, quantity) VALUES ('a1', 9e999)")
    conn.close()
    assert "assistance.quantity cannot hold an infinite number" in str(info.value)
    assert astana.store.pending_count() == 0
    assert astana.store.rows("assistance") == []


def _world(tmp_path, schema: Schema, names=("astana", "almaty"), **app_options):
    store = SqliteHubStore(tmp_path / "hub.db", schema)
    gen = serve(create_app(store, **app_options))
    url = next(gen)
    offices = []
    for name in names:
        token = store.add_node(name)
        store.set_scopes(name, ["*"])
        node = NodeStore.init(tmp_path / f"{name}.db", name, url, token, schema)
        client = HttpHubClient(url, token, node=name)
        offices.append(Office(name, node, SyncAgent(node, client), client, node.path))
    return Hub(url, store, store.path), offices, gen


def _close(gen, hub, offices):
    for office in offices:
        office.client.close()
        office.store.close()
    gen.close()
    hub.store.close()


UNICODE_SCHEMA = '''
[tables.people]
create = """CREATE TABLE people (id TEXT PRIMARY KEY, "имя" TEXT, "a.b c" TEXT, status TEXT)"""
'''


def test_non_ascii_column_names_send_only_changed_columns(tmp_path):
    hub, (astana, almaty), gen = _world(tmp_path, Schema.from_toml(UNICODE_SCHEMA))
    try:
        write(astana, "INSERT INTO people (id, \"имя\", status) VALUES ('p1', 'Aigerim', 'new')")
        sync_all(astana, almaty)
        write(almaty, "UPDATE people SET \"имя\" = 'Aigerim B.' WHERE id = 'p1'")
        write(astana, "UPDATE people SET status = 'open' WHERE id = 'p1'")
        [change] = astana.store.pending(10)
        assert change.values == {"status": "open"}
        sync_all(almaty, astana)
        assert_converged_tables(hub, [astana, almaty], "people")
        assert hub.store.rows("people")[0]["имя"] == "Aigerim B."
        assert hub.store.conflicts() == []
    finally:
        _close(gen, hub, [astana, almaty])


def assert_converged_tables(hub, offices, table):
    for office in offices:
        assert office.store.rows(table) == hub.store.rows(table)


def test_batch_over_the_body_limit_is_split_until_it_fits(tmp_path):
    hub, (astana, almaty), gen = _world(tmp_path, Schema.load(), max_body_bytes=60_000)
    try:
        notes = [(f"c{i:03}", f"{i:03} " + "x" * 3000 + str(i) * 500) for i in range(200)]
        with sqlite3.connect(astana.path) as conn:
            conn.executemany("INSERT INTO cases (id, notes) VALUES (?, ?)", notes)
        conn.close()
        report = astana.agent.sync_once()
        assert report.pushed == 200
        almaty.sync()
        assert len(almaty.store.rows("cases")) == 200
        # One change that can never fit gets a clear error; the rest still sync.
        import os

        big = os.urandom(80_000).hex()
        write(astana, "INSERT INTO cases (id, notes) VALUES ('huge', ?)", big)
        with pytest.raises(HubRejectedError, match="larger than the hub accepts"):
            astana.sync()
        assert astana.store.pending_count() == 1
    finally:
        _close(gen, hub, [astana, almaty])


def test_stale_resolution_is_refused_unless_forced(hub, make_office):
    astana, almaty, shymkent = make_office("astana"), make_office("almaty"), make_office("shymkent")
    add_case(astana, "c1")
    sync_all(astana, almaty, shymkent)
    write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
    time.sleep(0.01)
    write(almaty, "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")
    sync_all(astana, almaty, shymkent)
    [conflict] = hub.store.conflicts()
    write(shymkent, "UPDATE cases SET status = 'closed' WHERE id = 'c1'")  # saw everything
    shymkent.sync()
    with pytest.raises(FieldsyncError, match="changed after the conflict was logged"):
        hub.store.resolve(conflict.id, "other", "admin")
    assert case(hub, "c1")["status"] == "closed"
    hub.store.resolve(conflict.id, "kept", "admin")  # keeping needs no write: allowed
    assert case(hub, "c1")["status"] == "closed"


def test_forced_resolution_applies(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")
    sync_all(astana, almaty)
    [conflict] = hub.store.conflicts()
    write(astana, "UPDATE cases SET status = 'closed' WHERE id = 'c1'")
    astana.sync()
    hub.store.resolve(conflict.id, "other", "admin", force=True)
    sync_all(astana, almaty)
    assert case(almaty, "c1")["status"] == conflict.other_value
    assert_converged(hub, astana, almaty)


def test_two_admins_cannot_both_resolve_one_conflict(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET status = 'refugee' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET status = 'rejected' WHERE id = 'c1'")
    sync_all(astana, almaty)
    [conflict] = hub.store.conflicts()
    with SqliteHubStore(hub.path) as alice:  # a second admin process on the same hub file
        stale = alice.conflict(conflict.id)  # Alice looks first...
        hub.store.resolve(conflict.id, "value", "bob", "closed")  # ...Bob decides first
        with pytest.raises(FieldsyncError, match="resolved by bob"):
            # resolve()'s write alone, after its checks passed on what Alice saw
            write_resolution(
                alice.database, stale, alice.schema.table("cases"), "other", "alice", None, False
            )
    assert case(hub, "c1")["status"] == "closed"
    assert hub.store.conflict(conflict.id).resolved_by == "bob"


def test_resolve_value_on_a_whole_record_conflict_is_a_one_line_error(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET notes = 'still here' WHERE id = 'c1'")
    sync_all(astana, almaty)
    [conflict] = hub.store.conflicts()
    result = CliRunner().invoke(
        cli,
        [
            "hub",
            "resolve",
            str(conflict.id),
            "--db",
            str(hub.path),
            "--keep",
            "value",
            "--value",
            "x",
        ],
    )
    assert result.exit_code == 1
    assert "whole record" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "create",
    [
        "CREATE TABLE t (id TEXT PRIMARY KEY, code TEXT UNIQUE)",
        "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, b TEXT, UNIQUE (a, b))",
    ],
)
def test_unique_constraints_besides_the_key_are_refused(create):
    with pytest.raises(SchemaError, match="UNIQUE constraint"):
        Schema.from_toml(f'[tables.t]\ncreate = """{create}"""\n')


def test_adopting_a_table_with_a_unique_index_is_refused(tmp_path):
    path = tmp_path / "office.db"
    with sqlite3.connect(path) as conn:
        conn.execute(Schema.load().tables["cases"].create)
        conn.execute("CREATE UNIQUE INDEX cases_number ON cases (case_number)")
    conn.close()
    with pytest.raises(StoreError, match="cases_number"):
        NodeStore.init(path, "astana", "http://127.0.0.1:9", "t")


def test_a_file_that_is_not_a_database_gives_a_one_line_error(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    result = CliRunner().invoke(cli, ["node", "status", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def test_writes_during_a_push_wait_for_the_next_sync(hub, make_office):
    def plan(n, request):
        if n == 3:  # (after the hub's time and schema) staff keep typing while the first
            # push is on its way
            with sqlite3.connect(astana.path) as conn:
                conn.execute("INSERT INTO cases (id) VALUES ('typed-meanwhile')")
            conn.close()
        return "ok"

    astana = make_office("astana", transport=FlakyTransport(plan))
    add_case(astana, "c1")
    report = astana.agent.sync_once()
    assert report.pushed == 1
    assert astana.store.pending_count() == 1
    astana.sync()
    assert {r["id"] for r in hub.store.rows("cases")} == {"c1", "typed-meanwhile"}


def test_resolution_sees_a_later_edit_with_an_older_stamp(hub, make_office):
    astana, almaty, shymkent = make_office("astana"), make_office("almaty"), make_office("shymkent")
    add_case(astana, "c1", notes="old")
    sync_all(astana, almaty, shymkent)
    write(shymkent, "UPDATE cases SET notes = 'shymkent, offline' WHERE id = 'c1'")  # made first
    write(almaty, "UPDATE cases SET household_size = 3 WHERE id = 'c1'")
    almaty.sync()
    write(astana, "DELETE FROM cases WHERE id = 'c1'")  # had not seen Almaty's edit
    astana.sync()
    [conflict] = hub.store.conflicts()
    assert conflict.kind == "delete"
    shymkent.sync()  # after the conflict was logged, with an older stamp
    with pytest.raises(FieldsyncError, match="changed after the conflict"):
        hub.store.resolve(conflict.id, "other", "admin")
    assert case(hub, "c1")["notes"] == "shymkent, offline"


def test_resolution_of_an_untouched_revived_record_is_allowed(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1", notes="old")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET household_size = 4 WHERE id = 'c1'")
    time.sleep(0.01)
    write(almaty, "UPDATE cases SET notes = 'n' WHERE id = 'c1'")
    write(almaty, "DELETE FROM cases WHERE id = 'c1'")
    almaty.sync()
    astana.sync()  # Astana's update revives c1; Almaty's delete is logged
    [conflict] = hub.store.conflicts()
    assert conflict.kind == "delete"
    hub.store.resolve(conflict.id, "other", "admin")  # nothing changed since: allowed
    sync_all(astana, almaty)
    assert case(hub, "c1") is None and case(astana, "c1") is None


def test_large_and_tiny_real_numbers_travel_exactly(hub, make_office):
    import random
    import struct

    astana, almaty = make_office("astana"), make_office("almaty")
    rng = random.Random(7)
    numbers = []
    while len(numbers) < 500:
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if x == x and abs(x) != float("inf"):
            numbers.append(x)
    numbers += [-1.1545580616824966e232, 5e-324, 2.2250738585072014e-308, 0.0]
    with sqlite3.connect(astana.path) as conn:
        conn.executemany(
            "INSERT INTO assistance (id, quantity) VALUES (?, ?)",
            [(f"a{i:04}", x) for i, x in enumerate(numbers)],
        )
    conn.close()
    sync_all(astana, almaty)
    got = [r["quantity"] for r in almaty.store.rows("assistance")]
    assert got == numbers
    assert_converged(hub, astana, almaty)


LOOSE_SCHEMA = '''
[tables.visits]
create = """CREATE TABLE visits (id TEXT PRIMARY KEY, people INTEGER, cost REAL, note TEXT, x)"""
'''


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        pytest.param(
            "INSERT INTO visits (id, people) VALUES ('v1', 'two')",
            "visits.people takes INTEGER",
            id="text-in-integer",
        ),
        pytest.param(
            "INSERT INTO visits (id, people) VALUES ('v1', 2.5)",
            "visits.people takes INTEGER",
            id="real-in-integer",
        ),
        pytest.param(
            "INSERT INTO visits (id, cost) VALUES ('v1', 'cheap')",
            "visits.cost takes REAL",
            id="text-in-real",
        ),
        pytest.param(
            "INSERT INTO visits (id, note) VALUES ('v1', x'00')",
            "visits.note takes TEXT",
            id="blob-in-text",
        ),
        pytest.param(
            "INSERT INTO visits (id, x) VALUES ('v1', x'00')",
            "visits.x cannot hold a BLOB",
            id="blob-untyped",
        ),
        pytest.param(
            "INSERT INTO visits (id) VALUES (NULL)",
            "visits.id is part of the key",
            id="null-key",
        ),
    ],
)
def test_values_the_hub_could_never_take_are_refused_when_written(tmp_path, sql, message):
    store = NodeStore.init(
        tmp_path / "o.db", "astana", "http://127.0.0.1:9", "t", Schema.from_toml(LOOSE_SCHEMA)
    )
    try:
        with pytest.raises(sqlite3.IntegrityError, match=message):
            store.db.conn.execute(sql)
        store.db.conn.execute("INSERT INTO visits (id, people, cost, x) VALUES ('v2', 2, 3, 'a')")
        assert store.pending_count() == 1  # good writes still go through
    finally:
        store.close()


def test_adopting_rows_the_hub_could_never_take_is_refused(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE visits (id TEXT PRIMARY KEY, people INTEGER, cost REAL, note TEXT, x)"
        )
        conn.executemany(
            "INSERT INTO visits (id, people) VALUES (?, ?)",
            [("v1", 2), ("v2", "two"), ("v3", "3x")],
        )
    conn.close()
    with pytest.raises(StoreError, match=r"people \(2 rows\)"):
        NodeStore.init(path, "astana", "http://127.0.0.1:9", "t", Schema.from_toml(LOOSE_SCHEMA))
    with sqlite3.connect(path) as conn:  # nothing of the init was left behind
        assert conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '_fieldsync%'"
        ).fetchone() == (0,)
        conn.execute("UPDATE visits SET people = NULL WHERE typeof(people) = 'text'")
    conn.close()
    store = NodeStore.init(
        path, "astana", "http://127.0.0.1:9", "t", Schema.from_toml(LOOSE_SCHEMA)
    )
    assert store.pending_count() == 3
    store.close()


def test_hub_commands_never_turn_other_databases_into_hubs(tmp_path):
    office = NodeStore.init(tmp_path / "astana.db", "astana", "http://127.0.0.1:9", "t")
    office.close()
    plain = tmp_path / "plain.db"
    with sqlite3.connect(plain) as conn:
        conn.execute("CREATE TABLE notes (a)")
    conn.close()
    before = plain.read_bytes()
    runner = CliRunner()
    for args, needle in (
        (["hub", "conflicts", "--db", str(plain)], "not a fieldsync hub database"),
        (["hub", "add-node", "x", "--db", str(plain)], "not a fieldsync hub database"),
        (["hub", "add-node", "x", "--db", str(tmp_path / "astana.db")], "office database"),
        (["hub", "conflicts", "--db", str(tmp_path / "missing.db")], "does not exist"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert needle in result.output and "Traceback" not in result.output
    assert plain.read_bytes() == before
    assert not (tmp_path / "missing.db").exists()


def test_unknown_schema_keys_are_refused():
    with pytest.raises(SchemaError, match="unknown key"):
        Schema.from_toml(
            '[tables.t]\npolcy = "record"\ncreate = "CREATE TABLE t (id TEXT PRIMARY KEY)"\n'
        )


def test_node_set_points_an_office_at_a_new_token(hub, make_office):
    astana = make_office("astana")
    issued = astana.store.token  # the token the hub made for office astana
    other = hub.store.add_node("astana-2")
    add_case(astana, "c1")

    def node(*args: str):
        return CliRunner().invoke(cli, ["node", args[0], str(astana.path), *args[1:]])

    def acked() -> dict[str, int]:
        return {n["name"]: n["acked_seq"] for n in hub.store.nodes()}

    # The office holds an old token the hub does not take (as after a revocation): set
    # with --offline, as node set itself refuses it when the hub can be asked.
    assert "does not accept this token" in node("set", "--token", "old-token").output
    assert node("set", "--token", "old-token", "--offline").exit_code == 0
    result = node("sync")
    assert result.exit_code == 1 and "401 unauthorized" in result.output
    assert "1 local change is kept" in result.output and "once this is fixed" in result.output
    # Another office's token is refused for this database: nothing arrives as that office.
    assert "belongs to office 'astana-2'" in node("set", "--token", other).output
    assert node("set", "--token", other, "--offline").exit_code == 0
    result = node("sync")
    assert result.exit_code == 1, result.output
    assert "403 forbidden" in result.output and "belongs to office 'astana-2'" in result.output
    assert acked() == {"astana": 0, "astana-2": 0}
    # Its own new token: the sync goes through, as office astana; the old token would
    # have been refused as above, so it is no longer sent.
    result = node("set", "--token", issued)
    assert result.exit_code == 0, result.output
    assert "token replaced (the hub accepts it as astana's)" in result.output
    result = node("sync")
    assert result.exit_code == 0 and "Synced astana: pushed 1" in result.output, result.output
    assert acked() == {"astana": 1, "astana-2": 0}
    assert case(hub, "c1") is not None
    reopened = NodeStore(astana.path)
    assert (reopened.token, reopened.pending_count()) == (issued, 0)
    reopened.close()
    bad = node("set", "--hub", "hub:80")
    assert bad.exit_code == 1 and "http://" in bad.output
    assert CliRunner().invoke(cli, ["node", "set", str(astana.path)]).exit_code == 1


def test_text_made_by_json_functions_travels_as_text(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "a1", notes="{}")
    write(astana, "INSERT INTO cases (id, notes) VALUES ('b1', json_quote('q'))")
    write(astana, "UPDATE cases SET notes = json_set(notes, '$.phone', '555') WHERE id = 'a1'")
    sync_all(astana, almaty)
    assert case(almaty, "a1")["notes"] == '{"phone":"555"}'
    assert case(almaty, "b1")["notes"] == '"q"'
    assert_converged(hub, astana, almaty)


def test_case_only_edits_under_nocase_are_captured(tmp_path):
    schema = Schema.from_toml(
        '[tables.people]\ncreate = "CREATE TABLE people (id TEXT PRIMARY KEY, '
        'name TEXT COLLATE NOCASE)"\n'
    )
    store = NodeStore.init(tmp_path / "o.db", "astana", "http://127.0.0.1:9", "t", schema)
    try:
        store.db.conn.execute("INSERT INTO people VALUES ('p1', 'ivanov')")
        store.db.conn.execute("UPDATE people SET name = 'Ivanov' WHERE id = 'p1'")
        assert [c.values for c in store.pending(10)][-1] == {"name": "Ivanov"}
    finally:
        store.close()


def test_values_too_big_for_any_push_are_refused_when_written(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn, pytest.raises(sqlite3.IntegrityError, match="MiB"):
        conn.execute("INSERT INTO cases (id, notes) VALUES ('c1', ?)", ["x" * (5 * 2**20)])
    conn.close()
    assert astana.store.pending_count() == 0


def test_text_that_is_not_utf8_is_named_not_quoted_and_can_be_dropped(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn:  # as `.import` of a Latin-1 CSV leaves it
        conn.execute(
            "INSERT INTO cases (id, family_name) VALUES ('c1', CAST(? AS TEXT))", [b"M\xfcller"]
        )
    conn.close()
    add_case(astana, "c2")
    with pytest.raises(StoreError) as info:
        astana.sync()
    message = str(info.value)
    assert "not UTF-8" in message and "ller" not in message
    assert "ller" not in (astana.store.status().last_error or "")
    write(astana, "UPDATE cases SET family_name = 'Müller' WHERE id = 'c1'")  # fixed
    assert "drop-change" in message and " 1 " in message  # the bad change is the first
    result = CliRunner().invoke(cli, ["node", "drop-change", str(astana.path), "1"])
    assert result.exit_code == 0, result.output
    astana.sync()
    assert case(hub, "c1")["family_name"] == "Müller" and case(hub, "c2") is not None


def test_records_too_big_for_any_push_are_refused_when_written(hub, make_office):
    astana = make_office("astana")
    part = "x" * (3 * 2**20)  # each value under the limit, the record over it
    with (
        sqlite3.connect(astana.path) as conn,
        pytest.raises(sqlite3.IntegrityError, match="record"),
    ):
        conn.execute(
            "INSERT INTO cases (id, notes, family_name, given_name) VALUES ('c1', ?, ?, ?)",
            [part, part, part],
        )
    conn.close()
    assert astana.store.pending_count() == 0


def test_adopting_a_table_with_oversized_values_is_refused(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(Schema.load().tables["cases"].create)
        conn.execute("INSERT INTO cases (id, notes) VALUES ('c1', ?)", ["x" * (5 * 2**20)])
    conn.close()
    with pytest.raises(StoreError, match=r"notes \(1 rows\)"):
        NodeStore.init(path, "astana", "http://127.0.0.1:9", "t")


def test_dropping_a_bad_change_still_sends_the_whole_fixed_record(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    with sqlite3.connect(astana.path) as conn:
        conn.execute(
            "INSERT INTO cases (id, family_name, given_name, household_size) "
            "VALUES ('c1', CAST(? AS TEXT), 'Anna', 4)",
            [b"M\xfcller"],
        )
    conn.close()
    write(astana, "UPDATE cases SET family_name = 'Müller' WHERE id = 'c1'")
    result = CliRunner().invoke(cli, ["node", "drop-change", str(astana.path), "1"])
    assert result.exit_code == 0, result.output
    sync_all(astana, almaty)
    assert_converged(hub, astana, almaty)
    row = case(almaty, "c1")
    assert (row["family_name"], row["given_name"], row["household_size"]) == ("Müller", "Anna", 4)


def test_key_that_is_not_utf8_is_named_too(hub, make_office):
    astana = make_office("astana")
    with sqlite3.connect(astana.path) as conn:
        conn.execute("INSERT INTO cases (id) VALUES (CAST(? AS TEXT))", [b"c\xfc1"])
    conn.close()
    with pytest.raises(StoreError, match="not UTF-8.*drop-change"):
        astana.sync()


def test_insert_update_delete_before_a_sync_leaves_no_record(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    write(astana, "INSERT INTO cases (id, family_name, status) VALUES ('c1', 'Ali', 'refugee')")
    write(astana, "UPDATE cases SET family_name = 'Aliyev' WHERE id = 'c1'")
    write(astana, "DELETE FROM cases WHERE id = 'c1'")
    sync_all(astana, almaty)
    assert hub.store.rows("cases") == []
    assert astana.store.rows("cases") == [] and almaty.store.rows("cases") == []
    assert hub.store.conflicts() == []  # its own delete is no conflict


def test_insert_then_rename_before_a_sync_moves_the_whole_record(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    write(astana, "INSERT INTO cases (id, family_name, status) VALUES ('c1', 'Ali', 'refugee')")
    write(astana, "UPDATE cases SET id = 'c2', notes = 'renumbered' WHERE id = 'c1'")
    write(astana, "UPDATE cases SET household_size = 4 WHERE id = 'c2'")
    sync_all(astana, almaty)
    assert [r["id"] for r in hub.store.rows("cases")] == ["c2"]
    assert case(almaty, "c2")["family_name"] == "Ali" and case(almaty, "c2")["household_size"] == 4
    assert hub.store.conflicts() == []


def test_a_push_cut_off_mid_body_is_no_hub_error(hub, make_office, caplog):
    import socket
    from urllib.parse import urlsplit

    astana = make_office("astana")
    url = urlsplit(hub.url)
    with caplog.at_level("INFO", logger="fieldsync.hub"):
        sock = socket.create_connection((url.hostname, url.port), timeout=5)
        sock.sendall(
            b"POST /v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + astana.store.token.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            + b'{"protocol": 2, "changes": ['
        )
        sock.close()  # the link drops mid-body
        deadline = time.monotonic() + 5
        while "arrived whole" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "went away before its request arrived whole" in caplog.text
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text
    assert hub.store.office("astana").last_error is None  # a bad link, nothing to fix
    add_case(astana, "c1")
    astana.sync()  # and the hub serves on
    assert case(hub, "c1") is not None
