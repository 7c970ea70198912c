"""
Chaos: offices write and sync through a fault proxy while the hub and one office's
agent are killed with SIGKILL; afterwards every replica equals the hub and no write is
lost, applied twice or overwritten without a trace in the conflict log.

Set-up: a real hub process (``fieldsync hub serve``) behind ``tests/proxy.py``, which
refuses, cuts, drops, delays or answers 503 to a share of the requests. Every office
but the last syncs in this process (SyncAgent + HttpHubClient, each in its own thread);
the last runs ``fieldsync node sync`` as a child process, which is SIGKILLed in the
middle of a sync now and then. Writes are plain ``sqlite3`` statements on the office
databases (the triggers capture them), between syncs and while syncs run; on purpose,
several offices edit the same field of the same case between syncs.

The oracle. Every value a write puts into a tracked column is unique in the whole run,
so a value names the write that made it. For each write the test records what the
office saw in the same transaction: the column's previous value (updates) or the whole
row (deletes), and the change-log number and stamp the trigger gave it. At the end:

- every replica equals the hub (sha256 of each table, ordered by primary key), every
  office database passes ``PRAGMA integrity_check``, and so does the hub's on SQLite;
  on either engine the hub's counters agree with its records (the last ``seq`` handed
  out is at least every record's and exit's, the lag counters count the records);
- applied once: each office's change log is empty; its last number equals the hub's
  ``acked_seq`` and its own; the hub's receipts are exactly the recorded
  (number, stamp) pairs of that office; no conflict is logged twice;
- nothing lost: each value written is still there, or lost a same-field conflict (it
  is ``other_value`` of a logged conflict on that field), or was overwritten by a
  write made by an office that saw it, or its record was deleted by a delete that saw
  it. Each delete has taken effect, or is logged as a delete conflict (an update it
  had not seen kept the record), or was a no-op on a record another office had
  already deleted, whose delete is logged;
- every value at the hub comes from a write to that record and column; for each group
  of same-field edits, the later stamp holds and every other value is logged.

The test runs on both engines: the hub on a SQLite file, and on PostgreSQL as
``hub serve --workers 2``, where besides the whole-hub kills single workers are
SIGKILLed now and then, mid-request (uvicorn's supervisor starts another).

``FIELDSYNC_SOAK=1`` runs a larger soak (50,000 writes, 6 offices); or set
``FIELDSYNC_CHAOS_OPS``, ``_OFFICES``, ``_ROUNDS``, ``_RATE`` and ``_SEED``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hub.engine import Conn
from hub.ingest import all_receipts
from hub.migrations import LAG_BUCKET
from hub.store import ConflictRecord, SqlHubStore, open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import HubUnavailableError
from tests.engines import Engine
from tests.processes import ENV, FIELDSYNC, HubProcess
from tests.proxy import FaultProxy, ProxyStats

pytestmark = pytest.mark.integration


def _env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    return float(text) if text else default


SOAK = os.environ.get("FIELDSYNC_SOAK", "").strip() not in ("", "0")
SEED = int(_env("FIELDSYNC_CHAOS_SEED", 20240611))
OPS = int(_env("FIELDSYNC_CHAOS_OPS", 50_000 if SOAK else 5_000))
OFFICES = max(3, int(_env("FIELDSYNC_CHAOS_OFFICES", 6 if SOAK else 4)))
ROUNDS = max(12, int(_env("FIELDSYNC_CHAOS_ROUNDS", max(75, OPS // 70))))
RATE = _env("FIELDSYNC_CHAOS_RATE", 0.38)
HUB_KILLS = max(3, min(40, ROUNDS // 10))
AGENT_KILLS = max(3, min(12, ROUNDS // 12))  # SIGKILLs of the agent process mid-sync
WORKER_KILLS = HUB_KILLS  # SIGKILLs of one worker, on PostgreSQL (the hub runs 2 there)
PG_WORKERS = 2
MIN_FAILED_SHARE = 0.20  # of the sync requests, made to fail by the proxy

NAMES = ("astana", "almaty", "shymkent", "aktobe", "taraz", "pavlodar", "oskemen", "semey")

# Columns whose every written value is unique in the run (they name their write), and
# columns set only by the insert, with values that repeat.
UNIQUE = {
    "cases": (
        "case_number",
        "family_name",
        "given_name",
        "country_of_origin",
        "household_size",
        "registered_on",
        "office",
        "notes",
    ),
    "assistance": ("kind", "quantity", "delivered_on", "office", "notes"),
}
INSERT_ONLY = {"cases": ("status",), "assistance": ("case_id",)}
EDITED = {
    "cases": ("family_name", "country_of_origin", "household_size", "notes"),
    "assistance": ("kind", "quantity", "notes"),
}
CONFLICT_COLUMN = "given_name"  # only the deliberate same-field edits change it
# Pushes the hub could not take, or local failures: never expected, even under chaos.
BAD_OUTPUT = ("Traceback", "refused it (", "local database error", "another sync")


def value(table: str, column: str, office: str, n: int) -> Any:
    """The unique value write ``n`` puts in ``column``."""
    if column == "household_size":
        return n
    if column == "quantity":
        return n + 0.5
    return f"{column}:{office}:{n}"


# -- the oracle ------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One committed write, as the office made it."""

    n: int
    office: str
    table: str
    pk: str
    op: str  # insert, update or delete
    values: dict[str, Any]  # what it set (nothing for a delete)
    seen: dict[str, Any]  # update: the column's previous value; delete: the whole row
    seq: int  # its number in the office's change log
    hlc: int  # the stamp the trigger gave it
    group: int | None = None  # a deliberate same-field edit group

    @property
    def version(self) -> str:
        return f"{self.hlc:016x}-{self.office}"


