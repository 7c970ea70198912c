"""
The audit log: who did what to the hub's keys and case data, when and from where.

One row per event in ``_fieldsync_audit``, kept apart from the conflict log: sign-ins
(and failed or throttled ones, at the dashboard and at the admin API), resolutions,
downloads and exports, record histories read, offices and admins added, tokens revoked
and rotated, roles changed, offices' scopes changed, records moved. Each row names

- ``actor``: the admin (``?`` when a token named nobody), or the OS user of a command;
- ``source``: the client's address, or ``cli`` for a command run on the hub's machine;
- ``action``: one of :data:`ACTIONS`;
- ``target`` and ``detail``: what it was about, as names, keys and ids only.

It never holds a case value: callers pass tables, record keys, conflict ids, office
and admin names, formats and counts, never a column's value, and never a token.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from typing import Any

from hub.database import HubDatabase
from hub.engine import Conn
from hub.times import utcnow

# Every action the log records, and what it means.
ACTIONS = {
    "sign_in": "signed in to the dashboard",
    "sign_in_failed": "a dashboard sign-in with a wrong, revoked or office token",
    "sign_in_throttled": "a dashboard sign-in refused: too many failures (429)",
    "sign_out": "signed out of the dashboard",
    "api_auth_failed": "an admin API request with a wrong, revoked or office token",
    "api_auth_throttled": "an admin API request refused: too many failures (429)",
    "resolve": "settled a conflict",
    "download": "downloaded a table from the dashboard",
    "export": "exported a table with `fieldsync hub export`",
    "view_record": "read every version of one record",
    "search_records": "searched records by case number, name or key (the count, not the text)",
    "add_office": "registered an office",
    "add_admin": "made an admin",
    "revoke": "revoked a token",
    "rotate": "replaced a token",
    "set_role": "changed an admin's role",
    "set_scope": "changed which records an office holds (its scopes)",
    "move": "moved a record to another office",
    "schema_apply": "changed the schema (`hub schema apply`): its new version and plan",
}

# Who is nobody in particular: a token that matched no admin.
NOBODY = "?"
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, and from where: an admin and a client address, or a command's user."""

    name: str
    source: str

    @classmethod
    def cli(cls) -> Actor:
        """The user running a ``fieldsync hub`` command on the hub's machine."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid
            user = "unknown"
        return cls(user, "cli")


def record(conn: Conn, action: str, actor: Actor, target: str = "", **detail: Any) -> None:
    """Append one entry, in the caller's write transaction.

    ``detail`` holds names, keys, ids and counts only: never a case value or a token.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    conn.execute(
        "INSERT INTO _fieldsync_audit (at, actor, source, action, target, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            utcnow(),
            actor.name,
            actor.source,
            action,
            target,
            json.dumps(detail, sort_keys=True, default=str),
        ],
    )


def log(hub: HubDatabase, action: str, actor: Actor, target: str = "", **detail: Any) -> None:
    """Append one entry in a transaction of its own."""
    with hub.write() as conn:
        record(conn, action, actor, target, **detail)


def entries(hub: HubDatabase, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (older than id ``before``, if given), newest first."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    with hub.read() as conn:
        rows = conn.execute(
            "SELECT id, at, actor, source, action, target, detail FROM _fieldsync_audit "
            "WHERE id < ? ORDER BY id DESC LIMIT ?",
            [before if before is not None else 2**63 - 1, limit],
        ).fetchall()
    return [
        {
            "id": row[0],
            "at": row[1],
            "actor": row[2],
            "source": row[3],
            "action": row[4],
            "target": row[5],
            "detail": json.loads(row[6]),
        }
        for row in rows
    ]
