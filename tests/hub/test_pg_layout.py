"""The hub's own tables on PostgreSQL (hub/pg/layout.py) against SQLite's layout
(hub/migrations.py): same tables, columns, keys and indexes, the same lag counts for
the same writes, idempotent steps, identity ids."""

from __future__ import annotations

import glob
import itertools
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hub.migrations import MIGRATIONS
from hub.pg import layout
from hub.pg.layout import LAYOUT, create_layout, layout_version, upgrade_layout
from hub.store import SqliteHubStore
from shared.errors import FieldsyncError

# -- a throwaway cluster ------------------------------------------------------------
# replaced by tests/engines.py pg_url on merge


def _pg(binary: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{binary}"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A cluster on a Unix socket in a new /tmp folder, stopped and removed after."""
    folder = tempfile.mkdtemp(prefix="fs-pg-", dir="/tmp")
    data = os.path.join(folder, "data")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(folder, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, _pg("initdb"), "-D", data, "-A", "trust", "--no-sync", "-U", "fieldsync"]
        + ["-E", "UTF8", "--locale=C.UTF-8"],
        check=True,
        capture_output=True,
    )
    options = f"-k {folder} -c listen_addresses='' -c fsync=off"
    subprocess.run(
        [*run_as, _pg("pg_ctl"), "start", "-w", "-D", data, "-l", f"{folder}/log", "-o", options],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://fieldsync@/postgres?host={folder}"
    finally:
        stop = [*run_as, _pg("pg_ctl"), "stop", "-m", "immediate", "-D", data]
        subprocess.run(stop, check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------

_numbers = itertools.count()


@pytest.fixture
def pg(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection (autocommit) to a new database whose default collation sorts 'B'
    after 'a' (ICU), as many servers' do: the layout must not depend on it."""
    name = f"t_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'"
        )
    try:
        with psycopg.connect(pg_url.replace("/postgres?", f"/{name}?"), autocommit=True) as conn:
            yield conn
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def hub_db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A real SQLite hub's file, opened raw (autocommit)."""
    SqliteHubStore(tmp_path / "hub.db").close()
    conn = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    yield conn
    conn.close()


# -- (1) the same tables ------------------------------------------------------------

_TYPES = {"INTEGER": "bigint", "TEXT": "text", "REAL": "double precision"}


def _sqlite_layout(conn: sqlite3.Connection) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_fieldsync\\_%' "
        "ESCAPE '\\' ORDER BY name"
    )
    for (table,) in names.fetchall():
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        pk = [row[1] for row in sorted((r for r in info if r[5]), key=lambda r: r[5])]
        rowid = (
            pk if len(pk) == 1 and info[[r[1] for r in info].index(pk[0])][2] == "INTEGER" else []
        )
        columns = [
            (name, _TYPES[kind], bool(notnull) or name in pk, _default(dflt))
            for _, name, kind, notnull, dflt, _ in info
        ]
        unique, indexes = set(), {}
        for _, index, is_unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
            cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({index})"))
            if origin == "u":
                unique.add(cols)
            elif origin == "c":
                indexes[index] = (cols, bool(is_unique), bool(partial))
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", [table]).fetchone()
        tables[table] = {
            "columns": columns,
            "checks": sql.upper().count("CHECK"),
            "pk": pk,
            "identity": rowid,
            "unique": unique,
            "indexes": indexes,
        }
    return tables


def _default(value: str | None) -> str | None:
    return None if value is None else value.removesuffix("::text")


def _pg_layout(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    names = conn.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
        " AND relname LIKE '\\_fieldsync\\_%' ORDER BY relname"
    )
    for (table,) in names.fetchall():
        info = conn.execute(
            "SELECT column_name, data_type, is_nullable = 'NO', column_default, "
            "is_identity = 'YES', collation_name FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            [table],
        ).fetchall()
        for name, kind, _, _, _, collation in info:
            assert (kind == "text") == (collation == "C"), f"{table}.{name}: {collation}"
        constraints = conn.execute(
            "SELECT contype, array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY "
            "AS k(n, i) JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n "
            "ORDER BY k.i) FROM pg_constraint c WHERE conrelid = %s::regclass",
            [table],
        ).fetchall()
        indexes = conn.execute(
            "SELECT i.relname, array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY "
            "AS k(n, o) JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n "
            "ORDER BY k.o), x.indisunique, x.indpred IS NOT NULL "
            "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE x.indrelid = %s::regclass AND NOT EXISTS "
            "(SELECT FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
            [table],
        ).fetchall()
        tables[table] = {
            "columns": [(n, k, nn, _default(d)) for n, k, nn, d, _, _ in info],
            "checks": sum(kind == "c" for kind, _ in constraints),
            "pk": next(cols for kind, cols in constraints if kind == "p"),
            "identity": [n for n, _, _, _, identity, _ in info if identity],
            "unique": {tuple(cols) for kind, cols in constraints if kind == "u"},
            "indexes": {name: (tuple(c), u, p) for name, c, u, p in indexes},
        }
    return tables


def test_every_sqlite_table_has_its_twin(
    hub_db: sqlite3.Connection, pg: psycopg.Connection[Any]
) -> None:
    create_layout(pg)
    sqlite, postgres = _sqlite_layout(hub_db), _pg_layout(pg)
    assert sorted(postgres) == sorted(sqlite)
    for table, expected in sqlite.items():
        assert postgres[table] == expected, table


def test_the_same_triggers(hub_db: sqlite3.Connection, pg: psycopg.Connection[Any]) -> None:
    create_layout(pg)
    sqlite = hub_db.execute(
        "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger' ORDER BY 1, 2"
    ).fetchall()
    postgres = pg.execute(
        "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal "
        "ORDER BY 1, 2"
    ).fetchall()
    assert postgres == sqlite


def test_the_version_is_sqlites(pg: psycopg.Connection[Any]) -> None:
    """A SQLite step appended without its twin here fails (the newest number)."""
    create_layout(pg)
    assert layout.STEPS[-1][0] == len(MIGRATIONS)
    assert layout_version(pg) == len(MIGRATIONS)
    row = pg.execute("SELECT value FROM _fieldsync_meta WHERE key = %s", [LAYOUT]).fetchone()
    assert row == (str(len(MIGRATIONS)),)


def test_text_sorts_by_bytes_as_in_sqlite(
    hub_db: sqlite3.Connection, pg: psycopg.Connection[Any]
) -> None:
    create_layout(pg)
    keys = ["a", "B", "b", "A", "ä", "Z", "_", "10", "9", "é"]
    for key in keys:
        hub_db.execute("INSERT INTO _fieldsync_meta VALUES (?, '')", [f"k{key}"])
        pg.execute("INSERT INTO _fieldsync_meta VALUES (%s, '')", [f"k{key}"])
    query = "SELECT key FROM _fieldsync_meta WHERE key LIKE 'k%' ORDER BY key"
    expected = hub_db.execute(query).fetchall()
    assert pg.execute(query).fetchall() == expected
    # and the database's own order differs: the test would see a missing COLLATE "C"
    assert pg.execute(f'{query} COLLATE "default"').fetchall() != expected


# -- (2) the lag counts ---------------------------------------------------------------

_ORIGINS = [None, "", "north", "south", "Ünter"]
_KEYS = [(tbl, f'["{n}"]') for tbl in ("cases", "visits") for n in range(5)]

_op = st.one_of(
    st.tuples(
        st.just("upsert"),
        st.sampled_from(_KEYS),
        st.integers(0, 700),
        st.sampled_from(_ORIGINS),
        st.integers(0, 1),
    ),
    st.tuples(st.just("seq"), st.sampled_from(_KEYS), st.integers(0, 700)),
    st.tuples(st.just("origin"), st.sampled_from(_KEYS), st.sampled_from(_ORIGINS)),
    st.tuples(
        st.just("both"), st.sampled_from(_KEYS), st.integers(0, 700), st.sampled_from(_ORIGINS)
    ),
    st.tuples(st.just("other"), st.sampled_from(_KEYS), st.integers(0, 1)),
    st.tuples(st.just("same"), st.sampled_from(_KEYS)),
    st.tuples(st.just("delete"), st.sampled_from(_KEYS)),
    st.tuples(st.just("retag"), st.sampled_from(_ORIGINS), st.sampled_from(_ORIGINS)),
    st.tuples(st.just("purge"), st.integers(0, 700)),
)

_UPSERT = (
    "INSERT INTO _fieldsync_records (tbl, pk, seq, origin, deleted, vals, vers, scope, "
    "parent) VALUES (?, ?, ?, ?, ?, '{}', '{}', ?, NULL) ON CONFLICT (tbl, pk) DO UPDATE SET "
    "seq = excluded.seq, origin = excluded.origin, deleted = excluded.deleted, "
    "vals = excluded.vals, vers = excluded.vers, scope = excluded.scope, "
    "parent = excluded.parent"
)
_WHERE = " WHERE tbl = ? AND pk = ?"


def _statements(ops: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
    """The writes ``ops`` stand for, kept valid: a seq taken by another record moves on
    to the next free one (seq is unique), so both databases take every statement."""
    records: dict[tuple[str, str], tuple[int, int]] = {}  # key -> (seq, deleted)

    def free(key: tuple[str, str], seq: int) -> int:
        taken = {s for k, (s, _) in records.items() if k != key}
        while seq in taken:
            seq += 1
        return seq

    for kind, *args in ops:
        key = args[0]
        if kind == "upsert":
            _, seq, origin, deleted = args
            records[key] = (free(key, seq), deleted)
            yield _UPSERT, [*key, records[key][0], origin, deleted, f"s{deleted}"]
        elif kind == "purge":  # compaction: tombstones below a seq, several rows at once
            records = {k: (s, d) for k, (s, d) in records.items() if not (d and s < key)}
            yield "DELETE FROM _fieldsync_records WHERE seq < ? AND deleted = 1", [key]
        elif kind == "retag":  # several rows at once
            sql = "UPDATE _fieldsync_records SET origin = ? WHERE coalesce(origin, '') = ?"
            yield sql, [args[1], key or ""]
        elif key not in records:
            continue
        elif kind == "seq":
            records[key] = (free(key, args[1]), records[key][1])
            yield "UPDATE _fieldsync_records SET seq = ?" + _WHERE, [records[key][0], *key]
        elif kind == "origin":
            yield "UPDATE _fieldsync_records SET origin = ?" + _WHERE, [args[1], *key]
        elif kind == "both":
            records[key] = (free(key, args[1]), records[key][1])
            sql = "UPDATE _fieldsync_records SET seq = ?, origin = ?" + _WHERE
            yield sql, [records[key][0], args[2], *key]
        elif kind == "other":  # deleted, scope and values: not counted
            records[key] = (records[key][0], args[1])
            sql = "UPDATE _fieldsync_records SET deleted = ?, scope = 'x', vals = '[]'" + _WHERE
            yield sql, [args[1], *key]
        elif kind == "same":  # seq and origin set to what they are
            yield "UPDATE _fieldsync_records SET seq = seq, origin = origin" + _WHERE, [*key]
        elif kind == "delete":
            del records[key]
            yield "DELETE FROM _fieldsync_records" + _WHERE, [*key]


def _apply(
    sqlite: sqlite3.Connection, pg: psycopg.Connection[Any], ops: list[tuple[Any, ...]]
) -> None:
    sqlite.execute("BEGIN")  # one commit (fsync) for the lot
    for sql, parameters in _statements(ops):
        sqlite.execute(sql, parameters)
        pg.execute(sql.replace("?", "%s"), parameters)
    sqlite.execute("COMMIT")


def _counts(conn: Any) -> list[tuple[int, str, int]]:
    rows = conn.execute("SELECT bucket, origin, n FROM _fieldsync_seq_counts").fetchall()
    return sorted(tuple(row) for row in rows)


@pytest.fixture
def both(
    hub_db: sqlite3.Connection, pg: psycopg.Connection[Any]
) -> tuple[sqlite3.Connection, psycopg.Connection[Any]]:
    create_layout(pg)
    return hub_db, pg


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_op, max_size=40))
def test_seq_counts_as_sqlites(
    both: tuple[sqlite3.Connection, psycopg.Connection[Any]], ops: list[tuple[Any, ...]]
) -> None:
    sqlite, pg = both
    for conn in both:  # each example from empty (TRUNCATE fires no trigger)
        conn.execute("DELETE FROM _fieldsync_records")
        conn.execute("DELETE FROM _fieldsync_seq_counts")
    _apply(sqlite, pg, ops)
    assert _counts(pg) == _counts(sqlite)