class Oracle:
    """Every write of the run; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes: list[Write] = []
        self._numbers = itertools.count(1)

    def number(self) -> int:
        with self.lock:
            return next(self._numbers)

    def add(self, write: Write) -> None:
        with self.lock:
            self.writes.append(write)

    def __len__(self) -> int:
        with self.lock:
            return len(self.writes)


class Desk:
    """A plain sqlite3 connection to an office database that records each write."""

    def __init__(self, office: str, path: Path, oracle: Oracle) -> None:
        self.office, self.oracle = office, oracle
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self.conn.close()

    def ids(self, table: str) -> list[str]:
        return [r[0] for r in self.conn.execute(f"SELECT id FROM {table} ORDER BY id")]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _commit(self, table: str, pk: str, op: str) -> tuple[int, int]:
        """The change the trigger logged for this write (checked), then COMMIT."""
        seq, tbl, key, logged_op, hlc = self.conn.execute(
            "SELECT seq, tbl, pk, op, hlc FROM _fieldsync_changes ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        assert (tbl, json.loads(key), logged_op) == (table, [pk], op), "capture went wrong"
        self.conn.execute("COMMIT")
        return int(seq), int(hlc)

    def insert(self, table: str, pk: str, values: dict[str, Any]) -> Write:
        n = self.oracle.number()
        row = {"id": pk, **values}
        cols, marks = ", ".join(row), ", ".join("?" for _ in row)
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))
            seq, hlc = self._commit(table, pk, "insert")
        write = Write(n, self.office, table, pk, "insert", values, {}, seq, hlc)
        self.oracle.add(write)
        return write

    def update(self, table: str, pk: str, column: str, group: int | None = None) -> Write | None:
        """Give ``column`` of ``pk`` a new unique value; None if the row is not here."""
        n = self.oracle.number()
        new = value(table, column, self.office, n)
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {column} FROM {table} WHERE id = ?", [pk]).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return None
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", [new, pk])
            seq, hlc = self._commit(table, pk, "update")
        write = Write(
            n, self.office, table, pk, "update", {column: new}, {column: row[0]}, seq, hlc, group
        )
        self.oracle.add(write)
        return write

    def delete(self, table: str, pk: str) -> Write | None:
        n = self.oracle.number()
        with self._transaction() as conn:
            cursor = conn.execute(f"SELECT * FROM {table} WHERE id = ?", [pk])
            row = cursor.fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return None
            seen = dict(zip([d[0] for d in cursor.description], row, strict=True))
            conn.execute(f"DELETE FROM {table} WHERE id = ?", [pk])
            seq, hlc = self._commit(table, pk, "delete")
        write = Write(n, self.office, table, pk, "delete", {}, seen, seq, hlc)
        self.oracle.add(write)
        return write

    # -- workload ----------------------------------------------------------------

    def new_case(self) -> Write:
        n = self.oracle.number()
        values = {c: value("cases", c, self.office, n) for c in UNIQUE["cases"]}
        return self.insert("cases", f"{self.office}-c{n}", {**values, "status": "asylum_seeker"})

    def new_assistance(self, case_id: str) -> Write:
        n = self.oracle.number()
        values = {c: value("assistance", c, self.office, n) for c in UNIQUE["assistance"]}
        return self.insert("assistance", f"{self.office}-a{n}", {**values, "case_id": case_id})

    def random_writes(
        self, rng: random.Random, count: int, hot: set[str], pause: float = 0.0
    ) -> None:
        """``count`` random inserts, updates and deletes; updates favour ``hot`` cases."""
        cases, aid = self.ids("cases"), self.ids("assistance")
        hot_here = [c for c in cases if c in hot]
        for _ in range(count):
            r = rng.random()
            if r < 0.2 or not cases:
                cases.append(self.new_case().pk)
            elif r < 0.6:
                pool = hot_here if hot_here and rng.random() < 0.35 else cases
                self.update("cases", rng.choice(pool), rng.choice(EDITED["cases"]))
            elif r < 0.65:
                victim = rng.choice(cases)
                cases.remove(victim)
                if victim in hot_here:
                    hot_here.remove(victim)
                self.delete("cases", victim)
            elif r < 0.77 or not aid:
                aid.append(self.new_assistance(rng.choice(cases)).pk)
            elif r < 0.95:
                self.update("assistance", rng.choice(aid), rng.choice(EDITED["assistance"]))
            else:
                victim = rng.choice(aid)
                aid.remove(victim)
                self.delete("assistance", victim)
            if pause:
                time.sleep(rng.uniform(0, pause))


# -- processes --------------------------------------------------------------------


@dataclass
class Site:
    """One office: its database, its token, and an in-process agent (or none)."""

    name: str
    path: Path
    token: str
    desk: Desk  # the test's writes between syncs
    side: Desk  # writes made while syncs run
    agent: SyncAgent | None = None
    client: HttpHubClient | None = None
    store: NodeStore | None = None

    def close(self) -> None:
        for thing in (self.client, self.store, self.desk, self.side):
            if thing is not None:
                thing.close()


@dataclass
class AgentRun:
    """One run of ``fieldsync node sync`` in a child process."""

    returncode: int
    stderr: str
    meant_to_kill: bool = False
    killed: bool = False  # SIGKILLed by the test while still running
    mid_sync: bool = False  # ... after it had sent at least one request
    pending_before: int = 0
    pending_after: int = 0


@dataclass
class Tally:
    """What happened during the run, for the report and the assertions."""

    failed_syncs: int = 0
    good_syncs: int = 0
    agent_runs: list[AgentRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def pending(path: Path) -> int:
    store = NodeStore(path)
    try:
        return store.pending_count()
    finally:
        store.close()


def run_agent_process(
    site: Site, proxy: FaultProxy, rng: random.Random, *, kill: bool, batch: int
) -> AgentRun:
    """``fieldsync node sync``; with ``kill``, SIGKILL it shortly after its first request."""
    before = pending(site.path)
    seen = proxy.requests_from(site.token)
    command = [str(FIELDSYNC), "node", "sync", str(site.path), "--batch-size", str(batch)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    killed = mid_sync = False
    try:
        if kill:
            deadline = time.monotonic() + 30
            while (
                proc.poll() is None
                and proxy.requests_from(site.token) == seen
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            # Soon: one push in four fails here, which ends the sync by itself.
            time.sleep(rng.uniform(0.0, 0.08))
            if proc.poll() is None:
                started = proxy.requests_from(site.token) > seen
                proc.send_signal(signal.SIGKILL)
                killed, mid_sync = True, started
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        err = f"the agent process hung and was killed\n{err}"
    return AgentRun(proc.returncode, err, kill, killed, mid_sync, before, pending(site.path))


# -- the run ----------------------------------------------------------------------


class Chaos:
    """Sets up the hub, the proxy and the offices; runs rounds; heals; checks."""

    def __init__(self, tmp: Path, engine: Engine) -> None:
        self.tmp = tmp
        self.engine = engine.name
        self.rng = random.Random(SEED)
        self.oracle = Oracle()
        self.tally = Tally()
        self.hot: set[str] = set()
        self.grouped: set[str] = set()
        self.groups = itertools.count(1)
        workers = PG_WORKERS if engine.name == "postgres" else 1
        self.hub = HubProcess(engine.db(tmp), tmp / "hub.log", workers=workers)
        self.worker_kills = self.busy_worker_kills = 0
        self.proxy = FaultProxy(self.hub.port, seed=SEED, rate=RATE, timeout=30)
        self.sites: list[Site] = []

    # set-up and tear-down

    def open(self) -> None:
        names = [NAMES[i] if i < len(NAMES) else f"office{i}" for i in range(OFFICES)]
        registry = open_store(self.hub.db)
        try:
            tokens = {name: registry.add_node(name) for name in names}
            for name in names:
                registry.set_scopes(name, ["*"])  # every office holds every case
        finally:
            registry.close()
        self.proxy.start()
        self.hub.start()
        for i, name in enumerate(names):
            path = self.tmp / f"{name}.db"
            NodeStore.init(path, name, self.proxy.url, tokens[name]).close()
            site = Site(
                name,
                path,
                tokens[name],
                Desk(name, path, self.oracle),
                Desk(name, path, self.oracle),
            )
            if i < len(names) - 1:  # the last office syncs in a child process
                site.store = NodeStore(path)
                site.client = HttpHubClient(
                    self.proxy.url, tokens[name], node=name, timeout_seconds=30
                )
                site.agent = SyncAgent(
                    site.store,
                    site.client,
                    batch_size=self.rng.choice([40, 100, 250]),
                    page_size=self.rng.choice([50, 150, 400]),
                )
            self.sites.append(site)

    def close(self) -> None:
        for site in self.sites:
            site.close()
        self.hub.stop()
        self.proxy.close()

    @property
    def process_site(self) -> Site:
        return self.sites[-1]

    # writes

    def write_phase(self, per_office: int, bulk: int) -> None:
        for site in self.sites:
            count = per_office + (bulk if site is self.process_site else 0)
            site.desk.random_writes(self.rng, count, self.hot)
        if len(self.hot) < 40:
            self.hot.update(sorted(self.sites[0].desk.ids("cases"))[: 40 - len(self.hot)])
        for _ in range(2 if OFFICES < 6 else 4):
            self.conflict_group()

    def conflict_group(self) -> None:
        """Several offices edit the same field of the same case before they sync."""
        chosen = self.rng.sample(self.sites, self.rng.randint(2, len(self.sites)))
        common = set.intersection(*(set(s.desk.ids("cases")) for s in chosen)) - self.grouped
        if not common:
            return
        pk = self.rng.choice(sorted(common))
        self.grouped.add(pk)
        group = next(self.groups)
        for site in chosen:
            site.desk.update("cases", pk, CONFLICT_COLUMN, group=group)

    # syncs

    def sync_in_process(self, site: Site, times: int) -> None:
        assert site.agent is not None
        for _ in range(times):
            try:
                site.agent.sync_once()
            except HubUnavailableError:
                with self.tally.lock:
                    self.tally.failed_syncs += 1
            except Exception as exc:
                self.tally.problem(f"{site.name}: sync failed unexpectedly: {exc!r}")
                return
            else:
                with self.tally.lock:
                    self.tally.good_syncs += 1

    def sync_phase(
        self, round_no: int, side: int, kill_agent: bool, kill_hub: bool, kill_worker: bool
    ) -> None:
        rngs = [random.Random(self.rng.random()) for _ in range(3)]
        jobs: list[tuple[str, Callable[[], None]]] = [
            (
                f"sync of {site.name}",
                functools.partial(self.sync_in_process, site, 2 if self.rng.random() < 0.3 else 1),
            )
            for site in self.sites
            if site.agent is not None
        ]

        def side_writes() -> None:
            for site in rngs[0].sample(self.sites, len(self.sites)):
                site.side.random_writes(rngs[0], side, self.hot, pause=0.02)

        def agent_process() -> None:
            site = self.process_site
            run = run_agent_process(
                site, self.proxy, rngs[1], kill=kill_agent, batch=5 if kill_agent else 200
            )
            with self.tally.lock:
                self.tally.agent_runs.append(run)
            if not run.killed and run.returncode not in (0, 1):
                self.tally.problem(f"round {round_no}: agent exit {run.returncode}: {run.stderr}")
            if any(bad in run.stderr for bad in BAD_OUTPUT):
                self.tally.problem(f"round {round_no}: agent process said: {run.stderr}")

        def hub_monkey() -> None:
            # Preferably while the hub is busy with a request (for at most 2 s).
            time.sleep(rngs[2].uniform(0.02, 0.4))
            deadline = time.monotonic() + 2
            while self.proxy.in_flight() == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rngs[2].uniform(0, 0.01))
            self.hub.kill()
            # Down about as long either way: two workers take ~1 s longer to start than one.
            pause = (0.2, 1.0) if self.hub.workers == 1 else (0.0, 0.3)
            time.sleep(rngs[2].uniform(*pause))
            self.hub.start()

        syncing = threading.Event()  # cleared when every other job has ended

        def worker_monkey() -> None:
            # One worker of two, preferably one serving a request (while the round's
            # syncs run): the other serves on while the supervisor starts another.
            pids: list[int] = []
            while not pids and syncing.is_set():
                if self.proxy.in_flight():
                    pids = self.hub.busy_worker_pids()
                time.sleep(0.001)
            busy = bool(pids)
            pids = pids or self.hub.worker_pids()
            assert pids, "no worker to kill"
            os.kill(rngs[2].choice(pids), signal.SIGKILL)
            self.worker_kills += 1
            self.busy_worker_kills += busy

        jobs += [("side writes", side_writes), ("agent process", agent_process)]
        if kill_hub:
            jobs.append(("hub kill", hub_monkey))
        if kill_worker:
            jobs.append(("worker kill", worker_monkey))
        threads = [
            threading.Thread(target=self._guard(name, job, round_no), daemon=True)
            for name, job in jobs
        ]
        syncing.set()
        for thread in threads:
            thread.start()
        for thread in threads[:-1] if kill_worker else threads:
            thread.join(timeout=300)
        syncing.clear()
        threads[-1].join(timeout=300)
        stuck = [t for t in threads if t.is_alive()]
        assert not stuck, f"round {round_no}: {len(stuck)} jobs did not finish in 300 s"

    def _guard(self, name: str, job: Callable[[], None], round_no: int) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            except Exception as exc:
                self.tally.problem(f"round {round_no}: {name} raised {exc!r}")

        return run

    def run_rounds(self) -> None:
        # About 72% of the writes between syncs, 10% during syncs, 15% in the queues of
        # agent processes about to be killed, the rest in same-field groups.
        per_office = math.ceil(0.72 * OPS / (ROUNDS * OFFICES))
        side = max(1, round(0.1 * OPS / (ROUNDS * OFFICES)))
        bulk = max(60, int(0.15 * OPS / (AGENT_KILLS * 1.5)))
        hub_rounds = {ROUNDS * (i + 1) // (HUB_KILLS + 1) for i in range(HUB_KILLS)}
        # On PostgreSQL (2 workers), half-way between two hub kills: one worker's.
        worker_rounds = set()
        if self.hub.workers > 1:
            spread = 2 * (WORKER_KILLS + 1)
            worker_rounds = {ROUNDS * (2 * i + 1) // spread for i in range(WORKER_KILLS)}
            worker_rounds -= hub_rounds
        round_no = owed = 0
        while round_no < ROUNDS or ((len(self.oracle) < OPS or owed > 0) and round_no < 2 * ROUNDS):
            owed = AGENT_KILLS - sum(r.mid_sync for r in self.tally.agent_runs)
            kill_agent = owed > 0 and (round_no % 2 == 1 or ROUNDS - round_no <= 3 * owed)
            self.write_phase(per_office, bulk if kill_agent else 0)
            self.sync_phase(
                round_no, side, kill_agent, round_no in hub_rounds, round_no in worker_rounds
            )
            if self.tally.problems:
                break
            round_no += 1
        self.rounds = round_no

    def save_writes(self, path: Path) -> None:
        with path.open("w") as out:
            for w in self.oracle.writes:
                out.write(json.dumps({**w.__dict__, "version": w.version}) + "\n")

    def quiet_rounds(self) -> None:
        """Heal the network; two rounds in which every office syncs in turn, cleanly."""
        self.proxy.heal()
        if self.hub.proc is None:
            self.hub.start()
        if self.hub.workers > 1:  # the supervisor replaced every worker killed
            deadline = time.monotonic() + 30
            while len(self.hub.worker_pids()) < self.hub.workers:
                assert time.monotonic() < deadline, f"workers now: {self.hub.worker_pids()}"
                time.sleep(0.05)
        for _ in range(2):
            for site in self.sites:
                if site.agent is not None:
                    site.agent.sync_once()
                    continue
                run = run_agent_process(site, self.proxy, self.rng, kill=False, batch=1000)
                assert run.returncode == 0, f"quiet sync of {site.name} failed: {run.stderr}"


# -- the checks -----------------------------------------------------------------


def table_rows(conn: sqlite3.Connection, table: str) -> dict[str, dict[str, Any]]:
    """Every row of an office's ``table``, by key."""
    cursor = conn.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cursor.description]
    return {str(row[0]): dict(zip(names, row, strict=True)) for row in cursor}


