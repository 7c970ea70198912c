"""
The hub's copy of every record, and its mirror in real tables.

Per record the hub stores the current values and column versions in
``_fieldsync_records`` (tombstones included), with the hub ``seq`` of its last
change and its origin: the office whose change it holds exactly as that office has
it, so that pulls do not send it back there. Live records are mirrored into real
tables named as in the schema, so headquarters can query them with any SQLite tool.

``_fieldsync_meta`` keeps the last ``seq`` handed out and the hub clock's last stamp.
These functions run on the connection they are given, inside its caller's
transaction; they are on the push and pull paths, so they stay plain SQL
with one statement per batch, not per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hub.engine import Conn, dialect_of
from shared.clock import HybridClock
from shared.merge import RecordState
from shared.protocol import PullRow, dumps_text, loads
from shared.schema import RecordKey, Schema, Table
from shared.sqlite import delete_sql, upsert_sql

# A record to write: table, key text, key, state, hub seq, origin office (or None),
# the JSON text of the state's values if already made (or None), and where it
# belongs: its scope key and its parent's key text (hub/scopes.py; None: no scope).
RecordWrite = tuple[
    Table, str, dict[str, Any], RecordState, int, str | None, str | None, str | None, str | None
]


#: ``_fieldsync_meta`` key: the schema version for which every live record's stored
#: values name every column (see complete_values).
COMPLETE = "vals_complete"
_CHUNK = 2000  # records read and rewritten at a time by complete_values


def last_seq(conn: Conn) -> int:
    """The last hub ``seq`` handed out (0: none yet)."""
    row = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = 'seq'").fetchone()
    return int(row[0]) if row else 0


def save_meta(conn: Conn, seq: int, clock: HybridClock) -> None:
    """Keep the last ``seq`` handed out and the clock's last stamp."""
    conn.execute(
        "INSERT INTO _fieldsync_meta (key, value) VALUES ('seq', ?), ('hlc', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [str(seq), str(clock.last)],
    )


def load_many(
    conn: Conn,
    schema: Schema,
    keys: Sequence[RecordKey | None],
    seqs: dict[RecordKey, int] | None = None,
) -> dict[RecordKey, RecordState]:
    """The stored state of each record named by (table, key text), in a few queries.

    ``seqs``, if given, gets each found record's hub seq.
    """
    wanted: dict[str, set[str]] = {}
    for ref in keys:
        if ref is not None:
            wanted.setdefault(ref[0], set()).add(ref[1])
    found: dict[RecordKey, RecordState] = {}
    among = dialect_of(conn).among
    for name, names in wanted.items():
        unpack = schema.tables[name].unpack_versions
        for where, chosen in among("pk", sorted(names)):
            for pk, vals, vers, deleted, seq in conn.execute(
                f"SELECT pk, vals, vers, deleted, seq FROM _fieldsync_records "
                f"WHERE tbl = ? AND {where}",
                [name, *chosen],
            ):
                found[(name, pk)] = RecordState(loads(vals), unpack(vers), bool(deleted))
                if seqs is not None:
                    seqs[(name, pk)] = seq
    return found


def load(conn: Conn, schema: Schema, table: str, key: str) -> tuple[RecordState, int] | None:
    """One record's stored state and hub seq (None: the hub has never seen it)."""
    seqs: dict[RecordKey, int] = {}
    state = load_many(conn, schema, [(table, key)], seqs).get((table, key))
    return None if state is None else (state, seqs[(table, key)])


def write_records(conn: Conn, schema: Schema, records: Iterable[RecordWrite]) -> None:
    """Store records' states and mirror them into the real tables."""
    rows = []
    mirrored: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
    for table, key, pk, state, seq, origin, vals, scope, parent in records:
        if len(state.values) != len(table.column_names) and not state.deleted:
            # Every column named (a pull serves the stored text as it is): an office
            # behind on the schema, or an update of a record the hub never had.
            state.values.update(dict.fromkeys(_lacking(table, state.values)))
            vals = None
        rows.append(
            (
                table.name,
                key,
                seq,
                origin,
                int(state.deleted),
                dumps_text(state.values) if vals is None else vals,
                table.pack_versions(state.versions),
                scope,
                parent,
            )
        )
        mirrored.setdefault(table.name, []).append((pk, None if state.deleted else state.values))
    dialect = dialect_of(conn)
    if dialect.stages(conn, len(rows)):
        dialect.put_staged(conn, rows, [schema.tables[name] for name in mirrored])
        for name, records_of_table in mirrored.items():  # the deleted ones
            gone = [(pk, values) for pk, values in records_of_table if values is None]
            _mirror(conn, schema.tables[name], gone)
        return
    conn.executemany(
        "INSERT INTO _fieldsync_records (tbl, pk, seq, origin, deleted, vals, vers, scope, "
        "parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tbl, pk) DO UPDATE SET "
        "seq = excluded.seq, origin = excluded.origin, deleted = excluded.deleted, "
        "vals = excluded.vals, vers = excluded.vers, scope = excluded.scope, "
        "parent = excluded.parent",
        rows,
    )
    for name, records_of_table in mirrored.items():  # one entry per record
        _mirror(conn, schema.tables[name], records_of_table)


