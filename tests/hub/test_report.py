"""Headquarters' figures (hub.report) on real hub databases (a SQLite file, and
PostgreSQL) filled through the store's push, and its SVG charts parsed back with
ElementTree.

Expected figures are computed here from the Python data the test generated and pushed,
never copied from the report's own output.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sqlite3
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.engine import Conn
from hub.report import (
    KNOWN_STATUSES,
    MAX_BARS,
    OTHER_COUNTRY,
    TOP_COUNTRIES,
    UNKNOWN_STATUS,
    bar_chart_svg,
    column_chart_svg,
    figures,
)
from hub.store import SqlHubStore, SqliteHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change
from shared.schema import Schema
from tests.engines import Engine

T0 = now_ms() << COUNTER_BITS
_TICKS = itertools.count(1)

COUNTRIES = [
    "AFG", "SYR", "UKR", "IRQ", "IRN", "SOM", "ERI", "SDN", "YEM", "MMR",
    "COD", "VEN", "TJK", "UZB", "KGZ", "PAK", "ETH", "SSD", "LBY", "PSE",
]  # fmt: skip
DATES = [
    "2023-12-31",
    "2024-01-15",
    "2024-02-03",
    "2024-02-28",
    "2024-03-10",
    None,
    "soon",  # unparseable: undated
    "2024-13-01",  # no month 13: undated
    "2024-1-05",  # not YYYY-MM: undated
]
KINDS = ["food", "cash", "hygiene_kit", None]
QUANTITIES = [0.5, 1.0, 2.5, 10.0, 40.0, None]  # sums of these are exact in floating point


class Office:
    """Changes as one office's change log numbers and stamps them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0

    def change(
        self,
        table: str,
        key: str,
        op: str,
        values: dict[str, Any] | None,
        base: dict[str, str] | None = None,
    ) -> tuple[Change, Timestamp]:
        self.seq += 1
        ts = Timestamp(T0 + next(_TICKS), self.name)
        if op == "insert" and values is not None:
            values = {"id": key, **values}
        return Change(self.seq, table, {"id": key}, op, ts, values, base or {}), ts


def push(store: SqlHubStore, office: str, changes: list[Change]) -> None:
    result = store.push(office, changes)
    assert result.rejected == [] and result.conflicts == 0
    assert result.applied == len(changes)


def month_of(date: str | None) -> str | None:
    match = re.fullmatch(r"([0-9]{4}-(?:0[1-9]|1[0-2]))(?:-.*)?", date or "", re.DOTALL)
    return match.group(1) if match else None


def nulls_last(value: Any) -> tuple[bool, Any]:
    return (value is None, value or "")


@pytest.fixture
def hub(hub_store: SqlHubStore) -> SqlHubStore:
    return hub_store  # the hub's own fixture (tests/hub/conftest.py): both engines


@pytest.fixture
def live(hub: SqlHubStore) -> dict[str, dict[str, dict[str, Any]]]:
    """``hub`` filled from two offices: the live records it should hold."""
    return fill(hub)


@pytest.fixture
def sqlite_hub(tmp_path: Path) -> Iterator[SqliteHubStore]:
    """A SQLite hub filled as ``live`` fills one: for what is about SQLite's connection."""
    with SqliteHubStore(tmp_path / "sqlite.db") as store:
        fill(store)
        yield store