def digest(rows: dict[str, dict[str, Any]]) -> tuple[str, int]:
    """sha256 of a canonical dump of a table's rows (every column, ordered by key)."""
    ordered = [rows[k] for k in sorted(rows)]
    text = json.dumps(ordered, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), len(ordered)


def first_differences(
    left: dict[str, dict[str, Any]], right: dict[str, dict[str, Any]], limit: int = 5
) -> list[str]:
    keys = sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))
    return [f"{k}: {left.get(k)} != {right.get(k)}" for k in keys[:limit]]


def counter_problems(conn: Conn) -> list[str]:
    """Where the hub's counters disagree with its records (either engine): the last
    ``seq`` handed out is below a record's or an exit's, or the lag counters
    (``_fieldsync_seq_counts``, kept by triggers) miscount the records."""
    problems = []
    row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'seq'").fetchone()
    last = int(row[0]) if row else 0
    for table in ("_fieldsync_records", "_fieldsync_exits"):
        top = conn.execute(f"SELECT max(seq) FROM {table}").fetchone()[0]
        if top is not None and int(top) > last:
            problems.append(f"{table} holds seq {top}, the hub handed out only {last}")
    counted = {
        (int(b), str(o)): int(n)
        for b, o, n in conn.execute(
            "SELECT bucket, origin, n FROM _fieldsync_seq_counts WHERE n <> 0"
        )
    }
    actual = {
        (int(b), str(o)): int(n)
        for b, o, n in conn.execute(
            f"SELECT seq / {LAG_BUCKET}, coalesce(origin, ''), count(*) "
            "FROM _fieldsync_records GROUP BY 1, 2"
        )
    }
    if counted != actual:
        wrong = sorted(k for k in counted.keys() | actual.keys() if counted.get(k) != actual.get(k))
        problems.append(
            "lag counters miscount the records (bucket, origin: counted, actual): "
            + ", ".join(f"{k}: {counted.get(k)}, {actual.get(k)}" for k in wrong[:5])
        )
    return problems


