"""
fieldsync benchmark: one run, one machine, every figure next to its target.

What it measures (each figure is the median of ``--repeat`` repetitions):

- **End-to-end throughput.** N case inserts are made offline at office A (astana);
  the clock starts when A's sync starts and stops when B's (almaty's) sync has put
  them all in B's database. The hub is a real ``fieldsync hub serve`` subprocess
  (uvicorn on 127.0.0.1); the two syncs run in this process through
  ``SyncAgent.sync_once()`` and ``HttpHubClient``, exactly as ``fieldsync node sync``
  builds them, so the figure leaves out interpreter start-up. Also shown as a ratio
  to a raw SQLite ``executemany`` of the same rows into a plain table.
- **Change-capture overhead.** The same N rows, ``executemany`` in one transaction,
  into the office database (capture triggers) and into a plain table (same CREATE
  TABLE, no triggers), both WAL with ``synchronous=NORMAL``.
- **Bytes and requests on the wire, per hop.** In each repetition the sync is done a
  second time from scratch with each office reaching the hub through its own
  byte-counting TCP relay on 127.0.0.1 (in a separate process, so it shares no
  interpreter lock with the syncing office; kept out of the throughput figure, as it
  costs CPU): bytes both ways, HTTP headers included (TCP payload, not TCP/IP
  headers), and HTTP requests. Hop "push" is A <-> hub (A's whole sync), hop "pull"
  is hub <-> B (B's whole sync).
- **Peak memory.** A separate run with ``--memory-changes`` changes (1,000,000 by
  default) where both offices sync as ``fieldsync node sync`` subprocesses: peak RSS
  is VmHWM from /proc, sampled every 10 ms for the offices, read at the end for the hub.

Run ``make bench`` or ``.venv/bin/python bench/bench.py --help``; ``--only capture`` measures
the change-capture overhead alone (no hub, no sync, no memory run); ``--hub-db postgresql``
serves each hub from a fresh database on a throwaway PostgreSQL cluster (bench/scale.py
measures both engines in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import shared
from hub.store import open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import FieldsyncError
from shared.schema import Schema

CODE = Path(shared.__file__).resolve().parent.parent  # the fieldsync code measured
OFFICE_A, OFFICE_B = "astana", "almaty"
HOST = "127.0.0.1"
CHUNK = 50_000  # rows per transaction when filling the memory run's office

# -- realistic case rows -----------------------------------------------------------

FAMILY_NAMES = tuple(
    "Ahmadi Karimi Haidari Rahimi Nazari Hosseini Sultani Popal Al-Hassan Al-Khatib Haddad "
    "Mansour Darwish Kovalenko Shevchenko Bondarenko Tkachenko Mohamed Abdi Warsame Tesfaye "
    "Bekele Ibrahim Osman Rashidov Nazarov Yusupov Saidov Aung Hlaing Ахмади Каримов Сейткали "
    "Шевченко".split()
)
GIVEN_NAMES = tuple(
    "Ahmad Fatima Mohammad Zahra Ali Maryam Hassan Aisha Omar Layla Yusuf Amina Olena Dmytro "
    "Iryna Andriy Hodan Abdirahman Selam Dawit Farhod Dilnoza Rustam Nilufar Min Thandar Ахмад "
    "Фатима Айгерим Олена".split()
)
COUNTRIES = tuple("AFG SYR UKR IRQ SOM SDN ERI ETH MMR COD YEM IRN TJK PAK VEN".split())
STATUSES = ("asylum_seeker", "refugee", "rejected", "closed")
STATUS_WEIGHTS = (45, 35, 10, 10)
NOTES = (
    "Referred for legal counselling.",
    "Needs interpreter (Dari).",
    "Medical follow-up scheduled.",
    "Household moved within the city.",
    "Documents pending verification.",
    "Child enrolled in school.",
    "Cash assistance approved.",
    "Awaiting RSD interview.",
    "Vulnerable: single parent.",
    "Переводчик нужен (русский).",
)
COLUMNS = (
    "id",
    "case_number",
    "family_name",
    "given_name",
    "country_of_origin",
    "status",
    "household_size",
    "registered_on",
    "office",
    "notes",
)
INSERT = f"INSERT INTO cases ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
FIRST_DAY = date(2015, 1, 1).toordinal()
DAYS = date(2025, 12, 31).toordinal() - FIRST_DAY + 1


def case_rows(count: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """``count`` realistic rows of the default schema's ``cases`` table, reproducibly."""
    rng = random.Random(seed)
    for i in range(count):
        registered = date.fromordinal(FIRST_DAY + rng.randrange(DAYS))
        notes = None
        if rng.random() < 0.8:
            notes = " ".join(rng.sample(NOTES, rng.choice((1, 1, 2))))
        yield (
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            f"AST-{registered.year % 100:02d}-{i + 1:07d}",
            rng.choice(FAMILY_NAMES),
            rng.choice(GIVEN_NAMES),
            rng.choice(COUNTRIES),
            rng.choices(STATUSES, STATUS_WEIGHTS)[0],
            rng.randint(1, 9),
            registered.isoformat(),
            OFFICE_A,
            notes,
        )


