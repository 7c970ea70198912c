"""
Life-cycle benchmark: database sizes after many updates, before and after compaction,
and what an office offline across a purge pulls to come back.

    .venv/bin/python bench/lifecycle.py                      # 1,000,000 updates, 10,000 records
    .venv/bin/python bench/lifecycle.py --records 1000 --updates 20000   # quick (< 1 min)

A real hub (``fieldsync hub serve`` in a subprocess on 127.0.0.1) and three offices
driven in this process (``SyncAgent.sync_once()`` with ``HttpHubClient``, as
``fieldsync node sync`` builds them), every office holding every record:

1. office A inserts ``--records`` cases; A, B and C sync. C then goes offline.
2. update rounds: A, then B, in turn updates every record once (household size and
   notes) in one transaction and syncs; the other office syncs to pull it. Rounds go on
   until ``--updates`` updates are made.
3. A deletes ``--delete-share`` of the records; A and B sync (twice: the hub knows an
   office has a page once it pulls after it).
4. sizes; then ``hub compact`` (hub/compact.py, in this process, on the served file) as
   if 91 days had passed: the tombstones are older than the 90-day maximum, so they are
   purged although C has not pulled them, and C is marked to resync. History kept by
   the default (365 days), then by 1 version per record; each followed by VACUUM.
5. ``node compact`` of A and B (as if 91 days had passed) and VACUUM.
6. C comes back: its sync is a full resync of its scope: its time, the records pulled
   and the bytes received (HTTP bodies as sent, gzip); C must end with exactly A's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench import Hub, case_rows, check_same, close_agent, fill, open_db, progress
from hub.compact import Keep, compact
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.compact import compact_node
from node.store import NodeStore

OFFICES = ("astana", "almaty", "shymkent")  # A and B update, C goes offline
LATER = timedelta(days=91)


class CountingTransport(httpx.HTTPTransport):
    """Counts the bytes of response bodies as they come off the wire."""

    received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        stream = response.stream
        transport = self

        class Counted(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in stream:  # type: ignore[union-attr]
                    transport.received += len(chunk)
                    yield chunk

            def close(self) -> None:
                stream.close()  # type: ignore[union-attr]

        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=Counted(),
            extensions=response.extensions,
        )


def agent(path: Path, transport: httpx.HTTPTransport | None = None) -> SyncAgent:
    store = NodeStore(path)
    client = httpx.Client(transport=transport or httpx.HTTPTransport(), timeout=600)
    return SyncAgent(
        store, HttpHubClient(store.hub_url, store.token, client=client, node=store.node)
    )


def size(path: Path) -> int:
    """The file's size once its write-ahead log is checkpointed into it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {
            name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            for name in ("_fieldsync_records", "_fieldsync_history")
        }
    finally:
        conn.close()


def largest(path: Path, count: int = 4) -> dict[str, int]:
    """The largest tables and indexes of a database, in bytes (SQLite's dbstat)."""
    conn = sqlite3.connect(path)
    try:
        return dict(
            conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT ?",
                [count],
            ).fetchall()
        )
    except sqlite3.OperationalError:  # an SQLite built without dbstat
        return {}
    finally:
        conn.close()


