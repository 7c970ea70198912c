"""
The plan of a schema change: what turns the tables of one schema into another's.

:func:`plan` compares two :class:`~shared.schema.Schema` and says, table by table,
what a database must do: nothing, create a new table, add columns (``ALTER TABLE
ADD COLUMN``), or rebuild the table (create it anew, copy, drop, rename). Changes that
keep every value are *additive*: new tables, new columns (that ``ADD COLUMN`` can
add), new indexes, a policy or scope change, a ``CHECK (col IN (...))`` list that only
gains values. Anything else may lose values (a dropped or renamed column, a changed
type or constraint, a narrower list, a dropped table): :meth:`Plan.refusal` names each
and what to do instead, and only an explicit ``--allow-loss`` goes ahead.

How "only columns were added" is told: the body of each ``CREATE TABLE`` is split into
its top-level parts (column definitions and table constraints; parentheses, quotes and
comments respected) and normalised (comments gone, whitespace collapsed, keywords in
one case). The old parts must equal the new ones minus the added columns' definitions,
with the same table options (STRICT, WITHOUT ROWID); each added definition is what
``ADD COLUMN`` takes, and a scratch database checks that SQLite takes it and ends with
the new table's columns.

:func:`migrate` carries a plan out on a connection, inside the caller's transaction;
both the hub (its mirrored tables) and offices use it. The planning is pure.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

from shared.errors import SchemaError
from shared.schema import Schema, Table, quote

# What a table needs, in the order of growing work.
SAME, NEW, ADD, REBUILD = "same", "new", "add columns", "rebuild"

_CONSTRAINT = re.compile(r"(CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN)\b", re.IGNORECASE)
_LIST = re.compile(r"\bIN\s*\(\s*'(?:[^']|'')*'(?:\s*,\s*'(?:[^']|'')*')*\s*\)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Definition:
    """A ``CREATE TABLE`` statement cut in its parts."""

    head: str  # up to the opening parenthesis: CREATE TABLE name
    parts: tuple[str, ...]  # column definitions and table constraints, as written
    options: str  # after the closing parenthesis: STRICT, WITHOUT ROWID

    def body(self) -> str:
        """The parts and options again, without the head: ``(a, b) STRICT``."""
        return "(" + ", ".join(self.parts) + ")" + self.options


def split_create(sql: str) -> Definition:
    """Cut ``CREATE TABLE name (a, b, CHECK (...)) STRICT`` into head, parts, options.

    Commas inside parentheses, quotes (``'`` ``"`` `````` ``[]``) and comments do not
    cut; comments are dropped.
    """
    text = _strip_comments(sql)
    depth = 0
    start = -1
    parts: list[str] = []
    quote_end = ""
    mark = 0
    for at, char in enumerate(text):
        if quote_end:
            if char == quote_end:
                quote_end = ""
            continue
        if char in "'\"`":
            quote_end = char
        elif char == "[":
            quote_end = "]"
        elif char == "(":
            depth += 1
            if depth == 1 and start < 0:
                start = mark = at + 1
        elif char == ")":
            depth -= 1
            if depth == 0 and start >= 0:
                parts.append(text[mark:at])
                return Definition(
                    text[: start - 1].strip(), tuple(p.strip() for p in parts), text[at + 1 :]
                )
        elif char == "," and depth == 1:
            parts.append(text[mark:at])
            mark = at + 1
    raise SchemaError(f"cannot read the columns of {sql[:60]!r}")


def _strip_comments(sql: str) -> str:
    out: list[str] = []
    at = 0
    while at < len(sql):
        char = sql[at]
        if char in "'\"`[":
            end = sql.find("]" if char == "[" else char, at + 1)
            end = len(sql) if end < 0 else end + 1
            out.append(sql[at:end])
            at = end
        elif sql.startswith("--", at):
            end = sql.find("\n", at)
            at = len(sql) if end < 0 else end
            out.append(" ")
        elif sql.startswith("/*", at):
            end = sql.find("*/", at + 2)
            at = len(sql) if end < 0 else end + 2
            out.append(" ")
        else:
            out.append(char)
            at += 1
    return "".join(out)


def normalise(part: str) -> str:
    """One part's text compared: whitespace collapsed, upper case outside quotes."""
    pieces = re.split(r"('(?:[^']|'')*'|\"[^\"]*\"|`[^`]*`|\[[^\]]*\])", part)
    out = []
    for index, piece in enumerate(pieces):
        if index % 2:
            out.append(piece)
        else:
            piece = re.sub(r"\s+", " ", piece.upper())
            out.append(re.sub(r"\s*([(),])\s*", r"\1", piece))
    return "".join(out).strip()


def _part_column(part: str) -> str | None:
    """The column a part defines (None for a table constraint)."""
    if _CONSTRAINT.match(part):
        return None
    found = re.match(r'\s*("(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|[^\s(]+)', part)
    if found is None:
        return None
    name = found[1]
    if name[0] in '"`[':
        name = name[1:-1].replace('""', '"')
    return name


@dataclass(frozen=True, slots=True)
class TablePlan:
    """What one table needs: ``action`` (SAME, NEW, ADD, REBUILD) and why."""

    name: str
    action: str
    added: tuple[str, ...] = ()  # the added columns' definitions (ADD COLUMN takes them)
    added_columns: tuple[str, ...] = ()
    losses: tuple[str, ...] = ()  # what the change may lose, each with what to do
    notes: tuple[str, ...] = ()  # what else changes (policy, scope, indexes, lists)
    indexes: tuple[tuple[str, str], ...] = ()  # indexes to create: (name, SQL)
    dropped_indexes: tuple[str, ...] = ()
    common: tuple[str, ...] = ()  # columns a rebuild copies


@dataclass(frozen=True, slots=True)
class Plan:
    """Every table's plan, from ``old`` to ``new``."""

    old: Schema
    new: Schema
    tables: tuple[TablePlan, ...]
    dropped: tuple[str, ...] = ()
    rescope: bool = False  # a table's scope changed: every record's scope key again
    losses: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return self.old.source == self.new.source

    def lines(self) -> list[str]:
        """The plan for people, one line per change."""
        out: list[str] = []
        for t in self.tables:
            if t.action == NEW:
                out.append(f"new table {t.name}")
            for column in t.added_columns:
                out.append(f"new column {t.name}.{column}")
            if t.action == REBUILD:
                out.append(f"table {t.name} rebuilt (created anew, rows copied)")
            out.extend(f"{t.name}: {note}" for note in t.notes)
            out.extend(f"{t.name}: index {name} added" for name, _ in t.indexes)
            out.extend(f"{t.name}: index {name} dropped" for name in t.dropped_indexes)
        out.extend(f"table {name} dropped" for name in self.dropped)
        if self.rescope:
            out.append("scopes changed: every office pulls its scope again")
        return out or ["no change to the tables"]

    def dropped_columns(self) -> list[tuple[str, str]]:
        """(table, column) of each column ``old`` has and ``new`` lacks, in tables both
        keep."""
        return [
            (name, column)
            for name, table in self.old.tables.items()
            if name in self.new.tables
            for column in table.column_names
            if column not in self.new.tables[name].column_names
        ]

    def refusal(self, version: int) -> str:
        """Why the plan is refused without --allow-loss (its losses, and what to do)."""
        return (
            f"schema version {version} would lose data: "
            + "; ".join(self.losses)
            + ". Nothing was changed; to go ahead anyway (a backup is made first), "
            "add --allow-loss"
        )


def plan(old: Schema, new: Schema) -> Plan:
    """What turns the tables of ``old`` into those of ``new``."""
    tables: list[TablePlan] = []
    losses: list[str] = []
    rescope = False
    for table in new.tables.values():
        before = old.tables.get(table.name)
        if before is None:
            tables.append(TablePlan(table.name, NEW, indexes=table.indexes))
            continue
        found = _plan_table(before, table)
        tables.append(found)
        losses.extend(found.losses)
        rescope = rescope or before.scope != table.scope
    dropped = tuple(name for name in old.tables if name not in new.tables)
    losses.extend(
        f"table {name} is dropped (keep it in the schema; offices and the hub keep its rows)"
        for name in dropped
    )
    return Plan(old, new, tuple(tables), dropped, rescope, tuple(losses))


def _plan_table(old: Table, new: Table) -> TablePlan:
    name = new.name
    notes: list[str] = []
    if old.policy != new.policy:
        notes.append(f"policy {old.policy} -> {new.policy}")
    if old.scope != new.scope:
        notes.append(
            "scope: "
            + (old.scope.describe() if old.scope else "every office")
            + " -> "
            + (new.scope.describe() if new.scope else "every office")
        )
    old_indexes, new_indexes = dict(old.indexes), dict(new.indexes)
    indexes = tuple((n, sql) for n, sql in new.indexes if old_indexes.get(n) != sql)
    dropped_indexes = tuple(n for n in old_indexes if new_indexes.get(n) != old_indexes[n])
    old_def, new_def = split_create(old.create), split_create(new.create)
    old_names, new_names = set(old.column_names), set(new.column_names)
    added_columns = tuple(c for c in new.column_names if c not in old_names)
    added = tuple(p for p in new_def.parts if _part_column(p) in added_columns)
    rest = [normalise(p) for p in new_def.parts if p not in added]
    old_rest = [
        normalise(p)
        for p in old_def.parts
        if _part_column(p) is None or _part_column(p) in new_names
    ]
    same_options = normalise(old_def.options) == normalise(new_def.options)
    losses: list[str] = []
    for column in old.column_names:
        if column not in new_names:
            losses.append(
                f"column {name}.{column} is dropped or renamed (keep it; to rename, add the "
                "new column and copy the values)"
            )
    if old.primary_key != new.primary_key:
        losses.append(f"the key of {name} changes (make a new table and copy the records)")
    for col in old.columns:
        if col.name not in new_names:
            continue
        after = new.column(col.name)
        if after.type != col.type:
            losses.append(
                f"column {name}.{col.name} changes type {col.type or 'none'} -> "
                f"{after.type or 'none'} (add a new column and copy the values)"
            )
        if after.notnull and not col.notnull:
            losses.append(
                f"column {name}.{col.name} becomes NOT NULL (existing NULLs break it; "
                "keep it nullable)"
            )
    for column in added_columns:
        if column in new.primary_key:
            losses.append(f"new column {name}.{column} is part of the key")
    if rest == old_rest and same_options and not losses:
        problem = _check_add(old, new, added)
        if problem is None:
            action = ADD if added else SAME
            return TablePlan(
                name, action, added, added_columns, (), tuple(notes), indexes, dropped_indexes
            )
        losses.append(problem)
    elif not losses:
        lists_only = [_LIST.sub("IN(…)", p) for p in rest] == [
            _LIST.sub("IN(…)", p) for p in old_rest
        ]
        for column in old.column_names:
            if column not in new_names:
                continue
            was, now = old.choices(column), new.choices(column)
            if was is not None and now is not None and not set(was) <= set(now):
                gone = ", ".join(sorted(set(was) - set(now)))
                losses.append(
                    f"the values allowed in {name}.{column} lose {gone} (keep them in the "
                    "CHECK list)"
                )
            elif was != now:
                notes.append(f"the values allowed in {column} widen")
        if not lists_only or not same_options:
            losses.append(
                f"the SQL of {name} changes beyond added columns and wider CHECK lists "
                "(constraints, defaults or table options; add new columns instead)"
            )
        for column in added_columns:
            problem = _check_add(old, new, tuple(p for p in added if _part_column(p) == column))
            if problem is not None:
                losses.append(problem)
    common = tuple(c for c in new.column_names if c in old_names)
    return TablePlan(
        name,
        REBUILD,
        added,
        added_columns,
        tuple(losses),
        tuple(notes),
        indexes,
        dropped_indexes,
        common,
    )


def _check_add(old: Table, new: Table, added: tuple[str, ...]) -> str | None:
    """None if ``ALTER TABLE ADD COLUMN`` of each of ``added`` turns ``old`` into ``new``
    (checked in a scratch database), else what is wrong."""
    new_columns = {_part_column(part) for part in added}
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.execute(old.create)
        for part in added:
            try:
                scratch.execute(f"ALTER TABLE {quote(old.name)} ADD COLUMN {part}")
            except sqlite3.Error as exc:
                column = _part_column(part)
                return (
                    f"new column {old.name}.{column} cannot be added to existing records "
                    f"({exc}; a new column can have no key or UNIQUE, and NOT NULL needs "
                    "a DEFAULT)"
                )
        got = scratch.execute(f"PRAGMA table_info({quote(old.name)})").fetchall()
        scratch.execute(f"CREATE TABLE _expected {split_create(new.create).body()}")
        want = scratch.execute("PRAGMA table_info(_expected)").fetchall()
    finally:
        scratch.close()
    for row in want:
        if row[1] in new_columns and row[3] and row[4] is None:
            return (
                f"new column {old.name}.{row[1]} is NOT NULL without a DEFAULT, which "
                "existing records cannot have (give it a DEFAULT, or let it be NULL)"
            )
    if sorted(got, key=lambda r: r[1]) != sorted(want, key=lambda r: r[1]):
        return f"the columns of {old.name} do not come out as declared after adding columns"
    return None


def migrate(conn: sqlite3.Connection, steps: Plan) -> None:
    """Carry ``steps`` out on ``conn``'s tables (in the caller's transaction).

    New tables are created, columns added, tables rebuilt (their own indexes kept
    where their columns still exist); a row the new table refuses aborts with
    SchemaError naming the table (the caller rolls back). Dropped tables are left
    in the database, no longer synced.
    """
    for table in steps.tables:
        spec = steps.new.tables[table.name]
        if table.action == NEW:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [spec.name]
            ).fetchone()
            if not exists:
                conn.execute(spec.create)
        elif table.action == ADD:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({quote(spec.name)})")}
            for part, column in zip(table.added, table.added_columns, strict=True):
                if column not in have:  # added by hand already: adopted as it is
                    conn.execute(f"ALTER TABLE {quote(spec.name)} ADD COLUMN {part}")
        elif table.action == REBUILD:
            rebuild(conn, spec, table.common)
        for name in table.dropped_indexes:
            conn.execute(f"DROP INDEX IF EXISTS {quote(name)}")
        for name, sql in table.indexes:
            conn.execute(f"DROP INDEX IF EXISTS {quote(name)}")
            conn.execute(sql)