def account(
    writes: list[Write],
    alive: dict[str, dict[str, dict[str, Any]]],
    known: set[tuple[str, str]],
    conflicts: list[ConflictRecord],
) -> tuple[list[str], Counter[str]]:
    """Check every write against the final state and the conflict log; return problems."""
    problems: list[str] = []
    how: Counter[str] = Counter()
    by_value: dict[tuple[str, str, Any], Write] = {}
    inserts: dict[tuple[str, str], Write] = {}
    overwritten: set[tuple[str, str, str, Any]] = set()
    deletes_saw: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    delete_versions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for w in writes:
        for col, val in w.values.items():
            if col in UNIQUE[w.table]:
                assert (w.table, col, val) not in by_value, "the test reused a value"
                by_value[(w.table, col, val)] = w
        if w.op == "insert":
            inserts[(w.table, w.pk)] = w
        elif w.op == "update":
            for col, val in w.seen.items():
                overwritten.add((w.table, w.pk, col, val))
        else:
            deletes_saw[(w.table, w.pk)].append(w.seen)
            delete_versions[(w.table, w.pk)].add(w.version)

    losers: set[tuple[str, str, str, Any]] = set()
    logged_deletes: dict[tuple[str, str], set[str]] = defaultdict(set)
    seen_entries: set[tuple[Any, ...]] = set()
    for c in conflicts:
        pk = str(c.pk["id"])
        entry = (c.table, pk, c.kind, c.column, c.kept_version, c.other_version)
        if entry in seen_entries:
            problems.append(f"conflict logged twice (a change applied twice?): {entry}")
        seen_entries.add(entry)
        if c.kind == "field":
            assert c.column is not None
            losers.add((c.table, pk, c.column, c.other_value))
            for side in (c.kept_value, c.other_value):
                origin = by_value.get((c.table, c.column, side))
                if origin is None or origin.pk != pk:
                    problems.append(f"conflict {c.id} holds a value nobody wrote: {side!r}")
        elif c.kind == "delete":
            logged_deletes[(c.table, pk)].add(c.other_version)
            if c.other_version not in delete_versions[(c.table, pk)]:
                problems.append(f"delete conflict {c.id} names a delete nobody made")
        else:
            problems.append(f"unexpected conflict kind {c.kind} (policy merge)")

    for w in writes:
        key = (w.table, w.pk)
        row = alive[w.table].get(w.pk)
        if w.op == "delete":
            if row is None:
                how["delete took effect"] += 1
            elif w.version in logged_deletes[key]:
                how["delete logged as conflict"] += 1
            elif logged_deletes[key] & delete_versions[key]:
                how["delete on a deleted record, the other delete logged"] += 1
            else:
                problems.append(f"lost delete: {w}")
            continue
        for col, val in w.values.items():
            if col not in UNIQUE[w.table]:
                continue
            if row is not None and row[col] == val:
                how["value kept"] += 1
            elif (w.table, w.pk, col, val) in losers:
                how["value lost a logged conflict"] += 1
            elif (w.table, w.pk, col, val) in overwritten:
                how["value overwritten by an office that saw it"] += 1
            elif row is None and any(s.get(col) == val for s in deletes_saw[key]):
                how["record deleted by an office that saw the value"] += 1
            else:
                problems.append(f"lost write: {w.office} set {w.table} {w.pk} {col}={val!r}")

    for table, pk in inserts:
        if (table, pk) not in known:
            problems.append(f"the hub never heard of {table} {pk}")
    for table, rows in alive.items():
        for pk, row in rows.items():
            origin = inserts.get((table, pk))
            if origin is None:
                problems.append(f"the hub holds {table} {pk}, which nobody inserted")
                continue
            for col in UNIQUE[table]:
                w = by_value.get((table, col, row[col]))
                if w is None or w.pk != pk:
                    problems.append(f"{table} {pk} {col}={row[col]!r} was never written there")
            for col in INSERT_ONLY[table]:
                if row[col] != origin.values[col]:
                    problems.append(f"{table} {pk} {col}={row[col]!r} was never written there")

    groups: dict[int, list[Write]] = defaultdict(list)
    for w in writes:
        if w.group is not None:
            groups[w.group].append(w)
    for members in groups.values():
        row = alive["cases"].get(members[0].pk)
        if len(members) < 2 or row is None:
            continue
        how["same-field groups checked"] += 1
        winner = max(members, key=lambda w: (w.hlc, w.office))
        if row[CONFLICT_COLUMN] != winner.values[CONFLICT_COLUMN]:
            problems.append(f"same-field group on {winner.pk}: the later stamp did not win")
        for w in members:
            value_ = w.values[CONFLICT_COLUMN]
            if w is not winner and ("cases", w.pk, CONFLICT_COLUMN, value_) not in losers:
                problems.append(f"same-field edit not in the conflict log: {w}")
    return problems, how