def _random_ops(rng: random.Random, count: int) -> list[tuple[Any, ...]]:
    """``count`` writes of every kind the property test draws, on more records."""
    keys = [(tbl, f'["{n}"]') for tbl in ("cases", "visits") for n in range(40)]

    def seq() -> int:
        return rng.randrange(2000)

    kinds: dict[str, Callable[[], tuple[Any, ...]]] = {
        "upsert": lambda: (rng.choice(keys), seq(), rng.choice(_ORIGINS), rng.randrange(2)),
        "seq": lambda: (rng.choice(keys), seq()),
        "origin": lambda: (rng.choice(keys), rng.choice(_ORIGINS)),
        "both": lambda: (rng.choice(keys), seq(), rng.choice(_ORIGINS)),
        "other": lambda: (rng.choice(keys), rng.randrange(2)),
        "same": lambda: (rng.choice(keys),),
        "delete": lambda: (rng.choice(keys),),
        "retag": lambda: (rng.choice(_ORIGINS), rng.choice(_ORIGINS)),
        "purge": lambda: (seq(),),
    }
    weights = [8, 3, 3, 2, 2, 1, 2, 1, 1]
    return [(kind, *kinds[kind]()) for kind in rng.choices(list(kinds), weights, k=count)]


@pytest.mark.parametrize("seed", range(3))
def test_seq_counts_as_sqlites_long_run(
    both: tuple[sqlite3.Connection, psycopg.Connection[Any]], seed: int
) -> None:
    """Many records over many runs of seqs, longer than the property test's lists."""
    sqlite, pg = both
    _apply(sqlite, pg, _random_ops(random.Random(seed), 1500))
    counts = _counts(sqlite)
    assert len(counts) > 20 and any(n == 0 for _, _, n in counts)  # a real mix
    assert _counts(pg) == counts


