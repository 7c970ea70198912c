"""
Sync scopes: which offices hold which records.

A table declared with a scope (:class:`shared.schema.Scope`) holds records that each
belong to one *scope key*: the value of its scope column (``cases.office``), or, for
a table that follows a parent, the key of its parent record (an assistance record
belongs wherever its case does). The hub keeps each record's key with it
(``_fieldsync_records.scope``) and, for a follower, its parent's key text
(``parent``), so that a moving case carries its assistance records along.

An office holds the records whose key is in its scopes (``_fieldsync_nodes.scopes``:
a JSON list of keys, ``["*"]`` for every record, NULL for just its own name), and
every record of tables without a scope. A record whose scope column is NULL, or whose
parent the hub does not know, has the key ``""``: only offices holding ``*`` see it.

**Moves.** When a record's key changes, the hub notes which key it left
(``_fieldsync_exits``, with the record's new seq). An office that held it finds a
*gone* entry in its pull stream and drops its copy without capturing a delete; the
office it moved to pulls it as any changed record. Followers move with it: each gets
the new key and a new seq, and an exit of its own.

**Who may write.** An office may change a record in its scopes, and create records
that land in them. It may also change a record that left its scopes after the office
last pulled: an edit made offline to a case that moved away is merged, not lost, and
the office is told again that the record left. Anything else is rejected, per change,
with no word of where the record now is.

**Scope changes.** When an admin gives an office other scopes, its next pull answers
``resync``: the office pulls its whole scope again and drops what that did not bring
(not when it has never reached the hub: it holds nothing yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from hub import audit, records
from hub.audit import Actor
from hub.database import HubDatabase
from hub.engine import Conn, dialect_of
from hub.history import Version, write_history
from hub.times import utcnow
from shared.clock import Timestamp
from shared.errors import FieldsyncError, InvalidChangeError
from shared.merge import RecordState
from shared.protocol import dumps_text
from shared.schema import RecordKey, Schema, Table

ALL = "*"  # in an office's scopes: every record
UNASSIGNED = ""  # the key of a record that names no office (or whose parent is unknown)
_CHUNK = 500

# Where a record belongs: its scope key (None: its table has no scope) and, for a
# follower, its parent's key text.
Place = tuple[str | None, str | None]
# A record whose key changed, or a new one: table, key text, key before (None: new),
# key now, its hub seq.
Move = tuple[Table, str, str | None, str, int]


def read_scopes(text: str | None, node: str) -> frozenset[str] | None:
    """An office's stored scopes as a set of keys (None: every record)."""
    if text is None:
        return frozenset([node])
    keys = frozenset(orjson.loads(text))
    return None if ALL in keys else keys


def office_scopes(conn: Conn, node: str) -> tuple[frozenset[str] | None, int]:
    """An office's scopes (None: every record) and the cursor it last pulled from."""
    row = conn.execute(
        "SELECT scopes, pulled_seq FROM _fieldsync_nodes WHERE name = ?", [node]
    ).fetchone()
    return read_scopes(row[0], node), int(row[1])


def describe(scopes: frozenset[str] | None) -> str:
    if scopes is None:
        return "every record"
    return ", ".join(sorted(repr(k) if k == UNASSIGNED else k for k in scopes)) or "nothing"


def set_scopes(
    hub: HubDatabase, node: str, keys: Sequence[str], by: Actor | None = None
) -> frozenset[str] | None:
    """Give office ``node`` the scopes ``keys`` (``*``: every record); return them.

    The office pulls its whole scope again on its next sync, and drops what falls out.
    Recorded in the audit log, as done by ``by`` (None: the command's user).
    """
    if not keys:
        raise FieldsyncError("give at least one scope key (an office name), or * for all")
    for key in keys:
        if not key or key != key.strip() or len(key) > 200:
            raise FieldsyncError(f"{key!r} is not a scope key: use an office name, or *")
    wanted = sorted(set(keys))
    text = orjson.dumps([ALL] if ALL in wanted else wanted).decode()
    with hub.write() as conn:
        row = conn.execute("SELECT scopes FROM _fieldsync_nodes WHERE name = ?", [node]).fetchone()
        if row is None:
            raise FieldsyncError(f"no office named {node!r} is registered")
        if read_scopes(row[0], node) != read_scopes(text, node):
            # An office that never reached the hub holds nothing to pull again or drop
            # (headquarters given * as it is registered): its first pull is plain.
            conn.execute(
                "UPDATE _fieldsync_nodes SET scopes = ?, "
                "rescope = CASE WHEN rescope <> 0 OR last_seen_at IS NOT NULL THEN 1 ELSE 0 END "
                "WHERE name = ?",
                [text, node],
            )
            audit.record(conn, "set_scope", by or Actor.cli(), f"office {node}", scopes=wanted)
    return read_scopes(text, node)


