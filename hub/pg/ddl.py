"""
The mirrored tables (the organisation's own, declared in the schema TOML) on PostgreSQL.

A table's ``create`` SQL is written for SQLite; :func:`create_table_sql` (and
:func:`add_column_sql`, and :func:`index_sql` for the indexes the schema declares) says
the same in PostgreSQL's words, from the columns SQLite itself read
(``shared.schema.Table``) and the parts of the statement
(``shared.schema_change.split_create``):

- Types, by SQLite's affinity rules on the declared type (so a column holds on
  PostgreSQL what SQLite would keep in it): a type containing INT → ``bigint``; CHAR,
  CLOB or TEXT → ``text COLLATE "C"`` (byte order, as SQLite compares text, whatever
  the server's locale); REAL, FLOA or DOUB → ``double precision``; anything else — no
  type, NUMERIC, DECIMAL, DATE, BOOLEAN, ANY, a type containing BLOB — → ``jsonb``.
  Such a column may hold text *and* numbers in one table (``Table.check_value``), and
  only ``jsonb`` keeps each value's kind: ``'5'`` stays text, ``5`` an integer (exact up
  to 2**63-1), ``2.5`` a float (exact: numbers are kept as written). One change: a
  float without fraction at or beyond 1e16 comes back as an integer of equal value (as
  SQLite's NUMERIC affinity stores it). ``bytea`` is never used: the hub stores no
  bytes (values travel as JSON), and the schema refuses BLOB columns.
- Kept: NOT NULL, literal DEFAULTs (``CURRENT_TIMESTAMP``/``_DATE``/``_TIME`` as the
  text SQLite writes), the primary key (one column or several), UNIQUE, CHECK
  constraints (identifiers quoted as SQLite resolved them, ``==`` → ``=``, ``ifnull`` →
  ``coalesce``, ``length(x)`` of any column type); ``COLLATE BINARY`` (what "C" is).
- Dropped: REFERENCES and FOREIGN KEY (the hub never enforces them: offices send a
  record and its parent in any order), ON CONFLICT clauses, ASC/DESC, AUTOINCREMENT,
  STRICT, WITHOUT ROWID.
- Refused (:class:`~shared.errors.SchemaError`, one line naming the table and the
  clause, and what to write instead): other collations (NOCASE, RTRIM), DEFAULTs that
  are expressions, generated columns, and CHECKs that PostgreSQL would read otherwise
  or not at all — GLOB, LIKE (SQLite ignores ASCII case, PostgreSQL does not), REGEXP,
  MATCH, typeof(), functions other than a few common to both, text in double quotes,
  and any check on a ``jsonb`` column (its comparisons are not SQLite's).
"""

from __future__ import annotations

import json
import re

from shared.errors import SchemaError
from shared.schema import Column, Table, affinity, quote
from shared.schema_change import split_create

Token = tuple[str, str]  # (kind, text): str, qid, num, word, op

