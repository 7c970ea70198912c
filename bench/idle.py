"""
What an idle sync costs, and what the status views cost as offices multiply.

Three measurements, each on a fresh hub in a temporary directory:

- **idle**: a real ``fieldsync hub serve`` subprocess on 127.0.0.1 and ``--offices``
  offices in this process (``NodeStore.init`` + ``HttpHubClient`` + ``SyncAgent``, one
  HTTP client kept per office, as `node run` keeps it). Every office syncs twice
  (not measured: its first sync sets things up), then ``--syncs`` rounds in which
  every office syncs once with nothing to push or pull. Per idle sync: HTTP requests
  (counted by an httpx event hook on the office's client) and hub CPU (utime + stime
  of the hub process from /proc/PID/stat over the rounds, divided by the syncs).
- **views**: a hub with K offices (``--view-offices``, 100 and 500), each with 20
  reported sync events, and 20,000 cases pushed by one more office (in process,
  through ``SqliteHubStore.push``). Each office's pull cursor is then set either to
  the last record (0 behind) or to before the 20,000 (20,000 behind), with the shipped
  schema (scoped: each office holds its own name's cases) and without its scope lines
  (unscoped). The hub is served by ``fieldsync hub serve``; timed (wall, median of
  ``--view-repeat`` after one unmeasured): ``GET /metrics`` and ``GET
  /v1/admin/offices`` with an admin token, the dashboard's office list (``GET /``
  with a session cookie), and ``fieldsync hub status --db HUB`` as a subprocess
  (interpreter start-up included; ``hub status`` of a hub without offices is shown
  as the floor).
- **push**: the push path in process: 20,000 cases pushed to a fresh
  ``SqliteHubStore`` in batches of 5,000 (``process_time``, microseconds per change).

``--against DIR`` measures two trees in the same run: this script runs itself once
with ``PYTHONPATH=DIR`` (the code before, e.g. ``git archive main | tar -x -C DIR``)
and once with this tree, ``--repeat`` times alternating, and prints the medians side
by side. Without it, the tree Python imports is measured and printed (``--json``).

Run ``.venv/bin/python bench/idle.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from scopes import hub_cpu_seconds, unscoped_schema

from bench import HOST, BenchError, Hub, case_rows, fieldsync_command, fill, machine, progress
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.reports import StatusReport, SyncEvent
from shared.schema import Schema

BEHIND = 20_000
EVENTS = 20
VIEWS = ("metrics", "admin_offices", "dashboard", "hub_status")


# -- idle syncs ---------------------------------------------------------------------


def idle_run(workdir: Path, offices: int, syncs: int) -> dict[str, float]:
    names = [f"office-{i + 1:03d}" for i in range(offices)]
    hub = Hub(workdir / "hub", names, everything=False)
    agents: list[SyncAgent] = []
    requests = [0]

    def count(request: httpx.Request) -> None:
        requests[0] += 1

    try:
        for name in names:
            store = NodeStore.init(workdir / f"{name}.db", name, hub.url, hub.tokens[name])
            client = httpx.Client(timeout=60, event_hooks={"request": [count]})
            http = HttpHubClient(hub.url, hub.tokens[name], node=name, client=client)
            agent = SyncAgent(store, http)
            agent.interval_seconds = 60
            agents.append(agent)
        with hub.blamed("an idle sync"):
            for _ in range(2):
                for agent in agents:
                    agent.sync_once()
            requests[0] = 0
            cpu = hub_cpu_seconds(hub.process.pid)
            for _ in range(syncs):
                for agent in agents:
                    report = agent.sync_once()
                    if report.pushed or report.pulled:
                        raise BenchError(f"an idle sync moved something: {report.summary()}")
            cpu = hub_cpu_seconds(hub.process.pid) - cpu
    finally:
        for agent in agents:
            agent.client.close()
            agent.store.close()
        hub.stop()
    done = offices * syncs
    return {"idle_requests": requests[0] / done, "idle_hub_cpu_ms": 1000 * cpu / done}


# -- status views -------------------------------------------------------------------


def build_view_hub(workdir: Path, k: int, scoped: bool) -> tuple[Path, dict[str, str]]:
    """A hub database with ``k`` offices and BEHIND cases pushed by one more office."""
    schema = Schema.load() if scoped else unscoped_schema()
    workdir.mkdir(parents=True)
    path = workdir / "hub.db"
    names = [f"office-{i + 1:03d}" for i in range(k)]
    with SqliteHubStore(path, schema) as hub:
        for name in names:
            hub.add_node(name)
            if not scoped:
                hub.set_scopes(name, ["*"])
        token = hub.add_node("writer")
        hub.set_scopes("writer", ["*"])
        admin = hub.add_admin("bench")
        cookie, _ = hub.start_session("bench")
        writer = NodeStore.init(workdir / "writer.db", "writer", "http://x", token, schema)
        try:
            fill(workdir / "writer.db", case_rows(BEHIND, 1))
            while batch := writer.pending(5000):
                result = hub.push("writer", batch)
                writer.mark_acked(result.acked, batch, result.rejected)
        finally:
            writer.close()
        for name in names:
            events = [
                SyncEvent(i + 1, "2026-01-01T00:00:00+00:00", 0.1, "ok", 0, 0, 0, 0, 100, 100)
                for i in range(EVENTS)
            ]
            report = StatusReport(0, None, 0, 0, "bench", events=events)
            hub.record_status(name, report)
            hub.pull(name, 0, 1)  # the office has been seen
    return path, {"admin": admin, "cookie": cookie}


def set_cursors(path: Path, behind: int) -> None:
    """Every office's pull cursor ``behind`` records before the last."""
    with SqliteHubStore(path) as hub, hub.database.write() as conn:
        last = conn.execute("SELECT max(seq) FROM _fieldsync_records").fetchone()[0]
        cursor = max(0, last - behind)
        conn.execute("UPDATE _fieldsync_office_stats SET pulled_seq = ?", [cursor])
        conn.execute("UPDATE _fieldsync_nodes SET pulled_seq = ?", [cursor])


