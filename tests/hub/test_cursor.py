"""A pull cursor never skips a record, however many processes write at once.

The trap: with concurrent write transactions, a higher ``seq`` can commit (and be
read) before a lower one; a puller whose cursor moves past it never sees the lower
one. The harness below pushes new records from many threads through several stores
on one database (as several workers would), widens the window between handing out
seq numbers and committing them, and has pullers follow the cursor as offices do.
It is first shown to catch the trap on a naive counter (a sequence read by
``seq > cursor`` while transactions commit in any order), then run on the hub.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from hub.store import SqlHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change

PUSHERS = 6
BATCHES = 25
PER_BATCH = 5
PULLERS = 3
STORES = 3


def _follow(pull: Callable[[int], tuple[list[str], int, bool]], done: threading.Event) -> set[str]:
    """Follow the cursor as an office does until the pushers are done and nothing is
    left: every key seen."""
    seen: set[str] = set()
    cursor = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = done.is_set()
        keys, cursor, more = pull(cursor)
        seen.update(keys)
        if finished and not more:
            return seen
        if not more:
            time.sleep(0.002)
    raise AssertionError("the puller did not drain within 60 s")


def _run(
    push: Callable[[int, list[str]], None],
    pull: Callable[[int], tuple[list[str], int, bool]],
) -> tuple[set[str], list[set[str]]]:
    """Push ``PUSHERS * BATCHES`` batches of new keys while ``PULLERS`` follow."""
    pushed: set[str] = set()
    lock = threading.Lock()
    done = threading.Event()
    seen: list[set[str]] = []
    errors: list[BaseException] = []

    def pusher(n: int) -> None:
        try:
            for b in range(BATCHES):
                keys = [f"p{n}-b{b}-{i}" for i in range(PER_BATCH)]
                push(n, keys)
                with lock:
                    pushed.update(keys)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def puller() -> None:
        try:
            seen.append(_follow(pull, done))
        except BaseException as exc:
            errors.append(exc)

    pullers = [threading.Thread(target=puller) for _ in range(PULLERS)]
    pushers = [threading.Thread(target=pusher, args=(n,)) for n in range(PUSHERS)]
    for thread in pullers + pushers:
        thread.start()
    for thread in pushers:
        thread.join(timeout=120)
    done.set()
    for thread in pullers:
        thread.join(timeout=120)
    assert not errors, errors
    return pushed, seen


def _widen(rng: random.Random) -> None:
    time.sleep(rng.random() * 0.003)


def test_the_harness_catches_a_cursor_passing_a_record_still_to_commit(pg_url: str) -> None:
    # The naive design: a sequence hands out numbers at insert, transactions commit
    # when they are done; pulls read `seq > cursor` and move to the highest seen.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE naive (seq bigserial PRIMARY KEY, key text NOT NULL)")
    rng = random.Random(7)
    local = threading.local()
    opened: list[psycopg.Connection[Any]] = []

    def connection() -> psycopg.Connection[Any]:
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(pg_url, autocommit=True)
            opened.append(local.conn)
        conn: psycopg.Connection[Any] = local.conn
        return conn

    def push(_: int, keys: list[str]) -> None:
        conn = connection()
        with conn.transaction():
            for key in keys:
                conn.execute("INSERT INTO naive (key) VALUES (%s)", [key])
            _widen(rng)

    def pull(cursor: int) -> tuple[list[str], int, bool]:
        rows = (
            connection()
            .execute("SELECT seq, key FROM naive WHERE seq > %s ORDER BY seq LIMIT 50", [cursor])
            .fetchall()
        )
        return [key for _, key in rows], (rows[-1][0] if rows else cursor), len(rows) == 50

    try:
        pushed, seen = _run(push, pull)
    finally:
        for conn in opened:
            conn.close()
    missed = [len(pushed - one) for one in seen]
    assert any(n > 0 for n in missed), "the naive cursor missed nothing: the harness is blind"


def test_no_puller_misses_a_record_with_several_stores_writing(engine: Any, tmp_path: Any) -> None:
    db = engine.db(tmp_path)
    stores: list[SqlHubStore] = [open_store(db) for _ in range(STORES)]
    try:
        offices = [f"office{n}" for n in range(PUSHERS)]
        for name in [*offices, "hq"]:
            stores[0].add_node(name)
            stores[0].set_scopes(name, ["*"])
        rng = random.Random(11)
        for store in stores:
            store.database.before_commit = lambda: _widen(rng)
        numbers = [0] * PUSHERS

        def push(n: int, keys: list[str]) -> None:
            stamp = Timestamp(now_ms() << COUNTER_BITS, offices[n])
            changes = []
            for key in keys:
                numbers[n] += 1
                changes.append(
                    Change(numbers[n], "cases", {"id": key}, "insert", stamp, {"id": key})
                )
            result = rng.choice(stores).push(offices[n], changes)
            assert result.acked == numbers[n]

        def pull(cursor: int) -> tuple[list[str], int, bool]:
            page = rng.choice(stores).pull("hq", cursor, 50)
            return [row.pk["id"] for row in page.rows], page.cursor, page.more

        pushed, seen = _run(push, pull)
        assert len(pushed) == PUSHERS * BATCHES * PER_BATCH
        assert [len(pushed - one) for one in seen] == [0] * PULLERS
    finally:
        for store in stores:
            store.close()