def fill(hub: SqlHubStore) -> dict[str, dict[str, dict[str, Any]]]:
    """Fill ``hub`` from two offices; return the live records the hub should hold."""
    rng = random.Random(2024)
    hub.add_node("astana")
    hub.set_scopes("astana", ["*"])
    hub.add_node("almaty")
    hub.set_scopes("almaty", ["*"])
    offices = {"astana": Office("astana"), "almaty": Office("almaty")}
    pushed: dict[str, list[Change]] = {"astana": [], "almaty": []}
    cases: dict[str, dict[str, Any]] = {}
    stamps: dict[str, Timestamp] = {}
    for i in range(48):
        sender = "astana" if i % 2 == 0 else "almaty"
        values = {
            "case_number": f"K-{i:03d}",
            "family_name": f"Family {i}",
            "status": rng.choice([*KNOWN_STATUSES, None]),
            # Every country at least once, so that some are folded into "other"; no
            # country twice, as often as many others, at the fold: NULL sorts last.
            "country_of_origin": (
                [*COUNTRIES, None][i] if i <= 20 else None if i == 47 else rng.choice(COUNTRIES)
            ),
            "household_size": rng.randint(1, 8),
            "office": None if i % 7 == 3 else sender,  # the office column is user data
        }
        key = f"case-{i:03d}"
        change, stamps[key] = offices[sender].change("cases", key, "insert", values)
        pushed[sender].append(change)
        cases[key] = {"id": key, **values}
    assistance: dict[str, dict[str, Any]] = {}
    for i in range(40):
        sender = "almaty" if i % 3 == 0 else "astana"
        values = {
            "case_id": f"case-{rng.randrange(48):03d}",
            "kind": rng.choice(KINDS),
            "quantity": rng.choice(QUANTITIES),
            "delivered_on": rng.choice(DATES),
            "office": sender,
        }
        key = f"aid-{i:03d}"
        change, _ = offices[sender].change("assistance", key, "insert", values)
        pushed[sender].append(change)
        assistance[key] = {"id": key, **values}
    # Records deleted later: never counted.
    gone_case = {"status": "refugee", "country_of_origin": "ZZZ", "office": "astana"}
    gone_aid = {"kind": "tents", "quantity": 99.0, "delivered_on": "2025-06-01"}
    change, case_ts = offices["astana"].change("cases", "gone", "insert", gone_case)
    pushed["astana"].append(change)
    change, aid_ts = offices["astana"].change("assistance", "gone", "insert", gone_aid)
    pushed["astana"].append(change)
    push(hub, "astana", pushed["astana"])
    push(hub, "almaty", pushed["almaty"])
    push(
        hub,
        "astana",
        [
            offices["astana"].change(
                "cases", "gone", "delete", None, dict.fromkeys(["id", *gone_case], str(case_ts))
            )[0],
            offices["astana"].change(
                "assistance", "gone", "delete", None, dict.fromkeys(["id", *gone_aid], str(aid_ts))
            )[0],
        ],
    )
    # Almaty edits a case of astana's, having seen it: the hub holds the new status.
    edited = "case-000"
    new_status = "closed" if cases[edited]["status"] != "closed" else None
    update, _ = offices["almaty"].change(
        "cases", edited, "update", {"status": new_status}, {"status": str(stamps[edited])}
    )
    push(hub, "almaty", [update])
    cases[edited]["status"] = new_status
    return {"cases": cases, "assistance": assistance}


@pytest.fixture
def conn(hub: SqlHubStore, live: dict[str, Any]) -> Iterator[Conn]:
    """A read-only snapshot of the hub's own (SQLite: a connection to the file opened
    read-only; PostgreSQL: a REPEATABLE READ READ ONLY transaction)."""
    with hub.database.snapshot() as connection:
        yield connection


