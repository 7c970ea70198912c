"""The databases the hub's tests run on: SQLite files, and PostgreSQL.

PostgreSQL comes from a throwaway cluster the test run starts itself (``pg_cluster``):
Debian's server binaries (``make postgres`` installs them when missing), a data
directory in /tmp, a Unix socket only (no TCP port), trust authentication, ``fsync``
off; stopped and removed at the end of the session, or at exit if the run is cut short.
``FIELDSYNC_TEST_PG=postgresql://USER@HOST/DB`` runs the tests on that server instead
(each test gets a database of its own there, dropped afterwards).

No PostgreSQL is a failure, not a skip: CI must run every test.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg.sql import SQL, Identifier

ENV = "FIELDSYNC_TEST_PG"
SUPERUSER = "fieldsync"  # the cluster's superuser, trusted on its socket
INSTALL = (
    "no PostgreSQL server found (/usr/lib/postgresql/*/bin/initdb): run `make postgres` as "
    "root, or `apt-get install postgresql`, or set FIELDSYNC_TEST_PG to a server URL"
)
_SETTINGS = "-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


@dataclass
class PgCluster:
    """A PostgreSQL server the tests may make databases on.

    ``admin``: the URL of a database to connect to for CREATE/DROP DATABASE.
    ``socket_dir``: the directory of its Unix socket (None for a server given by URL
    that is reached over TCP).
    """

    admin: str
    socket_dir: str | None
    prefix: str = "t_"
    started_in: float = 0.0  # seconds initdb + start took (0 for a server given by URL)
    shared: bool = False  # a server given by URL: drop what the run made, at the end
    made: list[str] = field(default_factory=list)
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _conn: psycopg.Connection[tuple[object, ...]] | None = None

    def url(self, dbname: str) -> str:
        """The URL of database ``dbname`` on this server (psycopg and ``--db`` take it)."""
        return urlsplit(self.admin)._replace(path="/" + quote(dbname)).geturl()

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.admin, autocommit=True)
        return self._conn

    def new_database(self, template: str | None = None, name: str | None = None) -> str:
        """CREATE DATABASE a new empty database (a copy of ``template`` if given), named
        ``name`` or the next free name; return its name."""
        name = name or f"{self.prefix}{next(self._numbers)}"
        query = SQL("CREATE DATABASE {}").format(Identifier(name))
        if template is not None:
            query = SQL("{} TEMPLATE {}").format(query, Identifier(template))
        admin = self._admin()
        if admin.info.server_version >= 150000:  # a copy of files: faster for small ones
            query = SQL("{} STRATEGY FILE_COPY").format(query)
        admin.execute(query)
        self.made.append(name)
        return name

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ``name``, closing any connection still open on it."""
        self._admin().execute(
            SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(Identifier(name))
        )

    def close(self) -> None:
        """Drop what is left of the run's databases on a shared server; disconnect."""
        if self.shared:
            for name in self.made:
                self.drop_database(name)
        if self._conn is not None:
            self._conn.close()


def newest_initdb() -> Path | None:
    """Debian's initdb of the newest PostgreSQL installed, if any."""
    found = list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        return None
    return max(found, key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)


class _LocalServer:
    """A cluster in a temporary directory, run as ``postgres`` when we are root (the
    server refuses to run as root), else as ourselves."""

    def __init__(self, initdb: Path) -> None:
        self.bin = initdb.parent
        # short: a Unix socket's path must fit in ~107 bytes
        self.base = Path(tempfile.mkdtemp(prefix="fs-pg-", dir="/tmp"))
        self.data = self.base / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)  # root reaches it anyway
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.running = False

    def run(self, *args: str) -> None:
        done = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr.strip()}\n{tail}")

    def start(self) -> None:
        self.run(
            str(self.bin / "initdb"),
            *("-D", str(self.data), "--no-sync", "-A", "trust", "--locale=C.UTF-8"),
            *("-E", "UTF8", "-U", SUPERUSER),
        )
        self.run(
            str(self.bin / "pg_ctl"),
            *("start", "-w", "-D", str(self.data), "-l", str(self.base / "server.log")),
            *("-o", f"-k {self.base} {_SETTINGS}"),
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server (immediately: nothing in it is worth keeping) and remove it."""
        if self.running:
            self.running = False
            try:
                self.run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster() -> tuple[PgCluster, _LocalServer | None]:
    """The server FIELDSYNC_TEST_PG names, or a throwaway local cluster just started."""
    given = os.environ.get(ENV)
    if given:
        host = dict(psycopg.conninfo.conninfo_to_dict(given)).get("host")
        socket_dir = str(host) if isinstance(host, str) and host.startswith("/") else None
        # distinct names per run: the server may be shared
        return PgCluster(given, socket_dir, prefix=f"t_{os.getpid()}_", shared=True), None
    initdb = newest_initdb()
    if initdb is None:
        pytest.fail(INSTALL, pytrace=False)
    server = _LocalServer(initdb)
    atexit.register(server.stop)  # a run cut short leaves nothing behind either
    began = time.perf_counter()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    admin = f"postgresql://{SUPERUSER}@/postgres?host={quote(str(server.base), safe='/')}"
    return PgCluster(admin, str(server.base), started_in=time.perf_counter() - began), server


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server for the whole session (see the module's docstring)."""
    cluster, server = start_cluster()
    try:
        yield cluster
    finally:
        cluster.close()
        if server is not None:
            server.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = pg_cluster.new_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@dataclass
class Engine:
    """What a hub database is: ``name`` "sqlite" or "postgres"; :meth:`db` gives what
    ``hub … --db`` takes."""

    name: str
    cluster: PgCluster | None = None
    made: list[str] = field(default_factory=list)
    _files: Iterator[int] = field(default_factory=itertools.count)

    def db(self, tmp_path: Path) -> str:
        """A new hub database: a file path in ``tmp_path`` (SQLite) or a fresh
        database's URL (PostgreSQL)."""
        if self.cluster is None:
            return str(tmp_path / f"hub{next(self._files) or ''}.db")
        name = self.cluster.new_database()
        self.made.append(name)
        return self.cluster.url(name)


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Each test that takes it runs on both engines (the cluster starts only if needed).
    A test marked ``sqlite_only`` (of SQLite's own file or connection) has no postgres
    case: tests/conftest.py does not collect it."""
    yield from _engine(request)


@pytest.fixture
def hub_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The engine of the integration tests' ``hub``: SQLite, and PostgreSQL too in a
    module marked ``engines`` (tests/conftest.py parametrises it)."""
    yield from _engine(request)


def _engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "sqlite":
        yield Engine("sqlite")
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    found = Engine("postgres", cluster)
    yield found
    for name in found.made:
        cluster.drop_database(name)