# -- SQLite -----------------------------------------------------------------------


def open_db(path: Path) -> sqlite3.Connection:
    """A connection set up as fieldsync's own: WAL, synchronous=NORMAL, explicit BEGIN."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def timed_insert(path: Path, rows: Sequence[tuple[Any, ...]], create: str | None = None) -> float:
    """Seconds to ``executemany`` ``rows`` into ``cases`` in one transaction (commit included)."""
    conn = open_db(path)
    try:
        if create:
            conn.execute(create)
        gc.collect()
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def fill(path: Path, rows: Iterable[tuple[Any, ...]]) -> int:
    """Insert ``rows`` into ``cases`` a chunk per transaction; return how many."""
    conn = open_db(path)
    total = 0
    try:
        iterator = iter(rows)
        while chunk := list(itertools.islice(iterator, CHUNK)):
            conn.execute("BEGIN")
            conn.executemany(INSERT, chunk)
            conn.execute("COMMIT")
            total += len(chunk)
    finally:
        conn.close()
    return total


def digest(path: Path) -> tuple[int, str]:
    """Row count and a hash of every ``cases`` row, in key order."""
    conn = sqlite3.connect(path)
    try:
        sha = hashlib.sha256()
        count = 0
        for row in conn.execute("SELECT * FROM cases ORDER BY id"):
            sha.update(repr(row).encode("utf-8"))
            count += 1
        return count, sha.hexdigest()
    finally:
        conn.close()


def check_same(a: Path, b: Path, expected: int) -> None:
    """Raise unless B holds exactly A's ``expected`` case rows."""
    count_a, hash_a = digest(a)
    count_b, hash_b = digest(b)
    if count_a != expected or count_b != expected or hash_a != hash_b:
        raise BenchError(
            f"sync incomplete: {a.name} has {count_a} cases, {b.name} has {count_b}, "
            f"expected {expected}{'' if hash_a == hash_b else ', contents differ'}"
        )


# -- processes --------------------------------------------------------------------


class BenchError(Exception):
    """The benchmark could not measure what it meant to."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def fieldsync_command() -> str:
    path = Path(sys.executable).parent / "fieldsync"
    if not path.exists():
        raise BenchError(f"{path} not found; run `make install` and use the venv's python")
    return str(path)


def peak_rss_of(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in bytes; None once it has exited."""
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    return None


class Hub:
    """A real hub: ``fieldsync hub serve`` in a subprocess, on a loopback port."""

    def __init__(
        self,
        workdir: Path,
        offices: Sequence[str],
        ready_within: float = 60,
        *,
        everything: bool = True,
        db: str | None = None,
    ) -> None:
        """``everything``: each office holds every record (scope ``*``); else its own
        name's records, as ``fieldsync hub add-node NAME`` registers it. ``db``: a
        ``postgresql://`` URL of an empty database to serve (default: a SQLite file in
        ``workdir``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = db or str(workdir / "hub.db")
        store = open_store(path, create=True)
        try:
            self.tokens = {name: store.add_node(name) for name in offices}
            for name in offices if everything else ():  # B pulls everything A made
                store.set_scopes(name, ["*"])
        finally:
            store.close()
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = workdir / "hub.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [fieldsync_command(), "hub", "serve", "--db", path]
                + ["--host", HOST, "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(ready_within)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the hub exited ({self.process.returncode}): {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise BenchError(f"the hub did not answer within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, count: int = 5, sep: str = " | ") -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return sep.join(lines[-count:])

    @contextlib.contextmanager
    def blamed(self, what: str) -> Iterator[None]:
        """Turn a failure of ``what`` into a BenchError that quotes the end of the hub's log."""
        try:
            yield
        except (FieldsyncError, BenchError) as exc:
            tail = self.log_tail(40, "\n    ")
            raise BenchError(f"{what} failed: {exc}\n  the hub's log ends:\n    {tail}") from exc

    def peak_rss(self) -> int:
        peak = peak_rss_of(self.process.pid)
        if peak is None:
            raise BenchError(f"the hub exited ({self.process.poll()}): {self.log_tail()}")
        return peak

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


