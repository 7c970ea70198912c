"""
The hub's identity (its *epoch*), and what a backup of the hub holds.

The epoch is a random word in ``_fieldsync_meta``, made the first time a file is
opened as a hub (hubs made before it get one then). Every health check, pull page and
push answer carries it. A backup made by ``fieldsync hub backup`` has no epoch, only
a mark saying which hub it copies and when (:func:`mark_backup`): the first time the
file is served (`hub serve`), whether ``hub restore`` put it in place or a plain
``cp``, it gets a new epoch; other commands leave it a backup. An office that sees the
epoch change knows the hub was restored from a backup and may lack changes it
acknowledged (node/restore.py re-sends them). A copy restored twice is two new
identities: each file served makes its own.
"""

from __future__ import annotations

import logging
import secrets

from hub.engine import Conn, dialect_of
from hub.times import utcnow
from shared.errors import StoreError

log = logging.getLogger("fieldsync.hub")

EPOCH = "epoch"
BACKUP_OF = "backup_of"  # in a backup: the epoch of the hub it copies
BACKUP_AT = "backup_at"  # in a backup: when it was taken
RESTORED = "restored_from"  # in a restored hub: "<backup_of> at <backup_at>"
ANCHOR = "anchor"  # PostgreSQL: the database the hub was last served in (Dialect.anchor)

_META = "SELECT value FROM _fieldsync_meta WHERE key = ?"


def read_epoch(conn: Conn) -> str:
    """The hub's epoch ("" in a file not opened as a hub since it was copied)."""
    row = conn.execute(_META, [EPOCH]).fetchone()
    return "" if row is None else str(row[0])


def open_epoch(conn: Conn, *, serving: bool = True) -> str:
    """The hub's epoch, made if the file has none (a new hub, an older one, a backup
    put in place); call in the opening write transaction.

    A backup opened by a command that does not serve it (`hub status --db BACKUP`, to
    look at it) is left a backup, with no epoch ("" is returned): made then, the epoch
    would be copied with the file, and the same backup put in place twice by a plain
    ``cp`` would be one identity, the second restore unnoticed by the offices."""
    found = read_epoch(conn)
    anchor = dialect_of(conn).anchor(conn)
    if anchor is not None:
        found = _check_anchor(conn, found, anchor, serving)
    if found:
        return found
    if not serving and conn.execute(_META, [BACKUP_AT]).fetchone() is not None:
        return ""
    epoch = secrets.token_hex(8)
    _put(conn, EPOCH, epoch)
    taken = conn.execute(_META, [BACKUP_AT]).fetchone()
    if taken is not None:
        of = conn.execute(_META, [BACKUP_OF]).fetchone()
        restored = f"{of[0] if of else '?'} at {taken[0]}, restored {utcnow()}"
        _put(conn, RESTORED, restored)
        conn.execute("DELETE FROM _fieldsync_meta WHERE key IN (?, ?)", [BACKUP_AT, BACKUP_OF])
        log.warning(
            "this hub database is a backup taken at %s put in place: new identity %s; "
            "offices re-send the changes it lacks",
            taken[0],
            epoch,
        )
    return epoch


def _check_anchor(conn: Conn, found: str, anchor: str, serving: bool) -> str:
    """A PostgreSQL hub put back from a copy (pg_restore, a point-in-time recovery)
    carries no backup mark: what tells it is the database it finds itself in. Served
    there for the first time, it takes a new epoch ("" is returned: made by the
    caller), as a marked backup does; another command only looks."""
    stored = conn.execute(_META, [ANCHOR]).fetchone()
    if stored is not None and stored[0] == anchor:
        return found
    if stored is None or not found:  # a new hub, or one moved here (`hub migrate`)
        if serving or stored is None:
            _put(conn, ANCHOR, anchor)
        return found
    if not serving:
        return found
    _put(conn, ANCHOR, anchor)
    _put(conn, RESTORED, f"{found} in database {stored[0]}, restored {utcnow()}")
    conn.execute("DELETE FROM _fieldsync_meta WHERE key = ?", [EPOCH])
    log.warning(
        "this hub database is a copy of hub %s (database %s) put back here: a new "
        "identity; offices re-send the changes it lacks",
        found,
        stored[0],
    )
    return ""


def mark_backup(conn: Conn) -> None:
    """Make a copy of the hub a backup: no epoch, and which hub it copies, when."""
    epoch = read_epoch(conn)
    conn.execute("DELETE FROM _fieldsync_meta WHERE key = ?", [EPOCH])
    if epoch:  # a backup of a backup keeps the first one's mark
        _put(conn, BACKUP_OF, epoch)
    conn.execute(
        "INSERT INTO _fieldsync_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        [BACKUP_AT, utcnow()],
    )


def _put(conn: Conn, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO _fieldsync_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )


def count_hub(conn: Conn) -> dict[str, int]:
    """What a hub database holds: records, history versions, offices, the highest seq.

    StoreError if the file is not a hub database.
    """
    found = dialect_of(conn).table_names(conn)
    if "_fieldsync_state" in found:
        raise StoreError("is an office database, not a hub database")
    if not {"_fieldsync_meta", "_fieldsync_records", "_fieldsync_nodes"} <= found:
        raise StoreError("is not a fieldsync hub database")
    if conn.execute(_META, ["schema"]).fetchone() is None:
        raise StoreError("is not a fieldsync hub database (no schema)")
    seq = conn.execute(_META, ["seq"]).fetchone()
    return {
        "records": _count(conn, "_fieldsync_records"),
        "history": _count(conn, "_fieldsync_history") if "_fieldsync_history" in found else 0,
        "offices": _count(conn, "_fieldsync_nodes"),
        "highest seq": int(seq[0]) if seq else 0,
    }


def _count(conn: Conn, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
