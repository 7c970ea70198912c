"""Each office's lag read from the counts the triggers keep (hub/status.py: ``lags``)
equals the per-office count it replaces, on random pushes, deletes and cursors."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hub.migrations import LAG_BUCKET, MIGRATIONS
from hub.status import lags
from hub.store import SqlHubStore, SqliteHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change
from tests.engines import Engine

OFFICES = ["almaty", "astana", "bishkek", "osh"]


def counted(conn: Any, office: str, cursor: int) -> int:
    """The lag as hub/status.py counted it before: one count per office."""
    return int(
        conn.execute(
            "SELECT count(*) FROM _fieldsync_records "
            "WHERE seq > ? AND (origin IS NULL OR origin != ?)",
            [cursor, office],
        ).fetchone()[0]
    )


def random_history(store: SqlHubStore, rng: random.Random, steps: int) -> None:
    """Inserts, edits and deletes of a few hundred cases by random offices, records
    moved by an admin (no origin) and dropped as a purge drops them."""
    numbers = dict.fromkeys(OFFICES, 0)
    tick = 0
    for _ in range(steps):
        office = rng.choice(OFFICES)
        changes = []
        for _ in range(rng.randint(1, 40)):
            case = f"c{rng.randrange(300)}"
            numbers[office] += 1
            tick += 1
            stamp = Timestamp((now_ms() << COUNTER_BITS) + tick, office)
            state = store.record_state("cases", {"id": case})
            if state is None:
                values = {"id": case, "office": office, "notes": "new"}
                change = Change(numbers[office], "cases", {"id": case}, "insert", stamp, values, {})
            elif rng.random() < 0.2:
                versions = dict(state.versions)
                change = Change(
                    numbers[office], "cases", {"id": case}, "delete", stamp, None, versions
                )
            else:
                notes = {"notes": f"n{tick}"}
                change = Change(
                    numbers[office],
                    "cases",
                    {"id": case},
                    "update",
                    stamp,
                    notes,
                    dict(state.versions),
                )
            changes.append(change)
            store.push(office, changes)
            changes = []
        if rng.random() < 0.1:  # a move by an admin, as hub/scopes.py writes it
            with store.database.write() as conn:
                conn.execute(
                    "UPDATE _fieldsync_meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
                    "WHERE key = 'seq'"
                )
                conn.execute(
                    "UPDATE _fieldsync_records SET origin = NULL, "
                    "seq = (SELECT CAST(value AS BIGINT) FROM _fieldsync_meta WHERE key = 'seq') "
                    "WHERE (tbl, pk) IN "
                    "(SELECT tbl, pk FROM _fieldsync_records ORDER BY random() LIMIT 1)"
                )
        if rng.random() < 0.1:  # a purge, as hub/compact.py deletes records
            with store.database.write() as conn:
                conn.execute(
                    "DELETE FROM _fieldsync_records WHERE (tbl, pk) IN "
                    "(SELECT tbl, pk FROM _fieldsync_records ORDER BY random() LIMIT 5)"
                )


@pytest.mark.parametrize("seed", range(4))
def test_lags_equal_the_per_office_count_on_random_data(
    tmp_path: Path, seed: int, engine: Engine
) -> None:
    # PostgreSQL reads the cursors' runs for many offices in one statement.
    rng = random.Random(seed)
    with open_store(engine.db(tmp_path)) as store:
        for office in OFFICES:
            store.add_node(office)
            store.set_scopes(office, ["*"])
        random_history(store, rng, 60)
        with store.database.snapshot() as conn:
            last = conn.execute("SELECT max(seq) FROM _fieldsync_records").fetchone()[0]
            assert last > 3 * LAG_BUCKET  # several runs of seqs
            for _ in range(50):
                cursors = {o: rng.choice([0, last, rng.randrange(last + 5)]) for o in OFFICES}
                expected = {o: counted(conn, o, c) for o, c in cursors.items()}
                assert lags(conn, cursors) == expected
        # And as every view reads them: each office's own cursor.
        with store.database.write() as conn:
            for office in OFFICES:
                conn.execute(
                    "UPDATE _fieldsync_office_stats SET pulled_seq = ? WHERE node = ?",
                    [rng.randrange(last), office],
                )
        with store.database.snapshot() as conn:
            stats = dict(conn.execute("SELECT node, pulled_seq FROM _fieldsync_office_stats"))
            expected = {o: counted(conn, o, stats[o]) for o in OFFICES}
        assert {o.name: o.lag for o in store.offices()} == expected


def test_a_hub_from_before_the_counts_counts_its_records_once(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with SqliteHubStore(path) as store:
        for office in OFFICES:
            store.add_node(office)
            store.set_scopes(office, ["*"])
        random_history(store, random.Random(7), 20)
    raw = sqlite3.connect(path)
    try:  # as the layout before: no counts, no triggers
        for name in ("insert", "update", "delete"):
            raw.execute(f"DROP TRIGGER _fieldsync_seq_counts_{name}")
        raw.execute("DROP TABLE _fieldsync_seq_counts")
        step = next(i for i, f in enumerate(MIGRATIONS) if f.__name__ == "_seq_counts")
        raw.execute(f"PRAGMA user_version = {step}")
        raw.commit()
    finally:
        raw.close()
    with SqliteHubStore(path) as store, store.database.snapshot() as conn:
        cursors = dict.fromkeys(OFFICES, 0) | {"osh": 100}
        assert lags(conn, cursors) == {o: counted(conn, o, c) for o, c in cursors.items()}
