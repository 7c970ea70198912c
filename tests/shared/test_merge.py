"""The merge rule (shared/merge.py): cases per policy, and properties of the default one."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from shared.clock import Timestamp
from shared.merge import Conflict, Outcome, RecordState, effect, merge, node_of
from shared.protocol import Change
from shared.schema import EXISTS

HQ = Timestamp(100, "hq")
V0 = str(HQ)  # the version every column of the starting record has


def start(**values: Any) -> RecordState:
    """A record every office has seen: each column at version V0."""
    values = {"id": "c1", "family_name": "Karimov", "status": "refugee", **values}
    return RecordState(dict(values), dict.fromkeys(values, V0))


def change(
    node: str,
    hlc: int,
    values: dict[str, Any] | None,
    base: dict[str, str] | RecordState | None = None,
    *,
    op: str | None = None,
    seq: int = 1,
) -> Change:
    """A change by ``node`` stamped ``hlc``; ``base`` may be the state the office had seen."""
    if isinstance(base, RecordState):
        base = dict(base.versions)
    if op is None:
        op = "delete" if values is None else "update"
    return Change(seq, "cases", {"id": "c1"}, op, Timestamp(hlc, node), values, base or {})


def both_orders(
    state: RecordState | None, a: Change, b: Change, policy: str = "merge"
) -> tuple[tuple[Outcome, Outcome], tuple[Outcome, Outcome]]:
    """Apply a then b, and b then a, to the same starting state."""
    a1 = merge(state, a, policy)
    ab = merge(a1.state, b, policy)
    b1 = merge(state, b, policy)
    ba = merge(b1.state, a, policy)
    return (a1, ab), (b1, ba)


# -- a record the hub has never seen ----------------------------------------------


def test_insert_of_a_new_record_takes_all_values() -> None:
    ins = change("astana", 500, {"id": "c1", "family_name": "Ali"}, op="insert")
    out = merge(None, ins)
    assert out.state.values == {"id": "c1", "family_name": "Ali"}
    assert out.state.versions == {"id": str(ins.ts), "family_name": str(ins.ts)}
    assert out.state.deleted is False
    assert out.conflicts == []
    assert out.changed is True
    assert out.exact is True


def test_delete_of_an_unknown_record_leaves_a_tombstone() -> None:
    dele = change("astana", 500, None)
    out = merge(None, dele)
    assert out.state.deleted is True
    assert out.state.values == {}
    assert out.state.versions == {EXISTS: str(dele.ts)}
    assert out.changed is True
    assert out.exact is True


def test_new_record_with_a_base_is_not_exact() -> None:
    # The office had a version the hub never saw: it must get the hub's record back.
    out = merge(None, change("astana", 500, {"id": "c1"}, {"id": V0}))
    assert out.exact is False
    assert out.state.values == {"id": "c1"}


# -- base equals current: the write simply applies ---------------------------------


def test_base_equal_to_current_applies() -> None:
    s0 = start()
    upd = change("astana", 500, {"family_name": "Ali"}, s0)
    out = merge(s0, upd)
    assert out.state.values == {"id": "c1", "family_name": "Ali", "status": "refugee"}
    assert out.state.versions == {"id": V0, "family_name": str(upd.ts), "status": V0}
    assert out.conflicts == []
    assert out.changed is True
    assert out.exact is True
    # merge is pure: the input state is untouched
    assert s0 == start()


def test_base_equal_applies_even_with_an_older_stamp() -> None:
    # Causality is carried by base, not by stamps: a slow clock still wins if it had seen.
    s0 = RecordState({"id": "c1", "notes": "x"}, {"id": V0, "notes": str(Timestamp(900, "a"))})
    upd = change("almaty", 10, {"notes": "y"}, s0)
    out = merge(s0, upd)
    assert out.state.values["notes"] == "y"
    assert out.state.versions["notes"] == str(upd.ts)
    assert out.conflicts == []


def test_rewriting_the_same_value_with_the_same_stamp_changes_nothing() -> None:
    s0 = start()
    upd = change("astana", 500, {"family_name": "Ali"}, s0)
    once = merge(s0, upd).state
    again = merge(once, upd)
    assert again.state == once
    assert again.changed is False
    assert again.conflicts == []


def test_new_column_applies_without_conflict() -> None:
    s0 = start()
    upd = change("almaty", 50, {"notes": "first visit"}, {"id": V0})
    out = merge(s0, upd)
    assert out.state.values["notes"] == "first visit"
    assert out.conflicts == []
    assert out.exact is False  # it had not seen family_name/status at V0


# -- concurrent edits, merge policy ----------------------------------------------


def test_concurrent_edits_to_different_fields_are_both_kept() -> None:
    s0 = start()
    a = change("astana", 500, {"family_name": "Ali"}, s0)
    b = change("almaty", 400, {"status": "closed"}, s0)
    (_, ab), (_, ba) = both_orders(s0, a, b)
    expected = {"id": "c1", "family_name": "Ali", "status": "closed"}
    assert ab.state.values == ba.state.values == expected
    assert ab.state.versions == ba.state.versions
    assert ab.state.versions["family_name"] == str(a.ts)
    assert ab.state.versions["status"] == str(b.ts)
    assert ab.conflicts == ba.conflicts == []


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        pytest.param(("astana", 500), ("almaty", 400), "astana", id="greater-stamp-wins"),
        pytest.param(("astana", 400), ("almaty", 500), "almaty", id="greater-stamp-wins-2"),
        pytest.param(("almaty", 500), ("astana", 500), "astana", id="tie-breaks-on-node-id"),
        pytest.param(("zhezkazgan", 500), ("aktobe", 500), "zhezkazgan", id="tie-node-order"),
    ],
)
def test_concurrent_same_field_greater_stamp_wins_in_either_order(
    a: tuple[str, int], b: tuple[str, int], winner: str
) -> None:
    s0 = start()
    ca = change(a[0], a[1], {"family_name": f"from-{a[0]}"}, s0)
    cb = change(b[0], b[1], {"family_name": f"from-{b[0]}"}, s0)
    win, lose = (ca, cb) if winner == a[0] else (cb, ca)
    (_, ab), (_, ba) = both_orders(s0, ca, cb)
    for out in (ab, ba):
        assert out.state.values["family_name"] == f"from-{winner}"
        assert out.state.versions["family_name"] == str(win.ts)
        assert out.conflicts == [
            Conflict(
                "field",
                "family_name",
                f"from-{winner}",
                str(win.ts),
                lose.values["family_name"],  # type: ignore[index]
                str(lose.ts),
                open=False,
            )
        ]
    assert ab.state == ba.state


def test_loser_arriving_last_changes_nothing_but_is_logged() -> None:
    s0 = start()
    winner = change("astana", 900, {"family_name": "Ali"}, s0)
    loser = change("almaty", 100, {"family_name": "Aliev", "status": "closed"}, s0)
    first = merge(s0, winner)
    out = merge(first.state, loser)
    assert out.state.values == {"id": "c1", "family_name": "Ali", "status": "closed"}
    assert out.changed is True  # status applied
    assert out.exact is False
    assert [c.other_value for c in out.conflicts] == ["Aliev"]
    assert node_of(out.conflicts[0].kept_version) == "astana"
    assert node_of(out.conflicts[0].other_version) == "almaty"


def test_same_value_written_concurrently_is_no_conflict() -> None:
    s0 = start()
    a = change("astana", 500, {"status": "closed"}, s0)
    b = change("almaty", 600, {"status": "closed"}, s0)
    (_, ab), (_, ba) = both_orders(s0, a, b)
    assert ab.conflicts == ba.conflicts == []
    assert ab.state.values["status"] == ba.state.values["status"] == "closed"
    # the version is the greater stamp, whichever came first
    assert ab.state.versions["status"] == ba.state.versions["status"] == str(b.ts)


def test_concurrent_inserts_of_a_new_record_converge() -> None:
    a = change("astana", 500, {"id": "c1", "family_name": "Ali"}, op="insert")
    b = change("almaty", 700, {"id": "c1", "family_name": "Aliev", "notes": "n"}, op="insert")
    (_, ab), (_, ba) = both_orders(None, a, b)
    assert ab.state.values == ba.state.values == {"id": "c1", "family_name": "Aliev", "notes": "n"}
    assert [c.column for c in ab.conflicts] == [c.column for c in ba.conflicts] == ["family_name"]


# -- deletes ------------------------------------------------------------------------


def test_delete_after_seeing_the_update_wins() -> None:
    s0 = start()
    upd = change("almaty", 500, {"family_name": "Ali"}, s0)
    seen = merge(s0, upd).state
    dele = change("astana", 600, None, seen)
    out = merge(seen, dele)
    assert out.state.deleted is True
    assert out.state.versions[EXISTS] == str(dele.ts)
    assert out.conflicts == []
    assert out.changed is True
    assert out.exact is True


def test_delete_with_an_older_stamp_still_wins_if_it_had_seen_everything() -> None:
    s0 = start()
    dele = change("astana", 1, None, s0)
    out = merge(s0, dele)
    assert out.state.deleted is True
    assert out.conflicts == []


def test_update_first_then_concurrent_delete_keeps_the_record() -> None:
    s0 = start()
    upd = change("almaty", 500, {"family_name": "Ali"}, s0)
    dele = change("astana", 600, None, s0)  # had not seen the update
    updated = merge(s0, upd).state
    out = merge(updated, dele)
    assert out.state.deleted is False
    assert out.state.values == {"id": "c1", "family_name": "Ali", "status": "refugee"}
    assert out.state == updated
    assert out.changed is False
    assert out.exact is False
    [conflict] = out.conflicts
    assert conflict.kind == "delete"
    assert conflict.column is None
    assert conflict.kept_value == {"id": "c1", "family_name": "Ali", "status": "refugee"}
    assert conflict.kept_version == str(upd.ts)
    assert conflict.other_value is None
    assert conflict.other_version == str(dele.ts)
    assert conflict.open is False


def test_delete_first_then_concurrent_update_resurrects_the_record() -> None:
    s0 = start()
    dele = change("astana", 600, None, s0)
    upd = change("almaty", 500, {"family_name": "Ali"}, s0)  # had not seen the delete
    deleted = merge(s0, dele).state
    assert deleted.deleted is True
    out = merge(deleted, upd)
    assert out.state.deleted is False
    assert out.state.values == {"id": "c1", "family_name": "Ali", "status": "refugee"}
    assert out.state.versions["family_name"] == str(upd.ts)
    assert out.state.versions[EXISTS] == str(upd.ts)
    assert out.changed is True
    assert out.exact is False
    [conflict] = out.conflicts
    assert conflict.kind == "delete"
    assert conflict.column is None
    assert conflict.kept_value == out.state.values  # the whole record kept, as in the other order
    assert conflict.kept_version == str(upd.ts)
    assert conflict.other_value is None
    assert conflict.other_version == str(dele.ts)
    assert conflict.open is False


def test_delete_concurrent_with_update_keeps_the_same_values_in_both_orders() -> None:
    s0 = start()
    upd = change("almaty", 500, {"status": "closed"}, s0)
    dele = change("astana", 900, None, s0)
    (_, ud), (_, du) = both_orders(s0, upd, dele)
    assert ud.state.deleted is du.state.deleted is False
    assert ud.state.values == du.state.values
    assert ud.state.values["status"] == "closed"
    assert [c.kind for c in ud.conflicts] == [c.kind for c in du.conflicts] == ["delete"]


def test_update_that_had_seen_the_delete_revives_without_conflict() -> None:
    s0 = start()
    dele = change("astana", 600, None, s0)
    deleted = merge(s0, dele).state
    ins = change("astana", 700, {"id": "c1", "family_name": "New"}, deleted, op="insert")
    out = merge(deleted, ins)
    assert out.state.deleted is False
    assert out.conflicts == []
    assert out.state.values["family_name"] == "New"
    assert out.state.versions[EXISTS] == str(ins.ts)


def test_deleting_a_deleted_record_changes_nothing() -> None:
    s0 = start()
    deleted = merge(s0, change("astana", 600, None, s0)).state
    out = merge(deleted, change("almaty", 700, None, s0))
    assert out.state == deleted
    assert out.changed is False
    assert out.conflicts == []


def test_reinsert_versions_the_records_existence() -> None:
    s0 = start()
    s0.versions[EXISTS] = V0
    ins = change("astana", 700, {"id": "c1", "family_name": "Ali"}, s0, op="insert")
    out = merge(s0, ins)
    assert out.state.versions[EXISTS] == str(ins.ts)
    assert out.exact is True


# -- record policy ----------------------------------------------------------------


def test_record_policy_whole_later_record_wins_in_either_order() -> None:
    s0 = start()
    early = change("astana", 500, {"id": "c1", "family_name": "Ali", "status": "refugee"}, s0)
    late = change("almaty", 600, {"id": "c1", "family_name": "Karimov", "status": "closed"}, s0)
    (_, el), (_, le) = both_orders(s0, early, late, "record")
    for out in (el, le):
        # the later record wins whole: even family_name, which only `early` changed
        assert out.state.values == {"id": "c1", "family_name": "Karimov", "status": "closed"}
        assert out.exact is False
        assert out.conflicts == [
            Conflict(
                "record",
                None,
                dict(late.values),  # type: ignore[arg-type]
                str(late.ts),
                dict(early.values),  # type: ignore[arg-type]
                str(early.ts),
                open=False,
            )
        ]
    assert el.state.values == le.state.values


def test_record_policy_without_concurrency_applies() -> None:
    s0 = start()
    upd = change("almaty", 600, {"id": "c1", "family_name": "Ali", "status": "refugee"}, s0)
    out = merge(s0, upd, "record")
    assert out.state.values["family_name"] == "Ali"
    assert out.conflicts == []
    assert out.exact is True


def test_record_policy_earlier_record_is_logged_not_applied() -> None:
    s0 = start()
    late = change("almaty", 600, {"id": "c1", "family_name": "A", "status": "closed"}, s0)
    current = merge(s0, late, "record").state
    early = change("astana", 500, {"id": "c1", "family_name": "B", "status": "rejected"}, s0)
    out = merge(current, early, "record")
    assert out.state == current
    assert out.changed is False
    [conflict] = out.conflicts
    assert (conflict.kind, conflict.column) == ("record", None)
    assert conflict.kept_value == {"id": "c1", "family_name": "A", "status": "closed"}
    assert conflict.other_value == {"id": "c1", "family_name": "B", "status": "rejected"}
    assert conflict.open is False


# -- manual policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "later_hlc",
    [pytest.param(900, id="newer-still-waits"), pytest.param(100, id="older-waits")],
)
def test_manual_policy_keeps_the_hubs_value_and_opens_a_conflict(later_hlc: int) -> None:
    s0 = start()
    first = change("astana", 500, {"family_name": "Ali"}, s0)
    current = merge(s0, first, "manual").state
    second = change("almaty", later_hlc, {"family_name": "Aliev"}, s0)
    out = merge(current, second, "manual")
    assert out.state.values["family_name"] == "Ali"
    assert out.state.versions["family_name"] == str(first.ts)
    assert out.conflicts == [
        Conflict("field", "family_name", "Ali", str(first.ts), "Aliev", str(second.ts), True)
    ]
    assert out.exact is False


def test_manual_policy_merges_different_fields() -> None:
    s0 = start()
    a = change("astana", 500, {"family_name": "Ali"}, s0)
    b = change("almaty", 400, {"status": "closed"}, s0)
    (_, ab), (_, ba) = both_orders(s0, a, b, "manual")
    assert ab.state.values == ba.state.values
    assert ab.state.values == {"id": "c1", "family_name": "Ali", "status": "closed"}
    assert ab.conflicts == ba.conflicts == []


def test_manual_policy_concurrent_delete_is_an_open_conflict() -> None:
    s0 = start()
    updated = merge(s0, change("almaty", 500, {"status": "closed"}, s0), "manual").state
    out = merge(updated, change("astana", 600, None, s0), "manual")
    assert out.state.deleted is False
    assert [(c.kind, c.open) for c in out.conflicts] == [("delete", True)]


def test_node_of() -> None:
    assert node_of(str(Timestamp(5, "astana"))) == "astana"
    assert node_of(None) == ""


# -- properties of the default policy ----------------------------------------------

COLUMNS = ("id", "family_name", "status", "notes")
field_values = st.sampled_from(["a", "b", "c", None, 1])  # few values: equal writes happen
edits = st.dictionaries(st.sampled_from(COLUMNS[1:]), field_values, min_size=1, max_size=3)
stamps = st.integers(min_value=200, max_value=210)  # narrow: ties happen


@st.composite
def start_states(draw: st.DrawFn) -> RecordState:
    cols = draw(st.lists(st.sampled_from(COLUMNS[1:]), unique=True, max_size=3))
    values: dict[str, Any] = {"id": "c1", **{c: draw(field_values) for c in cols}}
    versions = {c: str(Timestamp(draw(st.integers(1, 150)), "hq")) for c in values}
    return RecordState(values, versions)


def _conflict_key(c: Conflict) -> tuple[str, ...]:
    fields = (
        c.kind,
        c.column,
        c.kept_value,
        c.kept_version,
        c.other_value,
        c.other_version,
        c.open,
    )
    return tuple(map(repr, fields))


@settings(max_examples=150)
@given(start_states(), edits, stamps, edits, stamps)
def test_merge_outcome_is_commutative_for_concurrent_updates(
    s0: RecordState, va: dict[str, Any], ha: int, vb: dict[str, Any], hb: int
) -> None:
    a = change("astana", ha, va, s0)
    b = change("almaty", hb, vb, s0)
    (_, ab), (_, ba) = both_orders(s0, a, b)
    assert ab.state.values == ba.state.values
    assert ab.state.versions == ba.state.versions
    assert sorted(map(_conflict_key, ab.conflicts)) == sorted(map(_conflict_key, ba.conflicts))
    # every column either kept the start value or took a value someone wrote
    for col, value in ab.state.values.items():
        assert value in (s0.values.get(col), va.get(col), vb.get(col))


@settings(max_examples=100)
@given(edits, stamps, edits, stamps)
def test_merge_outcome_is_commutative_for_concurrent_inserts(
    va: dict[str, Any], ha: int, vb: dict[str, Any], hb: int
) -> None:
    a = change("astana", ha, {"id": "c1", **va}, op="insert")
    b = change("almaty", hb, {"id": "c1", **vb}, op="insert")
    (_, ab), (_, ba) = both_orders(None, a, b)
    assert ab.state.values == ba.state.values
    assert ab.state.versions == ba.state.versions


@settings(max_examples=100)
@given(start_states(), edits, stamps)
def test_merge_of_a_change_with_itself_is_the_change(
    s0: RecordState, values: dict[str, Any], hlc: int
) -> None:
    a = change("astana", hlc, values, s0)
    once = merge(s0, a)
    twice = merge(once.state, a)
    assert twice.state == once.state
    assert twice.changed is False
    # a change made on top of the current state applies exactly, whatever its values
    assert once.conflicts == []
    assert once.exact is True
    assert once.state.values == {**s0.values, **values}


@settings(max_examples=100)
@given(start_states(), edits, stamps, edits, stamps)
def test_greater_stamp_wins_every_contested_field(
    s0: RecordState, va: dict[str, Any], ha: int, vb: dict[str, Any], hb: int
) -> None:
    a = change("astana", ha, va, s0)
    b = change("almaty", hb, vb, s0)
    win, lose = (a, b) if a.ts > b.ts else (b, a)
    (_, ab), _ = both_orders(s0, a, b)
    for col, value in win.values.items():  # type: ignore[union-attr]
        assert ab.state.values[col] == value
    for col, value in lose.values.items():  # type: ignore[union-attr]
        if col not in win.values:  # type: ignore[operator]
            assert ab.state.values[col] == value
        elif win.values[col] != value:  # type: ignore[index]
            assert any(c.column == col and c.other_value == value for c in ab.conflicts)


# -- custom policy ------------------------------------------------------------------


def test_custom_function_decides_concurrent_edits_and_incoming_is_logged() -> None:
    from shared.merge import MergeRequest

    seen: list[MergeRequest] = []

    def bigger(request: MergeRequest) -> dict[str, Any]:
        seen.append(request)
        return {**request.current, "household_size": 7}

    s0 = start(household_size=3)
    first = merge(s0, change("astana", 500, {"household_size": 5}, s0)).state
    out = merge(first, change("almaty", 400, {"household_size": 4}, s0), "custom:x:y", bigger)
    assert out.state.values["household_size"] == 7
    [request] = seen
    assert (request.columns, request.office, request.incoming) == (
        ("household_size",),
        "almaty",
        {"household_size": 4},
    )
    [conflict] = out.conflicts
    assert (conflict.kind, conflict.column) == ("custom", "household_size")
    assert (conflict.kept_value, conflict.other_value, conflict.merged) == (5, 4, 7)
    assert node_of(conflict.kept_version) == "astana"
    assert node_of(conflict.other_version) == "almaty"
    assert out.exact is False


def test_a_decided_value_other_than_the_incoming_one_takes_the_hubs_stamp() -> None:
    def choose(value: int) -> Any:
        return lambda request: {**request.current, "household_size": value}

    s0 = start(household_size=3)
    first = merge(s0, change("astana", 500, {"household_size": 5}, s0)).state
    incoming = change("almaty", 600, {"household_size": 4}, s0)
    hub_stamp = str(Timestamp(700 << 16, "hub"))
    for value, version in ((7, hub_stamp), (5, hub_stamp), (4, str(incoming.ts))):
        out = merge(first, incoming, "custom:x:y", choose(value), decided_stamp=hub_stamp)
        assert out.state.values["household_size"] == value
        # Neither office holds 7, almaty does not hold 5: the hub's stamp says so. The
        # incoming value keeps the change's stamp: its office holds that value already.
        assert out.state.versions["household_size"] == version
    # Without a stamp from the hub (pure use of the function), the change's own.
    out = merge(first, incoming, "custom:x:y", choose(7))
    assert out.state.versions["household_size"] == str(incoming.ts)


def test_custom_function_decides_only_the_clashing_columns() -> None:
    from shared.merge import MergeRequest

    def current_wins(request: MergeRequest) -> dict[str, Any]:
        return dict(request.current)  # decides household_size; knows nothing of notes

    s0 = start(household_size=3, notes="old")
    first = merge(s0, change("almaty", 500, {"household_size": 5}, s0)).state
    incoming = change("astana", 600, {"household_size": 4, "notes": "new"}, s0)
    out = merge(first, incoming, "custom:x:y", current_wins)
    assert out.state.values["household_size"] == 5
    assert out.state.values["notes"] == "new"  # a different field: both kept


def test_custom_function_is_not_called_without_a_concurrent_edit() -> None:
    def never(request: Any) -> dict[str, Any]:
        raise AssertionError("called")

    s0 = start()
    out = merge(s0, change("astana", 500, {"status": "closed"}, s0), "custom:x:y", never)
    assert out.state.values["status"] == "closed"
    assert out.conflicts == [] and out.exact is True


def test_record_policy_update_racing_a_later_delete_keeps_the_update() -> None:
    s0 = start(notes="old note")
    dele = change("astana", 900, None, s0)  # later stamp than the update
    upd = change(
        "almaty",
        500,
        {"id": "c1", "family_name": "Karimov", "status": "closed", "notes": "new"},
        s0,
    )
    deleted = merge(s0, dele, "record").state
    out = merge(deleted, upd, "record")
    assert out.state.deleted is False
    assert (out.state.values["status"], out.state.values["notes"]) == ("closed", "new")
    assert [c.kind for c in out.conflicts] == ["delete"]


# -- an admin's resolution ----------------------------------------------------------

NEW = str(Timestamp(900, "hub"))  # the fresh stamp the hub issues for the decision


def gone() -> RecordState:
    """A record deleted at NEW's predecessor: its values kept, marked deleted."""
    state = start()
    return RecordState(dict(state.values), {**state.versions, EXISTS: V0}, deleted=True)


