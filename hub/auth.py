"""
Who may sync and who may look: office tokens, admin tokens and dashboard sessions.

An office pushes and pulls with its own token (``_fieldsync_nodes``, which also keeps
how far the hub has dealt with its changes); an admin reads and settles with an admin
token (``_fieldsync_admins``) or, in the dashboard, a session cookie with its CSRF
token (``_fieldsync_sessions``). Tokens and session cookies are stored only as
SHA-256 hashes. Neither kind of token opens the other's door.

Every check reads the database (nothing is cached), so a token revoked or replaced
by ``fieldsync hub revoke`` / ``rotate-token`` is refused on the running hub's very
next request, and a revoked admin's sessions end with it. An office's request reads
its token with one statement (:func:`office_of`; on PostgreSQL in autocommit, one
round trip); :class:`SeenTokens` only tells which requests may send a body first.
The hash of a token taken back is kept (``_fieldsync_retired_tokens``) so that
whoever still sends it is told it was revoked, rather than that it is unknown.

An admin has a role (:data:`ROLES`): a viewer sees status and figures, a resolver
also settles conflicts, an owner also reads case data (downloads, record histories)
and the audit log. :class:`SignInThrottle` slows down guessing; every change of a
key or a role is recorded in the audit log (hub/audit.py) in its own transaction.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from hub import audit
from hub.audit import Actor
from hub.database import HubDatabase
from hub.engine import Conn
from hub.times import utcnow
from shared.clock import check_node_name
from shared.errors import AuthError, FieldsyncError, HubRejectedError, StoreError

# How long a dashboard session lasts.
SESSION_HOURS = 12

# Admin roles, least to most; each may do what those before it may.
ROLES = ("viewer", "resolver", "owner")
DEFAULT_ROLE = "viewer"

# The two tables of tokens, by the kind of holder.
_TABLES = {"office": "_fieldsync_nodes", "admin": "_fieldsync_admins"}


class Admin(NamedTuple):
    """A signed-in admin: name and role."""

    name: str
    role: str


def allows(role: str, needed: str) -> bool:
    """Whether an admin of ``role`` may do what needs ``needed``."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def hash_token(token: str) -> str:
    """The form a token is stored in: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(conn: Conn, table: str, name: str, taken: str) -> str:
    """Add ``name`` to ``table`` (offices or admins) with a new token; return the token.

    Only the token's hash is stored; ``taken`` is the error when the name is.
    """
    if conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", [name]).fetchone():
        raise FieldsyncError(taken)
    token = secrets.token_urlsafe(32)
    conn.execute(
        f"INSERT INTO {table} (name, token_hash, created_at) VALUES (?, ?, ?)",
        [name, hash_token(token), utcnow()],
    )
    return token


# -- offices ---------------------------------------------------------------------------


def add_node(hub: HubDatabase, name: str, by: Actor | None = None) -> str:
    """Register an office and return its new token (only its hash is stored)."""
    check_node_name(name)
    if name == "hub":
        raise ValueError("the office name 'hub' is reserved")
    with hub.write() as conn:
        token = new_token(conn, "_fieldsync_nodes", name, f"office {name!r} is already registered")
        audit.record(conn, "add_office", by or Actor.cli(), f"office {name}")
        return token


def nodes(hub: HubDatabase) -> list[dict[str, Any]]:
    """Every registered office, by name, with when it was last seen, pushed and pulled."""
    with hub.read() as conn:
        cursor = conn.execute(
            "SELECT name, created_at, acked_seq, last_seen_at, last_push_at, last_pull_at, "
            "revoked_at FROM _fieldsync_nodes ORDER BY name"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def authenticate(hub: HubDatabase, token: str) -> str:
    """Return the office that owns ``token``; raise AuthError otherwise."""
    return office_of(hub, token)[0]


def office_of(hub: HubDatabase, token: str) -> tuple[str, int]:
    """The office that owns ``token`` and the number of its last change the hub has
    dealt with, in one statement; AuthError otherwise.

    Asked on every request of an office: outside a transaction (on PostgreSQL a
    statement in autocommit, one round trip instead of three).
    """
    with lookup(hub) as conn:
        row = conn.execute(
            "SELECT name, revoked_at, acked_seq FROM _fieldsync_nodes WHERE token_hash = ?",
            [hash_token(token)],
        ).fetchone()
    if row is not None and row[1] is None:
        return str(row[0]), int(row[2])
    if row is None and is_admin_token(hub, token):
        raise AuthError(
            "an admin token cannot push or pull; the office syncs with its own token",
            "forbidden",
            403,
        )
    revoked = revoked_token(hub, token, "office")
    if revoked is not None:
        raise revoked
    raise AuthError("unknown or revoked token", "unauthorized", 401)


@contextmanager
def lookup(hub: HubDatabase) -> Iterator[Conn]:
    """A connection for one short read of the newest state, outside a transaction:
    SQLite's short reads (:meth:`HubDatabase.read`); on PostgreSQL a pooled
    connection in autocommit (its probe: one statement needs no BEGIN and COMMIT)."""
    if hub.dialect.name == "sqlite":
        with hub.read() as conn:
            yield conn
        return
    import psycopg  # the engine's (only here: SQLite hubs never load it)

    try:
        with hub.engine.probe() as conn:
            if conn is None:  # only SQLite's probe answers None
                raise StoreError(f"{hub.where}: no connection for a lookup")
            yield conn
    except psycopg.OperationalError as exc:  # as the engine's transactions say it
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{hub.where}: {why}") from None


def revoked_token(hub: HubDatabase, token: str, kind: str) -> RevokedError | None:
    """The error for a token of ``kind`` that was revoked or replaced (None: it was not):
    401 ``revoked``, saying what to do."""
    digest = hash_token(token)
    with hub.read() as conn:
        row = conn.execute(
            f"SELECT name, revoked_at FROM {_TABLES[kind]} "
            "WHERE token_hash = ? AND revoked_at IS NOT NULL",
            [digest],
        ).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT name, at FROM _fieldsync_retired_tokens WHERE token_hash = ? AND kind = ?",
                [digest, kind],
            ).fetchone()
    if row is None:
        return None
    name, when = str(row[0]), str(row[1])
    if kind == "office":
        detail = (
            f"the token of office {name!r} was revoked at {when}; ask the hub's admin for a "
            f"new one (`fieldsync hub rotate-token {name}`) and set it at the office with "
            "`fieldsync node set --token NEW`"
        )
    else:
        detail = (
            f"the token of admin {name!r} was revoked at {when}; ask an owner of the hub "
            f"for a new one (`fieldsync hub rotate-token {name} --admin`)"
        )
    return RevokedError(detail, name)


class SeenTokens:
    """Offices' tokens this process found good, by hash (the token itself is never
    kept): at most ``size``, the oldest forgotten first.

    Never trusted to let a request in: every request is authenticated against the
    database. It only tells that a request may send its body before that lookup, so
    that the lookup and the request's work share one trip to a worker thread
    (hub/app.py); a token that fails a lookup is forgotten, so whoever sends it again
    is refused before its body is read.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._offices: dict[str, str] = {}
        self._lock = threading.Lock()

    def office(self, token: str) -> str | None:
        """The office ``token`` belonged to when last looked up (None: not seen good)."""
        return self._offices.get(hash_token(token))

    def saw(self, token: str, office: str) -> None:
        digest = hash_token(token)
        with self._lock:
            self._offices[digest] = office
            while len(self._offices) > self.size:
                del self._offices[next(iter(self._offices))]

    def forget(self, token: str) -> None:
        with self._lock:
            self._offices.pop(hash_token(token), None)


