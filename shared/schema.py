"""
Which tables are synced, their columns, and the conflict policy of each.

A schema is declared in TOML: one ``[tables.NAME]`` entry per table, with the SQL
that creates it (``create``) and its ``policy``. Columns, types and the primary key
are read from SQLite itself by running the SQL in a scratch in-memory database, so
the declaration cannot disagree with the tables it creates.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sqlite3
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from shared.errors import InvalidChangeError, SchemaError

POLICIES = ("merge", "record", "manual")
# A custom policy names a Python function the hub imports: custom:package.module:function
_CUSTOM = re.compile(r"custom:([A-Za-z_][\w.]*):([A-Za-z_]\w*)")
# Pseudo-column that versions a record's existence (set by deletes and re-inserts).
EXISTS = "~"


# A record as office and hub store it: its table's name and its key text (Table.pk_key,
# a compact JSON array of the key's values, as SQLite's json_array() writes it). On the
# wire a key travels as an object, column -> value (Table.pk_dict turns the text back).
RecordKey = tuple[str, str]
# A record's versions: column (or EXISTS) -> the stamp text of the write that set it.
# Stored packed (Table.pack_versions): one stamp alone when every column carries it.
Versions = dict[str, str]


# A SQL text literal, and comments outside literals (for Table.choices).
_LITERAL = r"'(?:[^']|'')*'"
_COMMENT = re.compile(rf"({_LITERAL})|--[^\n]*|/\*.*?\*/", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a synced table."""

    name: str
    type: str  # TEXT, INTEGER, REAL, or "" for no declared type
    notnull: bool


@dataclass(frozen=True, slots=True)
class Scope:
    """Which offices a table's records belong to (see hub/scopes.py).

    ``parent`` None: a record belongs to the office its ``column`` names. Otherwise
    ``column`` holds the key of a record of table ``parent``, and the record belongs
    wherever that one does (an assistance record follows its case).
    """

    column: str
    parent: str | None = None

    def describe(self) -> str:
        if self.parent is None:
            return f"the office named by {self.column}"
        return f"its {self.parent} record, through {self.column}"


