"""
`fieldsync demo`: two offices and a hub on one machine, an outage and a conflict.

Everything runs in one process on 127.0.0.1: the hub under uvicorn in a thread, the
offices as SQLite files written with plain ``sqlite3`` (capture needs no fieldsync
code). Only the ``demo`` command imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from hub.app import create_app
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.errors import FieldsyncError, HubUnavailableError

Echo = Callable[[str], None]
TABLES = ("cases", "assistance")
# Country of origin -> (given names, family names).
PEOPLE = {
    "AFG": ("Ahmad Farida Gulalai Mohammad Zarghona Najibullah Mariam",
            "Ahmadzai Popal Karimi Noori Safi Wardak"),
    "SYR": ("Omar Lina Yara Khaled Rania Samer Huda", "Haddad Al-Khatib Darwish Halabi Mansour"),
    "UZB": ("Dilnoza Jasur Bekzod Gulnora Sardor Nodira", "Karimov Yusupov Rakhimov Ergashev"),
    "TJK": ("Farrukh Zarina Rustam Madina Firuz", "Rahmonzoda Saidzoda Sharifzoda Davlatzoda"),
    "UKR": ("Olena Andriy Iryna Taras Oksana Dmytro", "Kovalenko Shevchenko Bondarenko Melnyk"),
    "YEM": ("Abdullah Amal Fatima Ali Nabil", "Al-Hamdani Saleh Ba-Wazir"),
    "SOM": ("Abdi Hodan Ayaan Mahad Fartun", "Warsame Farah Hassan"),
    "IRN": ("Reza Shirin Parisa Dariush Neda", "Hosseini Tehrani Moradi Rostami"),
}  # fmt: skip
WEIGHTS = (30, 15, 12, 12, 12, 7, 6, 6)
STATUSES = ("asylum_seeker", "refugee", "rejected", "closed")
AID = {"cash": (20000, 90000), "food": (10, 50), "hygiene_kit": (1, 4), "winter_kit": (1, 3)}


def run_demo(
    echo: Echo,
    keep_dir: str | None = None,
    *,
    serve_port: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the demo, printing what happens through ``echo``.

    With ``serve_port`` the hub listens on that loopback port and stays up, with
    both offices syncing every few seconds, until ``stop`` is set.
    """
    quiet = logging.getLogger("fieldsync")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the hub logs every push at INFO
    try:
        if keep_dir is None:
            with tempfile.TemporaryDirectory(prefix="fieldsync-demo-") as tmp:
                _story(echo, Path(tmp), serve_port, stop)
            return
        base = Path(keep_dir)
        base.mkdir(parents=True, exist_ok=True)
        if any((base / f"{name}.db").exists() for name in ("hub", "astana", "almaty")):
            raise FieldsyncError(f"{base} already holds demo databases; choose an empty folder")
        echo(f"Files are kept in {base}")
        _story(echo, base, serve_port, stop)
    finally:
        quiet.setLevel(level)


class Office:
    """One office: its database, written by staff with plain sqlite3, and its link."""

    def __init__(self, base: Path, name: str, url: str, token: str) -> None:
        self.name, self.token = name, token
        self.store = NodeStore.init(base / f"{name}.db", name, url, token)
        self.client = HttpHubClient(url, token)

    def link(self, url: str) -> None:
        self.client.close()
        self.client = HttpHubClient(url, self.token, timeout_seconds=5)

    def sync(self) -> str:
        return f"{self.name}: {SyncAgent(self.store, self.client).sync_once().summary()}"

    def run(self, sql: str, rows: Sequence[Sequence[Any]] = ((),)) -> None:
        with contextlib.closing(sqlite3.connect(self.store.path)) as conn, conn:
            conn.executemany(sql, rows)

    def close(self) -> None:
        self.client.close()
        self.store.close()