_TOKEN = re.compile(
    r"""(?P<str>'(?:[^']|'')*')
    |(?P<qid>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\])
    |(?P<num>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<word>[^\W\d][\w$]*)
    |(?P<op><=|>=|<>|!=|==|\|\||<<|>>|[-+*/%<>=(),.~&|])
    |(?P<space>\s+)
    |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)

JSONB = "jsonb"
TEXT = 'text COLLATE "C"'

# Functions a CHECK may call: they mean the same on both (length is given a text cast).
_FUNCTIONS = {
    "abs": "abs",
    "coalesce": "coalesce",
    "ifnull": "coalesce",
    "length": "length",
    "lower": "lower",
    "ltrim": "ltrim",
    "nullif": "nullif",
    "round": "round",
    "rtrim": "rtrim",
    "substr": "substr",
    "trim": "trim",
    "upper": "upper",
}
_KEYWORDS = {
    "AND",
    "OR",
    "NOT",
    "IN",
    "IS",
    "NULL",
    "BETWEEN",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "DISTINCT",
    "FROM",
}
# What a CHECK cannot say on PostgreSQL, and what to write instead.
_REFUSED = {
    "GLOB": "GLOB is SQLite's own; use IN (...), comparisons or length()",
    "LIKE": "SQLite's LIKE ignores ASCII case and PostgreSQL's does not; "
    "use IN (...), comparisons or length()",
    "REGEXP": "REGEXP is SQLite's own; use IN (...), comparisons or length()",
    "MATCH": "MATCH is SQLite's own; use IN (...), comparisons or length()",
    "TYPEOF": "typeof() is SQLite's own; declare the column's type (TEXT, INTEGER, REAL) "
    "instead of checking it",
}
_CONSTRAINT_WORDS = {
    "CONSTRAINT",
    "PRIMARY",
    "NOT",
    "NULL",
    "UNIQUE",
    "CHECK",
    "DEFAULT",
    "COLLATE",
    "REFERENCES",
    "GENERATED",
    "AS",
}
_NOW = {
    "CURRENT_TIMESTAMP": "YYYY-MM-DD HH24:MI:SS",
    "CURRENT_DATE": "YYYY-MM-DD",
    "CURRENT_TIME": "HH24:MI:SS",
}


def pg_type(declared: str) -> str:
    """PostgreSQL's type for a column SQLite declared ``declared`` (by its affinity)."""
    kinds = {"INTEGER": "bigint", "TEXT": TEXT, "REAL": "double precision"}
    return kinds.get(affinity(declared), JSONB)


def create_table_sql(table: Table) -> str:
    """``CREATE TABLE`` of ``table`` for PostgreSQL; SchemaError if it cannot be said."""
    definition = split_create(table.create)
    lines: list[str] = []
    constraints: list[str] = []
    for part in definition.parts:
        reader = _Reader(part, table)
        if reader.peek() in ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"):
            found = _table_constraint(reader)
            if found:
                constraints.append(found)
        else:
            lines.append(_column(reader))
    keys = ", ".join(quote(name) for name in table.primary_key)
    lines.append(f"PRIMARY KEY ({keys})")
    lines.extend(constraints)
    body = ",\n    ".join(lines)
    return f"CREATE TABLE {quote(table.name)} (\n    {body}\n)"


def add_column_sql(table: Table, column: Column | str) -> str:
    """``ALTER TABLE … ADD COLUMN`` of ``column`` as ``table.create`` declares it."""
    name = column if isinstance(column, str) else column.name
    for part in split_create(table.create).parts:
        reader = _Reader(part, table)
        if reader.peek() not in ("CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"):
            start = reader.at
            if reader.column_of(reader.take()) == name:
                reader.at = start
                return f"ALTER TABLE {quote(table.name)} ADD COLUMN {_column(reader)}"
    raise KeyError(name)


def index_sql(table: Table) -> list[str]:
    """``CREATE INDEX`` of each index the schema declares on ``table`` (``indexes``)."""
    return [_index(table, name, sql) for name, sql in table.indexes]


def _index(table: Table, name: str, sql: str) -> str:
    reader = _Reader(sql, table)
    clause = f"the index {name}"
    if not (reader.accept("CREATE", "INDEX") or reader.accept("CREATE", "UNIQUE", "INDEX")):
        raise reader.refuse(clause, "fieldsync cannot read it")
    unique = "UNIQUE " if reader.tokens[1][1].upper() == "UNIQUE" else ""
    reader.accept("IF", "NOT", "EXISTS")
    while reader.peek() != "ON":  # the name, perhaps with its schema: main.name
        reader.take()
    reader.take()
    reader.take()  # the table
    items: list[list[Token]] = [[]]
    for token in reader.group():
        if token == ("op", ","):
            items.append([])
        else:
            items[-1].append(token)
    columns: list[str] = []
    for item in items:
        order = ""
        if item and item[-1][1].upper() in ("ASC", "DESC"):
            order, item = " " + item[-1][1].upper(), item[:-1]
        if len(item) > 1 and item[-2][1].upper() == "COLLATE":
            collation = _name(item[-1]).upper()
            if collation != "BINARY":
                raise reader.refuse(
                    f"COLLATE {collation} in {clause}",
                    "its text is compared byte by byte there; drop the COLLATE",
                )
            item = item[:-2]
        column = reader.column_of(item[0]) if len(item) == 1 else None
        if column is not None:
            columns.append(quote(column) + order)
        else:  # an expression: in parentheses of its own there
            columns.append(f"({_check(reader, item, clause)}){order}")
    where = ""
    if reader.accept("WHERE"):
        where = f" WHERE {_check(reader, reader.tokens[reader.at :], clause)}"
    return (
        f"CREATE {unique}INDEX {quote(name)} ON {quote(table.name)} ({', '.join(columns)}){where}"
    )


def tokenize(text: str) -> list[Token]:
    """The tokens of an SQL fragment, spaces left out."""
    tokens: list[Token] = []
    for found in _TOKEN.finditer(text):
        kind = found.lastgroup or "other"
        if kind != "space":
            tokens.append((kind, found.group()))
    return tokens


class _Reader:
    """Tokens of one part of a CREATE TABLE, read left to right."""

    def __init__(self, text: str, table: Table) -> None:
        self.tokens = tokenize(text)
        self.at = 0
        self.table = table
        self.text = " ".join(text.split())
        self.columns = {col.name.lower(): col for col in table.columns}

    def refuse(self, clause: str, why: str) -> SchemaError:
        return SchemaError(
            f"table {self.table.name}: {clause} cannot be kept on PostgreSQL ({why})"
        )

    def peek(self, ahead: int = 0) -> str:
        at = self.at + ahead
        return self.tokens[at][1].upper() if at < len(self.tokens) else ""

    def done(self) -> bool:
        return self.at >= len(self.tokens)

    def take(self) -> Token:
        if self.done():
            raise self.refuse(repr(self.text), "it ends too soon")
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, *words: str) -> bool:
        if all(self.peek(n) == word for n, word in enumerate(words)):
            self.at += len(words)
            return True
        return False

    def group(self) -> list[Token]:
        """The tokens inside the parentheses that come next (which are consumed)."""
        if self.peek() != "(":
            raise self.refuse(repr(self.text), "a '(' is missing")
        start, depth = self.at, 0
        while not self.done():
            kind, text = self.take()
            if kind == "op" and text == "(":
                depth += 1
            elif kind == "op" and text == ")":
                depth -= 1
                if depth == 0:
                    return self.tokens[start + 1 : self.at - 1]
        raise self.refuse(repr(self.text), "a ')' is missing")

    def column_of(self, token: Token) -> str | None:
        """The column an identifier token names (SQLite's case-blind match), if any."""
        kind, text = token
        if kind == "qid":
            text = text[1:-1].replace(text[0] * 2, text[0]) if text[0] != "[" else text[1:-1]
        elif kind != "word":
            return None
        col = self.columns.get(text.lower())
        return None if col is None else col.name

    def skip_conflict(self) -> None:
        if self.accept("ON", "CONFLICT"):
            self.take()