def update_round(path: Path, ids: Sequence[str], round_no: int) -> None:
    conn = open_db(path)
    try:
        note = f"Round {round_no}: reviewed, household confirmed."
        conn.execute("BEGIN")
        conn.executemany(
            "UPDATE cases SET household_size = ?, notes = ? WHERE id = ?",
            [((round_no + i) % 9 + 1, note, key) for i, key in enumerate(ids)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def run(
    records: int, updates: int, delete_share: float, seed: int, workdir: Path
) -> dict[str, Any]:
    a, b, c = OFFICES
    hub = Hub(workdir / "hub", OFFICES)
    hub_path = workdir / "hub" / "hub.db"
    out: dict[str, Any] = {"records": records, "updates": updates}
    try:
        paths = {name: workdir / f"{name}.db" for name in OFFICES}
        for name, path in paths.items():
            NodeStore.init(path, name, hub.url, hub.tokens[name]).close()
        fill(paths[a], case_rows(records, seed))
        agents = {name: agent(path) for name, path in paths.items()}
        try:
            with hub.blamed("the first syncs"):
                for name in OFFICES:
                    agents[name].sync_once()
            close_agent(agents.pop(c))  # C goes offline, holding every record
            conn = sqlite3.connect(paths[a])
            ids = [row[0] for row in conn.execute("SELECT id FROM cases ORDER BY id")]
            conn.close()
            started = time.monotonic()
            done = round_no = 0
            while done < updates:
                writer, reader = (a, b) if round_no % 2 == 0 else (b, a)
                chunk = ids[: updates - done]
                update_round(paths[writer], chunk, round_no)
                with hub.blamed(f"round {round_no}"):
                    agents[writer].sync_once()
                    agents[reader].sync_once()
                done += len(chunk)
                round_no += 1
                if round_no % 10 == 0:
                    progress(f"{done:,} updates synced ({time.monotonic() - started:.0f} s)")
            out["update_seconds"] = round(time.monotonic() - started, 1)
            doomed = ids[:: max(1, round(1 / delete_share))] if delete_share else []
            conn = open_db(paths[a])
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM cases WHERE id = ?", [(k,) for k in doomed])
            conn.execute("COMMIT")
            conn.close()
            with hub.blamed("the deletes"):
                # Twice: the hub learns an office has a page when it pulls after it.
                for _ in range(2):
                    agents[a].sync_once()
                    agents[b].sync_once()
            out["deleted"] = len(doomed)
        finally:
            for each in agents.values():
                close_agent(each)
        out["sizes_before"] = {"hub": size(hub_path), **{n: size(p) for n, p in paths.items()}}
        out["rows_before"] = counts(hub_path)
        out["largest_before"] = largest(hub_path)
        progress(f"before compaction: {out['sizes_before']}")
        later = datetime.now(UTC) + LATER
        with SqliteHubStore(hub_path, create=False) as store:
            for label, keep in (("default (365 days)", Keep()), ("1 version", Keep(None, 1))):
                result = compact(store.database, keep=keep, now=later)
                began = time.monotonic()
                compact(store.database, keep=keep, now=later, vacuum=True)
                vacuum_s = time.monotonic() - began
                store.database.checkpointer.poke()
                entry = {
                    **result.to_json(),
                    "vacuum_seconds": round(vacuum_s, 1),
                    "hub_size_after": size(hub_path),
                    "rows_after": counts(hub_path),
                    "largest_after": largest(hub_path),
                }
                out.setdefault("hub_compactions", {})[label] = entry
                progress(f"hub compact, history kept {label}: {entry}")
        out["offices_after"] = {}
        for name in (a, b):
            with NodeStore(paths[name]) as store:
                now_ms = int(later.timestamp() * 1000)
                node = compact_node(store.db, store.schema, store.path, vacuum=True, now_ms=now_ms)
            out["offices_after"][name] = {
                "versions_dropped": node.versions,
                "size": size(paths[name]),
            }
        # C comes back: one sync, which the hub answers with a resync of its scope.
        counting = CountingTransport()
        back = agent(paths[c], counting)
        try:
            began = time.monotonic()
            with hub.blamed("C's resync"):
                report = back.sync_once()
            seconds = time.monotonic() - began
        finally:
            close_agent(back)
        check_same(paths[a], paths[c], records - out["deleted"])
        out["resync"] = {
            "seconds": round(seconds, 2),
            "records_pulled": report.pulled,
            "bytes_received": counting.received,
            "records_held_after": records - out["deleted"],
            "size_after": size(paths[c]),
        }
        progress(f"C's resync: {out['resync']}")
    finally:
        hub.stop()
    return out


def table(result: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    before = result["sizes_before"]
    a, b, c = OFFICES
    lines = [
        f"{result['records']:,} records, {result['updates']:,} updates "
        f"({result['update_seconds']} s), {result['deleted']:,} deleted",
        "",
        "| database | before | after |",
        "| --- | --- | --- |",
    ]
    for label, entry in result["hub_compactions"].items():
        lines.append(
            f"| hub, history kept {label} | {mb(before['hub'])} "
            f"({result['rows_before']['_fieldsync_history']:,} versions) | "
            f"{mb(entry['hub_size_after'])} ({entry['rows_after']['_fieldsync_history']:,} "
            f"versions; purged {entry['tombstones']:,} tombstones, {entry['versions']:,} "
            f"versions in {entry['seconds']} s, longest lock {entry['longest_lock_ms']} ms "
            f"{entry['locks_ms']}; "
            f"VACUUM {entry['vacuum_seconds']} s; to resync: {', '.join(entry['resync']) or '-'}) |"
        )
    for name in (a, b):
        after = result["offices_after"][name]
        lines.append(
            f"| office {name} | {mb(before[name])} | {mb(after['size'])} "
            f"({after['versions_dropped']:,} deleted records' versions dropped) |"
        )
    resync = result["resync"]
    lines.append(
        f"| office {c} (offline across the purge) | {mb(before[c])} | {mb(resync['size_after'])} |"
    )
    lines += [
        "",
        f"Resync of {c}: {resync['seconds']} s, {resync['records_pulled']:,} records pulled, "
        f"{resync['bytes_received']:,} bytes received; holds {resync['records_held_after']:,}.",
    ]
    for label, found in [("before", result["largest_before"])] + [
        (f"after, history kept {label}", entry["largest_after"])
        for label, entry in result["hub_compactions"].items()
    ]:
        lines.append(
            f"Largest in the hub {label}: " + ", ".join(f"{k} {mb(v)}" for k, v in found.items())
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--delete-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--tmpdir", help="Work here (default: a temporary directory).")
    parser.add_argument("--json", action="store_true", help="Print every figure as JSON.")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-lifecycle-", dir=args.tmpdir))
    try:
        result = run(args.records, args.updates, args.delete_share, args.seed, workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
