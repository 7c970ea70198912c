"""
Many offices, two engines, several workers: what a sync costs the hub as offices multiply.

Each cell is one engine (``sqlite``: a file; ``postgres``: a fresh database on a
throwaway PostgreSQL cluster this script starts, Unix socket only, durable commits),
one ``--workers`` count and one K (offices), with scopes on (each office registered
as ``fieldsync hub add-node NAME`` registers it: it holds the cases whose ``office`` is
its name) or off (every office holds ``*``). The hub is a real ``fieldsync hub serve
--workers N`` subprocess on 127.0.0.1, on a database made for the cell (offices and an
admin registered in process before it serves). The K offices are lightweight clients
in this process: asyncio, one ``httpx.AsyncClient`` each (one kept-alive connection,
as ``node run`` keeps its client), and in memory only what an office's sync needs
(change number, hybrid clock, pull cursor, the versions of its cases). Nothing is
stored at the office, so the office's own SQLite work is not in any figure.

A sync is the requests ``SyncAgent.sync_once()`` makes, with the bodies
node/client.py sends: ``GET /v1/health``; ``POST /v1/push`` of the office's 5 new
changes (gzip JSON with ``Fieldsync-Schema``, exactly as ``HttpHubClient`` builds it:
4 inserts of new cases and an update of one of its earlier cases, whose ``base`` are
the versions it holds; 5 inserts in its first sync); ``GET /v1/pull`` following the
cursor until ``more`` is false (the first with ``count=1``); ``POST /v1/status`` with
one sync event. An idle sync is what an office with nothing queued does now: one
``GET /v1/pull``.

Schedule, per cell: a warm-up round (every office's first sync, not measured),
``--rounds`` measured rounds, a catch-up round (pulls only, not measured) and one
measured idle round. In each round every office syncs once, at a random moment within
the round's T seconds (T = K / ``--rate``: the offered load is ``--rate`` syncs a
second whatever K), and the next round starts when every sync of this one has ended
and T has passed. Per cell:

- sync latency p50/p95/p99: each office's sync, first request to last answer, over
  every sync of the measured rounds;
- hub CPU per sync and per idle sync: utime + stime (+ those of reaped children) of the
  ``hub serve`` process and every process under it (its workers), from /proc, read at
  the start and end of each round, divided by the round's syncs; the median of the
  measured rounds; on PostgreSQL, the same for every process of the cluster (the
  backends serving the hub, and the server's own: checkpointer, WAL writer,
  autovacuum), shown apart;
- changes/s: changes acknowledged in the measured rounds over their wall time (with
  the hub keeping up, this is the offered load; the hub's CPU use over the same time
  is shown as a share of one core);
- requests and bytes per sync, counted in the client: request bodies as sent plus
  answer bodies as received (gzip), headers not counted;
- at the end (every office caught up), ``GET /metrics`` and ``GET /v1/admin/offices``
  with an admin token: wall time, the median of 3 after one warm-up.

Checks: every push is acknowledged whole with no rejection and no conflict; with
scopes on no office pulls anything; with scopes off every office ends holding every
case the others made. A cell is cut at ``--cell-timeout`` seconds, or when a request
waits 60 s (the hub far behind the offered load); it is shown as cut and the run goes on.

``--e2e N`` also measures the end-to-end figure of bench/bench.py (N inserts, office A
-> hub -> office B, the same code: ``bench.sync_pass``) on both engines in the same run,
each repetition one raw SQLite insert of the rows then both engines (their order
alternating), and the ratio of each to the raw insert.

Run ``.venv/bin/python bench/scale.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import resource
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson

from bench import (
    COLUMNS,
    HOST,
    BenchError,
    case_rows,
    fieldsync_command,
    free_port,
    fresh_databases,
    machine,
    pg_cluster,
    progress,
    sync_pass,
    timed_insert,
)
from hub.store import open_store
from shared import __version__
from shared.protocol import PROTOCOL_VERSION, SCHEMA_HEADER
from shared.reports import StatusReport, SyncEvent
from shared.schema import Schema

CHANGES = 5  # changes an office makes per round: 4 inserts and 1 update (5 inserts first)
PAGE = 5000  # the agent's default page size
OFFICE = COLUMNS.index("office")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENGINES = ("sqlite", "postgres")


# -- CPU time of a tree of processes ----------------------------------------------------


def tree_cpu(root: int) -> float:
    """Seconds of CPU of ``root`` and every live process under it: utime + stime, plus
    cutime + cstime (children that ended and were waited for), from /proc."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(f) for f in fields[11:15])
    if root not in ticks:
        raise BenchError(f"process {root} is gone")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / CLOCK_TICKS


