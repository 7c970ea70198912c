"""
`fieldsync demo`: a hub and three offices on one machine: sync scopes (astana and almaty
hold their own cases, headquarters every case), an outage, a conflict and a case moved
from one office to another.

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
OFFICES = ("astana", "almaty", "hq")  # hq: headquarters, holding every case
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
    the offices syncing every few seconds, until ``stop`` is set.
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
        if any((base / f"{name}.db").exists() for name in ("hub", *OFFICES)):
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
        tokens = {name: hub.add_node(name) for name in OFFICES}
        hub.set_scopes("hq", ["*"])  # fieldsync hub add-node hq --scope '*'
        url = stack.enter_context(_serve(create_app(hub), serve_port or 0))
        echo(f"1. The hub serves {url} from {base / 'hub.db'}.")
        echo("   Registered (their tokens are stored as hashes): offices astana and almaty,")
        echo("   each holding only its own cases, and hq, headquarters' own office database,")
        echo("   holding every case (scope *).")
        offices = [Office(base, name, url, token) for name, token in tokens.items()]
        for office in offices:
            stack.callback(office.close)
        astana, almaty, hq = offices

        echo("2. Staff register cases with Python's plain sqlite3 module; triggers capture them.")
        echo("   Each case names its office (cases.office):")
        for office in (astana, almaty):
            _register(office, rng, 40, days_back=700)
            echo(f"   {office.name}: {_counts(office)}; {office.store.pending_count()} changes")
        echo("3. Every office syncs:")
        for office in offices:
            echo(f"   {office.sync()}")
        for office, what in ((astana, "its own"), (almaty, "its own"), (hq, "everyone's")):
            echo(f"   {office.name} holds {_counts(office)}: {what}")

        dead = _dead_url()
        astana.link(dead)
        echo(f"4. Astana's link goes down (its hub address now leads nowhere: {dead}).")
        clash = _pick(astana, "status = 'asylum_seeker'")
        shared = _pick(astana, "notes IS NULL", clash)
        aided = "id IN (SELECT case_id FROM assistance GROUP BY case_id HAVING count(*) > 1)"
        moved = _pick(astana, aided, clash, shared)
        moved_name, moved_aid = _case(astana, moved), _aid(astana, moved)
        astana.run("UPDATE cases SET status = 'refugee' WHERE id = ?", [[clash]])
        astana.run("UPDATE cases SET household_size = household_size + 2 WHERE id = ?", [[shared]])
        astana.run("UPDATE cases SET office = 'almaty' WHERE id = ?", [[moved]])
        added = _register(astana, rng, 6, days_back=1)
        echo(f"   astana: {_case(astana, clash)}: status -> refugee")
        echo(f"   astana: {_case(astana, shared)}: household_size +2 (a newborn and a cousin)")
        echo(f"   astana: {moved_name} moved to Almaty: office -> almaty")
        echo(f"   astana: registers {added}")
        try:
            astana.sync()
        except HubUnavailableError as exc:
            echo(f"   astana: sync failed: {exc}")
        pending = astana.store.status().pending
        echo(f"   astana keeps its {pending} changes (node status: {pending} pending) for later")

        time.sleep(0.01)  # headquarters corrects a little later than Astana
        echo("   Meanwhile headquarters reviews Astana's files:")
        hq.run("UPDATE cases SET status = 'closed' WHERE id = ?", [[clash]])
        hq.run("UPDATE cases SET notes = 'moved to Karaganda' WHERE id = ?", [[shared]])
        echo(f"   hq: {_case(hq, clash)}: status -> closed (same field!)")
        echo(f"   hq: {_case(hq, shared)}: notes edited (another field)")
        echo(f"   {hq.sync()}")

        astana.link(url)
        echo("5. Astana's link is back; every office syncs twice:")
        for office in (*offices, *offices):
            echo(f"   {office.sync()}")

        echo("6. What the hub decided:")
        for record in hub.conflicts():
            _show_conflict(echo, record.to_json(), _case(astana, record.pk["id"]))
        size, notes = astana.store.db.conn.execute(
            "SELECT household_size, notes FROM cases WHERE id = ?", [shared]
        ).fetchone()
        echo(f"   {_case(astana, shared)}: edits to different fields merge cleanly:")
        echo(f"      household_size {size} (from astana), notes {notes!r} (from hq)")
        (owner,) = almaty.store.db.conn.execute(
            "SELECT office FROM cases WHERE id = ?", [moved]
        ).fetchone()
        (left,) = astana.store.db.conn.execute(
            "SELECT count(*) FROM cases WHERE id = ?", [moved]
        ).fetchone()
        aid = f"{_aid(almaty, moved)} of {moved_aid} assistance deliveries"
        echo(f"   {moved_name}, id {moved}, moved to almaty:")
        echo(f"      almaty holds it now (office {owner!r}), with its {aid};")
        echo(f"      astana's copy is gone ({left} rows): removed without a delete")
        echo(f"      captured or sent (astana: {astana.store.status().pending} changes pending)")

        echo("7. Scopes: each office holds exactly the hub's rows in its scope (rows and sha256")
        echo("   of the sorted rows; hq holds *, all of the hub's):")
        scopes = hub.scopes()
        for table in TABLES:
            seen = []
            for office in offices:
                count, digest = _digest(office.store.rows(table))
                if (count, digest) != _digest(_in_scope(hub, table, scopes[office.name])):
                    raise FieldsyncError(f"{office.name} does not hold its scope of {table}")
                seen.append(f"{office.name} {count} {digest}")
            count, digest = _digest(hub.rows(table))
            echo(f"   {table:<11}" + "   ".join([*seen, f"hub {count} {digest}"]))
        echo("   Astana holds only Astana's cases, Almaty only Almaty's, headquarters all.")

        token = hub.add_admin("demo", "owner")
        echo(f"8. The admin dashboard is at {url}/ : offices, conflicts, headquarters figures.")
        if serve_port is None:
            echo("   (The hub stops with the demo; `fieldsync demo --serve` keeps it up.)")
        else:
            echo("   The hub stays up and the three offices sync every 10 s; Ctrl-C stops.")
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


def _pick(office: Office, where: str, *besides: str) -> str:
    """The first of the office's own cases (by number) matching ``where``, but ``besides``."""
    marks = ", ".join("?" * len(besides))
    sql = (
        f"SELECT id FROM cases WHERE office = ? AND {where} AND id NOT IN ({marks}) "
        "ORDER BY case_number LIMIT 1"
    )
    return str(office.store.db.conn.execute(sql, [office.name, *besides]).fetchone()[0])


def _aid(office: Office, case_id: str) -> int:
    sql = "SELECT count(*) FROM assistance WHERE case_id = ?"
    return int(office.store.db.conn.execute(sql, [case_id]).fetchone()[0])


def _in_scope(hub: SqliteHubStore, table: str, scopes: list[str] | None) -> list[dict[str, Any]]:
    """The hub's rows of ``table`` in ``scopes`` (None: all), from the values alone: a
    case by its office, an assistance delivery by its case's."""
    rows = hub.rows(table)
    if scopes is None:
        return rows
    if table == "cases":
        return [row for row in rows if row["office"] in scopes]
    office = {row["id"]: row["office"] for row in hub.rows("cases")}
    return [row for row in rows if office.get(row["case_id"]) in scopes]


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