class RevokedError(AuthError):
    """A token that was revoked or replaced: 401 ``revoked``; ``name`` is its holder."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message, "revoked", 401)
        self.name = name


def acked(hub: HubDatabase, node: str) -> int:
    """The number of ``node``'s last change the hub has dealt with (0: none)."""
    with lookup(hub) as conn:
        row = conn.execute(
            "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
        ).fetchone()
    if row is None:
        raise FieldsyncError(f"there is no office {node!r}")
    return int(row[0])


# -- admins and sessions ---------------------------------------------------------------


def add_admin(
    hub: HubDatabase, name: str, role: str = DEFAULT_ROLE, by: Actor | None = None
) -> str:
    """Register an admin of ``role`` and return a new token (only its hash is stored)."""
    check_node_name(name)
    check_role(role)
    with hub.write() as conn:
        token = new_token(conn, "_fieldsync_admins", name, f"admin {name!r} already exists")
        conn.execute("UPDATE _fieldsync_admins SET role = ? WHERE name = ?", [role, name])
        audit.record(conn, "add_admin", by or Actor.cli(), f"admin {name}", role=role)
        return token


def authenticate_admin(hub: HubDatabase, token: str) -> str:
    """Return the admin who owns ``token``; AuthError 401 (unknown or revoked) or 403
    (an office's)."""
    return identify_admin(hub, token).name