# A conflict as the hub logged it: about one field, a whole record, or a delete.
FIELD = {"kind": "field", "column": "status", "kept_value": "closed", "other_value": "x"}
CUSTOM = {**FIELD, "kind": "custom"}
RECORD = {
    "kind": "record",
    "column": None,
    "kept_value": {"id": "c1", "notes": "hub"},
    "other_value": {"id": "c1", "notes": "office"},
}
LOST_DELETE = {"kind": "delete", "column": None, "kept_value": {"id": "c1"}, "other_value": None}
LOST_RECORD = {**LOST_DELETE, "kept_value": None, "other_value": {"id": "c1", "status": "x"}}


@pytest.mark.parametrize(
    ("current", "conflict", "keep", "value", "values", "versions", "deleted", "chosen"),
    [
        pytest.param(
            start(status="closed"), FIELD, "kept", None, {"status": "closed"}, {"status": V0},
            False, {}, id="field-keep-kept-writes-nothing",
        ),
        pytest.param(
            start(status="closed"), FIELD, "other", None, {"status": "x"}, {"status": NEW},
            False, {"status": "x"}, id="field-keep-other",
        ),
        pytest.param(
            start(status="closed"), FIELD, "value", "rejected", {"status": "rejected"},
            {"status": NEW}, False, {"status": "rejected"}, id="field-keep-typed-value",
        ),
        pytest.param(
            start(status="merged"), CUSTOM, "kept", None, {"status": "closed"}, {"status": NEW},
            False, {"status": "closed"}, id="custom-keep-kept-undoes-the-functions-choice",
        ),
        pytest.param(
            start(notes="hub"), RECORD, "other", None,
            {"id": "c1", "notes": "office", "status": "refugee"},
            {"id": NEW, "notes": NEW, "status": V0}, False, {"id": "c1", "notes": "office"},
            id="record-keep-other-takes-the-whole-record",
        ),
        pytest.param(
            start(notes="hub"), RECORD, "kept", None, {"notes": "hub"}, {"notes": V0},
            False, {}, id="record-keep-kept-writes-nothing",
        ),
        pytest.param(
            start(), LOST_DELETE, "other", None, {"status": "refugee"}, {EXISTS: NEW},
            True, {}, id="delete-keep-other-deletes",
        ),
        pytest.param(
            gone(), LOST_RECORD, "other", None, {"status": "x"}, {EXISTS: NEW, "status": NEW},
            False, {"id": "c1", "status": "x"}, id="delete-keep-other-record-brings-it-back",
        ),
        pytest.param(
            gone(), FIELD, "value", "closed", {"status": "closed"},
            {EXISTS: NEW, "status": NEW}, False, {"status": "closed"},
            id="value-on-a-deleted-record-brings-it-back",
        ),
    ],
)  # fmt: skip
def test_resolve(
    current: RecordState,
    conflict: dict[str, Any],
    keep: str,
    value: Any,
    values: dict[str, Any],
    versions: dict[str, str],
    deleted: bool,
    chosen: dict[str, Any],
) -> None:
    from shared.merge import resolution_writes, resolve

    before = RecordState(dict(current.values), dict(current.versions), current.deleted)
    done = resolve(current, **conflict, keep=keep, value=value, stamp=NEW)
    assert current == before  # pure: the given state is left alone
    assert {c: done.state.values[c] for c in values} == values
    assert {c: done.state.versions.get(c) for c in versions} == versions
    assert done.state.deleted is deleted
    assert done.chosen == chosen
    assert done.changed is (done.state != current)
    assert done.changed is resolution_writes(conflict["kind"], keep)