@dataclass(frozen=True, slots=True)
class Table:
    """One synced table: columns in order, primary key, policy and creating SQL."""

    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    policy: str
    create: str
    scope: Scope | None = None  # None: every office holds every record
    # The table's own indexes, declared with ``indexes = ["CREATE INDEX ..."]``:
    # (index name, its SQL), in the order written.
    indexes: tuple[tuple[str, str], ...] = ()
    # Per column, the Python types whose values need no closer look (see check_values).
    _fast: dict[str, frozenset[type]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )
    _names: tuple[str, ...] = field(default=(), init=False, compare=False, repr=False)
    _pk_names: frozenset[str] = field(default=frozenset(), init=False, compare=False, repr=False)
    _name_set: frozenset[str] = field(default=frozenset(), init=False, compare=False, repr=False)
    _key_at: tuple[tuple[int, str], ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(c.name for c in self.columns))
        object.__setattr__(self, "_name_set", frozenset(self._names))
        object.__setattr__(
            self, "_key_at", tuple((self._names.index(name), name) for name in self.primary_key)
        )
        object.__setattr__(self, "_pk_names", frozenset(self.primary_key))
        for col in self.columns:
            kind = col.type.upper()
            found = affinity(kind)
            fast: set[type] = {type(None)}
            if found == "TEXT":
                fast.add(str)
            elif found == "INTEGER":
                fast.add(int)
            elif found == "REAL" or kind == "NUMERIC":
                fast.update((int, float))
            else:
                fast.update((str, int, float))
            self._fast[col.name] = frozenset(fast)

    def __hash__(self) -> int:
        # Tables equal in every field are equal in these: the hash dataclass makes
        # walks every column (8 us), and lru_caches keyed by a table ask it per row.
        return hash((self.name, self.create, self.policy))

    @property
    def column_names(self) -> tuple[str, ...]:
        return self._names

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    def choices(self, name: str) -> tuple[str, ...] | None:
        """The values a ``CHECK (name IN ('a', 'b'))`` in the table's SQL allows column
        ``name``, in the order written; None when no such check lists them.

        A check of the form ``name IN (...) OR name IS NULL`` counts too; identifiers may
        be quoted ("name", `name`, [name]); comments are ignored. Only lists of text
        literals count (the dashboard offers them as a choice).
        """
        self.column(name)  # KeyError for a column the table lacks
        sql = _COMMENT.sub(lambda m: m.group(1) or " ", self.create)
        ident = (
            "|".join(re.escape(form) for form in (f'"{name}"', f"`{name}`", f"[{name}]"))
            + rf"|\b{re.escape(name)}\b"
        )
        pattern = re.compile(
            rf"\bCHECK\s*\(\s*(?:{ident})\s+IN\s*\(\s*({_LITERAL}(?:\s*,\s*{_LITERAL})*)\s*\)"
            rf"(?:\s+OR\s+(?:{ident})\s+IS\s+NULL)?\s*\)",
            re.IGNORECASE,
        )
        found = pattern.search(sql)
        if found is None:
            return None
        return tuple(text[1:-1].replace("''", "'") for text in re.findall(_LITERAL, found[1]))

    def pack_versions(self, versions: Mapping[str, str], stamps: set[Any] | None = None) -> str:
        """The stored text of a record's versions (column -> stamp), as JSON.

        A record written once (every column at one stamp, its existence never
        versioned) is stored as that stamp alone: a fifteenth of the bytes, and most
        records are like that. Anything else is stored as the object. ``stamps``:
        the set of the versions' values, if the caller has it already.
        """
        if len(versions) == len(self._names):
            if stamps is None:
                stamps = set(versions.values())
            if len(stamps) == 1 and versions.keys() == self._name_set:
                return orjson.dumps(next(iter(stamps))).decode("utf-8")
        return orjson.dumps(versions).decode("utf-8")

    def unpack_versions(self, text: str | bytes) -> Versions:
        """The versions :meth:`pack_versions` stored (either form)."""
        found: dict[str, str] | str = orjson.loads(text)
        if isinstance(found, str):
            return dict.fromkeys(self._names, found)
        return found

    def expand_versions(self, versions: Mapping[str, str] | str) -> Versions:
        """Versions column by column, from either form (one stamp names every column)."""
        if isinstance(versions, str):
            return dict.fromkeys(self._names, versions)
        return dict(versions)

    def row(self, pk: Mapping[str, Any], values: Mapping[str, Any]) -> list[Any]:
        """The record's column values in table order: ``values``, with the key ``pk``
        names (a column ``values`` lacks is None)."""
        row = list(map(values.get, self._names))
        for index, name in self._key_at:
            row[index] = pk[name]
        return row

    def pk_key(self, pk: Mapping[str, Any]) -> str:
        """Return the canonical text key of a primary key: a compact JSON array."""
        if len(self.primary_key) == 1:
            value = pk[self.primary_key[0]]
            kind = type(value)
            # The common keys, spelled as the JSON encoder would (see pk_key below).
            if kind is str and value.isprintable() and '"' not in value and "\\" not in value:
                return f'["{value}"]'
            if kind is int:
                return f"[{value}]"
        return pk_key([pk[name] for name in self.primary_key])

    def pk_dict(self, key: str) -> dict[str, Any]:
        """The primary key, column -> value, of a key text (the inverse of :meth:`pk_key`)."""
        if len(self.primary_key) == 1 and len(key) > 3 and key[:2] == '["' and key[-2:] == '"]':
            value = key[2:-2]
            # The common key, spelled as pk_key's fast path spells it: read as JSON reads it.
            if value.isprintable() and '"' not in value and "\\" not in value:
                return {self.primary_key[0]: value}
        return dict(zip(self.primary_key, key_values(key), strict=True))

    def check_pk(self, pk: Any) -> dict[str, Any]:
        """Return ``pk`` if it names exactly this table's key columns with scalar values."""
        if type(pk) is dict and pk.keys() == self._pk_names and None not in pk.values():
            self.check_values(pk)  # the same checks as check_value, faster
            return pk
        if not isinstance(pk, dict) or set(pk) != set(self.primary_key):
            raise InvalidChangeError(
                f"primary key of {self.name} must name exactly "
                f"{', '.join(self.primary_key)}, got {_names(pk)}"
            )
        for name, value in pk.items():
            if value is None:
                raise InvalidChangeError(f"primary key column {self.name}.{name} is null")
            self.check_value(name, value)
        return pk

    def check_values(self, values: Mapping[str, Any]) -> None:
        """Raise InvalidChangeError unless every value fits its column (a fast path)."""
        allowed = self._fast
        for name, value in values.items():
            kinds = allowed.get(name)
            kind = type(value)
            if kinds is not None and kind in kinds:
                if kind is int:
                    if -(2**63) <= value < 2**63:
                        continue
                elif kind is float:
                    if value - value == 0:  # finite: inf - inf and nan - nan are nan
                        continue
                elif kind is str:
                    if "\x00" not in value:  # PostgreSQL's text cannot hold it
                        continue
                else:
                    continue
            self.check_value(name, value)  # the exact check, and its message

    def check_value(self, name: str, value: Any) -> None:
        """Raise InvalidChangeError unless ``value`` fits column ``name``.

        The message names the column and the kind of value, never the value itself:
        it ends up in logs and protection data must not.
        """
        try:
            col = self.column(name)
        except KeyError:
            raise InvalidChangeError(
                f"table {self.name} has no column {name!r}; "
                f"its columns are {', '.join(self.column_names)}"
            ) from None
        if value is None:
            return
        kind = col.type.upper()
        ok: bool
        if isinstance(value, bool) or isinstance(value, (dict, list)):
            ok = False
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidChangeError(
                f"column {self.name}.{name} cannot hold {value}: only finite numbers sync"
            )
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise InvalidChangeError(
                f"column {self.name}.{name} cannot hold {value}: integers must fit in 64 bits"
            )
        elif isinstance(value, str) and "\x00" in value:
            raise InvalidChangeError(
                f"column {self.name}.{name} cannot hold text with a NUL character"
            )
        elif (found := affinity(kind)) == "TEXT":
            ok = isinstance(value, str)
        elif found == "INTEGER":
            ok = isinstance(value, int)
        elif found == "REAL" or kind == "NUMERIC":
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, (str, int, float))
        if not ok:
            raise InvalidChangeError(
                f"column {self.name}.{name} holds {col.type or 'scalar'} values, "
                f"not {type(value).__name__}"
            )

    def parse_value(self, name: str, text: str) -> Any:
        """The value of column ``name`` that a person typed as ``text``.

        ``null`` is NULL; a whole number for INTEGER columns, a number for REAL ones;
        other columns take the text as typed, or a JSON string (``"null"`` is the
        text null). The command line and the dashboard both read typed values here.
        Raises InvalidChangeError (naming the column, never the text) when the
        text is not a value of the column's type.
        """
        kind = self.column(name).type.upper()
        if text == "null":
            return None
        if affinity(kind) == "INTEGER":
            try:
                return int(text)
            except ValueError:
                raise InvalidChangeError(f"{name} takes whole numbers") from None
        if affinity(kind) == "REAL" or kind == "NUMERIC":
            try:
                return float(text)
            except ValueError:
                raise InvalidChangeError(f"{name} takes numbers") from None
        if text.startswith('"'):  # a JSON string: '"null"' is the text null
            try:
                quoted = json.loads(text)
            except ValueError:
                quoted = None
            if isinstance(quoted, str):
                return quoted
        return text