def all_scopes(hub: HubDatabase) -> dict[str, list[str] | None]:
    """Each office's scopes, sorted (None: every record)."""
    with hub.read() as conn:
        rows = conn.execute("SELECT name, scopes FROM _fieldsync_nodes ORDER BY name").fetchall()
    found = {}
    for name, text in rows:
        keys = read_scopes(text, name)
        found[name] = None if keys is None else sorted(keys)
    return found


def _children(schema: Schema) -> Mapping[str, tuple[Table, ...]]:
    """Per table, the tables whose records follow its records."""
    found: dict[str, list[Table]] = {}
    for table in schema.tables.values():
        if table.scope is not None and table.scope.parent is not None:
            found.setdefault(table.scope.parent, []).append(table)
    return {name: tuple(tables) for name, tables in found.items()}


class Locator:
    """Works out where records belong, with the parents' keys read in few queries.

    ``batch`` holds keys worked out earlier in the same write (they win over the
    stored ones: a parent may move in the batch that writes its follower).
    """

    def __init__(self, conn: Conn, schema: Schema) -> None:
        self.conn = conn
        self.schema = schema
        self.batch: dict[RecordKey, str] = {}
        self._stored: dict[RecordKey, str | None] = {}

    def stored(self, refs: Iterable[RecordKey]) -> dict[RecordKey, str | None]:
        """The stored key of each record named (absent: the hub has no such record)."""
        wanted: dict[str, set[str]] = {}
        for name, key in refs:
            if (name, key) not in self._stored and self.schema.tables[name].scope is not None:
                wanted.setdefault(name, set()).add(key)
        among = dialect_of(self.conn).among
        for name, keys in wanted.items():
            for where, chosen in among("pk", sorted(keys), _CHUNK):
                for key, scope in self.conn.execute(
                    f"SELECT pk, scope FROM _fieldsync_records WHERE tbl = ? AND {where}",
                    [name, *chosen],
                ):
                    self._stored[(name, key)] = scope
            for key in keys:
                self._stored.setdefault((name, key), None)
        return self._stored

    def parent_ref(self, table: Table, values: Mapping[str, object]) -> RecordKey | None:
        scope = table.scope
        if scope is None or scope.parent is None:
            return None
        value = values.get(scope.column)
        if value is None:
            return None
        parent = self.schema.tables[scope.parent]
        return (parent.name, parent.pk_key({parent.primary_key[0]: value}))

    def prefetch(self, items: Iterable[tuple[Table, Mapping[str, object] | None]]) -> None:
        """Read the stored keys of the parents these records name, in a few queries."""
        refs = []
        for table, values in items:
            if values is not None:
                ref = self.parent_ref(table, values)
                if ref is not None:
                    refs.append(ref)
        self.stored(refs)

    def place(self, table: Table, values: Mapping[str, object]) -> Place:
        """Where a record with ``values`` belongs (see Place)."""
        scope = table.scope
        if scope is None:
            return None, None
        if scope.parent is None:
            value = values.get(scope.column)
            return (value if isinstance(value, str) else UNASSIGNED), None
        ref = self.parent_ref(table, values)
        if ref is None:
            return UNASSIGNED, None
        found = self.batch.get(ref)
        if found is None:
            found = self.stored([ref]).get(ref)
        return (found if found is not None else UNASSIGNED), ref[1]