def identify_admin(hub: HubDatabase, token: str) -> Admin:
    """The admin who owns ``token`` and their role; AuthError 401 (unknown, or
    ``revoked``) or 403 (an office's)."""
    digest = hash_token(token)
    with hub.read() as conn:
        row = conn.execute(
            "SELECT name, role FROM _fieldsync_admins WHERE token_hash = ? AND revoked_at IS NULL",
            [digest],
        ).fetchone()
        office = (
            conn.execute(
                "SELECT name FROM _fieldsync_nodes WHERE token_hash = ?", [digest]
            ).fetchone()
            if row is None
            else None
        )
    if row is not None:
        return Admin(str(row[0]), str(row[1]))
    if office is not None:
        raise AuthError(
            "an office token cannot open the admin pages; sign in with an admin token "
            "(`fieldsync hub add-admin NAME`)",
            "forbidden",
            403,
        )
    revoked = revoked_token(hub, token, "admin")
    if revoked is not None:
        raise revoked
    raise AuthError("unknown or revoked admin token", "unauthorized", 401)


def is_admin_token(hub: HubDatabase, token: str) -> bool:
    with hub.read() as conn:
        return (
            conn.execute(
                "SELECT 1 FROM _fieldsync_admins WHERE token_hash = ?", [hash_token(token)]
            ).fetchone()
            is not None
        )


def start_session(hub: HubDatabase, admin: str) -> tuple[str, str]:
    """A new dashboard session for ``admin``: (cookie value, CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with hub.write() as conn:
        conn.execute(
            "DELETE FROM _fieldsync_sessions WHERE expires_at < ?",
            [now.isoformat(timespec="seconds")],
        )
        conn.execute(
            "INSERT INTO _fieldsync_sessions (token_hash, admin, csrf, created_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?)",
            [
                hash_token(token),
                admin,
                csrf,
                now.isoformat(timespec="seconds"),
                (now + timedelta(hours=SESSION_HOURS)).isoformat(timespec="seconds"),
            ],
        )
    return token, csrf


def session(hub: HubDatabase, token: str) -> tuple[str, str, str] | None:
    """(admin, CSRF token, role) of a live session, or None (unknown, expired, admin
    revoked). The role is read each time: a changed role takes effect at once."""
    with hub.read() as conn:
        row = conn.execute(
            "SELECT s.admin, s.csrf, a.role FROM _fieldsync_sessions AS s "
            "JOIN _fieldsync_admins AS a ON a.name = s.admin AND a.revoked_at IS NULL "
            "WHERE s.token_hash = ? AND s.expires_at > ?",
            [hash_token(token), utcnow()],
        ).fetchone()
    return (str(row[0]), str(row[1]), str(row[2])) if row else None


def end_session(hub: HubDatabase, token: str) -> None:
    with hub.write() as conn:
        conn.execute("DELETE FROM _fieldsync_sessions WHERE token_hash = ?", [hash_token(token)])


# -- taking keys back ------------------------------------------------------------------


def _kind_of(conn: Conn, name: str, kind: str | None) -> str:
    """Whether ``name`` is an office or an admin (``kind`` chooses when it is both)."""
    found = [
        k
        for k, table in _TABLES.items()
        if (kind is None or k == kind)
        and conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", [name]).fetchone()
    ]
    if not found:
        what = {"office": "no office", "admin": "no admin"}.get(kind or "", "no office or admin")
        raise FieldsyncError(f"there is {what} named {name!r}")
    if len(found) > 1:
        raise FieldsyncError(
            f"{name!r} is both an office and an admin; say which with --office or --admin"
        )
    return found[0]


def _retire(conn: Conn, kind: str, name: str, why: str) -> None:
    """Keep the hash of ``name``'s current token, so that it is answered ``revoked``."""
    conn.execute(
        "INSERT INTO _fieldsync_retired_tokens (token_hash, kind, name, why, at) "
        f"SELECT token_hash, ?, name, ?, ? FROM {_TABLES[kind]} WHERE name = ? "
        "ON CONFLICT (token_hash) DO NOTHING",
        [kind, why, utcnow(), name],
    )


def revoke(
    hub: HubDatabase, name: str, kind: str | None = None, by: Actor | None = None
) -> tuple[str, bool]:
    """Revoke the token of office or admin ``name``: (its kind, whether it already was).

    Idempotent; recorded each time. An admin's dashboard sessions end with it. An
    office's state at the hub (what it pushed, its acknowledgements) is kept.
    """
    with hub.write() as conn:
        kind = _kind_of(conn, name, kind)
        table = _TABLES[kind]
        already = (
            conn.execute(f"SELECT revoked_at FROM {table} WHERE name = ?", [name]).fetchone()[0]
            is not None
        )
        if not already:
            conn.execute(f"UPDATE {table} SET revoked_at = ? WHERE name = ?", [utcnow(), name])
        if kind == "admin":
            conn.execute("DELETE FROM _fieldsync_sessions WHERE admin = ?", [name])
        audit.record(conn, "revoke", by or Actor.cli(), f"{kind} {name}", already=already)
    return kind, already