def _column(reader: _Reader) -> str:
    first = reader.take()
    name = reader.column_of(first)
    if name is None:
        if any(token[1].upper() in ("GENERATED", "AS") for token in reader.tokens):
            # hidden from PRAGMA table_info: not in table.columns
            raise reader.refuse(
                f"the generated column {_name(first)}", "the hub writes every column it mirrors"
            )
        raise reader.refuse(repr(reader.text), "it names no column SQLite reads")
    while not reader.done() and reader.peek() not in _CONSTRAINT_WORDS:
        if reader.peek() == "(":
            reader.group()  # VARCHAR(20): the length, which SQLite ignores too
        else:
            reader.take()
    kind = pg_type(reader.table.column(name).type)
    out = [quote(name), kind]
    clause = f"column {name}"
    while not reader.done():
        label = ""
        if reader.accept("CONSTRAINT"):
            label = f"CONSTRAINT {quote(_name(reader.take()))} "
        word = reader.peek()
        if reader.accept("PRIMARY", "KEY"):  # the table's key, written once at the end
            reader.accept("ASC") or reader.accept("DESC")
            reader.skip_conflict()
            reader.accept("AUTOINCREMENT")
        elif reader.accept("NOT", "NULL"):
            reader.skip_conflict()
            out.append("NOT NULL")
        elif reader.accept("NULL"):
            continue
        elif reader.accept("UNIQUE"):
            reader.skip_conflict()
            out.append("UNIQUE")
        elif word == "CHECK":
            reader.take()
            out.append(f"{label}CHECK ({_check(reader, reader.group(), clause)})")
        elif word == "DEFAULT":
            reader.take()
            out.append("DEFAULT " + _default(reader, name, kind))
        elif word == "COLLATE":
            reader.take()
            collation = _name(reader.take()).upper()
            if collation != "BINARY":
                raise reader.refuse(
                    f"COLLATE {collation} on column {name}",
                    "its text is compared byte by byte there; drop the COLLATE",
                )
        elif word == "REFERENCES":
            _skip_references(reader)
        elif word in ("GENERATED", "AS"):
            raise reader.refuse(
                f"the generated column {name}", "the hub writes every column it mirrors"
            )
        else:
            raise reader.refuse(f"{word!r} in column {name}", "fieldsync cannot read it")
    return " ".join(out)