def _story(echo: Echo, base: Path, serve_port: int | None, stop: threading.Event | None) -> None:
    rng = random.Random(2024)
    with contextlib.ExitStack() as stack:
        hub = SqliteHubStore(base / "hub.db")
        stack.callback(hub.close)
        tokens = {name: hub.add_node(name) for name in ("astana", "almaty")}
        url = stack.enter_context(_serve(create_app(hub), serve_port or 0))
        echo(f"1. The hub serves {url} from {base / 'hub.db'};")
        echo("   offices astana and almaty are registered (their tokens are stored as hashes).")
        offices = [Office(base, name, url, token) for name, token in tokens.items()]
        for office in offices:
            stack.callback(office.close)
        astana, almaty = offices

        echo("2. Staff register cases with Python's plain sqlite3 module; triggers capture them:")
        for office in offices:
            _register(office, rng, 40, days_back=700)
            echo(f"   {office.name}: {_counts(office)}; {office.store.pending_count()} changes")
        echo("3. Both offices sync:")
        for office in (astana, almaty, astana):
            echo(f"   {office.sync()}")
        echo(f"   each office now holds {_counts(astana)}")

        dead = _dead_url()
        almaty.link(dead)
        echo(f"4. Almaty's link goes down (its hub address now leads nowhere: {dead}).")
        clash = _pick(almaty, "office = 'astana' AND status = 'asylum_seeker'")
        shared = _pick(almaty, "office = 'almaty' AND notes IS NULL")
        gone = _pick(astana, "office = 'astana' AND id NOT IN (SELECT case_id FROM assistance)")
        almaty.run("UPDATE cases SET status = 'closed' WHERE id = ?", [[clash]])
        almaty.run("UPDATE cases SET household_size = household_size + 2 WHERE id = ?", [[shared]])
        added = _register(almaty, rng, 6, days_back=1)
        echo(f"   almaty: {_case(almaty, clash)}: status -> closed")
        echo(f"   almaty: {_case(almaty, shared)}: household_size +2 (a newborn and a cousin)")
        echo(f"   almaty: registers {added}")
        try:
            almaty.sync()
        except HubUnavailableError as exc:
            echo(f"   almaty: sync failed: {exc}")
        pending = almaty.store.status().pending
        echo(f"   almaty keeps its {pending} changes (node status: {pending} pending) for later")

        time.sleep(0.01)  # Astana decides a little later than Almaty
        gone_name = _case(astana, gone)
        astana.run("UPDATE cases SET status = 'refugee' WHERE id = ?", [[clash]])
        astana.run("UPDATE cases SET notes = 'moved to Karaganda' WHERE id = ?", [[shared]])
        astana.run("DELETE FROM cases WHERE id = ?", [[gone]])
        echo(f"   astana: {_case(astana, clash)}: status -> refugee (same field!)")
        echo(f"   astana: {_case(astana, shared)}: notes edited (another field)")
        echo(f"   astana: deletes {gone_name}, registered twice by mistake")
        echo(f"   {astana.sync()}")

        almaty.link(url)
        echo("5. Almaty's link is back; everyone syncs twice:")
        for office in (almaty, astana, almaty, astana):
            echo(f"   {office.sync()}")

        echo("6. What the hub decided:")
        for record in hub.conflicts():
            _show_conflict(echo, record.to_json(), _case(astana, record.pk["id"]))
        size, notes = almaty.store.db.conn.execute(
            "SELECT household_size, notes FROM cases WHERE id = ?", [shared]
        ).fetchone()
        echo(f"   {_case(almaty, shared)}: edits to different fields merge cleanly:")
        echo(f"      household_size {size} (from almaty), notes {notes!r} (from astana)")
        deleted = almaty.store.db.conn.execute("SELECT count(*) FROM cases WHERE id = ?", [gone])
        echo(f"   {gone_name}: deleted in almaty too ({deleted.fetchone()[0]} rows left)")

        echo("7. Convergence: rows and sha256 of the sorted rows of each table:")
        sources = {"astana": astana.store.rows, "almaty": almaty.store.rows, "hub": hub.rows}
        for table in TABLES:
            seen = {name: _digest(rows(table)) for name, rows in sources.items()}
            echo(f"   {table:<11}" + "   ".join(f"{n} {c} {d}" for n, (c, d) in seen.items()))
            if len(set(seen.values())) != 1:
                raise FieldsyncError(f"the offices and the hub disagree on {table}")
        echo("   Astana, Almaty and the hub hold exactly the same data.")

        token = hub.add_admin("demo", "owner")
        echo(f"8. The admin dashboard is at {url}/ : offices, conflicts, headquarters figures.")
        if serve_port is None:
            echo("   (The hub stops with the demo; `fieldsync demo --serve` keeps it up.)")
        else:
            echo("   The hub stays up and both offices sync every 10 s; Ctrl-C stops.")
            for office in offices:
                agent = SyncAgent(office.store, office.client)
                thread = threading.Thread(
                    target=agent.run, args=(10.0,), kwargs={"stop": stop}, daemon=True
                )
                thread.start()
                stack.callback(thread.join, 30)
        echo("   Sign in with the admin token on the last line (stored only as a hash):")
        echo(token)
        if serve_port is not None and stop is not None:
            stop.wait()