def explain(
    problems: list[str], writes: list[Write], hub: SqlHubStore, conflicts: list[ConflictRecord]
) -> str:
    """The story of the first record a problem names: its writes, the hub's record."""
    text = problems[0]
    pk = next((w.pk for w in writes if f" {w.pk} " in text or f"'{w.pk}'" in text), None)
    if pk is None:
        return ""
    lines = [f"\nhistory of {pk} (office, op, seq, stamp, values set, values seen):"]
    for w in writes:
        if w.pk == pk:
            lines.append(f"  {w.office} {w.op} {w.seq} {w.version} {w.values} {w.seen}")
    with hub.database.read() as conn:
        record = conn.execute(
            "SELECT seq, origin, deleted, vals, vers FROM _fieldsync_records WHERE pk = ?",
            [json.dumps([pk])],
        ).fetchall()
    lines.append(f"  hub record: {[tuple(r) for r in record]}")
    for c in conflicts:
        if c.pk.get("id") == pk:
            lines.append(
                f"  conflict {c.id} {c.kind} {c.column}: kept {c.kept_value!r} "
                f"{c.kept_version}, other {c.other_value!r} {c.other_version}"
            )
    return "\n".join(lines)


def check(chaos: Chaos) -> dict[str, Any]:
    """Every assertion about the final state; returns figures for the report."""
    with open_store(chaos.hub.db, create=False) as hub:
        return check_against(chaos, hub)


