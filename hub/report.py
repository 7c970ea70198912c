"""
Headquarters' consolidated figures across offices, and the charts that show them.

:func:`figures` reads the real tables the hub mirrors live records into (see
:mod:`hub.records`; deleted records are not in them) and returns one JSON-serialisable
dict, for the admin dashboard's headquarters view and the JSON admin API alike.
Every figure is an SQL ``GROUP BY``: no table's rows are loaded into Python, so a
table of a million records costs one scan per section, and the answers are as small
as the number of offices, statuses, countries and months. The SQL is plain (``substr``,
``COALESCE``, ``COUNT(DISTINCT …)``) and runs on PostgreSQL too; which columns exist,
and a record's key text, are asked of the connection's dialect (hub/engine.py).

A deployment may use its own schema: a section whose table or columns are missing
(from the schema or from the database) is ``None``. The shape::

    {
      "tables": [                       # every synced table, in schema order
        {"table": "cases", "records": 1234,
         "by_office": [{"office": "almaty", "records": 600}, ...] | null}
      ],                                # by_office: null for a table without a scope;
                                        # offices by name, null (no office) last
      "cases_by_office_status": null | {
        "statuses": ["asylum_seeker", "refugee", "rejected", "closed", <others>, "unknown"],
        "rows": [{"office": "almaty", "counts": {<every status>: n}, "total": n}, ...],
        "totals": {<every status>: n},
        "total": n
      },
      "cases_by_country": null | [
        {"country": "AFG", "cases": n}, ...,           # at most 15, cases desc, then code
        {"country": "other", "cases": n, "countries": k}   # only if more countries exist
      ],
      "assistance_by_kind_month": null | {
        "months": ["2024-01", ..., null],             # null: undated (shown as "undated")
        "kinds": ["cash", "food", ..., null],
        "rows": [{"kind": k, "month": m, "deliveries": n, "quantity": q}, ...],
        "by_month": [{"month": m, "deliveries": n, "quantity": q}, ...]
      }
    }

**Per office** means the record's scope key (``_fieldsync_records.scope``, see
:mod:`hub.scopes`): the value of its scope column, or its parent's key for a table that
follows one (assistance follows its case). It is what an office holds and what a
download for that office (:mod:`hub.export`) writes, so each office's figure is the row
count of its download. A record with no office (key ``""``) is counted under ``null``.
A table without a scope is held whole by every office: it has no per-office figures.

Statuses: only those present are listed, the four known ones first in their fixed
order, then any others (a custom schema's) sorted, then ``"unknown"`` for cases with
no status (NULL); a stored status literally ``"unknown"`` is counted with them. A
country or office that is NULL is ``null``. A month is the ``YYYY-MM`` of
``delivered_on``; a delivery with no date, or one that does not start ``YYYY-MM``
(month 01-12), is counted under month ``null``. ``quantity`` is the sum of the
quantities (NULL ones add nothing), always a float.

:func:`bar_chart_svg` and :func:`column_chart_svg` render such figures server-side
as inline ``<svg>``: no script, no external reference, every text escaped.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hub.engine import Conn, Dialect, dialect_of
from shared.schema import Schema, Table, quote

KNOWN_STATUSES = ("asylum_seeker", "refugee", "rejected", "closed")
UNKNOWN_STATUS = "unknown"  # the status key of cases whose status is NULL
UNDATED = "undated"  # how a null month is labelled on charts and pages
TOP_COUNTRIES = 15
OTHER_COUNTRY = "other"
MAX_BARS = 30  # a chart draws at most this many bars; it notes how many it left out

# -- figures -------------------------------------------------------------------


def figures(conn: Conn, schema: Schema) -> dict[str, Any]:
    """Consolidated figures of the hub database ``conn`` (see the module's docstring).

    Read in one transaction (one snapshot) unless ``conn`` is already in one, as a
    snapshot of :meth:`hub.database.HubDatabase.snapshot` is (PostgreSQL's: REPEATABLE
    READ). Give it a connection no other thread uses meanwhile: a read-only one of its
    own is best (it never blocks the hub's writes).
    """
    with _snapshot(conn):
        columns = {
            name: _columns(conn, name) & set(table.column_names)
            for name, table in schema.tables.items()
        }
        return {
            "tables": [
                _table_counts(conn, table, columns[name]) for name, table in schema.tables.items()
            ],
            "cases_by_office_status": _cases_by_office_status(
                conn, schema.tables.get("cases"), columns.get("cases")
            ),
            "cases_by_country": _cases_by_country(conn, columns.get("cases")),
            "assistance_by_kind_month": _assistance_by_kind_month(conn, columns.get("assistance")),
        }


@contextmanager
def _snapshot(conn: Conn) -> Iterator[None]:
    # Both SQLite's connections and PostgreSQL's adapter say whether they are in one.
    if _in_transaction(conn):
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if _in_transaction(conn):
            conn.execute("ROLLBACK")  # nothing was written


def _in_transaction(conn: Conn) -> bool:
    return bool(getattr(conn, "in_transaction", False))


def _columns(conn: Conn, table: str) -> frozenset[str]:
    """The columns ``table`` has in the database (none if it is not there)."""
    return frozenset(str(name) for name in dialect_of(conn).columns(conn, table))


def _has(columns: frozenset[str] | None, *names: str) -> bool:
    return columns is not None and all(name in columns for name in names)


def _office_of(table: Table, dialect: Dialect) -> str:
    """SQL (over ``t``, the mirrored table) for the office a record belongs to: its scope
    key, NULL for none (one lookup in ``_fieldsync_records``' key per record)."""
    key = dialect.key_text([f"t.{quote(c)}" for c in table.primary_key])
    return (
        "(SELECT NULLIF(r.scope, '') FROM _fieldsync_records AS r "
        f"WHERE r.tbl = {_literal(table.name)} AND r.pk = {key})"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _table_counts(conn: Conn, spec: Table, columns: frozenset[str]) -> dict[str, Any]:
    name = spec.name
    if not columns:  # declared, but not in this database: it holds no records
        return {"table": name, "records": 0, "by_office": None if spec.scope is None else []}
    table = quote(name)
    if spec.scope is None:
        (count,) = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        return {"table": name, "records": int(count), "by_office": None}
    # The live records of a table are those _fieldsync_records holds undeleted (the
    # mirrored table holds the same ones): one range of its key, no lookup per record.
    by_office = [
        {"office": _json(office), "records": int(n)}
        for office, n in conn.execute(
            "SELECT fs_office, COUNT(*) FROM (SELECT NULLIF(scope, '') AS fs_office "
            "FROM _fieldsync_records WHERE tbl = ? AND deleted = 0) AS o "
            "GROUP BY fs_office ORDER BY (fs_office IS NULL), fs_office",
            [name],
        )
    ]
    return {
        "table": name,
        "records": sum(entry["records"] for entry in by_office),
        "by_office": by_office,
    }


def _cases_by_office_status(
    conn: Conn, spec: Table | None, columns: frozenset[str] | None
) -> dict[str, Any] | None:
    if spec is None or not _has(columns, "status"):
        return None
    if spec.scope is not None:
        office = _office_of(spec, dialect_of(conn))
    elif _has(columns, "office"):
        office = "t.office"
    else:
        return None
    counts: dict[Any, dict[str, int]] = {}  # office -> status key -> cases
    for office_name, status, n in conn.execute(
        f"SELECT fs_office, status, COUNT(*) FROM (SELECT {office} AS fs_office, "
        "t.status AS status FROM cases AS t) AS c GROUP BY fs_office, status "
        "ORDER BY (fs_office IS NULL), fs_office"
    ):
        per_office = counts.setdefault(_json(office_name), {})
        key = UNKNOWN_STATUS if status is None else str(status)
        per_office[key] = per_office.get(key, 0) + int(n)
    present = {key for per_office in counts.values() for key in per_office}
    statuses = [s for s in KNOWN_STATUSES if s in present]
    statuses += sorted(present - set(KNOWN_STATUSES) - {UNKNOWN_STATUS})
    statuses += [UNKNOWN_STATUS] if UNKNOWN_STATUS in present else []
    rows = [
        {
            "office": office,
            "counts": {s: per_office.get(s, 0) for s in statuses},
            "total": sum(per_office.values()),
        }
        for office, per_office in counts.items()
    ]
    totals = {s: sum(row["counts"][s] for row in rows) for s in statuses}
    return {
        "statuses": statuses,
        "rows": rows,
        "totals": totals,
        "total": sum(totals.values()),
    }


def _cases_by_country(conn: Conn, columns: frozenset[str] | None) -> list[dict[str, Any]] | None:
    if not _has(columns, "country_of_origin"):
        return None
    top = [
        {"country": _json(country), "cases": int(n)}
        for country, n in conn.execute(
            "SELECT country_of_origin, COUNT(*) AS n FROM cases GROUP BY country_of_origin "
            "ORDER BY n DESC, (country_of_origin IS NULL), country_of_origin LIMIT ?",
            [TOP_COUNTRIES],
        )
    ]
    total, distinct, nulls = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT country_of_origin), "
        "COUNT(*) - COUNT(country_of_origin) FROM cases"
    ).fetchone()
    groups = int(distinct) + (1 if nulls else 0)
    if groups > len(top):
        top.append(
            {
                "country": OTHER_COUNTRY,
                "cases": int(total) - sum(entry["cases"] for entry in top),
                "countries": groups - len(top),
            }
        )
    return top


def _month_sql(column: str) -> str:
    """SQL for the ``YYYY-MM`` a date text starts with, or NULL (plain SQL)."""
    d = quote(column)
    checks = [f"substr({d}, {i}, 1) BETWEEN '0' AND '9'" for i in (1, 2, 3, 4, 6, 7)]
    checks += [
        f"substr({d}, 5, 1) = '-'",
        f"substr({d}, 6, 2) BETWEEN '01' AND '12'",
        f"(length({d}) = 7 OR substr({d}, 8, 1) = '-')",
    ]
    return f"CASE WHEN {' AND '.join(checks)} THEN substr({d}, 1, 7) END"


def _assistance_by_kind_month(conn: Conn, columns: frozenset[str] | None) -> dict[str, Any] | None:
    if not _has(columns, "kind", "quantity", "delivered_on"):
        return None
    rows = [
        {
            "kind": _json(kind),
            "month": month,
            "deliveries": int(n),
            "quantity": float(quantity),
        }
        for kind, month, n, quantity in conn.execute(
            "SELECT fs_kind, fs_month, COUNT(*), COALESCE(SUM(fs_quantity), 0) FROM "
            f"(SELECT kind AS fs_kind, {_month_sql('delivered_on')} AS fs_month, "
            "quantity AS fs_quantity FROM assistance) AS a GROUP BY fs_kind, fs_month"
        )
    ]
    rows.sort(key=lambda row: (_order(row["kind"]), _order(row["month"])))
    months = sorted({row["month"] for row in rows}, key=_order)
    kinds = sorted({row["kind"] for row in rows}, key=_order)
    by_month = []
    for month in months:
        of_month = [row for row in rows if row["month"] == month]
        by_month.append(
            {
                "month": month,
                "deliveries": sum(row["deliveries"] for row in of_month),
                "quantity": math.fsum(row["quantity"] for row in of_month),
            }
        )
    return {"months": months, "kinds": kinds, "rows": rows, "by_month": by_month}


def _json(value: Any) -> Any:
    """A grouped value as JSON can hold it (text, number or null)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _order(value: Any) -> tuple[int, Any]:
    """Sort key as SQLite orders values, but NULL last: numbers, then text."""
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


# -- charts ----------------------------------------------------------------------

_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
_BAR_FILL = "#4e79a7"
_MUTED = "#767676"
_TITLE_H = 28
_LABEL_CHARS = 28  # longer labels are cut (the whole label is in the bar's tooltip)
# XML 1.0 cannot hold these characters, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def bar_chart_svg(bars: Sequence[tuple[str, float]], *, title: str, unit: str = "") -> str:
    """A horizontal bar chart as an inline ``<svg>``; bar lengths are proportional to
    the values (the largest fills the width).

    Each bar's label and value are drawn as text (``unit`` follows the value). With no
    positive value the chart says "no data". At most :data:`MAX_BARS` bars are drawn;
    the chart notes how many more there were. Every text is escaped; the SVG holds no
    script and no external reference, and scales with its container (viewBox only).
    """
    items, left_out = _prepare(bars)
    width = 640
    label_w, value_w, row_h, bar_h = 180, 100, 22, 16
    span = width - label_w - value_w
    top = _TITLE_H + 4
    peak = max((v for _, v in items), default=0.0)
    if peak <= 0:
        return _no_data(title, width)
    parts: list[str] = []
    for i, (label, value) in enumerate(items):
        y = top + i * row_h
        length = span * max(value, 0.0) / peak
        text = _value_text(value, unit)
        parts.append(
            f'<g class="row"><title>{_esc(label)}: {_esc(text)}</title>'
            f'<text class="label" x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
            f"{_esc(_clip(label))}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{length:.2f}" '
            f'height="{bar_h}" fill="{_BAR_FILL}"/>'
            f'<text class="value" x="{label_w + length + 4:.2f}" y="{y + 15}">'
            f"{_esc(text)}</text></g>"
        )
    height = top + len(items) * row_h + 6
    if left_out:
        parts.append(_left_out_note(left_out, 8, height + 10))
        height += 20
    return _svg(title, width, height, "fs-bar-chart", parts)


def column_chart_svg(columns: Sequence[tuple[str, float]], *, title: str, unit: str = "") -> str:
    """A vertical bar (column) chart as an inline ``<svg>``, e.g. deliveries per month;
    column heights are proportional to the values (the largest fills the height).

    Same rules as :func:`bar_chart_svg`: labels under the columns (slanted when they do
    not fit), values above them, "no data" with no positive value, escaped text.
    """
    items, left_out = _prepare(columns)
    slot, col_w, plot_h, pad = 44, 28, 180, 12
    peak = max((v for _, v in items), default=0.0)
    if peak <= 0:
        return _no_data(title, 360)
    labels = [_clip(label) for label, _ in items]
    texts = [_value_text(value, unit) for _, value in items]
    slant = any(_text_w(label, 12) > slot - 4 for label in labels)
    upright = any(_text_w(text, 11) > slot - 2 for text in texts)
    value_h = (max(_text_w(text, 11) for text in texts) + 8) if upright else 16
    label_h = (max(_text_w(label, 12) for label in labels) * 0.72 + 16) if slant else 20
    # A slanted label reaches left of its column: room for the first one.
    left = max(pad, math.ceil(_text_w(labels[0], 12) * 0.72 - slot / 2 + 4) if slant else 0)
    content = len(items) * slot
    width = max(360, left + content + pad)
    start = max(left, (width - content) / 2)  # a few columns stand in the middle
    base = _TITLE_H + value_h + plot_h  # the y of the columns' foot
    parts = [
        f'<line class="axis" x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}" '
        f'stroke="{_MUTED}" stroke-width="1"/>'
    ]
    for i, ((label, value), clipped, text) in enumerate(zip(items, labels, texts, strict=True)):
        centre = start + i * slot + slot / 2
        height = plot_h * max(value, 0.0) / peak
        y = base - height
        if slant:
            label_svg = (
                f'<text class="label" x="{centre:.2f}" y="{base + 14}" text-anchor="end" '
                f'transform="rotate(-45 {centre:.2f} {base + 14})">{_esc(clipped)}</text>'
            )
        else:
            label_svg = (
                f'<text class="label" x="{centre:.2f}" y="{base + 15}" text-anchor="middle">'
                f"{_esc(clipped)}</text>"
            )
        if upright:
            value_svg = (
                f'<text class="value" x="{centre + 4:.2f}" y="{y - 4:.2f}" font-size="11" '
                f'transform="rotate(-90 {centre + 4:.2f} {y - 4:.2f})">{_esc(text)}</text>'
            )
        else:
            value_svg = (
                f'<text class="value" x="{centre:.2f}" y="{y - 4:.2f}" font-size="11" '
                f'text-anchor="middle">{_esc(text)}</text>'
            )
        parts.append(
            f'<g class="column"><title>{_esc(label)}: {_esc(text)}</title>'
            f'<rect class="bar" x="{centre - col_w / 2:.2f}" y="{y:.2f}" width="{col_w}" '
            f'height="{height:.2f}" fill="{_BAR_FILL}"/>{value_svg}{label_svg}</g>'
        )
    total_h = base + label_h + 6
    if left_out:
        parts.append(_left_out_note(left_out, pad, total_h + 10))
        total_h += 20
    return _svg(title, width, math.ceil(total_h), "fs-column-chart", parts)


def _prepare(bars: Sequence[tuple[str, float]]) -> tuple[list[tuple[str, float]], int]:
    """The bars to draw (labels as text, non-finite values as 0) and how many are left out."""
    items = [
        (str(label), float(value) if math.isfinite(value) else 0.0)
        for label, value in bars[:MAX_BARS]
    ]
    return items, max(len(bars) - MAX_BARS, 0)


def _svg(title: str, width: int, height: int, kind: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="fs-chart {kind}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" '
        f'font-family="{_FONT}" font-size="12" fill="currentColor">'
        f"<title>{_esc(title)}</title>"
        f'<text class="chart-title" x="8" y="18" font-size="14" font-weight="bold">'
        f"{_esc(title)}</text>" + "".join(parts) + "</svg>"
    )


def _no_data(title: str, width: int) -> str:
    note = (
        f'<text class="no-data" x="{width / 2:.0f}" y="{_TITLE_H + 26}" '
        f'text-anchor="middle" fill="{_MUTED}">no data</text>'
    )
    return _svg(title, width, _TITLE_H + 44, "fs-no-data", [note])


def _left_out_note(count: int, x: int, y: float) -> str:
    return f'<text class="note" x="{x}" y="{y:.0f}" fill="{_MUTED}">{count} more not shown</text>'


def _value_text(value: float, unit: str) -> str:
    if value == int(value) and abs(value) < 1e15:
        text = f"{int(value):,}"
    elif abs(value) >= 1e15 or abs(value) < 0.01:
        text = f"{value:.3g}"
    else:
        text = f"{value:,.2f}"
    return f"{text} {unit}" if unit else text


def _clip(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


def _text_w(text: str, size: int) -> float:
    """A rough width of ``text`` in a sans-serif font of ``size`` px."""
    return len(text) * size * 0.6


def _esc(text: str) -> str:
    """Text made safe for XML content and attribute values."""
    return html.escape(_NOT_XML.sub("\ufffd", text), quote=True)