def _register(office: Office, rng: random.Random, count: int, days_back: int) -> str:
    """Register ``count`` cases with some assistance in ``office``; say how many."""
    cases: list[tuple[Any, ...]] = []
    aid: list[tuple[Any, ...]] = []
    prefix = office.name[:3].upper()
    for _ in range(count):
        country = rng.choices(list(PEOPLE), WEIGHTS)[0]
        given, family = (rng.choice(names.split()) for names in PEOPLE[country])
        if family.endswith("ov") and given.endswith("a"):
            family += "a"  # Karimova, Yusupova
        case_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        day = date.today() - timedelta(days=rng.randrange(days_back))
        number = f"{prefix}-{day.year % 100}-{rng.randrange(10000):04d}"
        status = rng.choices(STATUSES, (5, 3, 1, 1))[0]
        size = rng.randint(1, 8)
        row = (case_id, number, family, given, country, status, size, day.isoformat(), office.name)
        cases.append(row)
        for kind in rng.sample(list(AID), rng.randrange(3)):
            low, high = AID[kind]
            when = min(day + timedelta(days=rng.randrange(60)), date.today())
            quantity = float(rng.randint(low, high))
            aid_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            aid.append((aid_id, case_id, kind, quantity, when.isoformat(), office.name))
    office.run(
        "INSERT INTO cases (id, case_number, family_name, given_name, country_of_origin, "
        "status, household_size, registered_on, office) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        cases,
    )
    office.run(
        "INSERT INTO assistance (id, case_id, kind, quantity, delivered_on, office) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        aid,
    )
    return f"{len(cases)} cases and {len(aid)} assistance deliveries"


@contextlib.contextmanager
def _serve(app: Starlette, port: int = 0) -> Iterator[str]:
    """Serve ``app`` under uvicorn on a loopback port (0: a free one), in a thread."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise FieldsyncError(f"cannot serve the demo hub on 127.0.0.1:{port}: {exc}") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo-hub")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise FieldsyncError("the demo hub did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _dead_url() -> str:
    """A loopback URL nothing listens on: a port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _counts(office: Office) -> str:
    return ", ".join(f"{len(office.store.rows(t))} {t}" for t in TABLES)


def _pick(office: Office, where: str) -> str:
    sql = f"SELECT id FROM cases WHERE {where} ORDER BY case_number LIMIT 1"
    return str(office.store.db.conn.execute(sql).fetchone()[0])


def _case(office: Office, case_id: str) -> str:
    number, family, given = office.store.db.conn.execute(
        "SELECT case_number, family_name, given_name FROM cases WHERE id = ?", [case_id]
    ).fetchone()
    return f"case {number} ({given} {family})"


def _show_conflict(echo: Echo, record: dict[str, Any], what: str) -> None:
    kept, other = record["kept"], record["other"]
    echo(f"   conflict #{record['id']} on {what}, id {record['pk']['id']}:")
    echo(f"   field {record['column']}, changed by both offices without seeing each other:")
    for side in (kept, other):
        echo(f"      {side['office']:<7} set {json.dumps(side['value']):<10} at {side['time']}")
    echo(f"   kept {json.dumps(kept['value'])}: the later edit wins under the 'merge' policy;")
    echo(f"   {other['office']}'s value stays in the conflict log ({record['status']}), and an")
    echo("   admin can still choose it: fieldsync hub conflicts / hub resolve")


def _digest(rows: list[dict[str, Any]]) -> tuple[int, str]:
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return len(rows), hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