# -- the offices ---------------------------------------------------------------------


@dataclass
class Case:
    id: str
    versions: dict[str, str]  # column -> version, as the office holds it
    household: int


@dataclass
class Office:
    """What a lightweight office keeps in memory."""

    name: str
    token: str
    rows: Iterator[tuple[Any, ...]]
    client: httpx.AsyncClient
    headers: dict[str, str]
    seq: int = 0  # its last change number
    hlc: int = 0  # its hybrid clock's last stamp
    cursor: int = 0  # its pull cursor
    cases: list[Case] = field(default_factory=list)
    next_update: int = 0
    events: int = 0
    seen: set[str] = field(default_factory=set)  # cases of others pulled (scopes off)

    def stamp(self) -> int:
        self.hlc = max(self.hlc + 1, int(time.time() * 1000) << 16)
        return self.hlc

    def changes(self) -> list[dict[str, Any]]:
        """This round's changes, as pushed (``Change.to_json``)."""
        made: list[dict[str, Any]] = []
        updates = 1 if self.cases else 0
        for row in (next(self.rows) for _ in range(CHANGES - updates)):
            values = dict(
                zip(COLUMNS, row[:OFFICE] + (self.name,) + row[OFFICE + 1 :], strict=True)
            )
            self.seq += 1
            ts = self.stamp()
            version = f"{ts:016x}-{self.name}"
            self.cases.append(
                Case(values["id"], dict.fromkeys(COLUMNS, version), values["household_size"])
            )
            made.append(
                {
                    "seq": self.seq,
                    "table": "cases",
                    "pk": {"id": values["id"]},
                    "op": "insert",
                    "ts": ts,
                    "base": {},
                    "values": values,
                }
            )
        if updates:
            case = self.cases[self.next_update % (len(self.cases) - len(made))]
            self.next_update += 1
            self.seq += 1
            ts = self.stamp()
            case.household += 1
            base = dict(case.versions)
            made.append(
                {
                    "seq": self.seq,
                    "table": "cases",
                    "pk": {"id": case.id},
                    "op": "update",
                    "ts": ts,
                    "base": base,
                    "values": {"household_size": case.household, "notes": f"Visit {self.seq}."},
                }
            )
            version = f"{ts:016x}-{self.name}"
            case.versions.update(household_size=version, notes=version)
        return made


@dataclass
class Sync:
    """One office's sync, as the client saw it."""

    seconds: float
    requests: int = 0
    bytes: int = 0
    pushed: int = 0
    pulled: int = 0
    retries: int = 0


class Checked(BenchError):
    """The hub answered something a correct sync does not get."""


