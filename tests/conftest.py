"""Shared fixtures: a real uvicorn hub on 127.0.0.1 and a factory of office nodes; and
the check that markers agree with folders."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from hub.app import create_app
from hub.store import SqlHubStore, SqliteHubStore, open_store
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.schema import Schema
from tests.engines import (  # noqa: F401  (fixtures, for every test)
    Engine,
    engine,
    hub_engine,
    pg_cluster,
    pg_url,
)

# Each of these folders holds exactly the tests with the marker of its name, so that
# `pytest -m "not integration"` and `pytest tests/node` skip the same slow tests.
MARKED_FOLDERS = ("integration", "browser")
TESTS = Path(__file__).parent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The integration tests' hub is SQLite's, and PostgreSQL's too in a module (or for
    a test) marked ``engines``."""
    if "hub_engine" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("engines") is not None
        names = ["sqlite", "postgres"] if both else ["sqlite"]
        metafunc.parametrize("hub_engine", names, ids=names if both else [""], indirect=True)


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: every test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run any test while a marker and a folder disagree (MARKED_FOLDERS);
    leave out the postgres case of a test marked ``sqlite_only``."""
    sqlite_only = [
        item
        for item in items
        if item.get_closest_marker("sqlite_only") is not None and _engine_of(item) == "postgres"
    ]
    if sqlite_only:
        config.hook.pytest_deselected(items=sqlite_only)
        items[:] = [item for item in items if item not in sqlite_only]
    wrong = []
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        folder = item.path.relative_to(TESTS).parts[0]
        for marker in MARKED_FOLDERS:
            marked = item.get_closest_marker(marker) is not None
            if marked and folder != marker:
                wrong.append(f"{item.nodeid}: marked {marker} outside tests/{marker}/")
            elif folder == marker and not marked:
                wrong.append(f"{item.nodeid}: in tests/{marker}/ but not marked {marker}")
    if wrong:
        raise pytest.UsageError(
            "cannot run the tests: markers disagree with folders. Move the test to its "
            "marker's folder, or mark its module (pytestmark = pytest.mark.NAME):\n  "
            + "\n  ".join(wrong)
        )


def _engine_of(item: pytest.Item) -> str | None:
    """The engine a test's case runs on (None: it takes none)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    found = callspec.params.get("engine") or callspec.params.get("hub_engine")
    return found.name if isinstance(found, Engine) else found


@dataclass
class Hub:
    """A hub served by uvicorn on a loopback port."""

    url: str
    store: SqlHubStore
    path: Path  # the SQLite file (meaningless on PostgreSQL: use ``db``)
    db: str = ""  # what `hub … --db` takes: the file, or the database's URL

    def sql(self, query: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the hub's database, whichever engine it is."""
        with self.store.database.read() as conn:
            return [tuple(row) for row in conn.execute(query, parameters).fetchall()]


@dataclass
class Office:
    """One office: its database and its sync agent."""

    name: str
    store: NodeStore
    agent: SyncAgent
    client: HttpHubClient
    path: Path

    def sync(self) -> None:
        self.agent.sync_once()


def serve(app: object) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port until the generator closes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # as uvicorn sets on a socket of its own: without it, a client that writes a request
    # in two parts (requests, schemathesis) waits 40 ms for each answer (delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def hub(tmp_path: Path, hub_engine: Engine) -> Iterator[Hub]:  # noqa: F811
    """A real hub behind uvicorn on 127.0.0.1: a SQLite file in tmp_path (and, in a
    module marked ``engines``, a PostgreSQL database too)."""
    db = hub_engine.db(tmp_path)
    store = open_store(db)
    gen = serve(create_app(store))
    url = next(gen)
    try:
        yield Hub(url, store, Path(db), db)
    finally:
        gen.close()
        store.close()


@pytest.fixture
def make_office(tmp_path: Path, hub: Hub) -> Iterator[Callable[..., Office]]:
    """Factory: ``make_office("astana")`` registers an office on the hub and inits its db.

    Offices hold every record (``scopes=("*",)``) unless told otherwise: most tests are
    about sync mechanics between offices sharing cases, not about sync scopes."""
    offices: list[Office] = []

    def make(
        name: str,
        *,
        schema: Schema | None = None,
        batch_size: int = 1000,
        page_size: int = 1000,
        transport: httpx.BaseTransport | None = None,
        scopes: tuple[str, ...] = ("*",),
    ) -> Office:
        token = hub.store.add_node(name)
        if scopes:
            hub.store.set_scopes(name, scopes)
        path = tmp_path / f"{name}.db"
        store = NodeStore.init(path, name, hub.url, token, schema)
        client = HttpHubClient(
            hub.url,
            token,
            client=httpx.Client(transport=transport, timeout=30) if transport else None,
            node=name,
        )
        agent = SyncAgent(store, client, batch_size=batch_size, page_size=page_size)
        office = Office(name, store, agent, client, path)
        offices.append(office)
        return office

    yield make
    for office in offices:
        office.client.close()
        office.store.close()


def schema_with_policy(policy: str) -> Schema:
    """The default schema, its cases table under ``policy``."""
    text = Schema.load().source.replace(
        '[tables.cases]\npolicy = "merge"', f'[tables.cases]\npolicy = "{policy}"'
    )
    schema = Schema.from_toml(text)
    assert schema.tables["cases"].policy == policy
    return schema


@pytest.fixture
def policy_hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Hub, Schema]]:
    """A hub whose cases table uses the policy given by indirect parametrisation."""
    schema = schema_with_policy(request.param)
    store = SqliteHubStore(tmp_path / "policy-hub.db", schema)
    gen = serve(create_app(store))
    url = next(gen)
    try:
        yield Hub(url, store, tmp_path / "policy-hub.db"), schema
    finally:
        gen.close()
        store.close()