def load_custom(policy: str) -> Callable[..., Any]:
    """Import the function a ``custom:package.module:function`` policy names."""
    match = _CUSTOM.fullmatch(policy)
    if match is None:
        raise SchemaError(f"{policy!r} is not a custom:package.module:function policy")
    module_name, func_name = match.groups()
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise SchemaError(f"cannot load the merge function of policy {policy!r}: {exc}") from exc
    if not callable(func):
        raise SchemaError(f"{policy!r} does not name a function")
    return func  # type: ignore[no-any-return]


def _names(pk: Any) -> str:
    # Column names only: error messages never quote record contents.
    if isinstance(pk, dict):
        return ", ".join(map(str, pk)) or "no columns"
    return f"a {type(pk).__name__}"


_KEY_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def affinity(declared: str) -> str:
    """SQLite's type affinity of a column declared ``declared``: INTEGER, TEXT, REAL,
    NUMERIC or BLOB (no type). The hub checks values by it, and PostgreSQL's columns
    are made by it (hub/pg/ddl.py), so both engines take the same values."""
    kind = declared.upper()
    if "INT" in kind:
        return "INTEGER"
    if "CHAR" in kind or "CLOB" in kind or "TEXT" in kind:
        return "TEXT"
    if "BLOB" in kind or not kind:
        return "BLOB"
    if "REAL" in kind or "FLOA" in kind or "DOUB" in kind:
        return "REAL"
    return "NUMERIC"


def pk_key(values: list[Any]) -> str:
    """Canonical text of a primary key; byte-identical to SQLite's json_array()."""
    return _KEY_ENCODER.encode(values)