@pytest.mark.parametrize(
    ("column", "keep"),
    [
        pytest.param("status", "both", id="unknown-keep"),
        pytest.param(None, "value", id="value-for-a-whole-record"),
    ],
)
def test_resolve_refuses(column: str | None, keep: str) -> None:
    from shared.merge import resolve

    with pytest.raises(ValueError):
        resolve(
            start(),
            kind="field" if column else "record",
            column=column,
            kept_value=None,
            other_value=None,
            keep=keep,
            value="x",
            stamp=NEW,
        )


# -- effect: the versions an office keeps for a change the hub applies exactly ------


@pytest.mark.parametrize(
    ("versions", "op", "values", "expected"),
    [
        pytest.param({}, "insert", {"id": "c1", "notes": "x"}, {"id": "T", "notes": "T"}, id="new"),
        pytest.param(
            {"id": V0, EXISTS: V0},
            "insert",
            {"id": "c1"},
            {"id": "T", EXISTS: "T"},
            id="re-insert-versions-existence",
        ),
        pytest.param(
            {"id": V0, "notes": V0},
            "update",
            {"notes": "y"},
            {"id": V0, "notes": "T"},
            id="update-keeps-other-columns",
        ),
        pytest.param(
            {"id": V0, "notes": V0},
            "delete",
            None,
            {"id": V0, "notes": V0, EXISTS: "T"},
            id="delete-versions-existence-only",
        ),
    ],
)
def test_effect_cases(
    versions: dict[str, str], op: str, values: dict[str, Any] | None, expected: dict[str, str]
) -> None:
    before = dict(versions)
    assert effect(versions, op, values, "T") == expected
    assert versions == before  # pure: the versions given are left alone


