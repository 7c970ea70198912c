"""Finding records (hub/search.py) and a record's versions marked winner or loser
(hub/history.py), on a real hub file: issue 15 point 5."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.search import LIMIT, like_pattern
from hub.store import SqlHubStore, open_store
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change
from tests.engines import Engine

T0 = now_ms() << COUNTER_BITS


def stamp(tick: int, office: str) -> Timestamp:
    return Timestamp(T0 + tick, office)


def insert(seq: int, key: str, tick: int, office: str = "astana", **values: Any) -> Change:
    return Change(seq, "cases", {"id": key}, "insert", stamp(tick, office), {"id": key, **values})


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Iterator[SqlHubStore]:
    hub = open_store(engine.db(tmp_path))
    for office in ("astana", "almaty"):
        hub.add_node(office)
        hub.set_scopes(office, ["*"])
    try:
        yield hub
    finally:
        hub.close()


def found(store: SqlHubStore, text: str) -> list[str]:
    return [r["pk"]["id"] for r in store.find_records(text)["results"]]


# -- search ---------------------------------------------------------------------------


def test_search_by_case_number_name_and_key(store: SqlHubStore) -> None:
    store.push(
        "astana",
        [
            insert(1, "0f3a9c1e-uuid", 1, case_number="AST-2024-0017", family_name="Nazarova"),
            insert(2, "7b21d004-uuid", 2, case_number="AST-2024-0018", family_name="Karimov"),
            insert(3, "c9e4aa10-uuid", 3, case_number="ALM-2024-0001", family_name="Абаев"),
        ],
    )
    assert found(store, "AST-2024-0017") == ["0f3a9c1e-uuid"]
    assert sorted(found(store, "ast-2024")) == ["0f3a9c1e-uuid", "7b21d004-uuid"]  # any case
    assert found(store, "nazar") == ["0f3a9c1e-uuid"]  # part of a name
    assert found(store, "Абаев") == ["c9e4aa10-uuid"]
    assert found(store, "абаев") == ["c9e4aa10-uuid"]  # not only ASCII letters fold
    assert found(store, "7b21d0") == ["7b21d004-uuid"]  # part of the key
    [hit] = store.find_records("karimov")["results"]
    assert hit["table"] == "cases" and hit["matched"] == ["family_name"]
    assert hit["values"]["case_number"] == "AST-2024-0018"


def test_search_prefix_matches_come_first(store: SqlHubStore) -> None:
    store.push(
        "astana",
        [
            insert(1, "k1", 1, family_name="Bekova", notes="met Sultanov"),
            insert(2, "k2", 2, family_name="Sultanova"),
        ],
    )
    assert found(store, "sultan") == ["k2", "k1"]


def test_wildcards_and_quotes_match_themselves(store: SqlHubStore) -> None:
    store.push(
        "astana",
        [
            insert(1, "w1", 1, notes="100% done"),
            insert(2, "w2", 2, notes="1000 done"),
            insert(3, "w3", 3, family_name="a_b"),
            insert(4, "w4", 4, family_name="axb"),
            insert(5, "w5", 5, family_name="O'Brien"),
            insert(6, "w6", 6, notes="back\\slash"),
        ],
    )
    assert found(store, "100%") == ["w1"]
    assert found(store, "a_b") == ["w3"]
    assert found(store, "o'brien") == ["w5"]
    assert found(store, "k\\s") == ["w6"]
    assert found(store, "' OR 1=1 --") == []
    assert like_pattern("5%_\\") == "%5\\%\\_\\\\%"


def test_search_is_bounded_and_says_there_are_more(store: SqlHubStore) -> None:
    store.push("astana", [insert(i, f"r{i:03d}", i, family_name="Family") for i in range(1, 61)])
    answer = store.find_records("family")
    assert len(answer["results"]) == LIMIT and answer["more"] is True
    store.push("astana", [insert(100, "x1", 100, family_name="Unique")])
    assert store.find_records("unique")["more"] is False


def test_deleted_records_are_not_found_and_short_texts_refused(store: SqlHubStore) -> None:
    one = stamp(1, "astana")
    store.push("astana", [insert(1, "d1", 1, family_name="Gone")])
    base = {"id": str(one), "family_name": str(one)}
    store.push(
        "astana", [Change(2, "cases", {"id": "d1"}, "delete", stamp(2, "astana"), None, base)]
    )
    assert found(store, "gone") == []
    with pytest.raises(ValueError, match="at least 2 characters"):
        store.find_records(" a ")


# -- history: stamp order, winners and losers -------------------------------------------


def test_history_is_in_stamp_order_with_winners_and_losers(store: SqlHubStore) -> None:
    made = stamp(10, "astana")
    store.push("astana", [insert(1, "c1", 10, status="refugee", notes="first")])
    seen = {"status": str(made), "notes": str(made)}
    closed = stamp(20, "astana")
    store.push(
        "astana",
        [
            Change(2, "cases", {"id": "c1"}, "update", closed, {"status": "closed"}, seen),
            Change(
                3,
                "cases",
                {"id": "c1"},
                "update",
                stamp(30, "astana"),
                {"status": "rejected"},
                {"status": str(closed)},
            ),
        ],
    )
    # Almaty's edit of notes, made offline before astana's insert reached it (an older
    # stamp), arrives last: it does not take.
    store.push(
        "almaty",
        [Change(1, "cases", {"id": "c1"}, "update", stamp(5, "almaty"), {"notes": "late"}, {})],
    )
    story = store.record_versions("cases", ["c1"])
    versions = story["versions"]
    assert [(v["actor"], v["op"]) for v in versions] == [
        ("almaty", "update"),  # made first, received last
        ("astana", "insert"),
        ("astana", "update"),
        ("astana", "update"),
    ]
    assert [v["stamp"] for v in versions] == sorted(v["stamp"] for v in versions)
    marks = [(v["outcome"], v["reason"], v["current_columns"]) for v in versions]
    assert marks[0][:2] == ("loser", "lost a conflict")
    assert marks[1][0] == "winner" and "notes" in marks[1][2] and "status" not in marks[1][2]
    assert marks[2] == ("loser", "overridden by a later change", [])
    assert marks[3] == ("winner", None, ["status"])
    assert story["current"]["values"]["notes"] == "first"
    assert story["current"]["values"]["status"] == "rejected"
    assert story["current"]["deleted"] is False
    assert store.record_history("cases", ["c1"]) == versions


def test_a_conflicts_loser_is_marked(store: SqlHubStore) -> None:
    made = stamp(1, "astana")
    store.push("astana", [insert(1, "c1", 1, notes="a")])
    seen = {"notes": str(made)}
    store.push(
        "astana",
        [Change(2, "cases", {"id": "c1"}, "update", stamp(3, "astana"), {"notes": "b"}, seen)],
    )
    # Almaty edits the same field concurrently (it saw only the insert), with an older
    # stamp than astana's edit: it loses.
    store.push(
        "almaty",
        [Change(1, "cases", {"id": "c1"}, "update", stamp(2, "almaty"), {"notes": "c"}, seen)],
    )
    [conflict] = store.conflicts()
    versions = {v["actor"]: v for v in store.record_versions("cases", ["c1"])["versions"]}
    assert versions["almaty"]["stamp"] == conflict.other_version
    assert (versions["almaty"]["outcome"], versions["almaty"]["reason"]) == (
        "loser",
        "lost a conflict",
    )