class Gate:
    """Which of an office's changes its scopes allow (see the module's docstring)."""

    def __init__(self, conn: Conn, schema: Schema, node: str, refs: Iterable[RecordKey]) -> None:
        self.node = node
        self.locator = Locator(conn, schema)
        self.active = schema.scoped
        self.scopes, self.pulled = office_scopes(conn, node) if self.active else (None, 0)
        self.conn = conn
        # Records this office may write although outside its scopes, with the key it
        # left: the office is told again that they left.
        self.returned: dict[RecordKey, str] = {}
        if self.active:
            self.before = dict(self.locator.stored(refs))

    def refuse(self, table: Table, ref: RecordKey, exists: bool) -> str | None:
        """Why this office may not change record ``ref`` (None: it may).

        ``exists``: the hub holds the record (perhaps deleted); a new one is judged
        by where it lands (:meth:`allows_new`).
        """
        if not self.active or self.scopes is None or table.scope is None or not exists:
            return None
        current = self.locator.batch.get(ref)
        if current is None:
            current = self.before.get(ref)
        if current in self.scopes:
            return None
        if ref in self.returned:
            return None
        left = self.conn.execute(
            "SELECT scope FROM _fieldsync_exits WHERE tbl = ? AND pk = ? AND seq > ? "
            "ORDER BY seq DESC",
            [ref[0], ref[1], self.pulled],
        ).fetchall()
        for (scope,) in left:
            if scope in self.scopes:
                self.returned[ref] = scope
                return None
        return (
            f"office {self.node} may not change this {table.name} record: it is outside its scope"
        )

    def allows_new(self, table: Table, place: Place) -> str | None:
        """Why a new record landing at ``place`` is refused (None: it is not)."""
        if not self.active or self.scopes is None or table.scope is None:
            return None
        if place[0] in self.scopes:
            return None
        return (
            f"a new {table.name} record of office {self.node} must belong to its scope "
            f"({table.scope.describe()} must be one of: {describe(self.scopes)})"
        )


def exits_and_followers(
    conn: Conn,
    schema: Schema,
    moves: Sequence[Move],
    returned: Mapping[RecordKey, str],
    seq: int,
    history: list[Version],
    *,
    actor: str,
    stamp: str,
    now: str,
) -> int:
    """Note where moved records left, move their followers; return the last seq used.

    ``returned``: records an office wrote outside its scopes (see Gate.refuse), by the
    key the office held them under: it is told again that they left. Followers get
    new seqs after ``seq``, and a version in ``history`` each (op ``move``).
    """
    children = _children(schema)
    seqs = {(t.name, key): s for t, key, _, _, s in moves}
    exits = [
        (t.name, key, old, s) for t, key, old, new, s in moves if old is not None and old != new
    ]
    exits += [
        (name, key, scope, seqs[(name, key)])
        for (name, key), scope in returned.items()
        if (name, key) in seqs
    ]
    level = [(t, key, new) for t, key, old, new, _ in moves if old != new and t.name in children]
    back = [(t.name, key, new) for t, key, old, new, _ in moves if old is not None and old != new]
    while level:
        following: list[tuple[Table, str, str]] = []
        by_parent: dict[str, dict[str, str]] = {}
        for table, key, new in level:
            by_parent.setdefault(table.name, {})[key] = new
        for parent_name, moved in by_parent.items():
            tables = children[parent_name]
            names = ", ".join("?" * len(tables))
            for where, chosen in dialect_of(conn).among("parent", sorted(moved), _CHUNK):
                rows = conn.execute(
                    "SELECT tbl, pk, seq, scope, parent FROM _fieldsync_records "
                    f"WHERE {where} AND tbl IN ({names})",
                    [*chosen, *(t.name for t in tables)],
                ).fetchall()
                for name, key, prev, old, parent in rows:
                    new = moved[parent]
                    if old == new:
                        continue
                    seq += 1
                    conn.execute(
                        "UPDATE _fieldsync_records SET scope = ?, seq = ?, origin = NULL "
                        "WHERE tbl = ? AND pk = ?",
                        [new, seq, name, key],
                    )
                    history.append((seq, prev, name, key, actor, stamp, "move", None, now))
                    if old is not None:
                        exits.append((name, key, old, seq))
                        back.append((name, key, new))
                    table = schema.tables[name]
                    if name in children:
                        following.append((table, key, new))
        level = following
    conn.executemany(
        "INSERT INTO _fieldsync_exits (tbl, pk, scope, seq) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (tbl, pk, scope) DO UPDATE SET seq = excluded.seq",
        exits,
    )
    # A record back in a scope it once left: that exit is over.
    conn.executemany("DELETE FROM _fieldsync_exits WHERE tbl = ? AND pk = ? AND scope = ?", back)
    return seq