@st.composite
def exact_changes(draw: st.DrawFn) -> tuple[RecordState | None, Change]:
    """A record as the hub holds it (None: never seen, or deleted) and a change made on
    top of it: its base is the record's versions."""
    kind = draw(st.sampled_from(["new", "held", "deleted"]))
    hlc = draw(stamps)
    if kind == "new":
        op = draw(st.sampled_from(["insert", "delete"]))
        values = None if op == "delete" else {"id": "c1", **draw(edits)}
        return None, change("astana", hlc, values, {}, op=op)
    s0 = draw(start_states())
    if kind == "deleted":  # only an insert brings it back: the office had no record
        s0.deleted = True
        s0.versions[EXISTS] = str(Timestamp(draw(st.integers(1, 150)), "hq"))
        return s0, change("astana", hlc, {"id": "c1", **draw(edits)}, s0, op="insert")
    if draw(st.booleans()):
        s0.versions[EXISTS] = str(Timestamp(draw(st.integers(1, 150)), "hq"))  # re-inserted once
    op = draw(st.sampled_from(["insert", "update", "delete"]))
    values = None if op == "delete" else draw(edits)
    return s0, change("astana", hlc, values, s0, op=op)


@settings(max_examples=200)
@given(exact_changes(), st.sampled_from(["merge", "record", "manual"]))
def test_effect_agrees_with_merge_for_a_change_made_on_the_current_versions(
    case: tuple[RecordState | None, Change], policy: str
) -> None:
    current, c = case
    out = merge(current, c, policy)
    assert out.exact is True
    before = current.versions if current is not None else {}
    assert effect(before, c.op, c.values, str(c.ts)) == out.state.versions