@dataclass
class Finished:
    """A subprocess that ran to its end: seconds, peak RSS (bytes), exit code, output."""

    seconds: float
    peak_rss: int
    returncode: int
    output: str


def run_measured(command: Sequence[str], timeout: float, log_path: Path) -> Finished:
    """Run ``command``, bounded by ``timeout``, sampling its VmHWM every 10 ms.

    Not ru_maxrss from wait4(): Linux carries the high-water mark of the process that
    forked the child across exec, so it would report this benchmark's own peak.
    """
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = started + timeout
    peak = 0
    while True:
        peak = max(peak, peak_rss_of(process.pid) or 0)  # VmHWM only grows while it lives
        try:
            returncode = process.wait(timeout=0.01)
            break
        except subprocess.TimeoutExpired:
            if time.perf_counter() > deadline:
                process.kill()
                process.wait(timeout=30)
                raise BenchError(
                    f"{shlex.join(command)} did not finish within {timeout:.0f} s"
                ) from None
    seconds = time.perf_counter() - started
    output = log_path.read_text(errors="replace").strip()
    return Finished(seconds, peak, returncode, output)


# -- byte-counting relay ----------------------------------------------------------


class RequestCounter:
    """Counts HTTP/1.1 requests in a client-to-server byte stream (Content-Length bodies)."""

    def __init__(self, on_request: Callable[[str], None]) -> None:
        self._on_request = on_request
        self._head = b""
        self._body_left = 0
        self.lost = False  # a body it cannot delimit (chunked): counting stops

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.lost:
            if self._body_left:
                taken = min(len(view), self._body_left)
                self._body_left -= taken
                view = view[taken:]
                continue
            self._head += view.tobytes()
            view = memoryview(b"")
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                self.lost = len(self._head) > 1 << 20
                return
            head, rest = self._head[:end], self._head[end + 4 :]
            self._head = b""
            lines = head.decode("latin-1").split("\r\n")
            method, target = (lines[0].split(" ") + ["", ""])[:2]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._on_request(f"{method} {target.split('?', 1)[0]}")
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.lost = True
            self._body_left = int(headers.get("content-length", "0") or 0)
            view = memoryview(rest)


class Hop:
    """A loopback port relaying TCP to the hub, counting bytes per connection and requests."""

    def __init__(self, target_port: int) -> None:
        self._target = (HOST, target_port)
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._connections: list[list[int]] = []  # [bytes up, bytes down] per connection
        self._requests: Counter[str] = Counter()
        self._counters: list[RequestCounter] = []
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            counts = [0, 0]
            counter = RequestCounter(self._count_request)
            with self._lock:
                self._connections.append(counts)
                self._counters.append(counter)
            done = threading.Semaphore(0)
            for args in ((client, upstream, 0, counter), (upstream, client, 1, None)):
                threading.Thread(target=self._pump, args=(*args, counts, done), daemon=True).start()
            threading.Thread(target=self._close, args=(client, upstream, done), daemon=True).start()

    def _count_request(self, name: str) -> None:
        with self._lock:
            self._requests[name] += 1

    @staticmethod
    def _pump(
        source: socket.socket,
        sink: socket.socket,
        index: int,
        counter: RequestCounter | None,
        counts: list[int],
        done: threading.Semaphore,
    ) -> None:
        try:
            while data := source.recv(1 << 16):
                counts[index] += len(data)  # before forwarding: counted once the peer has it
                if counter is not None:
                    counter.feed(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            done.release()

    @staticmethod
    def _close(a: socket.socket, b: socket.socket, done: threading.Semaphore) -> None:
        done.acquire()
        done.acquire()
        a.close()
        b.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "connections": len(self._connections),
                "bytes_up": sum(c[0] for c in self._connections),
                "bytes_down": sum(c[1] for c in self._connections),
                "requests": dict(self._requests),
                "uncounted_connections": sum(c.lost for c in self._counters),
            }

    def close(self) -> None:
        self._closing.set()
        self._listener.close()