def key_values(key: str) -> list[Any]:
    """The values of a key text (a JSON array, as :func:`pk_key` writes it)."""
    try:
        return list(orjson.loads(key))
    except ValueError:  # beyond what orjson reads (an integer past 64 bits)
        return list(json.loads(key))


@dataclass(frozen=True, slots=True)
class Schema:
    """The synced tables, in declaration order."""

    tables: Mapping[str, Table]
    source: str  # the TOML text, stored in every database that uses the schema

    def table(self, name: Any) -> Table:
        """Return the table called ``name``, or raise InvalidChangeError."""
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise InvalidChangeError(
                f"unknown table {name!r}; synced tables are {', '.join(self.tables)}"
            )
        return table

    @classmethod
    def from_toml(cls, text: str, origin: str = "schema") -> Schema:
        """Parse a TOML schema; raise SchemaError naming what is wrong."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(f"cannot read {origin}: {exc}") from exc
        entries = data.get("tables")
        if not isinstance(entries, dict) or not entries:
            raise SchemaError(f"{origin} declares no [tables.NAME] entries")
        scratch = sqlite3.connect(":memory:")
        tables: dict[str, Table] = {}
        try:
            for name, entry in entries.items():
                tables[name] = _read_table(scratch, name, entry, origin)
                tables[name] = _read_scope(tables, tables[name], entry.get("scope"), origin)
        finally:
            scratch.close()
        return cls(tables, text)

    @property
    def scoped(self) -> bool:
        """Does any table hold records that belong to some offices only?"""
        return any(t.scope is not None for t in self.tables.values())

    @classmethod
    def load(cls, path: str | Path | None = None) -> Schema:
        """Load a schema file, or the default refugee case-management schema."""
        if path is None:
            text = resources.files("shared").joinpath("default_schema.toml").read_text()
            return cls.from_toml(text, "the default schema")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SchemaError(f"cannot read schema file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise SchemaError(f"cannot read schema file {path}: it is not UTF-8 text") from None
        return cls.from_toml(text, str(path))


def _read_table(scratch: sqlite3.Connection, name: str, entry: Any, origin: str) -> Table:
    if not isinstance(entry, dict) or not isinstance(entry.get("create"), str):
        raise SchemaError(f"{origin}: table {name} needs a 'create' SQL statement")
    unknown = sorted(set(entry) - {"create", "policy", "scope", "indexes"})
    if unknown:
        raise SchemaError(
            f"{origin}: table {name} has unknown key(s) {', '.join(unknown)}; "
            "a table takes 'create', 'policy', 'scope' and 'indexes'"
        )
    if name.startswith(("_fieldsync", "sqlite_")):
        raise SchemaError(f"{origin}: table name {name!r} is reserved")
    policy = entry.get("policy", "merge")
    if policy not in POLICIES and not _CUSTOM.fullmatch(str(policy)):
        raise SchemaError(
            f"{origin}: table {name} has unknown policy {policy!r}; "
            f"use one of {', '.join(POLICIES)} or custom:package.module:function"
        )
    create = entry["create"].strip().rstrip(";")
    try:
        scratch.execute(create)
    except sqlite3.Error as exc:
        raise SchemaError(f"{origin}: cannot create table {name}: {exc}") from exc
    if scratch.execute("SELECT 1 FROM temp.sqlite_master WHERE name = ?", [name]).fetchone():
        raise SchemaError(f"{origin}: table {name} is TEMP; a synced table must be a real one")
    info = scratch.execute(f"PRAGMA main.table_info({_quote(name)})").fetchall()
    if not info:
        raise SchemaError(f"{origin}: the create SQL of {name} does not create a table {name}")
    columns = tuple(Column(row[1], str(row[2]).upper(), bool(row[3])) for row in info)
    pk = tuple(row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0)
    if not pk:
        raise SchemaError(f"{origin}: table {name} has no primary key, so it cannot be synced")
    for col in columns:
        if (
            col.name == EXISTS
            or '"' in col.name
            or col.name.startswith("__fieldsync")
            or col.type == "BLOB"
        ):
            raise SchemaError(
                f"{origin}: column {name}.{col.name} cannot be synced "
                "(BLOB columns, the name '~' and names with '\"' are not supported)"
            )
    for col in columns:
        if col.name in pk and col.type not in ("TEXT", "INTEGER", "INT"):
            raise SchemaError(
                f"{origin}: primary key column {name}.{col.name} must be TEXT or INTEGER, "
                f"not {col.type or 'untyped'}"
            )
    pk_index = any(row[3] == "pk" for row in scratch.execute(f"PRAGMA index_list({_quote(name)})"))
    if len(pk) == 1 and table_type(columns, pk[0]) == "INTEGER" and not pk_index:
        raise SchemaError(
            f"{origin}: the key {name}.{pk[0]} is an INTEGER PRIMARY KEY, which SQLite "
            "numbers 1, 2, 3… in every office, so new records of two offices would take "
            "the same key; use a TEXT key (a UUID), or a table WITHOUT ROWID with keys "
            "that cannot clash"
        )
    indexes = _read_indexes(scratch, name, entry.get("indexes", []), origin)
    if unique_constraints(scratch, name):
        raise SchemaError(
            f"{origin}: table {name} has a UNIQUE constraint besides its primary key; "
            "offices working offline could each create the same value, which no sync can "
            "undo, so synced tables cannot have one"
        )
    return Table(name, columns, pk, policy, create, indexes=indexes)


def _read_indexes(
    scratch: sqlite3.Connection, name: str, entry: Any, origin: str
) -> tuple[tuple[str, str], ...]:
    """The indexes ``indexes = ["CREATE INDEX ...", ...]`` declares on table ``name``."""
    if not isinstance(entry, list) or not all(isinstance(sql, str) for sql in entry):
        raise SchemaError(f'{origin}: table {name}: indexes = ["CREATE INDEX ...", ...]')
    found: list[tuple[str, str]] = []
    for text in entry:
        sql = text.strip().rstrip(";")
        before = {row[0] for row in scratch.execute("SELECT name FROM sqlite_master")}
        try:
            scratch.execute(sql)
        except sqlite3.Error as exc:
            raise SchemaError(f"{origin}: cannot create an index of {name}: {exc}") from exc
        made = scratch.execute(
            "SELECT name, tbl_name, type FROM sqlite_master WHERE name NOT IN "
            f"({', '.join('?' for _ in before)})",
            sorted(before),
        ).fetchall()
        if len(made) != 1 or made[0][2] != "index" or made[0][1] != name:
            raise SchemaError(f"{origin}: {sql!r} must create one index of table {name}")
        found.append((str(made[0][0]), sql))
    return tuple(found)


def _read_scope(tables: dict[str, Table], table: Table, entry: Any, origin: str) -> Table:
    """``table`` with the scope its entry declares: ``scope = { column = "office" }``
    or ``scope = { column = "case_id", parent = "cases" }``."""
    if entry is None:
        return table
    where = f"{origin}: the scope of table {table.name}"
    if not isinstance(entry, dict) or not isinstance(entry.get("column"), str):
        raise SchemaError(
            f'{where} must name a column: scope = {{ column = "office" }}, or '
            'scope = { column = "case_id", parent = "cases" } to follow a parent record'
        )
    unknown = sorted(set(entry) - {"column", "parent"})
    if unknown:
        raise SchemaError(f"{where} has unknown key(s) {', '.join(unknown)}")
    column, parent = entry["column"], entry.get("parent")
    if column not in table.column_names:
        raise SchemaError(f"{where} names no column of {table.name}: {column!r}")
    if column in table.primary_key:
        raise SchemaError(f"{where} cannot be a primary key column ({column})")
    if parent is None:
        if table.column(column).type not in ("TEXT", ""):
            raise SchemaError(f"{where}: {column} names an office, so it must be TEXT")
        return replace(table, scope=Scope(column))
    if not isinstance(parent, str) or parent not in tables or parent == table.name:
        raise SchemaError(f"{where} follows {parent!r}, which is not a table declared before it")
    found = tables[parent]
    if found.scope is None:
        raise SchemaError(f"{where} follows {parent}, which has no scope of its own")
    if len(found.primary_key) != 1:
        raise SchemaError(f"{where} follows {parent}, whose key has more than one column")
    return replace(table, scope=Scope(column, parent))


def table_type(columns: tuple[Column, ...], name: str) -> str:
    return next(c.type for c in columns if c.name == name)


def unique_constraints(conn: sqlite3.Connection, table: str) -> list[str]:
    """Names of the unique indexes of ``table`` other than its primary key."""
    return [
        row[1]
        for row in conn.execute(f"PRAGMA index_list({_quote(table)})")
        if row[2] and row[3] != "pk"
    ]


def _quote(identifier: str) -> str:
    """Quote an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


quote = _quote