async def call(
    office: Office, sync: Sync, method: str, path: str, body: bytes | None = None, **params: Any
) -> Any:
    headers = office.headers
    if body is not None:
        headers = {**headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    try:
        response = await office.client.request(
            method, path, content=body, params=params or None, headers=headers
        )
    except httpx.RemoteProtocolError:
        # The hub closed a kept-alive connection as the request went out on it: an
        # office's sync would fail and try again later; here the request is sent again
        # at once (a push too: the hub's receipts make that safe), and counted.
        sync.retries += 1
        response = await office.client.request(
            method, path, content=body, params=params or None, headers=headers
        )
    sync.requests += 1
    sync.bytes += len(body or b"") + response.num_bytes_downloaded
    if response.status_code != 200:
        raise Checked(
            f"{office.name}: {method} {path}: {response.status_code} {response.text[:300]}"
        )
    return orjson.loads(response.content)


def packed(data: dict[str, Any]) -> bytes:
    return gzip.compress(orjson.dumps(data), compresslevel=3)  # as node/client.py's _gzip


async def pull_all(office: Office, sync: Sync, scoped: bool) -> None:
    first = True
    while True:
        params: dict[str, Any] = {"cursor": office.cursor, "limit": PAGE, "node": office.name}
        if first:
            params["count"] = 1
        page = await call(office, sync, "GET", "/v1/pull", **params, packed=1, scopes=1)
        if page["acked"] != office.seq:
            raise Checked(f"{office.name}: the hub acked {page['acked']}, not {office.seq}")
        for row in page["rows"]:
            if scoped or row["values"]["office"] == office.name:
                raise Checked(f"{office.name} pulled a case of {row['values']['office']}")
            office.seen.add(row["pk"]["id"])
        sync.pulled += len(page["rows"])
        office.cursor = page["cursor"]
        first = False
        if not page["more"]:
            return


async def full_sync(office: Office, scoped: bool, interval: float) -> Sync:
    """health, push, pull until caught up, status: what ``SyncAgent.sync_once`` sends."""
    began = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    sync = Sync(0.0)
    health = await call(office, sync, "GET", "/v1/health")
    if health.get("acked") != office.seq or health.get("node") != office.name:
        raise Checked(f"{office.name}: health check {health}")
    changes = office.changes()
    body = {"protocol": PROTOCOL_VERSION, "node": office.name, "changes": changes}
    result = await call(office, sync, "POST", "/v1/push", packed(body))
    if (
        result["acked"] != office.seq
        or result["applied"] != len(changes)
        or result["rejected"]
        or result["conflicts"]
    ):
        raise Checked(f"{office.name}: push answered {result}")
    sync.pushed = len(changes)
    await pull_all(office, sync, scoped)
    office.events += 1
    event = SyncEvent(
        office.events,
        started_at,
        time.perf_counter() - began,
        "ok",
        pushed=sync.pushed,
        pulled=sync.pulled,
        bytes_sent=sync.bytes,
    )
    report = StatusReport(0, None, 0, 0, __version__, interval, events=[event])
    status = {**msgspec.to_builtins(report), "node": office.name}
    await call(office, sync, "POST", "/v1/status", packed(status))
    sync.seconds = time.perf_counter() - began
    return sync


async def pull_sync(office: Office, scoped: bool) -> Sync:
    """An idle sync: the pull an office with nothing queued starts with (node/agent.py
    ``_idle_start``), and more pages if there are."""
    began = time.perf_counter()
    sync = Sync(0.0)
    await pull_all(office, sync, scoped)
    sync.seconds = time.perf_counter() - began
    return sync


# -- one cell --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    engine: str
    workers: int
    offices: int
    scoped: bool

    @property
    def label(self) -> str:
        scopes = "on" if self.scoped else "off"
        return f"{self.engine} x{self.workers} K={self.offices} scopes {scopes}"


class ServedHub:
    """``fieldsync hub serve --workers N`` on ``db``, in a subprocess."""

    def __init__(self, db: str, workers: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        command = [fieldsync_command(), "hub", "serve", "--db", db, "--host", HOST]
        command += ["--port", str(self.port), "--workers", str(workers)]
        command += ["--compact-after", "86400"]  # no compaction in the middle of a cell
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the hub exited: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    time.sleep(0.5 if workers > 1 else 0)  # every worker up
                    return
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"the hub did not answer within 60 s: {self.tail()}")

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def prepare(db: str, cell: Cell) -> tuple[dict[str, str], str, int]:
    """Offices and an admin registered at a new hub ``db``: tokens, admin token, schema version."""
    names = [f"office-{i + 1:04d}" for i in range(cell.offices)]
    store = open_store(db, Schema.load(), create=True)
    try:
        tokens = {name: store.add_node(name) for name in names}
        for name in names if not cell.scoped else ():
            store.set_scopes(name, ["*"])
        admin = store.add_admin("bench")
        return tokens, admin, store.schema_version
    finally:
        store.close()


async def run_round(
    offices: Sequence[Office],
    do: Callable[[Office], Any],
    period: float,
    rng: random.Random,
    cpu: Callable[[], dict[str, float]],
    deadline: float,
) -> dict[str, Any]:
    """Every office does ``do`` once at a random moment within ``period``; what it cost."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    offsets = [rng.uniform(0, period) for _ in offices]

    async def one(office: Office, offset: float) -> Sync:
        await asyncio.sleep(offset)
        return await do(office)  # type: ignore[no-any-return]

    before = cpu()
    syncs = await asyncio.wait_for(
        asyncio.gather(*(one(o, d) for o, d in zip(offices, offsets, strict=True))),
        max(1.0, deadline - time.monotonic()),
    )
    after = cpu()
    wall = loop.time() - start
    rest = start + period - loop.time()
    if rest > 0:
        await asyncio.sleep(rest)
    return {
        "syncs": syncs,
        "wall_s": wall,
        **{f"{key}_s": after[key] - before[key] for key in before},
    }


async def timed_get(url: str, path: str, token: str, repeat: int = 3) -> float:
    async with httpx.AsyncClient(
        base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        times = []
        for i in range(repeat + 1):
            began = time.perf_counter()
            response = await http.get(path)
            if response.status_code != 200:
                raise BenchError(f"GET {path}: {response.status_code} {response.text[:200]}")
            if i:
                times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


async def drive(
    hub: ServedHub,
    cell: Cell,
    tokens: dict[str, str],
    admin: str,
    schema_version: int,
    args: argparse.Namespace,
    cpu: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    period = cell.offices / args.rate
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.cell_timeout
    # An idle connection is dropped after 4 s, before uvicorn's 5 s, as a real office's
    # would be between syncs minutes apart (and to keep clear of the race above).
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=4)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # http://: no CA bundle (node/client.py)
    offices = []
    for i, (name, token) in enumerate(tokens.items()):
        client = httpx.AsyncClient(base_url=hub.url, timeout=60, limits=limits, verify=plain)
        headers = {
            "Authorization": f"Bearer {token}",
            "User-Agent": f"fieldsync/{__version__}",
            SCHEMA_HEADER: str(schema_version),
        }
        rows = case_rows(CHANGES * (args.rounds + 2), args.seed * 100_000 + i)
        offices.append(Office(name, token, rows, client, headers))
    try:

        def full(office: Office) -> Any:
            return full_sync(office, cell.scoped, period)

        def pulls(office: Office) -> Any:
            return pull_sync(office, cell.scoped)

        progress(f"  {cell.label}: warm-up round, T = {period:.1f} s")
        await run_round(offices, full, period, rng, cpu, deadline)
        rounds = []
        for r in range(args.rounds):
            progress(f"  {cell.label}: round {r + 1}/{args.rounds}")
            rounds.append(await run_round(offices, full, period, rng, cpu, deadline))
        progress(f"  {cell.label}: catch-up and idle rounds")
        await run_round(offices, pulls, period, rng, cpu, deadline)
        idle = await run_round(offices, pulls, period, rng, cpu, deadline)
        if any(s.pulled for s in idle["syncs"]):
            raise Checked("an idle sync pulled something")
        if not cell.scoped:
            every = {c.id for o in offices for c in o.cases}
            for office in offices:
                if office.seen != every - {c.id for c in office.cases}:
                    raise Checked(f"{office.name} does not hold every other office's case")
        views = {
            "metrics_ms": await timed_get(hub.url, "/metrics", admin),
            "admin_offices_ms": await timed_get(hub.url, "/v1/admin/offices", admin),
        }
    finally:
        for office in offices:
            await office.client.aclose()
    return summarize(cell, period, rounds, idle, views)


def summarize(
    cell: Cell,
    period: float,
    rounds: list[dict[str, Any]],
    idle: dict[str, Any],
    views: dict[str, float],
) -> dict[str, Any]:
    syncs = [s for r in rounds for s in r["syncs"]]
    seconds: list[float] = sorted(s.seconds for s in syncs)
    wall = sum(r["wall_s"] for r in rounds)

    def pct(q: float) -> float:
        return 1000 * seconds[min(len(seconds) - 1, int(q * len(seconds)))]

    def per_sync(key: str, found: Sequence[dict[str, Any]]) -> list[float]:
        return [1000 * r[key] / len(r["syncs"]) for r in found]

    out: dict[str, Any] = {
        "cell": cell.label,
        **{k: getattr(cell, k) for k in ("engine", "workers", "offices", "scoped")},
        "period_s": period,
        "syncs": len(syncs),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": 1000 * seconds[-1],
        "hub_cpu_ms_rounds": per_sync("hub_s", rounds),
        "hub_cpu_ms": statistics.median(per_sync("hub_s", rounds)),
        "idle_hub_cpu_ms": per_sync("hub_s", [idle])[0],
        "client_cpu_ms": statistics.median(per_sync("client_s", rounds)),
        "hub_core_share": sum(r["hub_s"] for r in rounds) / wall,
        "changes_per_s": sum(s.pushed for s in syncs) / wall,
        "requests_per_sync": sum(s.requests for s in syncs) / len(syncs),
        "bytes_per_sync": sum(s.bytes for s in syncs) / len(syncs),
        "pulled_per_sync": sum(s.pulled for s in syncs) / len(syncs),
        "retries": sum(s.retries for r in [*rounds, idle] for s in r["syncs"]),
        "idle_requests": sum(s.requests for s in idle["syncs"]) / len(idle["syncs"]),
        "idle_bytes": sum(s.bytes for s in idle["syncs"]) / len(idle["syncs"]),
        "idle_p95_ms": 1000
        * sorted(s.seconds for s in idle["syncs"])[int(0.95 * len(idle["syncs"]))],
        **views,
    }
    for key, name in (("pgxact", "pg_xacts"), ("pgrows", "pg_rows_read")):
        if f"{key}_s" in rounds[0]:  # over all the rounds: the statistics lag a little
            out[f"{name}_per_sync"] = sum(r[f"{key}_s"] for r in rounds) / len(syncs)
    if "pg_s" in rounds[0]:
        out["pg_cpu_ms_rounds"] = per_sync("pg_s", rounds)
        out["pg_cpu_ms"] = statistics.median(out["pg_cpu_ms_rounds"])
        out["idle_pg_cpu_ms"] = per_sync("pg_s", [idle])[0]
    return out


def pg_counts(cluster: Any, name: str | None) -> dict[str, float]:
    """Transactions and rows read (``tup_returned``: rows a sequential scan read, index
    entries an index scan returned) in database ``name`` so far, from pg_stat_database
    (each backend reports at the end of a transaction, at most once a second)."""
    found = (
        cluster._admin()
        .execute(
            "SELECT xact_commit + xact_rollback, tup_returned FROM pg_stat_database "
            "WHERE datname = %s",
            [name],
        )
        .fetchone()
    )
    return {"pgxact": float(found[0]), "pgrows": float(found[1])}


def run_cell(
    cell: Cell, args: argparse.Namespace, workdir: Path, cluster: tuple[Any, int] | None
) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    made = None
    if cell.engine == "postgres":
        assert cluster is not None
        made = cluster[0].new_database()
        db = cluster[0].url(made)
    else:
        db = str(workdir / "hub.db")
    try:
        tokens, admin, version = prepare(db, cell)
        hub = ServedHub(db, cell.workers, workdir / "hub.log")
        try:

            def cpu() -> dict[str, float]:
                found = {"hub": tree_cpu(hub.process.pid), "client": time.process_time()}
                if cluster is not None and cell.engine == "postgres":
                    found["pg"] = tree_cpu(cluster[1])
                    found |= pg_counts(cluster[0], made)
                return found

            profiler = None
            if args.profile:
                out = Path(args.profile) / f"{cell.label.replace(' ', '_')}.txt"
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--subprocesses",
                        "--nonblocking",
                        "--format",
                        "raw",
                    ]
                    + ["--rate", "100", "--pid", str(hub.process.pid), "--output", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            try:
                return asyncio.run(drive(hub, cell, tokens, admin, version, args, cpu))
            finally:
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(timeout=60)
        except httpx.TimeoutException as exc:
            # The hub fell so far behind the offered load that a request waited its
            # whole 60 s: the cell is cut, as at --cell-timeout, and the run goes on.
            raise TimeoutError(f"a request waited over 60 s ({type(exc).__name__})") from exc
        except (Checked, httpx.HTTPError) as exc:
            raise BenchError(f"{cell.label}: {exc}\n  the hub's log ends: {hub.tail()}") from exc
        finally:
            hub.stop()
    finally:
        if made is not None and cluster is not None:
            cluster[0].drop_database(made)


# -- end to end, both engines --------------------------------------------------------


def e2e(args: argparse.Namespace, workdir: Path, cluster: tuple[Any, int]) -> dict[str, Any]:
    """bench/bench.py's end-to-end figure on both engines, in the same run."""
    rows = list(case_rows(args.e2e, args.seed))
    create = Schema.load().table("cases").create
    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgres": []}
    new_db = fresh_databases(cluster[0])
    for i in range(args.e2e_repeat):
        here = workdir / f"e2e-{i + 1}"
        here.mkdir(parents=True)
        plain = timed_insert(here / "plain.db", rows, create)
        order = ENGINES if i % 2 == 0 else ENGINES[::-1]
        for engine in order:
            done = sync_pass(rows, here / engine, False, new_db if engine == "postgres" else None)
            runs[engine].append(
                {
                    "rate": args.e2e / done["sync_s"],
                    "ratio": plain / done["sync_s"],
                    "push_s": done["push_s"],
                    "pull_s": done["pull_s"],
                    "raw_rate": args.e2e / plain,
                }
            )
            progress(
                f"e2e {i + 1}/{args.e2e_repeat} {engine}: {done['sync_s']:.1f} s "
                f"(push {done['push_s']:.1f}, pull {done['pull_s']:.1f}), raw {plain:.2f} s, "
                f"{plain / done['sync_s']:.3f}x"
            )
        shutil.rmtree(here)
    return runs


# -- running and reporting -----------------------------------------------------------


def cells(args: argparse.Namespace) -> list[Cell]:
    found = []
    for k in args.offices:
        for engine in args.engines:
            for workers in args.workers:
                found.append(Cell(engine, workers, k, True))
    for k in args.unscoped:
        for engine in args.engines:
            for workers in args.workers:
                found.append(Cell(engine, workers, k, False))
    return found


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def table(results: Sequence[dict[str, Any]]) -> str:
    head = (
        "| engine | workers | K | scopes | p50 / p95 / p99 ms | hub CPU ms per sync "
        "(rounds) | PG CPU ms per sync | hub CPU ms per idle sync (+PG) | changes/s "
        "(hub cores busy) | requests, bytes per sync | pulled per sync | /metrics, "
        "/v1/admin/offices ms |"
    )
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "cut" in r:
            lines.append(
                f"| {r['engine']} | {r['workers']} | {r['offices']} | "
                f"{'on' if r['scoped'] else 'off'} | cut: {r['cut']} |" + " |" * 7
            )
            continue
        rounds = "–".join(
            fmt(v) for v in (min(r["hub_cpu_ms_rounds"]), max(r["hub_cpu_ms_rounds"]))
        )
        pg = fmt(r["pg_cpu_ms"]) if "pg_cpu_ms" in r else "—"
        idle = fmt(r["idle_hub_cpu_ms"], 2)
        resent = f" ({r['retries']} resent)" if r["retries"] else ""
        if "idle_pg_cpu_ms" in r:
            idle += f" (+{fmt(r['idle_pg_cpu_ms'], 2)})"
        lines.append(
            f"| {r['engine']} | {r['workers']} | {r['offices']:,} | "
            f"{'on' if r['scoped'] else 'off'} | "
            f"{fmt(r['p50_ms'], 0)} / {fmt(r['p95_ms'], 0)} / {fmt(r['p99_ms'], 0)} | "
            f"{fmt(r['hub_cpu_ms'])} ({rounds}) | {pg} | {idle} | "
            f"{fmt(r['changes_per_s'], 0)} ({fmt(r['hub_core_share'], 2)}) | "
            f"{fmt(r['requests_per_sync'], 1)}, {fmt(r['bytes_per_sync'], 0)}{resent} | "
            f"{fmt(r['pulled_per_sync'], 0)} | "
            f"{fmt(r['metrics_ms'], 0)}, {fmt(r['admin_offices_ms'], 0)} |"
        )
    return "\n".join(lines)


def e2e_table(runs: dict[str, list[dict[str, float]]], n: int) -> str:
    lines = [
        f"| hub engine | end to end, {n:,} changes A → hub → B | push / pull s | "
        "÷ raw SQLite insert | target |",
        "|---|---:|---:|---:|---|",
    ]
    targets = {"sqlite": 0.10, "postgres": 0.06}
    for engine, found in runs.items():
        rate = statistics.median(r["rate"] for r in found)
        ratios = [r["ratio"] for r in found]
        ratio = statistics.median(ratios)
        push = statistics.median(r["push_s"] for r in found)
        pull = statistics.median(r["pull_s"] for r in found)
        verdict = "PASS" if ratio >= targets[engine] else "**FAIL**"
        lines.append(
            f"| {engine} | {rate:,.0f}/s | {push:.1f} / {pull:.1f} | "
            f"{ratio:.3f}× ({min(ratios):.3f}–{max(ratios):.3f}) | "
            f"≥ {targets[engine]:.2f}× {verdict} |"
        )
    raw = statistics.median(r["raw_rate"] for found in runs.values() for r in found)
    lines.append(f"\nRaw SQLite executemany: {raw:,.0f} rows/s (median).")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    parser.add_argument("--engines", type=lambda t: t.split(","), default=list(ENGINES))
    parser.add_argument("--workers", type=ints, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--offices", type=ints, default=[100, 500], help="K, scopes on")
    parser.add_argument("--unscoped", type=ints, default=[100], help="K, scopes off")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per cell")
    parser.add_argument(
        "--rate", type=float, default=25, help="offered syncs per second: T = K / rate"
    )
    parser.add_argument("--cell-timeout", type=float, default=600, help="seconds per cell")
    parser.add_argument("--e2e", type=int, default=100_000, help="changes end to end (0: none)")
    parser.add_argument("--e2e-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--profile", help="py-spy each cell's hub into this directory")
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="also write every figure as JSON to this file")
    parser.add_argument("--from-json", help="print the table of a run saved with --save")
    args = parser.parse_args(argv)
    if not set(args.engines) <= set(ENGINES):
        parser.error(f"--engines: of {', '.join(ENGINES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for cell in saved["cells"]:
            if cell.get("engine") != "postgres":  # no PostgreSQL figures for a SQLite cell
                for key in ("pg_cpu_ms", "pg_cpu_ms_rounds", "idle_pg_cpu_ms"):
                    cell.pop(key, None)
        print(table(saved["cells"]))
        return 0
    began = time.perf_counter()
    command = shlex.join(sys.orig_argv)
    info = machine()
    load = [os.getloadavg()[0]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    e2e_runs: dict[str, Any] = {}
    need_pg = "postgres" in args.engines or args.e2e
    with contextlib.ExitStack() as stack:
        cluster = None
        if need_pg:
            progress("starting a throwaway PostgreSQL cluster")
            cluster = stack.enter_context(pg_cluster())
        tmp = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fieldsync-scale-", dir=args.tmpdir)
            )
        )
        for n, cell in enumerate(cells(args)):
            progress(f"cell {n + 1}: {cell.label}")
            try:
                found = run_cell(cell, args, tmp / f"cell-{n + 1}", cluster)
            except TimeoutError as exc:
                found = {**vars(cell), "cut": str(exc) or f"over {args.cell_timeout:.0f} s"}
            results.append(found)
            if "cut" not in found:
                progress(
                    f"  p95 {found['p95_ms']:.0f} ms, hub CPU {found['hub_cpu_ms']:.1f} ms/sync"
                    + (f", PG {found['pg_cpu_ms']:.1f}" if "pg_cpu_ms" in found else "")
                    + f", idle {found['idle_hub_cpu_ms']:.2f}, client {found['client_cpu_ms']:.1f}"
                    + f", resent {found['retries']}"
                )
            shutil.rmtree(tmp / f"cell-{n + 1}", ignore_errors=True)
        load.append(os.getloadavg()[0])
        if args.e2e and cluster is not None:
            e2e_runs = e2e(args, tmp, cluster)
    load.append(os.getloadavg()[0])
    took = time.perf_counter() - began
    everything = {
        "command": command,
        "machine": info,
        "load": load,
        "cells": results,
        "e2e": e2e_runs,
        "seconds": took,
    }
    if args.save:
        Path(args.save).write_text(json.dumps(everything, indent=2, default=str))
    if args.json:
        print(json.dumps(everything, indent=2, default=str))
        return 0
    print(f"# fieldsync scale benchmark, {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    print(f"- command: `{command}`")
    print(
        f"- machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory']} RAM, "
        f"{info['platform']}; python {info['python']}, SQLite {info['sqlite']}; "
        f"fieldsync code {info['fieldsync_code']}"
    )
    print(
        f"- 1-min load average: {' → '.join(f'{v:.2f}' for v in load)} (start, end of cells, end)"
    )
    print(f"- took {took:.0f} s\n")
    if results:
        print(table(results) + "\n")
    if e2e_runs:
        print(e2e_table(e2e_runs, args.e2e))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