def check_movable(schema: Schema, table_name: str) -> Table:
    """The table, if its records can be moved by an admin (its scope names an office)."""
    table = schema.table(table_name)
    if table.scope is None:
        raise InvalidChangeError(f"table {table.name} has no scope: every office holds its records")
    if table.scope.parent is not None:
        raise InvalidChangeError(
            f"{table.name} records follow their {table.scope.parent} record: move that one"
        )
    return table


def write_hub_change(
    conn: Conn,
    hub: HubDatabase,
    table: Table,
    pk: dict[str, Any],
    state: RecordState,
    prev: int,
    *,
    actor: str,
    stamp: str,
    op: str,
    change: dict[str, Any],
) -> int:
    """Write a change the hub itself makes (an admin's resolution or move) to a record
    it holds, with its version in the history; moves its followers. Returns its seq."""
    schema = hub.schema
    key = table.pk_key(pk)
    locator = Locator(conn, schema)
    before = locator.stored([(table.name, key)]).get((table.name, key))
    scope, parent = locator.place(table, state.values)
    seq = records.last_seq(conn) + 1
    records.write_records(conn, schema, [(table, key, pk, state, seq, None, None, scope, parent)])
    now = utcnow()
    history: list[Version] = [
        (seq, prev, table.name, key, actor, stamp, op, dumps_text(change), now)
    ]
    last = seq
    if scope is not None:
        last = exits_and_followers(
            conn,
            schema,
            [(table, key, before, scope, seq)],
            {},
            seq,
            history,
            actor=actor,
            stamp=stamp,
            now=now,
        )
    write_history(conn, history)
    records.save_meta(conn, last, hub.clock)
    return seq


def move(
    hub: HubDatabase,
    table_name: str,
    key: Sequence[Any],
    to: str,
    by: str,
    actor: Actor | None = None,
) -> int:
    """Move a record (and its followers) to scope key ``to``, as admin ``by``
    (recorded in the audit log as done by ``actor``; None: the command's user).

    Written as a change of the scope column stamped by the hub, so it reaches every
    office as any change does. Returns the record's new seq.
    """
    table = check_movable(hub.schema, table_name)
    assert table.scope is not None
    if not to or to != to.strip() or to == ALL:
        raise FieldsyncError(f"{to!r} is not an office name to move a record to")
    if len(key) != len(table.primary_key):
        raise InvalidChangeError(
            f"the key of {table.name} has {len(table.primary_key)} part(s): "
            f"{', '.join(table.primary_key)}"
        )
    pk = table.check_pk(
        {n: table.parse_value(n, str(v)) for n, v in zip(table.primary_key, key, strict=True)}
    )
    with hub.write() as conn:
        found = records.load(conn, hub.schema, table.name, table.pk_key(pk))
        if found is None or found[0].deleted:
            raise FieldsyncError(f"the hub holds no {table.name} record with that key")
        current, prev = found
        for version in current.versions.values():
            hub.clock.observe(Timestamp.parse(version).hlc)
        stamp = str(hub.clock.tick())
        column = table.scope.column
        state = RecordState(
            {**current.values, column: to}, {**current.versions, column: stamp}, False
        )
        seq = write_hub_change(
            conn,
            hub,
            table,
            pk,
            state,
            prev,
            actor=f"admin {by}",
            stamp=stamp,
            op="move",
            change={column: to},
        )
        where = f"{table.name} {table.pk_key(pk)}"
        audit.record(conn, "move", actor or Actor.cli(), where, to=to, seq=seq)
        return seq