def _lacking(table: Table, values: dict[str, Any]) -> list[str]:
    return [name for name in table.column_names if name not in values]


def complete_values(conn: Conn, schema: Schema, version: int) -> int:
    """Make every live record's stored values name every column of its table (a
    column they lack: null), once per schema version (`hub schema apply` adds
    columns; hubs from before kept what offices sent); return how many were rewritten.

    hub/records.py's writes keep it so from then on, and a pull serves the stored text
    as it is (:func:`splicer`).
    """
    done = conn.execute("SELECT value FROM _fieldsync_meta WHERE key = ?", [COMPLETE]).fetchone()
    if done is not None and done[0] == str(version):
        return 0
    count = dialect_of(conn).object_length("vals")
    fixed = 0
    for table in schema.tables.values():
        after = ""  # in key order, a chunk at a time: memory stays bounded
        while True:
            found = conn.execute(
                f"SELECT pk, vals FROM _fieldsync_records WHERE tbl = ? AND pk > ? "
                f"AND deleted = 0 AND {count} <> ? ORDER BY pk LIMIT {_CHUNK}",
                [table.name, after, len(table.column_names)],
            ).fetchall()
            if not found:
                break
            rewritten = []
            for key, vals in found:
                values = loads(vals)
                values.update(dict.fromkeys(_lacking(table, values)))
                rewritten.append((dumps_text(values), table.name, key))
            conn.executemany(
                "UPDATE _fieldsync_records SET vals = ? WHERE tbl = ? AND pk = ?", rewritten
            )
            fixed += len(rewritten)
            after = found[-1][0]
    conn.execute(
        "INSERT INTO _fieldsync_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [COMPLETE, str(version)],
    )
    return fixed


def _mirror(
    conn: Conn, table: Table, records: Sequence[tuple[dict[str, Any], dict[str, Any] | None]]
) -> None:
    """Make mirrored ``table`` hold each ``(pk, values)`` record (values None deletes it),
    as shared.sqlite.put_rows does on an office's own connection."""
    gone = [[pk[c] for c in table.primary_key] for pk, values in records if values is None]
    adapt = dialect_of(conn).mirror_row
    live = [adapt(table, table.row(pk, values)) for pk, values in records if values is not None]
    if gone:
        conn.executemany(delete_sql(table), gone)
    if live:
        conn.executemany(upsert_sql(table), live)


def pull_row(
    table: Table,
    pk: dict[str, Any],
    seq: int,
    deleted: int,
    vals: str,
    vers: str,
    packed: bool = False,
) -> PullRow:
    """A stored record as a pull serves it."""
    values = None
    if not deleted:
        stored = loads(vals)
        columns = table.column_names
        # Stored values name known columns only: all of them when as many.
        values = stored if len(stored) == len(columns) else {c: stored.get(c) for c in columns}
    # Stored versions are packed already (Table.pack_versions).
    versions = loads(vers) if packed else table.unpack_versions(vers)
    return PullRow(seq, table.name, pk, values, versions)


def splicer(table: Table) -> Callable[[str, int, str, str], bytes]:
    """For ``table``'s live records: ``(key text, seq, vals, vers)`` -> the record as a
    packed pull serves it (shared.protocol.PullRow's JSON), made of the stored texts
    without reading them: the values name every column (see complete_values), the
    versions are stored packed, and the key text is a JSON array."""
    head = f'"table":{dumps_text(table.name)},"pk":'
    if len(table.primary_key) == 1:
        name = f"{{{dumps_text(table.primary_key[0])}:"

        def pk(key: str) -> str:
            return name + key[1:-1] + "}"
    else:

        def pk(key: str) -> str:
            return dumps_text(table.pk_dict(key))

    def splice(key: str, seq: int, vals: str, vers: str) -> bytes:
        return f'{{"seq":{seq},{head}{pk(key)},"versions":{vers},"values":{vals}}}'.encode()

    return splice