def _table_constraint(reader: _Reader) -> str:
    """A table constraint in PostgreSQL's words ("" when it is dropped)."""
    label = ""
    if reader.accept("CONSTRAINT"):
        label = f"CONSTRAINT {quote(_name(reader.take()))} "
    if reader.accept("PRIMARY", "KEY"):  # written from table.primary_key
        reader.group()
        reader.skip_conflict()
        return ""
    if reader.accept("FOREIGN", "KEY"):
        reader.group()
        _skip_references(reader)
        return ""
    if reader.accept("UNIQUE"):
        names = []
        for token in reader.group():
            if token == ("op", ","):
                continue
            name = reader.column_of(token)
            if name is None:
                raise reader.refuse(f"UNIQUE ({reader.text})", "only plain column names are taken")
            names.append(quote(name))
        reader.skip_conflict()
        return f"{label}UNIQUE ({', '.join(names)})"
    if reader.accept("CHECK"):
        return f"{label}CHECK ({_check(reader, reader.group(), 'a table CHECK')})"
    raise reader.refuse(repr(reader.text), "fieldsync cannot read it")


def _name(token: Token) -> str:
    kind, text = token
    if kind == "qid":
        return text[1:-1]
    if kind in ("word", "str"):
        return text.strip("'")
    raise SchemaError(f"{text!r} is not a name")


def _skip_references(reader: _Reader) -> None:
    """REFERENCES table (columns) and its clauses: dropped."""
    reader.accept("REFERENCES")
    reader.take()
    if reader.peek() == "(":
        reader.group()
    while not reader.done():
        if reader.accept("ON"):
            reader.take()  # DELETE or UPDATE
            if not (reader.accept("SET", "NULL") or reader.accept("SET", "DEFAULT")):
                if not reader.accept("NO", "ACTION"):
                    reader.take()  # CASCADE, RESTRICT
        elif reader.accept("MATCH"):
            reader.take()
        elif reader.accept("NOT", "DEFERRABLE") or reader.accept("DEFERRABLE"):
            if reader.accept("INITIALLY"):
                reader.take()
        else:
            return


def _default(reader: _Reader, column: str, kind: str) -> str:
    """A DEFAULT's value: a literal (as jsonb for a jsonb column), or the text SQLite
    writes for CURRENT_TIMESTAMP, CURRENT_DATE and CURRENT_TIME."""
    if reader.peek() == "(":
        tokens = reader.group()
    elif reader.peek() in ("-", "+"):
        tokens = [reader.take(), reader.take()]
    else:
        tokens = [reader.take()]
    sign = ""
    if len(tokens) == 2 and tokens[0] in (("op", "-"), ("op", "+")):
        sign, tokens = tokens[0][1], tokens[1:]
    if len(tokens) == 1:
        token_kind, text = tokens[0]
        upper = text.upper()
        if token_kind == "num":
            literal = sign + (str(int(text, 16)) if upper.startswith("0X") else text)
            if kind != JSONB:
                return literal
            number = float(literal) if any(c in upper for c in ".E") else int(literal)
            return f"'{json.dumps(number)}'::jsonb"
        elif token_kind == "str" and not sign:
            if kind != JSONB:
                return text
            text_value = text[1:-1].replace("''", "'")
            encoded = json.dumps(text_value, ensure_ascii=False).replace("'", "''")
            return f"'{encoded}'::jsonb"
        elif upper == "NULL" and not sign:
            return "NULL"
        elif upper in ("TRUE", "FALSE") and not sign:
            flag = "1" if upper == "TRUE" else "0"
            return f"'{flag}'::jsonb" if kind == JSONB else flag
        elif upper in _NOW and not sign and kind == TEXT:
            return f"(to_char(now() AT TIME ZONE 'UTC', '{_NOW[upper]}'))"
    raise reader.refuse(
        f"the DEFAULT of column {column}",
        "it takes a literal only: the hub writes every column, defaults matter to "
        "offices only; write a literal",
    )


