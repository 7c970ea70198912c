"""
Who may sync and who may look: office tokens, admin tokens and dashboard sessions.

An office pushes and pulls with its own token (``_fieldsync_nodes``, which also keeps
how far the hub has dealt with its changes); an admin reads and settles with an admin
token (``_fieldsync_admins``) or, in the dashboard, a session cookie with its CSRF
token (``_fieldsync_sessions``). Tokens and session cookies are stored only as
SHA-256 hashes. Neither kind of token opens the other's door.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from hub.database import HubDatabase
from hub.times import utcnow
from shared.clock import check_node_name
from shared.errors import AuthError, FieldsyncError

# How long a dashboard session lasts.
SESSION_HOURS = 12


def hash_token(token: str) -> str:
    """The form a token is stored in: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(conn: sqlite3.Connection, table: str, name: str, taken: str) -> str:
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


def add_node(hub: HubDatabase, name: str) -> str:
    """Register an office and return its new token (only its hash is stored)."""
    check_node_name(name)
    if name == "hub":
        raise ValueError("the office name 'hub' is reserved")
    with hub.write() as conn:
        return new_token(conn, "_fieldsync_nodes", name, f"office {name!r} is already registered")


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
    with hub.read() as conn:
        row = conn.execute(
            "SELECT name, revoked_at FROM _fieldsync_nodes WHERE token_hash = ?",
            [hash_token(token)],
        ).fetchone()
    if row is None and is_admin_token(hub, token):
        raise AuthError(
            "an admin token cannot push or pull; the office syncs with its own token",
            "forbidden",
            403,
        )
    if row is None or row[1] is not None:
        raise AuthError("unknown or revoked token", "unauthorized", 401)
    return str(row[0])


def acked(hub: HubDatabase, node: str) -> int:
    """The number of ``node``'s last change the hub has dealt with (0: none)."""
    with hub.read() as conn:
        row = conn.execute(
            "SELECT acked_seq FROM _fieldsync_nodes WHERE name = ?", [node]
        ).fetchone()
    if row is None:
        raise FieldsyncError(f"there is no office {node!r}")
    return int(row[0])


# -- admins and sessions ---------------------------------------------------------------


def add_admin(hub: HubDatabase, name: str) -> str:
    """Register an admin and return a new token (only its hash is stored)."""
    check_node_name(name)
    with hub.write() as conn:
        return new_token(conn, "_fieldsync_admins", name, f"admin {name!r} already exists")


def authenticate_admin(hub: HubDatabase, token: str) -> str:
    """Return the admin who owns ``token``; AuthError 401 (unknown) or 403 (an office's)."""
    digest = hash_token(token)
    with hub.read() as conn:
        row = conn.execute(
            "SELECT name FROM _fieldsync_admins WHERE token_hash = ? AND revoked_at IS NULL",
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
        return str(row[0])
    if office is not None:
        raise AuthError(
            "an office token cannot open the admin pages; sign in with an admin token "
            "(`fieldsync hub add-admin NAME`)",
            "forbidden",
            403,
        )
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


def session(hub: HubDatabase, token: str) -> tuple[str, str] | None:
    """(admin, CSRF token) of a live session, or None (unknown, expired, admin revoked)."""
    with hub.read() as conn:
        row = conn.execute(
            "SELECT s.admin, s.csrf FROM _fieldsync_sessions AS s "
            "JOIN _fieldsync_admins AS a ON a.name = s.admin AND a.revoked_at IS NULL "
            "WHERE s.token_hash = ? AND s.expires_at > ?",
            [hash_token(token), utcnow()],
        ).fetchone()
    return (str(row[0]), str(row[1])) if row else None


def end_session(hub: HubDatabase, token: str) -> None:
    with hub.write() as conn:
        conn.execute("DELETE FROM _fieldsync_sessions WHERE token_hash = ?", [hash_token(token)])