def _relay_main(conn: Connection, target_port: int, names: Sequence[str]) -> None:
    """The relay process: one Hop per name; answers "stats" until "stop" (or EOF)."""
    hops = {name: Hop(target_port) for name in names}
    conn.send({name: hop.port for name, hop in hops.items()})
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                break
            if command == "stats":
                conn.send({name: hop.stats() for name, hop in hops.items()})
            else:
                break
    finally:
        for hop in hops.values():
            hop.close()


class Relay:
    """Byte-counting relays to the hub, one port per hop, in a process of their own."""

    def __init__(self, target_port: int, names: Sequence[str], timeout: float = 60) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_relay_main, args=(child, target_port, list(names)), daemon=True
        )
        self._process.start()
        child.close()
        try:
            self.ports: dict[str, int] = self._answer(timeout)
        except BaseException:
            self.close()
            raise

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def _answer(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise BenchError(f"the relay process did not answer within {timeout:.0f} s")
        return self._conn.recv()

    def stats(self) -> dict[str, dict[str, Any]]:
        self._conn.send("stats")
        stats: dict[str, dict[str, Any]] = self._answer(10)
        return stats

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
        self._conn.close()


# -- a throwaway PostgreSQL cluster -------------------------------------------------

NewDb = Callable[[], str] | None
# Durable, unlike the test suite's cluster (fsync off): a commit waits for its WAL
# flush, as the SQLite hub's commit (synchronous=FULL) waits for its fsync.
PG_SETTINGS = "-c listen_addresses='' -c max_connections=200"


@contextlib.contextmanager
def pg_cluster() -> Iterator[tuple[Any, int]]:
    """A PostgreSQL cluster of Debian's binaries in a temporary directory, on a Unix
    socket only (tests/engines.py starts it; as ``postgres`` when run as root), with
    durable commits; yields (tests.engines.PgCluster, the postmaster's pid), and stops
    and removes it at the end."""
    sys.path.insert(0, str(CODE))  # tests/ is not installed: the tree measured has it
    from tests import engines

    initdb = engines.newest_initdb()
    if initdb is None:
        raise BenchError(engines.INSTALL)
    server = engines._LocalServer(initdb)
    try:
        settings, engines._SETTINGS = engines._SETTINGS, PG_SETTINGS
        try:
            server.start()
        finally:
            engines._SETTINGS = settings
        socket_dir = quote(str(server.base), safe="/")
        admin = f"postgresql://{engines.SUPERUSER}@/postgres?host={socket_dir}"
        cluster = engines.PgCluster(admin, str(server.base))
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
        try:
            yield cluster, pid
        finally:
            cluster.close()
    finally:
        server.stop()


def fresh_databases(cluster: Any) -> Callable[[], str]:
    """A function giving the URL of a new empty database on ``cluster`` at each call."""
    return lambda: str(cluster.url(cluster.new_database()))


# -- the measurements -------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def agent_for(path: Path) -> SyncAgent:
    """The agent `fieldsync node sync` builds (default batch and page sizes)."""
    store = NodeStore(path)
    return SyncAgent(store, HttpHubClient(store.hub_url, store.token, node=store.node))


def close_agent(agent: SyncAgent) -> None:
    agent.client.close()
    agent.store.close()


def sync_pass(
    rows: Sequence[tuple[Any, ...]], workdir: Path, relayed: bool, new_db: NewDb = None
) -> dict[str, Any]:
    """Fresh hub and offices; ``rows`` inserted at A (timed), then A syncs, then B (timed).

    ``relayed``: each office reaches the hub through its own byte-counting relay.
    ``new_db``: gives the URL of a fresh PostgreSQL database for the hub (None: SQLite).
    """
    n = len(rows)
    workdir.mkdir()
    hub = Hub(workdir / "hub", (OFFICE_A, OFFICE_B), db=new_db() if new_db else None)
    relay = None
    try:
        urls = {OFFICE_A: hub.url, OFFICE_B: hub.url}
        if relayed:
            relay = Relay(hub.port, ("push", "pull"))
            urls = {OFFICE_A: relay.url("push"), OFFICE_B: relay.url("pull")}
        paths = {name: workdir / f"{name}.db" for name in urls}
        for name, path in paths.items():
            NodeStore.init(path, name, urls[name], hub.tokens[name]).close()
        capture = timed_insert(paths[OFFICE_A], rows)
        agent_a, agent_b = agent_for(paths[OFFICE_A]), agent_for(paths[OFFICE_B])
        try:
            gc.collect()
            with hub.blamed("the sync"):
                started = time.perf_counter()
                report_a = agent_a.sync_once()
                pushed_at = time.perf_counter()
                report_b = agent_b.sync_once()
                finished = time.perf_counter()
        finally:
            close_agent(agent_a)
            close_agent(agent_b)
        wire = relay.stats() if relay else {}
    finally:
        if relay:
            relay.close()
        hub.stop()
    if report_a.pushed != n or report_b.pulled != n:
        raise BenchError(f"A pushed {report_a.pushed} and B pulled {report_b.pulled}, not {n}")
    check_same(paths[OFFICE_A], paths[OFFICE_B], n)
    if any(hop["uncounted_connections"] for hop in wire.values()):
        raise BenchError("the relay could not count requests (chunked request body)")
    return {
        "capture_s": capture,
        "push_s": pushed_at - started,
        "pull_s": finished - pushed_at,
        "sync_s": finished - started,
        "wire": wire,
    }


def throughput_run(
    rows: Sequence[tuple[Any, ...]], workdir: Path, new_db: NewDb = None
) -> dict[str, Any]:
    """One repetition: plain insert; captured insert and sync straight to the hub; the same
    again through the relays, for the wire figures (the relay process costs CPU time)."""
    workdir.mkdir()
    plain = timed_insert(workdir / "plain.db", rows, Schema.load().table("cases").create)
    direct = sync_pass(rows, workdir / "direct", relayed=False, new_db=new_db)
    relayed = sync_pass(rows, workdir / "relayed", relayed=True, new_db=new_db)
    return {
        **direct,
        "plain_s": plain,
        "wire": relayed["wire"],
        "relayed_sync_s": relayed["sync_s"],
    }


def capture_run(
    rows: Sequence[tuple[Any, ...]], workdir: Path, captured_first: bool
) -> dict[str, Any]:
    """One repetition of the capture figure alone: plain insert and captured insert (no hub).

    ``captured_first``: which goes first, so that alternating repetitions cancel drift.
    """
    workdir.mkdir()
    office = workdir / f"{OFFICE_A}.db"
    NodeStore.init(office, OFFICE_A, f"http://{HOST}:9", "unused").close()
    create = Schema.load().table("cases").create
    if captured_first:
        capture = timed_insert(office, rows)
        plain = timed_insert(workdir / "plain.db", rows, create)
    else:
        plain = timed_insert(workdir / "plain.db", rows, create)
        capture = timed_insert(office, rows)
    return {"plain_s": plain, "capture_s": capture}


def memory_run(
    count: int, seed: int, workdir: Path, timeout: float, new_db: NewDb = None
) -> dict[str, Any]:
    """``count`` changes from A to B with both offices as `fieldsync node sync` processes."""
    workdir.mkdir()
    hub = Hub(workdir / "hub", (OFFICE_A, OFFICE_B), db=new_db() if new_db else None)
    try:
        hub_idle = hub.peak_rss()
        paths = {name: workdir / f"{name}.db" for name in (OFFICE_A, OFFICE_B)}
        for name, path in paths.items():
            NodeStore.init(path, name, hub.url, hub.tokens[name]).close()
        started = time.perf_counter()
        fill(paths[OFFICE_A], case_rows(count, seed))
        generated = time.perf_counter() - started
        progress(f"  {count:,} changes made at {OFFICE_A} in {generated:.1f} s; syncing")
        runs = {}
        hub_peaks = {}
        for name, path in paths.items():
            command = [fieldsync_command(), "node", "sync", str(path)]
            with hub.blamed(shlex.join(command)):
                done = run_measured(command, timeout, workdir / f"{name}.log")
                if done.returncode != 0:
                    raise BenchError(f"exit code {done.returncode}: {done.output[-500:]}")
            runs[name] = done
            hub_peaks[name] = hub.peak_rss()
            progress(f"  {done.output} (peak RSS {done.peak_rss / 1e6:.0f} MB)")
    finally:
        hub.stop()
    expect = {OFFICE_A: f"pushed {count},", OFFICE_B: f"pulled {count},"}
    for name, text in expect.items():
        if text not in runs[name].output:
            raise BenchError(f"{name}'s sync did not report {text!r}: {runs[name].output}")
    check_same(paths[OFFICE_A], paths[OFFICE_B], count)
    return {
        "generate_s": generated,
        "push_s": runs[OFFICE_A].seconds,
        "pull_s": runs[OFFICE_B].seconds,
        "node_push_rss": runs[OFFICE_A].peak_rss,
        "node_pull_rss": runs[OFFICE_B].peak_rss,
        "hub_idle_rss": hub_idle,
        "hub_rss_after_push": hub_peaks[OFFICE_A],
        "hub_rss": hub_peaks[OFFICE_B],
    }


# -- reporting --------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How one figure is shown: label, unit, decimals, target, and a note from another metric."""

    label: str
    unit: str
    digits: int = 0
    target: tuple[str, float] | None = None  # ("<=", "<" or ">=", limit)
    note: tuple[str, str] | None = None  # (metric, format) shown after the value


# The reported figures, in order, keyed by metric; {n} and {m} are the run sizes.
SPECS = {
    "e2e_rate": Spec(
        "End-to-end throughput, {n} inserts A → hub → B",
        "changes/s",
        target=(">=", 20_000),
        note=("e2e_s", "{:.1f} s"),
    ),
    "push_rate": Spec("  push: A's sync", "changes/s", note=("push_s", "{:.1f} s")),
    "pull_rate": Spec("  pull: B's sync", "changes/s", note=("pull_s", "{:.1f} s")),
    "relayed_rate": Spec("  the same, each office through a byte-counting relay", "changes/s"),
    "raw_rate": Spec("Raw SQLite executemany, plain table", "rows/s", note=("plain_s", "{:.2f} s")),
    "e2e_vs_raw": Spec("End-to-end rate ÷ raw executemany rate", "×", 3, (">=", 0.10)),
    "capture_overhead": Spec(
        "Change capture: office db (triggers) ÷ plain table",
        "×",
        2,
        ("<=", 2),
        ("capture_s", "{:.2f} s with triggers"),
    ),
    "push_bytes": Spec("Wire bytes per change, push hop (A ↔ hub)", "B", 1, ("<=", 120)),
    "pull_bytes": Spec("Wire bytes per change, pull hop (hub ↔ B)", "B", 1, ("<=", 120)),
    "push_requests": Spec("HTTP requests per 1,000 changes, push hop", "", 2, ("<=", 2)),
    "pull_requests": Spec("HTTP requests per 1,000 changes, pull hop", "", 2, ("<=", 2)),
    "node_push_mb": Spec("Peak RSS, node pushing {m} changes", "MB", 0, ("<", 200)),
    "node_pull_mb": Spec("Peak RSS, node pulling {m} changes", "MB", 0, ("<", 200)),
    "hub_mb": Spec(
        "Peak RSS, hub, {m}-change sync", "MB", 0, ("<", 200), ("hub_idle_mb", "{:.0f} MB idle")
    ),
    "generate_s": Spec("  making the {m} changes at A (triggers)", "s", 1),
    "cli_push_s": Spec("  `fieldsync node sync` of A (push), wall time", "s", 1),
    "cli_pull_s": Spec("  `fieldsync node sync` of B (pull), wall time", "s", 1),
    "cli_rate": Spec("  end to end as CLI processes", "changes/s"),
}


def throughput_metrics(n: int, run: dict[str, Any]) -> dict[str, float]:
    def wire(hop: str) -> tuple[float, float]:
        stats = run["wire"][hop]
        total = stats["bytes_up"] + stats["bytes_down"]
        return total / n, sum(stats["requests"].values()) * 1000 / n

    (push_bytes, push_requests), (pull_bytes, pull_requests) = wire("push"), wire("pull")
    return {
        "e2e_rate": n / run["sync_s"],
        "push_rate": n / run["push_s"],
        "pull_rate": n / run["pull_s"],
        "raw_rate": n / run["plain_s"],
        "e2e_vs_raw": run["plain_s"] / run["sync_s"],
        "capture_overhead": run["capture_s"] / run["plain_s"],
        "push_bytes": push_bytes,
        "pull_bytes": pull_bytes,
        "push_requests": push_requests,
        "pull_requests": pull_requests,
        "e2e_s": run["sync_s"],
        "push_s": run["push_s"],
        "pull_s": run["pull_s"],
        "plain_s": run["plain_s"],
        "capture_s": run["capture_s"],
        "relayed_rate": n / run["relayed_sync_s"],
    }


def capture_metrics(n: int, run: dict[str, Any]) -> dict[str, float]:
    return {
        "raw_rate": n / run["plain_s"],
        "capture_overhead": run["capture_s"] / run["plain_s"],
        "plain_s": run["plain_s"],
        "capture_s": run["capture_s"],
    }


def memory_metrics(m: int, run: dict[str, Any]) -> dict[str, float]:
    return {
        "node_push_mb": run["node_push_rss"] / 1e6,
        "node_pull_mb": run["node_pull_rss"] / 1e6,
        "hub_mb": run["hub_rss"] / 1e6,
        "hub_idle_mb": run["hub_idle_rss"] / 1e6,
        "hub_after_push_mb": run["hub_rss_after_push"] / 1e6,
        "generate_s": run["generate_s"],
        "cli_push_s": run["push_s"],
        "cli_pull_s": run["pull_s"],
        "cli_rate": m / (run["push_s"] + run["pull_s"]),
    }


def median(runs: Sequence[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def passed(spec: Spec, value: float) -> bool | None:
    if spec.target is None:
        return None
    op, limit = spec.target
    if op == ">=":
        return value >= limit
    return value <= limit if op == "<=" else value < limit


def figures(runs: Sequence[dict[str, float]], sizes: dict[str, str]) -> list[dict[str, Any]]:
    """Each reported metric present in ``runs``: its median, every run, its target."""
    out = []
    for key, spec in SPECS.items():
        if not runs or key not in runs[0]:
            continue
        value = median(runs, key)
        out.append(
            {
                "key": key,
                "label": spec.label.format(**sizes),
                "unit": spec.unit,
                "median": value,
                "runs": [r[key] for r in runs],
                "target": list(spec.target) if spec.target else None,
                "pass": passed(spec, value),
                "note": spec.note[1].format(median(runs, spec.note[0])) if spec.note else "",
            }
        )
    return out


def show(value: float, unit: str, digits: int, with_unit: bool = True) -> str:
    """``value`` with thousands separators; "×" and unitless figures sit tight."""
    number = f"{value:,.{digits}f}"
    if not with_unit or not unit:
        return number
    return number + unit if unit == "×" else f"{number} {unit}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["figure", "median", "min – max", "runs", "target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        runs, unit = row["runs"], row["unit"]
        digits = SPECS[row["key"]].digits
        spread = "—"
        if len(runs) > 1:
            low, high = (show(v, unit, digits, unit == "×") for v in (min(runs), max(runs)))
            spread = f"{low} – {high}"
        value = show(row["median"], unit, digits) + (f" ({row['note']})" if row["note"] else "")
        target = result = "—"
        if row["target"]:
            op, limit = row["target"]
            sign = {"<=": "≤", "<": "<", ">=": "≥"}[op]
            target = f"{sign} {show(limit, unit, 2 if limit < 1 else 0)}"
            result = "PASS" if row["pass"] else "**FAIL**"
        cells = [row["label"], value, spread, str(len(runs)), target, result]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    revision = "not a git checkout"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(CODE)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "node", "hub", "shared"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if head.returncode == 0:
            revision = head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "fieldsync_code": f"{CODE} ({revision})",
    }


# -- command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark fieldsync: throughput, capture overhead, wire cost, memory.",
    )
    parser.add_argument("--changes", type=int, help="N (default 100,000; --quick: 5,000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--memory-changes",
        type=int,
        help="changes in the peak-memory run (default 1,000,000; --quick: 20,000; 0 skips it)",
    )
    parser.add_argument(
        "--memory-repeat", type=int, default=1, help="repetitions of the memory run (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: smaller defaults, under a minute"
    )
    parser.add_argument(
        "--only",
        choices=["capture"],
        help="measure one figure alone: capture = the change-capture overhead (no hub, no "
        "sync, no memory run)",
    )
    parser.add_argument("--seed", type=int, default=2024, help="random seed of the case rows")
    parser.add_argument(
        "--hub-db",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the hub's database: a SQLite file (default), or a fresh database for each "
        "hub on a throwaway PostgreSQL cluster started for the run (Unix socket only, "
        "durable commits; Debian's server binaries, `make postgres`)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--tmpdir", help="where to put the temporary databases (default: $TMPDIR)")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds allowed per sync (default 3600)"
    )
    args = parser.parse_args(argv)
    if args.changes is None:
        args.changes = 5_000 if args.quick else 100_000
    if args.memory_changes is None:
        args.memory_changes = 20_000 if args.quick else 1_000_000
    if args.changes < 1 or args.repeat < 1 or args.memory_changes < 0 or args.memory_repeat < 1:
        parser.error("--changes, --repeat and --memory-repeat must be >= 1, --memory-changes >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    command = shlex.join(sys.orig_argv)
    info = machine()
    load_before = os.getloadavg()[0]
    progress(f"fieldsync benchmark: {command}")
    sizes = {"n": f"{args.changes:,}", "m": f"{args.memory_changes:,}"}
    results: dict[str, Any] = {"command": command, "machine": info, "config": vars(args)}
    metrics: list[dict[str, float]] = []
    memory: list[dict[str, float]] = []
    seconds: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            new_db: NewDb = None
            if args.hub_db == "postgresql" and args.only != "capture":
                progress("starting a throwaway PostgreSQL cluster")
                new_db = fresh_databases(stack.enter_context(pg_cluster())[0])
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fieldsync-bench-", dir=args.tmpdir)
            )
            started = time.perf_counter()
            rows = list(case_rows(args.changes, args.seed))
            for i in range(args.repeat if args.only == "capture" else 0):
                workdir = Path(tmp) / f"capture-{i + 1}"
                run = capture_run(rows, workdir, captured_first=i % 2 == 1)
                shutil.rmtree(workdir)
                metrics.append(capture_metrics(args.changes, run))
                progress(
                    f"capture {i + 1}/{args.repeat}: plain {run['plain_s']:.2f} s, captured "
                    f"{run['capture_s']:.2f} s, {run['capture_s'] / run['plain_s']:.2f}×"
                )
            for i in range(0 if args.only else args.repeat):
                workdir = Path(tmp) / f"throughput-{i + 1}"
                run = throughput_run(rows, workdir, new_db)
                shutil.rmtree(workdir)
                metrics.append(throughput_metrics(args.changes, run))
                results.setdefault("wire", []).append(run["wire"])
                progress(
                    f"throughput {i + 1}/{args.repeat}: plain {run['plain_s']:.2f} s, captured "
                    f"{run['capture_s']:.2f} s, push {run['push_s']:.1f} s, "
                    f"pull {run['pull_s']:.1f} s, through relays {run['relayed_sync_s']:.1f} s"
                )
            del rows
            seconds[args.only or "throughput"] = time.perf_counter() - started
            for i in range(args.memory_repeat if args.memory_changes and not args.only else 0):
                started = time.perf_counter()
                progress(f"memory {i + 1}/{args.memory_repeat}: {sizes['m']} changes")
                workdir = Path(tmp) / f"memory-{i + 1}"
                run = memory_run(
                    args.memory_changes, args.seed + 1 + i, workdir, args.timeout, new_db
                )
                shutil.rmtree(workdir)
                memory.append(memory_metrics(args.memory_changes, run))
                seconds["memory"] = seconds.get("memory", 0) + time.perf_counter() - started
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    seconds["total"] = time.perf_counter() - began
    info["load_average_1min"] = [load_before, os.getloadavg()[0]]
    table = figures(metrics, sizes) + figures(memory, sizes)
    results.update(figures=table, throughput_runs=metrics, memory_runs=memory, seconds=seconds)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    print(f"# fieldsync benchmark, {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    print(f"- command: `{command}`")
    print(
        f"- machine: {info['cpus']} CPUs ({info['cpu_model'] or 'unknown model'}), "
        f"{info['memory']} RAM, {info['platform']}; 1-min load average "
        f"{load_before:.2f} at start, {info['load_average_1min'][1]:.2f} at end"
    )
    print(
        f"- python {info['python']}, SQLite {info['sqlite']}, "
        f"fieldsync code {info['fieldsync_code']}"
    )
    memory_note = (
        f"{sizes['m']} changes, runs: {args.memory_repeat}; offices as `fieldsync node sync` "
        "subprocesses straight to the hub"
        if args.memory_changes and not args.only
        else "skipped"
    )
    if args.only == "capture":
        print(
            f"- capture only: N = {sizes['n']} case inserts, median of {args.repeat}; plain and "
            "captured inserts alternate which goes first; no hub, no sync"
        )
    else:
        print(
            f"- throughput and wire: N = {sizes['n']} case inserts, median of {args.repeat}; "
            f"hub: `fieldsync hub serve` subprocess on 127.0.0.1 on {args.hub_db} "
            f"({'a file' if args.hub_db == 'sqlite' else 'a throwaway local cluster'}); "
            "offices sync in this process "
            "(SyncAgent + HttpHubClient) straight to the hub, then again from scratch with each "
            "office through its own byte-counting relay process for the wire figures"
        )
    print(f"- memory: {memory_note}\n")
    print(markdown_table(table))
    parts = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items() if name != "total")
    print(f"\nTook {seconds['total']:.0f} s ({parts}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
