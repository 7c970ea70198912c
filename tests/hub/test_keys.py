"""Roles, revoking and rotating, the audit log and the sign-in throttle, on the store
(no network; the real hub is tests/integration/test_keys.py, test_roles.py and
test_audit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlite_utils

from fieldsync.hub_commands import _ROLES
from hub import audit
from hub.audit import Actor
from hub.auth import ROLES, SignInThrottle, allows, hash_token
from hub.migrations import MIGRATIONS
from hub.store import SqliteHubStore
from shared.errors import AuthError, FieldsyncError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_blocks_after_the_failures_for_a_while() -> None:
    clock = Clock()
    throttle = SignInThrottle(failures=3, window=60, block=30, clock=clock)
    for _ in range(2):
        throttle.failed(["addr:a"])
    assert throttle.retry_after(["addr:a"]) is None
    throttle.failed(["addr:a"])
    assert throttle.retry_after(["addr:a"]) == 30
    assert throttle.retry_after(["addr:b"]) is None  # another address
    clock.now += 29.5
    assert throttle.retry_after(["addr:b", "addr:a"]) == 1
    clock.now += 1
    assert throttle.retry_after(["addr:a"]) is None  # the block is over


def test_the_throttle_forgets_old_failures_and_successes_clear() -> None:
    clock = Clock()
    throttle = SignInThrottle(failures=3, window=60, block=30, clock=clock)
    throttle.failed(["addr:a"])
    throttle.failed(["addr:a"])
    clock.now += 61  # out of the window
    throttle.failed(["addr:a"])
    assert throttle.retry_after(["addr:a"]) is None
    throttle.failed(["addr:a"])
    throttle.succeeded(["addr:a"])
    throttle.failed(["addr:a"])
    assert throttle.retry_after(["addr:a"]) is None


def test_roles_are_ordered_and_the_cli_offers_them_all() -> None:
    assert _ROLES == ROLES == ("viewer", "resolver", "owner")
    assert allows("owner", "resolver") and allows("resolver", "resolver")
    assert not allows("viewer", "resolver") and not allows("resolver", "owner")
    assert not allows("king", "viewer")


def test_admins_made_before_roles_become_owners(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    db = sqlite_utils.Database(path)
    with db.conn:
        MIGRATIONS[0](db)  # the layout before roles
        db.conn.execute("PRAGMA user_version = 1")
        db.conn.execute(
            "INSERT INTO _fieldsync_admins (name, token_hash, created_at) VALUES (?, ?, ?)",
            ["old", hash_token("old-token"), "2026-01-01T00:00:00+00:00"],
        )
    db.close()
    with SqliteHubStore(path) as store:
        assert tuple(store.identify_admin("old-token")) == ("old", "owner")
        store.add_admin("new")
        assert {a["name"]: a["role"] for a in store.admins()} == {"old": "owner", "new": "viewer"}
        assert store.audit_entries() != []


def test_revoking_is_idempotent_and_rotating_reactivates(hub_store: SqliteHubStore) -> None:
    token = hub_store.add_node("astana")
    assert hub_store.revoke("astana") == ("office", False)
    assert hub_store.revoke("astana") == ("office", True)
    with pytest.raises(AuthError) as refused:
        hub_store.authenticate(token)
    assert (refused.value.code, refused.value.status) == ("revoked", 401)
    kind, new = hub_store.rotate_token("astana")
    assert kind == "office" and hub_store.authenticate(new) == "astana"
    with pytest.raises(AuthError, match="node set --token NEW") as old:
        hub_store.authenticate(token)
    assert old.value.code == "revoked"
    with pytest.raises(AuthError) as unknown:
        hub_store.authenticate("never-a-token")
    assert unknown.value.code == "unauthorized"
    actions = [e["action"] for e in hub_store.audit_entries()]
    assert actions == ["rotate", "revoke", "revoke", "add_office"]


def test_a_name_that_is_both_needs_a_kind(hub_store: SqliteHubStore) -> None:
    hub_store.add_node("ops")
    hub_store.add_admin("ops")
    with pytest.raises(FieldsyncError, match="both an office and an admin"):
        hub_store.revoke("ops")
    with pytest.raises(FieldsyncError, match="no admin named 'astana'"):
        hub_store.revoke("astana", "admin")
    assert hub_store.revoke("ops", "admin") == ("admin", False)
    assert [n["revoked_at"] for n in hub_store.nodes()] == [None]


def test_the_audit_log_takes_known_actions_only(hub_store: SqliteHubStore) -> None:
    with pytest.raises(ValueError, match="unknown audit action"):
        hub_store.audit("steal", Actor("x", "cli"))
    with pytest.raises(ValueError, match="limit"):
        hub_store.audit_entries(0)
    hub_store.audit("export", Actor("ann", "cli"), "cases", rows=3)
    [entry] = hub_store.audit_entries()
    assert (entry["actor"], entry["source"], entry["action"], entry["detail"]) == (
        "ann",
        "cli",
        "export",
        {"rows": 3},
    )
    assert set(audit.ACTIONS) >= {"sign_in", "revoke", "rotate", "set_role", "download"}


def test_the_audit_log_is_its_own_table(hub_store: SqliteHubStore) -> None:
    hub_store.add_node("astana")
    with hub_store.database.read() as conn:
        assert tuple(conn.execute("SELECT count(*) FROM _fieldsync_audit").fetchone()) == (1,)
        assert tuple(conn.execute("SELECT count(*) FROM _fieldsync_conflicts").fetchone()) == (0,)