def timed(do: Any, repeat: int) -> float:
    do()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        do()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def serve(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    from bench import free_port

    port = free_port()
    process = subprocess.Popen(
        [fieldsync_command(), "hub", "serve", "--db", str(path), "--host", HOST]
        + ["--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise BenchError("the hub did not start")


def views_run(workdir: Path, sizes: Sequence[int], repeat: int) -> dict[str, float]:
    found: dict[str, float] = {}
    workdir.mkdir(parents=True)
    empty = workdir / "empty.db"
    SqliteHubStore(empty).close()
    status = [fieldsync_command(), "hub", "status", "--db"]
    found["hub_status_floor"] = timed(
        lambda: subprocess.run([*status, str(empty)], check=True, capture_output=True), repeat
    )
    for k in sizes:
        for scoped in (False, True):
            kind = "scoped" if scoped else "unscoped"
            progress(f"views: {k} offices, {kind}")
            path, secrets = build_view_hub(workdir / f"{kind}-{k}", k, scoped)
            for behind in (0, BEHIND):
                set_cursors(path, behind)
                key = f"{k}/{kind}/{behind}"
                with SqliteHubStore(path) as store:
                    found[f"offices_in_process {key}"] = timed(store.offices, repeat)
                process, url = serve(path)
                try:
                    with httpx.Client(
                        base_url=url,
                        timeout=120,
                        headers={"Authorization": f"Bearer {secrets['admin']}"},
                    ) as http:

                        def get(where: str, http: httpx.Client = http) -> None:
                            http.get(where).raise_for_status()

                        cookies = {"fieldsync_session": secrets["cookie"]}
                        with httpx.Client(base_url=url, timeout=120, cookies=cookies) as page:
                            found[f"metrics {key}"] = timed(lambda: get("/metrics"), repeat)
                            found[f"admin_offices {key}"] = timed(
                                lambda: get("/v1/admin/offices"), repeat
                            )
                            found[f"dashboard {key}"] = timed(
                                lambda page=page: page.get("/").raise_for_status(), repeat
                            )
                    found[f"hub_status {key}"] = timed(
                        lambda path=path: subprocess.run(
                            [*status, str(path)], check=True, capture_output=True
                        ),
                        repeat,
                    )
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    return found


# -- the push path ------------------------------------------------------------------


def push_run(workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True)
    with SqliteHubStore(workdir / "hub.db") as hub:
        token = hub.add_node("writer")
        hub.set_scopes("writer", ["*"])
        writer = NodeStore.init(workdir / "writer.db", "writer", "http://x", token)
        try:
            fill(workdir / "writer.db", case_rows(BEHIND, 2))
            batches = []
            after = None
            while batch := writer.pending(5000, after):
                batches.append(batch)
                after = batch
            started = time.process_time()
            for batch in batches:
                if hub.push("writer", batch).applied != len(batch):
                    raise BenchError("the hub did not apply every change")
            cpu = time.process_time() - started
        finally:
            writer.close()
    return {"push_us_per_change": 1e6 * cpu / BEHIND}


# -- running -------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, float]:
    found: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fieldsync-idle-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        if "idle" in args.only:
            progress(f"idle syncs: {args.offices} offices x {args.syncs}")
            found |= idle_run(work / "idle", args.offices, args.syncs)
        if "push" in args.only:
            progress("push path")
            found |= push_run(work / "push")
        if "views" in args.only:
            found |= views_run(work / "views", args.view_offices, args.view_repeat)
    return found


def compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    here = Path(__file__).resolve().parent.parent
    trees = {"before": Path(args.against).resolve(), "after": here}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    inner = [
        a
        for i, a in enumerate(argv)
        if not a.startswith("--against") and (i == 0 or argv[i - 1] != "--against")
    ]
    for repetition in range(args.repeat):
        order = ("before", "after") if repetition % 2 == 0 else ("after", "before")
        for which in order:
            progress(f"repetition {repetition + 1}: {which} ({trees[which]})")
            env = {**os.environ, "PYTHONPATH": str(trees[which])}
            done = subprocess.run(
                [sys.executable, __file__, *inner, "--repeat", "1", "--json"],
                env=env,
                check=True,
                stdout=subprocess.PIPE,
            )
            runs[which].append(json.loads(done.stdout))
    print(f"machine: {json.dumps(machine())}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}\n")
    print("| figure | before | after |")
    print("| --- | --- | --- |")
    for key in runs["after"][0]:
        before = [r[key] for r in runs["before"] if key in r]
        after = [r[key] for r in runs["after"]]
        shown = f"{statistics.median(before):.2f}" if before else "-"
        print(f"| {key} | {shown} | {statistics.median(after):.2f} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--offices", type=int, default=20, help="offices syncing idle")
    parser.add_argument("--syncs", type=int, default=5, help="idle syncs per office")
    parser.add_argument("--view-offices", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--view-repeat", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=["idle", "push", "views"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", help="the tree before, measured in the same run")
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tmpdir:
        Path(args.tmpdir).mkdir(parents=True, exist_ok=True)
    if args.against:
        return compare(args, argv)
    runs = [measure(args) for _ in range(args.repeat)]
    found = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    if args.json:
        print(json.dumps(found))
    else:
        for key, value in found.items():
            print(f"{key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