def rotate_token(
    hub: HubDatabase, name: str, kind: str | None = None, by: Actor | None = None
) -> tuple[str, str]:
    """Give office or admin ``name`` a new token: (its kind, the token).

    The old token is refused from the next request on (answered ``revoked``); a
    revoked office or admin is active again with the new one. An admin's sessions
    end; an office keeps its state at the hub (what it pushed, acknowledgements).
    """
    with hub.write() as conn:
        kind = _kind_of(conn, name, kind)
        table = _TABLES[kind]
        was_revoked = (
            conn.execute(f"SELECT revoked_at FROM {table} WHERE name = ?", [name]).fetchone()[0]
            is not None
        )
        _retire(conn, kind, name, "rotated")
        token = secrets.token_urlsafe(32)
        conn.execute(
            f"UPDATE {table} SET token_hash = ?, revoked_at = NULL WHERE name = ?",
            [hash_token(token), name],
        )
        if kind == "admin":
            conn.execute("DELETE FROM _fieldsync_sessions WHERE admin = ?", [name])
        audit.record(conn, "rotate", by or Actor.cli(), f"{kind} {name}", was_revoked=was_revoked)
    return kind, token


def set_role(hub: HubDatabase, name: str, role: str, by: Actor | None = None) -> str:
    """Give admin ``name`` the role ``role``; return the role they had."""
    check_role(role)
    with hub.write() as conn:
        row = conn.execute("SELECT role FROM _fieldsync_admins WHERE name = ?", [name]).fetchone()
        if row is None:
            raise FieldsyncError(f"there is no admin named {name!r}")
        conn.execute("UPDATE _fieldsync_admins SET role = ? WHERE name = ?", [role, name])
        audit.record(conn, "set_role", by or Actor.cli(), f"admin {name}", old=row[0], new=role)
    return str(row[0])


def admins(hub: HubDatabase) -> list[dict[str, Any]]:
    """Every admin, by name: role, when made, when revoked (never a token)."""
    with hub.read() as conn:
        cursor = conn.execute(
            "SELECT name, role, created_at, revoked_at FROM _fieldsync_admins ORDER BY name"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# -- sign-in throttling -----------------------------------------------------------------

# A client address, or an admin named by a failed attempt, with FAILURES failures
# within WINDOW_SECONDS is refused (429) for BLOCK_SECONDS. A success clears them.
FAILURES = 5
WINDOW_SECONDS = 60.0
BLOCK_SECONDS = 60.0
_MAX_KEYS = 10_000  # forget the oldest beyond this many addresses


class ThrottledError(HubRejectedError):
    """Too many failed sign-ins: 429, with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many failed sign-ins; try again in {retry_after} s", "throttled", 429
        )
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class SignInThrottle:
    """Failed sign-ins per key (``addr:ADDRESS``, ``admin:NAME``), kept in memory.

    One per hub process, shared by the dashboard's /login and the admin API.
    """

    def __init__(
        self,
        failures: int = FAILURES,
        window: float = WINDOW_SECONDS,
        block: float = BLOCK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures, self.window, self.block, self.clock = failures, window, block, clock
        self._lock = threading.Lock()
        self._failed: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}  # key: until

    def retry_after(self, keys: Sequence[str]) -> int | None:
        """Seconds until the most blocked of ``keys`` may try again; None: none is."""
        now = self.clock()
        with self._lock:
            waits = [self._blocked[k] - now for k in keys if self._blocked.get(k, 0) > now]
        return max(1, int(max(waits) + 0.999)) if waits else None

    def failed(self, keys: Sequence[str]) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                times = self._failed.setdefault(key, deque())
                times.append(now)
                while times and times[0] <= now - self.window:
                    times.popleft()
                if len(times) >= self.failures:
                    self._blocked[key] = now + self.block
                    times.clear()
            self._forget_oldest()

    def succeeded(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._failed.pop(key, None)
                self._blocked.pop(key, None)

    def _forget_oldest(self) -> None:
        for kept in (self._failed, self._blocked):
            while len(kept) > _MAX_KEYS:
                del kept[next(iter(kept))]