def rebuild(conn: sqlite3.Connection, spec: Table, common: tuple[str, ...]) -> None:
    """Make ``spec.name`` as ``spec.create`` declares, keeping the ``common`` columns'
    values: create anew, copy, drop, rename; then the table's other indexes again."""
    temp = f"_fieldsync_rebuild_{spec.name}"
    # The table's own indexes and the application's triggers go with the old table;
    # they are made again (capture triggers are the caller's business).
    indexes = [
        row[0]
        for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND tbl_name = ? "
            "AND sql IS NOT NULL AND name NOT LIKE '\\_fieldsync\\_%' ESCAPE '\\' "
            "ORDER BY type",
            [spec.name],
        )
    ]
    definition = split_create(spec.create)
    conn.execute(f"CREATE TABLE {quote(temp)} {definition.body()}")
    columns = ", ".join(quote(c) for c in common)
    try:
        conn.execute(
            f"INSERT INTO {quote(temp)} ({columns}) SELECT {columns} FROM {quote(spec.name)}"
        )
    except sqlite3.IntegrityError as exc:
        raise SchemaError(
            f"rows of {spec.name} break the new schema ({exc}); nothing was changed: "
            "correct those rows, or the schema, and apply again"
        ) from None
    conn.execute(f"DROP TABLE {quote(spec.name)}")
    # Legacy: a view naming the table would otherwise stop the rename (it names a table
    # that, for a moment, does not exist); it names the table again once renamed.
    legacy = conn.execute("PRAGMA legacy_alter_table").fetchone()[0]
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        conn.execute(f"ALTER TABLE {quote(temp)} RENAME TO {quote(spec.name)}")
    finally:
        conn.execute(f"PRAGMA legacy_alter_table = {int(legacy)}")
    for sql in indexes:
        try:
            conn.execute(sql)
        except sqlite3.OperationalError:  # of a column no longer there
            continue