# -- (3) steps: once each, in order -----------------------------------------------------


def _catalog(conn: psycopg.Connection[Any]) -> list[Any]:
    """Every object of the public schema with its definition, and the layout row."""
    objects = conn.execute(
        "SELECT c.relname, c.relkind, pg_get_indexdef(c.oid), "
        "array(SELECT (a.attname, format_type(a.atttypid, a.atttypmod)) FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum > 0 ORDER BY a.attnum)::text "
        "FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1"
    ).fetchall()
    functions = conn.execute(
        "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
    ).fetchall()
    triggers = conn.execute(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"
    ).fetchall()
    meta = conn.execute("SELECT key, value FROM _fieldsync_meta ORDER BY key").fetchall()
    return [objects, functions, triggers, meta]


def test_a_second_run_changes_nothing(pg: psycopg.Connection[Any]) -> None:
    assert upgrade_layout(pg) == len(layout.STEPS)
    pg.execute("INSERT INTO _fieldsync_meta VALUES ('seq', '7')")
    before = _catalog(pg)
    create_layout(pg)
    assert upgrade_layout(pg) == 0
    assert _catalog(pg) == before


def test_an_appended_step_runs_once(
    pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later step is one function appended to STEPS: a database at the step before
    takes it once, and records its number."""
    create_layout(pg)
    ran = []

    def later(conn: psycopg.Connection[Any]) -> None:
        ran.append(layout_version(conn))
        conn.execute("ALTER TABLE _fieldsync_nodes ADD COLUMN later bigint")

    monkeypatch.setattr(layout, "STEPS", [*layout.STEPS, (len(MIGRATIONS) + 1, later)])
    assert upgrade_layout(pg) == 1
    assert upgrade_layout(pg) == 0
    assert ran == [len(MIGRATIONS)]
    assert layout_version(pg) == len(MIGRATIONS) + 1


def test_a_failed_step_leaves_nothing(
    pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(conn: psycopg.Connection[Any]) -> None:
        conn.execute("ALTER TABLE _fieldsync_nodes ADD COLUMN later bigint")
        conn.execute("SELECT 1 / 0")

    monkeypatch.setattr(layout, "STEPS", [*layout.STEPS, (len(MIGRATIONS) + 1, broken)])
    with pytest.raises(psycopg.errors.DivisionByZero):
        upgrade_layout(pg)
    assert pg.execute("SELECT to_regclass('_fieldsync_meta')").fetchone() == (None,)


def test_a_newer_layout_is_refused(pg: psycopg.Connection[Any]) -> None:
    create_layout(pg)
    pg.execute("UPDATE _fieldsync_meta SET value = '99' WHERE key = 'layout'")
    with pytest.raises(FieldsyncError, match="layout version 99, newer than"):
        upgrade_layout(pg)


def test_hub_tables_without_a_version_are_refused(pg: psycopg.Connection[Any]) -> None:
    pg.execute("CREATE TABLE _fieldsync_records (tbl text)")
    with pytest.raises(FieldsyncError, match=r"fieldsync tables \(_fieldsync_records\)"):
        create_layout(pg)
    pg.execute("CREATE TABLE _fieldsync_meta (key text, value text)")
    with pytest.raises(FieldsyncError, match="no layout version"):
        create_layout(pg)


# -- (4) identity columns ---------------------------------------------------------------


def test_ids_rise_when_the_insert_gives_none(pg: psycopg.Connection[Any]) -> None:
    create_layout(pg)
    audit = [
        pg.execute(
            "INSERT INTO _fieldsync_audit (at, actor, source, action, target, detail) "
            "VALUES ('t', 'a', 'cli', 'x', 'y', '{}') RETURNING id"
        ).fetchone()[0]
        for _ in range(3)
    ]
    conflicts = [
        pg.execute(
            "INSERT INTO _fieldsync_conflicts (created_at, tbl, pk, kind, other_version, "
            "other_node, status, state_after) VALUES ('t', 'cases', '[1]', 'column', 'v', "
            "'north', 'open', '{}') RETURNING id, changed"
        ).fetchone()
        for _ in range(3)
    ]
    assert audit == [1, 2, 3]
    assert conflicts == [(1, 0), (2, 0), (3, 0)]
    # read by position as hub/conflicts.py does: `changed` last
    assert pg.execute("SELECT * FROM _fieldsync_conflicts WHERE id = 3").fetchone()[18] == 0
    history = pg.execute(
        "INSERT INTO _fieldsync_history (prev, tbl, pk, actor, ts, op, at) "
        "VALUES (NULL, 'cases', '[1]', 'north', '1', 'insert', 't') RETURNING seq"
    ).fetchone()
    assert history == (1,)


# -- the overridden-entries index ----------------------------------------------------


def test_the_overridden_index_selects_as_sqlites(
    hub_db: sqlite3.Connection, pg: psycopg.Connection[Any]
) -> None:
    """The partial index's condition says on PostgreSQL what json_extract says on
    SQLite, and a query repeating it (the PostgreSQL dialect's json_field) uses it."""
    create_layout(pg)
    resolutions = [None, '{"keep": "kept"}', '{"keep": "other"}', '{"keep": "value", "value": 1}']
    resolutions += ['{"other": 1}', '["kept"]', '"kept"', '{"keep": 1}', '{"keep": null}']
    insert = (
        "INSERT INTO _fieldsync_conflicts (created_at, tbl, pk, kind, other_version, "
        "other_node, status, state_after, kept_node, resolution, changed) "
        "VALUES ('t', 'cases', '[1]', 'column', 'v', 'north', ?, '{}', 'south', ?, ?)"
    )
    for number, (status, resolution) in enumerate(
        itertools.product(["open", "resolved"], resolutions)
    ):
        hub_db.execute(insert, [status, resolution, number])
        pg.execute(insert.replace("?", "%s"), [status, resolution, number])
    sqlite_sql = (
        "SELECT changed FROM _fieldsync_conflicts WHERE kept_node = 'south' AND status = "
        "'resolved' AND json_extract(resolution, '$.keep') != 'kept' ORDER BY changed"
    )
    pg_sql = sqlite_sql.replace(
        "json_extract(resolution, '$.keep') != 'kept'", "(resolution::json ->> 'keep') <> 'kept'"
    )
    assert pg.execute(pg_sql).fetchall() == hub_db.execute(sqlite_sql).fetchall()
    pg.execute("SET enable_seqscan = off")
    plan = "\n".join(row[0] for row in pg.execute(f"EXPLAIN {pg_sql}"))
    assert "_fieldsync_conflicts_overridden" in plan