def check_against(chaos: Chaos, hub: SqlHubStore) -> dict[str, Any]:
    """:func:`check`, the hub read through its store (the same SQL on either engine)."""
    writes = chaos.oracle.writes
    with hub.database.snapshot() as conn:
        if hub.database.dialect.name == "sqlite":  # PostgreSQL has no such check
            found = [tuple(r) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            assert found == [("ok",)], f"hub db damaged: {found[:5]}"
        bad_counters = counter_problems(conn)
        acked = {
            str(n): int(a) for n, a in conn.execute("SELECT name, acked_seq FROM _fieldsync_nodes")
        }
        receipts: dict[str, Counter[tuple[int, int]]] = defaultdict(Counter)
        for node, seq, hlc in all_receipts(conn):
            receipts[node][(seq, hlc)] += 1
        known = {
            (t, json.loads(k)[0]) for t, k in conn.execute("SELECT tbl, pk FROM _fieldsync_records")
        }
    assert not bad_counters, bad_counters
    alive = {t: {str(r["id"]): r for r in hub.rows(t)} for t in UNIQUE}
    conflicts = hub.conflicts()
    hub_digest = {t: digest(alive[t]) for t in UNIQUE}

    for site in chaos.sites:
        with contextlib.closing(sqlite3.connect(site.path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], site.name
            for table in UNIQUE:
                here = table_rows(conn, table)
                ours = digest(here)
                assert ours == hub_digest[table], (
                    f"{site.name}.{table} differs from the hub ({ours[1]} vs "
                    f"{hub_digest[table][1]} rows): {first_differences(here, alive[table])}"
                )
            own_acked = conn.execute("SELECT acked_seq FROM _fieldsync_state").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "_fieldsync_rejected" in tables:  # changes the hub refused, set aside
                refused = conn.execute("SELECT * FROM _fieldsync_rejected").fetchall()
                assert not refused, f"the hub refused changes of {site.name}: {refused[:3]}"
        store = NodeStore(site.path)
        try:
            left, last = store.pending_count(), store.last_seq()
        finally:
            store.close()
        assert left == 0, f"{site.name} still has {left} changes queued"
        made = Counter((w.seq, w.hlc) for w in writes if w.office == site.name)
        assert last == own_acked == acked[site.name] == len(made), (
            f"{site.name}: last seq {last}, acked here {own_acked}, at the hub "
            f"{acked[site.name]}, writes made {len(made)}"
        )
        assert receipts[site.name] == made, (
            f"{site.name}: the hub's receipts differ from the writes made: "
            f"missing {sorted(made - receipts[site.name])[:5]}, "
            f"extra {sorted(receipts[site.name] - made)[:5]}"
        )

    problems, how = account(writes, alive, known, conflicts)
    assert not problems, (
        f"{len(problems)} problems, first ones:\n"
        + "\n".join(problems[:20])
        + explain(problems, writes, hub, conflicts)
    )
    kinds = Counter(c.kind for c in conflicts)
    return {
        "rows": {t: hub_digest[t][1] for t in UNIQUE},
        "conflicts": dict(kinds),
        "accounted": dict(how),
    }


def chaos_report(chaos: Chaos, stats: ProxyStats, seconds: float) -> str:
    runs = chaos.tally.agent_runs
    partial = sum(r.mid_sync and 0 < r.pending_after < r.pending_before for r in runs)
    ops = Counter(w.op for w in chaos.oracle.writes)
    return "\n".join(
        [
            f"chaos: seed {SEED}, {len(chaos.oracle)} writes {dict(ops)}, {OFFICES} offices, "
            f"{chaos.rounds} rounds, {seconds:.0f} s",
            f"proxy: {stats.summary()}",
            f"hub ({chaos.engine}, {chaos.hub.workers} worker(s)) SIGKILLed {chaos.hub.kills} "
            f"times, single workers {chaos.worker_kills} times ({chaos.busy_worker_kills} while "
            f"serving a request); agent process runs {len(runs)}, "
            f"{sum(r.meant_to_kill for r in runs)} meant to be killed, "
            f"SIGKILLed {sum(r.killed for r in runs)} times, "
            f"{sum(r.mid_sync for r in runs)} of them mid-sync "
            f"({partial} with part of the queue acknowledged)",
            f"in-process syncs: {chaos.tally.good_syncs} ok, {chaos.tally.failed_syncs} failed",
        ]
    )


def test_chaos_converges_without_losing_a_write(tmp_path: Path, engine: Engine) -> None:
    started = time.monotonic()
    print(f"\nchaos seed {SEED} (FIELDSYNC_CHAOS_SEED={SEED} repeats it)")
    chaos = Chaos(tmp_path, engine)
    try:
        chaos.open()
        chaos.run_rounds()
        chaos.save_writes(tmp_path / "writes.jsonl")  # to study a failure
        stats = chaos.proxy.stats()
        print(chaos_report(chaos, stats, time.monotonic() - started))
        assert not chaos.tally.problems, "\n".join(chaos.tally.problems[:20])
        chaos.quiet_rounds()
        for site in chaos.sites:
            site.close()
        chaos.hub.stop()
        figures = check(chaos)
    finally:
        chaos.close()
    print(f"final rows {figures['rows']}, conflicts {figures['conflicts']}")
    print(f"accounted: {figures['accounted']}")
    print(f"whole test: {time.monotonic() - started:.0f} s")

    assert not chaos.proxy.stats().errors, chaos.proxy.stats().errors
    assert not chaos.hub.log_problems(), chaos.hub.log_problems()[:20]
    assert len(chaos.oracle) >= OPS
    assert stats.requests > 0 and stats.failed / stats.requests >= MIN_FAILED_SHARE, stats
    assert chaos.hub.kills >= HUB_KILLS >= 3
    if chaos.hub.workers > 1:
        assert chaos.worker_kills >= 3, f"only {chaos.worker_kills} single workers killed"
    mid_sync = sum(r.mid_sync for r in chaos.tally.agent_runs)
    assert mid_sync >= AGENT_KILLS >= 3, f"only {mid_sync} agent kills in the middle of a sync"
    assert figures["accounted"].get("same-field groups checked", 0) >= 10
    assert figures["conflicts"].get("field", 0) >= 10