def _check(reader: _Reader, tokens: list[Token], clause: str) -> str:
    """A CHECK's expression in PostgreSQL's words."""
    out: list[str] = []
    at = 0
    where = f"the CHECK of {clause}"
    while at < len(tokens):
        kind, text = tokens[at]
        upper = text.upper()
        following = tokens[at + 1] if at + 1 < len(tokens) else ("", "")
        at += 1
        if kind == "num":  # PostgreSQL 15 reads no 0x literal
            out.append(str(int(text, 16)) if upper.startswith("0X") else text)
        elif kind == "str":
            out.append(text)
        elif upper == "IS":  # SQLite's `a IS b` compares any values, NULL included
            negated = following[1].upper() == "NOT"
            after = tokens[at + negated][1].upper() if at + negated < len(tokens) else ""
            if after in ("NULL", "DISTINCT", "TRUE", "FALSE"):
                out.append("IS")
            else:
                out.append("IS DISTINCT FROM" if negated else "IS NOT DISTINCT FROM")
                at += negated
        elif upper in _REFUSED:
            raise reader.refuse(where, _REFUSED[upper])
        elif kind == "word" and following == ("op", "(") and upper not in _KEYWORDS:
            function = _FUNCTIONS.get(text.lower())
            if function is None:
                raise reader.refuse(
                    where,
                    f"{text}() may not exist there or mean the same; use "
                    + ", ".join(f"{f}()" for f in sorted(set(_FUNCTIONS) - {"ifnull"})),
                )
            if function == "length":  # of any column type, as SQLite's
                end = _closing(tokens, at)
                inner = _check(reader, tokens[at + 1 : end], clause)
                out.append(f"length(({inner})::text)")
                at = end + 1
            else:
                out.append(function + "(")
                at += 1
        elif kind in ("word", "qid") and reader.column_of((kind, text)) is not None:
            name = reader.column_of((kind, text)) or ""
            if pg_type(reader.table.column(name).type) == JSONB:
                raise reader.refuse(
                    where,
                    f"column {name} has no TEXT, INTEGER or REAL type, so its values "
                    "compare otherwise there; declare its type",
                )
            out.append(quote(name))
        elif kind == "qid":
            raise reader.refuse(
                where, f"{text} names no column (SQLite reads it as text); write '…' for text"
            )
        elif upper in _KEYWORDS:
            out.append(upper)
        elif upper in ("TRUE", "FALSE"):
            out.append("1" if upper == "TRUE" else "0")
        elif kind == "op" and text not in ("~", "&", "|", "<<", ">>", "."):
            out.append("=" if text == "==" else text)
        else:
            raise reader.refuse(where, f"{text!r} is not taken there")
    return _join(out)


def _join(words: list[str]) -> str:
    """Words of SQL joined by spaces, except inside parentheses' edges and before commas."""
    text = ""
    for word in words:
        if text and not text.endswith("(") and word not in (")", ","):
            text += " "
        text += word
    return text


def _closing(tokens: list[Token], at: int) -> int:
    """The index of the ')' closing the '(' at ``at``."""
    depth = 0
    for index in range(at, len(tokens)):
        if tokens[index] == ("op", "("):
            depth += 1
        elif tokens[index] == ("op", ")"):
            depth -= 1
            if depth == 0:
                return index
    raise SchemaError("a ')' is missing")
