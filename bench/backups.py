"""
Backups and the retention window, measured (README "Backups and restores").

    .venv/bin/python bench/backups.py wait [N]   # pushes during `hub backup` of N records
    .venv/bin/python bench/backups.py keep [N]   # an office's push of N changes, in process

``wait``: a hub of N records (default 100,000), one office pushing 10 changes every
5 ms through the store (as the web layer does), and `fieldsync hub backup` run as a
subprocess: how long each push took before and during the backup.

``keep``: N inserts (default 20,000) at an office pushed to a hub in this process (no
HTTP): the office's push time and the part spent acknowledging (where acknowledged
changes are kept), and the bytes kept per change. Run it with PYTHONPATH set to
another tree to compare (the code measured is whatever ``node`` imports).
"""

from __future__ import annotations

import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hub.store import SqliteHubStore
from node.agent import SyncAgent, SyncReport
from node.client import HubClock
from node.store import NodeStore
from shared.clock import Timestamp, now_ms
from shared.protocol import Change


def _changes(node: str, start: int, n: int) -> list[Change]:
    found = []
    for i in range(start, start + n):
        values = {
            "id": f"{node}{i:07d}",
            "family_name": f"Name{i % 977}",
            "given_name": f"G{i % 311}",
            "status": "asylum_seeker",
            "household_size": i % 9 + 1,
            "registered_on": "2024-01-01",
            "office": None,
            "notes": f"note {i * 7919 % 100003}",
        }
        stamp = Timestamp((now_ms() << 16) + i % 60000, node)
        found.append(Change(i + 1, "cases", {"id": values["id"]}, "insert", stamp, values, {}))
    return found


def _ms(times: list[float]) -> str:
    ordered = sorted(times)
    return (
        f"n={len(times)}, median {statistics.median(times) * 1000:.1f} ms, "
        f"p99 {ordered[int(len(ordered) * 0.99)] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


def wait(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hub.db"
        hub = SqliteHubStore(path)
        for name in ("a", "b"):
            hub.add_node(name)
            hub.set_scopes(name, ["*"])
        for start in range(0, n, 5000):
            hub.push("a", _changes("a", start, min(5000, n - start)))
        took: list[tuple[float, float]] = []
        stop = threading.Event()

        def push() -> None:
            seq = 0
            while not stop.is_set():
                batch = _changes("b", seq, 10)
                seq += 10
                begun = time.perf_counter()
                hub.push("b", batch)
                took.append((begun, time.perf_counter() - begun))
                time.sleep(0.005)

        pusher = threading.Thread(target=push)
        pusher.start()
        time.sleep(3)
        began = time.perf_counter()
        fieldsync = Path(sys.executable).with_name("fieldsync")
        out = subprocess.run(
            [fieldsync, "hub", "backup", "--db", path, Path(tmp) / "copy.db"],
            capture_output=True,
            text=True,
            check=True,
        )
        ended = time.perf_counter()
        time.sleep(1)
        stop.set()
        pusher.join()
        hub.close()
    print(out.stdout.strip())
    print(f"hub backup: {ended - began:.2f} s, process start included")
    print("a push of 10 changes before:", _ms([t for at, t in took if at < began]))
    print("a push of 10 changes during:", _ms([t for at, t in took if began <= at <= ended]))


class _InProcess:
    """The hub's store behind the office's client interface, in this process."""

    def __init__(self, hub: SqliteHubStore, node: str) -> None:
        self.hub, self.node = hub, node

    def prepare_push(self, changes: Any) -> bytes:
        return b""

    def push(self, changes: Any, body: bytes | None = None) -> Any:
        return self.hub.push(self.node, changes)

    def hub_time(self) -> HubClock:
        return HubClock(now_ms(), self.hub.acked(self.node))


def keep(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hub = SqliteHubStore(Path(tmp) / "hub.db")
        token = hub.add_node("a")
        hub.set_scopes("a", ["*"])
        store = NodeStore.init(Path(tmp) / "a.db", "a", "http://127.0.0.1:1", token)
        with sqlite3.connect(Path(tmp) / "a.db") as conn:
            conn.executemany(
                "INSERT INTO cases (id, family_name, given_name, status, household_size, "
                "registered_on, notes) VALUES (?, ?, ?, 'asylum_seeker', ?, '2024-01-01', ?)",
                [
                    (str(uuid.uuid4()), secrets.token_hex(5), secrets.token_hex(4), i % 9, f"n{i}")
                    for i in range(n)
                ],
            )
        conn.close()
        agent = SyncAgent(store, _InProcess(hub, "a"))  # type: ignore[arg-type]
        acking = 0.0
        mark_acked = store.mark_acked

        def timed(*args: Any) -> None:
            nonlocal acking
            begun = time.perf_counter()
            mark_acked(*args)
            acking += time.perf_counter() - begun

        store.mark_acked = timed  # type: ignore[method-assign]
        begun = time.perf_counter()
        agent._push_all(SyncReport(), lambda *_: None)
        total = time.perf_counter() - begun
        assert store.pending_count() == 0
        try:
            kept, count = store.db.conn.execute(
                "SELECT total(length(changes)), total(count) FROM _fieldsync_sent"
            ).fetchone()
        except sqlite3.Error:  # code from before acknowledged changes were kept
            kept, count = 0, 1
        store.close()
        hub.close()
    print(
        f"push of {n} changes: {total:.3f} s, acknowledging {acking:.3f} s, "
        f"kept {kept / max(count, 1):.1f} bytes a change"
    )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "wait"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else (100_000 if what == "wait" else 20_000)
    {"wait": wait, "keep": keep}[what](size)