def expected_table(
    name: str, records: dict[str, dict[str, Any]], cases: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Counted by the record's scope: a case's office, an assistance record's case's."""
    offices = Counter(
        r["office"] if name == "cases" else cases[r["case_id"]]["office"] for r in records.values()
    )
    return {
        "table": name,
        "records": len(records),
        "by_office": [
            {"office": o, "records": offices[o]} for o in sorted(offices, key=nulls_last)
        ],
    }


def test_tables_count_live_records_by_office(
    conn: Conn, hub: SqlHubStore, live: dict[str, Any]
) -> None:
    result = figures(conn, hub.schema)
    assert result["tables"] == [
        expected_table("cases", live["cases"], live["cases"]),
        expected_table("assistance", live["assistance"], live["cases"]),
    ]
    assert result["tables"][0]["records"] == 48  # the deleted case is not counted
    assert any(e["office"] is None for e in result["tables"][0]["by_office"])
    json.loads(json.dumps(result))  # JSON-serialisable as it is


def test_cases_by_office_and_status(conn: Conn, hub: SqlHubStore, live: dict[str, Any]) -> None:
    cases = live["cases"].values()
    per_office: dict[str | None, Counter[str]] = {}
    for case in cases:
        status = UNKNOWN_STATUS if case["status"] is None else case["status"]
        per_office.setdefault(case["office"], Counter())[status] += 1
    present = {s for c in per_office.values() for s in c}
    statuses = [s for s in [*KNOWN_STATUSES, UNKNOWN_STATUS] if s in present]
    assert len(statuses) == 5  # the data exercises every status and NULL
    rows = [
        {
            "office": office,
            "counts": {s: per_office[office][s] for s in statuses},
            "total": sum(per_office[office].values()),
        }
        for office in sorted(per_office, key=nulls_last)
    ]
    totals = Counter(UNKNOWN_STATUS if case["status"] is None else case["status"] for case in cases)
    assert figures(conn, hub.schema)["cases_by_office_status"] == {
        "statuses": statuses,
        "rows": rows,
        "totals": {s: totals[s] for s in statuses},
        "total": len(live["cases"]),
    }


def test_cases_by_country_keeps_the_top_and_folds_the_rest(
    conn: Conn, hub: SqlHubStore, live: dict[str, Any]
) -> None:
    counts = Counter(case["country_of_origin"] for case in live["cases"].values())
    assert None in counts and len(counts) > TOP_COUNTRIES + 1  # something to fold
    ranked = sorted(counts.items(), key=lambda item: (-item[1], *nulls_last(item[0])))
    top, rest = ranked[:TOP_COUNTRIES], ranked[TOP_COUNTRIES:]
    expected: list[dict[str, Any]] = [{"country": c, "cases": n} for c, n in top]
    expected.append(
        {"country": OTHER_COUNTRY, "cases": sum(n for _, n in rest), "countries": len(rest)}
    )
    result = figures(conn, hub.schema)["cases_by_country"]
    assert result == expected
    assert sum(entry["cases"] for entry in result) == len(live["cases"])
    assert "ZZZ" not in json.dumps(result)  # the deleted case's country


def test_assistance_by_kind_and_month(conn: Conn, hub: SqlHubStore, live: dict[str, Any]) -> None:
    deliveries: Counter[tuple[str | None, str | None]] = Counter()
    quantity: dict[tuple[str | None, str | None], float] = {}
    for aid in live["assistance"].values():
        key = (aid["kind"], month_of(aid["delivered_on"]))
        deliveries[key] += 1
        quantity[key] = quantity.get(key, 0.0) + (aid["quantity"] or 0.0)
    months = sorted({m for _, m in deliveries}, key=nulls_last)
    kinds = sorted({k for k, _ in deliveries}, key=nulls_last)
    assert None in months and "2023-12" in months and None in kinds
    rows = [
        {"kind": k, "month": m, "deliveries": deliveries[k, m], "quantity": quantity[k, m]}
        for k in kinds
        for m in months
        if (k, m) in deliveries
    ]
    by_month = [
        {
            "month": m,
            "deliveries": sum(n for (_, m2), n in deliveries.items() if m2 == m),
            "quantity": sum(q for (_, m2), q in quantity.items() if m2 == m),
        }
        for m in months
    ]
    result = figures(conn, hub.schema)["assistance_by_kind_month"]
    assert result == {"months": months, "kinds": kinds, "rows": rows, "by_month": by_month}
    assert "2025-06" not in result["months"]  # the deleted delivery's month
    assert all(isinstance(row["quantity"], float) for row in result["rows"])


def test_reads_one_snapshot_and_leaves_the_connection_as_it_was(
    sqlite_hub: SqliteHubStore,
) -> None:
    hub = sqlite_hub
    conn = hub.db.conn  # autocommit (isolation_level None), as the hub opens it
    assert not conn.in_transaction
    first = figures(conn, hub.schema)
    assert not conn.in_transaction
    conn.execute("BEGIN")
    try:
        assert figures(conn, hub.schema) == first
        assert conn.in_transaction  # the caller's transaction is left alone
    finally:
        conn.execute("ROLLBACK")


def test_one_read_only_snapshot_of_grouped_queries(sqlite_hub: SqliteHubStore) -> None:
    hub = sqlite_hub
    conn = hub.db.conn
    schema = hub.schema  # (which looks whether another program stored a newer version)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        figures(conn, schema)
    finally:
        conn.set_trace_callback(None)
    assert statements[0] == "BEGIN" and statements[-1] == "ROLLBACK"
    queries = [q for q in statements[1:-1] if not q.startswith("--")]  # "--": SQLite's notes
    assert queries and all(q.startswith("SELECT ") for q in queries)
    # Rows are counted by SQL, never fetched: every query of a synced table aggregates.
    # (Per-office counts read the records' scope keys in _fieldsync_records.)
    pattern = r"FROM (\S+ )?\(?\"?(cases|assistance|_fieldsync_records)\b"
    of_tables = [q for q in queries if re.search(pattern, q)]
    assert len(of_tables) >= 5 and all("COUNT(" in q for q in of_tables)


def test_an_empty_hub(hub: SqlHubStore) -> None:
    with hub.database.snapshot() as conn:
        result = figures(conn, hub.schema)
    assert hub.figures() == result
    assert result == {
        "tables": [
            {"table": "cases", "records": 0, "by_office": []},
            {"table": "assistance", "records": 0, "by_office": []},
        ],
        "cases_by_office_status": {"statuses": [], "rows": [], "totals": {}, "total": 0},
        "cases_by_country": [],
        "assistance_by_kind_month": {"months": [], "kinds": [], "rows": [], "by_month": []},
    }


CUSTOM = '''
[tables.visits]
scope = { column = "office" }
create = """CREATE TABLE visits (id TEXT PRIMARY KEY, office TEXT, place TEXT) STRICT"""

[tables.stock]
create = """CREATE TABLE stock (id TEXT PRIMARY KEY, item TEXT, quantity REAL) STRICT"""

[tables.assistance]
create = """CREATE TABLE assistance (id TEXT PRIMARY KEY, kind TEXT, quantity REAL,
    office TEXT) STRICT"""
'''


def test_a_schema_without_cases(tmp_path: Path, engine: Engine) -> None:
    store = open_store(engine.db(tmp_path), Schema.from_toml(CUSTOM))
    try:
        store.add_node("astana")
        store.set_scopes("astana", ["*"])
        office = Office("astana")
        visits = [("v1", "astana"), ("v2", "astana"), ("v3", None), ("v4", "almaty")]
        changes = [office.change("visits", k, "insert", {"office": o})[0] for k, o in visits]
        changes += [
            office.change("stock", f"s{i}", "insert", {"item": "tent"})[0] for i in range(3)
        ]
        changes.append(office.change("assistance", "a1", "insert", {"kind": "food"})[0])
        push(store, "astana", changes)
        with store.database.snapshot() as conn:
            result = figures(conn, store.schema)
        assert store.figures() == result
    finally:
        store.close()
    offices = Counter(o for _, o in visits)
    assert result == {
        "tables": [
            {
                "table": "visits",
                "records": len(visits),
                "by_office": [
                    {"office": o, "records": offices[o]} for o in sorted(offices, key=nulls_last)
                ],
            },
            {"table": "stock", "records": 3, "by_office": None},
            # An office column but no scope: every office holds it whole.
            {"table": "assistance", "records": 1, "by_office": None},
        ],
        "cases_by_office_status": None,
        "cases_by_country": None,
        "assistance_by_kind_month": None,  # no delivered_on column
    }


CUSTOM_CASES = '''
[tables.cases]
create = """CREATE TABLE cases (id TEXT PRIMARY KEY, status TEXT, office TEXT) STRICT"""
'''


def test_custom_statuses_come_after_the_known_ones(tmp_path: Path, engine: Engine) -> None:
    store = open_store(engine.db(tmp_path), Schema.from_toml(CUSTOM_CASES))
    statuses = ["resettled", None, "refugee", "asylum_seeker", "unknown", "deceased", "refugee"]
    try:
        store.add_node("astana")
        office = Office("astana")
        changes = [
            office.change("cases", f"c{i}", "insert", {"status": s, "office": "astana"})[0]
            for i, s in enumerate(statuses)
        ]
        push(store, "astana", changes)
        with store.database.snapshot() as conn:
            result = figures(conn, store.schema)
        assert store.figures() == result
    finally:
        store.close()
    assert result["cases_by_country"] is None  # no country_of_origin column
    assert result["assistance_by_kind_month"] is None  # no assistance table
    order = ["asylum_seeker", "refugee", "deceased", "resettled", UNKNOWN_STATUS]
    counts = {"asylum_seeker": 1, "refugee": 2, "deceased": 1, "resettled": 1, UNKNOWN_STATUS: 2}
    assert result["cases_by_office_status"] == {
        "statuses": order,
        "rows": [{"office": "astana", "counts": counts, "total": len(statuses)}],
        "totals": counts,
        "total": len(statuses),
    }


# -- charts ----------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert(1)</script>"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises unless well-formed
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    assert re.fullmatch(r"0 0 \d+ \d+", root.get("viewBox") or "")
    for element in root.iter():
        assert element.tag.removeprefix(SVG) not in ("script", "foreignObject", "image", "use")
        assert not any("href" in name or name.startswith("on") for name in element.attrib)
    assert "url(" not in svg and svg.count("http") == 1  # the xmlns only
    return root


def bars_of(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}rect") if e.get("class") == "bar"]


def texts(root: ET.Element) -> list[str]:
    return [e.text or "" for e in root.iter(f"{SVG}text")]


@pytest.mark.parametrize("chart", [bar_chart_svg, column_chart_svg])
def test_chart_title_and_aria_label(chart: Any) -> None:
    title = 'Cases & "deliveries" <by month>'
    root = parse(chart([("a", 1)], title=title))
    assert root.get("aria-label") == title
    title_element = root.find(f"{SVG}title")
    assert title_element is not None and title_element.text == title


def test_bar_widths_are_proportional_to_the_values() -> None:
    bars = [("astana", 40.0), ("almaty", 10.0), ("shymkent", 25.0), ("taraz", 0.0)]
    root = parse(bar_chart_svg(bars, title="Cases by office", unit="cases"))
    widths = [float(rect.get("width") or "nan") for rect in bars_of(root)]
    assert len(widths) == len(bars)
    peak = max(widths)
    assert peak > 100
    for width, (_, value) in zip(widths, bars, strict=True):
        assert width == pytest.approx(peak * value / 40.0, abs=0.01)
    drawn = texts(root)
    for label, value in bars:
        assert label in drawn
        assert f"{value:.0f} cases" in drawn


def test_column_heights_are_proportional_and_share_a_baseline() -> None:
    columns = [("2024-01", 12.0), ("2024-02", 3.0), ("2024-03", 6.5), ("undated", 1.0)]
    root = parse(column_chart_svg(columns, title="Deliveries per month"))
    rects = bars_of(root)
    heights = [float(r.get("height") or "nan") for r in rects]
    feet = {round(float(r.get("y") or "nan") + h, 2) for r, h in zip(rects, heights, strict=True)}
    assert len(feet) == 1
    for height, (_, value) in zip(heights, columns, strict=True):
        assert height == pytest.approx(max(heights) * value / 12.0, abs=0.01)
    drawn = texts(root)
    assert {"2024-01", "undated", "12", "6.50"} <= set(drawn)


@pytest.mark.parametrize("chart", [bar_chart_svg, column_chart_svg])
def test_labels_and_titles_are_escaped(chart: Any) -> None:
    svg = chart([(EVIL, 3), ("a & b", 1)], title=EVIL, unit="<kg>")
    assert "<script" not in svg and "&lt;script&gt;" in svg
    root = parse(svg)
    assert EVIL in texts(root) and "a & b" in texts(root) and "3 <kg>" in texts(root)


@pytest.mark.parametrize("chart", [bar_chart_svg, column_chart_svg])
def test_characters_xml_cannot_hold_do_not_break_the_svg(chart: Any) -> None:
    root = parse(chart([("bad\x00label\x1b", 2)], title="t\x07"))
    assert "bad\ufffdlabel\ufffd" in texts(root)


@pytest.mark.parametrize("chart", [bar_chart_svg, column_chart_svg])
@pytest.mark.parametrize("data", [[], [("a", 0.0), ("b", 0.0)], [("a", float("nan"))]])
def test_no_data(chart: Any, data: list[tuple[str, float]]) -> None:
    root = parse(chart(data, title="Nothing yet"))
    assert bars_of(root) == []
    assert "no data" in texts(root)


@pytest.mark.parametrize("chart", [bar_chart_svg, column_chart_svg])
def test_too_many_bars_are_left_out_with_a_note(chart: Any) -> None:
    data = [(f"{2020 + i // 12}-{i % 12 + 1:02d}", float(i + 1)) for i in range(MAX_BARS + 5)]
    root = parse(chart(data, title="Many"))
    assert len(bars_of(root)) == MAX_BARS
    assert "5 more not shown" in texts(root)


def test_long_labels_are_cut_but_kept_whole_in_the_tooltip() -> None:
    label = "hygiene kit for a family of five or more"
    root = parse(column_chart_svg([(label, 1)], title="Long"))
    assert label not in texts(root)
    assert any(t.startswith("hygiene kit") and t.endswith("…") for t in texts(root))
    tooltips = [e.text or "" for g in root.iter(f"{SVG}g") for e in g.iter(f"{SVG}title")]
    assert f"{label}: 1" in tooltips


def _stamp(counter: int, node: str) -> Timestamp:
    return Timestamp((now_ms() << COUNTER_BITS) + counter, node)


def _history(store: SqliteHubStore, pk: str) -> list[tuple[str, str, Any]]:
    return [(v["actor"], v["op"], v["values"]) for v in store.record_history("cases", [pk])]


def test_record_history_follows_every_version_and_survives_the_old_layout(
    tmp_path: Path,
) -> None:
    store = SqliteHubStore(tmp_path / "hub.db")
    try:
        for office in ("astana", "almaty"):
            store.add_node(office)
            store.set_scopes(office, ["*"])
        one, two = _stamp(1, "astana"), _stamp(2, "astana")
        # Two versions of c1 in one batch (the second follows the first), and c2.
        store.push(
            "astana",
            [
                Change(1, "cases", {"id": "c1"}, "insert", one, {"id": "c1", "notes": "a"}),
                Change(2, "cases", {"id": "c2"}, "insert", one, {"id": "c2", "notes": "x"}),
                Change(
                    3, "cases", {"id": "c1"}, "update", two, {"notes": "b"}, {"notes": str(one)}
                ),
            ],
        )
        # A concurrent edit from another office, then an admin's decision.
        late = _stamp(3, "almaty")
        store.push(
            "almaty",
            [Change(1, "cases", {"id": "c1"}, "update", late, {"notes": "c"}, {"notes": str(one)})],
        )
        [conflict] = store.conflicts()
        store.resolve(conflict.id, "value", "ops", "d")
        expected = [
            ("astana", "insert", {"id": "c1", "notes": "a"}),
            ("astana", "update", {"notes": "b"}),
            ("almaty", "update", {"notes": "c"}),
            ("admin ops", "resolve", {"notes": "d"}),
        ]
        assert _history(store, "c1") == expected
        assert _history(store, "c2") == [("astana", "insert", {"id": "c2", "notes": "x"})]
        assert _history(store, "nope") == []
    finally:
        store.close()
    # The layout of earlier hubs (an id per version and an index by record) is
    # converted when the hub opens, keeping every version in order.
    with sqlite3.connect(tmp_path / "hub.db") as conn:
        conn.executescript(
            """
            CREATE TABLE old (id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, pk TEXT NOT NULL,
                seq INTEGER NOT NULL, actor TEXT NOT NULL, ts TEXT NOT NULL, op TEXT NOT NULL,
                vals TEXT, at TEXT NOT NULL);
            INSERT INTO old (tbl, pk, seq, actor, ts, op, vals, at)
                SELECT tbl, pk, seq, actor, ts, op, vals, at FROM _fieldsync_history
                ORDER BY seq;
            DROP TABLE _fieldsync_history;
            ALTER TABLE old RENAME TO _fieldsync_history;
            CREATE INDEX _fieldsync_history_record ON _fieldsync_history (tbl, pk, id);
            PRAGMA user_version = 0;  -- hubs of that time kept no layout version
            """
        )
    store = SqliteHubStore(tmp_path / "hub.db")
    try:
        assert _history(store, "c1") == expected
        assert _history(store, "c2") == [("astana", "insert", {"id": "c2", "notes": "x"})]
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "hub.db") as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "_fieldsync_history_record" not in names and "_fieldsync_history_old" not in names
