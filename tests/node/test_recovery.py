"""The sync agent's recovery branches against an in-memory hub (tests/fakes.py).

Each test scripts the hub's refusal, then checks what the agent sent after it and
what the office's database holds: a real NodeStore on a file in tmp_path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from node.agent import FIRST_BATCH_SIZE, SyncAgent
from node.store import NodeStore
from shared.clock import Timestamp, now_ms
from shared.errors import (
    ClockSkewError,
    DivergedError,
    HubRejectedError,
    HubUnavailableError,
    ProtocolError,
)
from shared.protocol import Change, PullPage, PullRow
from tests.fakes import FakeHub

SKEW_MS = 600_000  # the hub's clock is this far behind the office's


@pytest.fixture
def office(tmp_path: Path) -> Iterator[NodeStore]:
    # The URL is never dialled: every test gives the agent a FakeHub.
    store = NodeStore.init(tmp_path / "astana.db", "astana", "http://127.0.0.1:9", "token")
    yield store
    store.close()


def add_cases(store: NodeStore, *ids: str) -> None:
    """Insert cases as the office's application does: on a connection of its own."""
    with sqlite3.connect(store.path) as conn:
        conn.executemany("INSERT INTO cases (id) VALUES (?)", [(i,) for i in ids])
    conn.close()


def pushed(hub: FakeHub) -> list[tuple[Change, ...]]:
    return [r.changes for r in hub.requests if r.kind == "push"]


def status_code(store: NodeStore) -> str | None:
    """The error code of the last sync, as the office reports it to the hub."""
    return store.status_report().last_error_code


# -- clock refusal ------------------------------------------------------------------


def test_clock_refusal_restamps_what_the_hub_did_not_commit_and_sends_it_again(office):
    add_cases(office, "c1", "c2", "c3")
    hub = FakeHub()
    refused_at: list[int] = []

    def refuse(changes):
        # The hub commits change 1, then finds change 2 stamped in its future: its
        # clock is behind the office's from now on.
        hub.received[1], hub.acked = changes[0], 1
        hub.clock = lambda: now_ms() - SKEW_MS
        refused_at.append(hub.clock())
        raise ClockSkewError("stamped ahead", "clock_skew", 422, refused_at[0], {"acked": 1})

    hub.answer("push", refuse)
    SyncAgent(office, hub).sync_once()

    assert hub.pushes() == [[1, 2, 3], [1, 2, 3]]
    first, second = pushed(hub)
    assert second[0].ts == first[0].ts, "the change the hub committed keeps its stamp"
    for before, after in zip(first[1:], second[1:], strict=True):
        assert after.ts.wall_ms <= refused_at[0] < before.ts.wall_ms
        assert after.receipt == before.receipt, "a re-stamped change keeps its receipt"
    assert sorted(hub.received) == [1, 2, 3]
    assert office.pending_count() == 0
    assert abs(office.clock_offset_ms + SKEW_MS) < 1000
    assert office.status().last_error is None


@pytest.mark.parametrize(
    ("hub_time", "refusals", "requests"),
    [
        pytest.param(True, 2, 2, id="refused-again-after-restamping"),
        pytest.param(False, 1, 1, id="no-hub-time-to-learn-from"),
    ],
)
def test_clock_refusal_that_restamping_cannot_cure_is_raised(office, hub_time, refusals, requests):
    add_cases(office, "c1")
    hub = FakeHub()
    hub_now = now_ms() - SKEW_MS if hub_time else None
    hub.answer(
        "push",
        *[ClockSkewError("stamped ahead", "clock_skew", 422, hub_now, {"acked": 0})] * refusals,
    )
    with pytest.raises(ClockSkewError):
        SyncAgent(office, hub).sync_once()
    assert hub.pushes() == [[1]] * requests
    assert hub.pulls() == []
    assert office.pending_count() == 1
    assert status_code(office) == "clock_skew"
    assert hub.reports[-1].last_error_code == "clock_skew"  # the hub hears of it


# -- diverged: this office database is an older copy ----------------------------------


def diverged(acked: int, at: int) -> DivergedError:
    return DivergedError(
        "reused number", "diverged", 409, None, {"acked": acked, "diverged_at": at}
    )


def test_diverged_push_keeps_the_hubs_receipts_and_renumbers_new_work(office):
    # The hub committed changes 1 and 2 of this office as they are here, and a change 3
    # this copy of the database never made (it was restored from a backup).
    add_cases(office, "c1", "c2", "c3")
    hub = FakeHub(acked=3)
    hub.answer("push", diverged(3, 3))
    SyncAgent(office, hub).sync_once()

    assert hub.pushes() == [[1, 2, 3], [4]]
    first, second = pushed(hub)
    assert (second[0].pk, second[0].receipt) == (first[2].pk, first[2].receipt)
    assert sorted(hub.received) == [4]
    assert office.pending_count() == 0
    assert office.last_seq() == 4
    # Records it sent since the backup are no longer here: it pulls everything again.
    [pull] = hub.pulls()
    assert (pull.cursor, pull.include_own) == (0, True)
    assert not office.repull


def test_diverged_again_after_renumbering_is_raised(office):
    add_cases(office, "c1", "c2", "c3")
    hub = FakeHub(acked=3)
    hub.answer("push", diverged(3, 3), diverged(4, 4))
    with pytest.raises(DivergedError):
        SyncAgent(office, hub).sync_once()
    assert hub.pushes() == [[1, 2, 3], [4]]
    assert office.pending_count() == 1  # c1 and c2 acknowledged, c3 queued as 4
    assert office.last_seq() == 4
    assert status_code(office) == "diverged"


def test_older_copy_seen_in_a_pull_numbers_new_work_past_the_hubs(office):
    office.apply_page(PullPage([], 12, False, now_ms(), "astana"))
    hub = FakeHub(acked=7)  # it holds changes 1 to 7 of this office; this copy made none
    SyncAgent(office, hub).sync_once()

    assert [(p.cursor, p.include_own) for p in hub.pulls()] == [(12, False), (0, True)]
    assert office.last_seq() == 7
    add_cases(office, "c1")
    assert [c.seq for c in office.pending(10)] == [8]
    assert not office.repull


def test_office_ahead_of_a_restored_hub_follows_its_cursor_and_keeps_its_numbers(office):
    # The office has pushed changes 1 to 3 and pulled to 12; the hub, restored from
    # an older backup, holds change 1 only and serves its records from the start.
    add_cases(office, "c1", "c2", "c3")
    SyncAgent(office, FakeHub()).sync_once()
    office.apply_page(PullPage([], 12, False, now_ms(), "astana", 3))
    add_cases(office, "c4")
    columns = office.schema.table("cases").column_names
    stamp = str(Timestamp(now_ms() << 16, "almaty"))
    row = PullRow(2, "cases", {"id": "c9"}, {c: None for c in columns} | {"id": "c9"}, stamp)
    hub = FakeHub(acked=1)
    hub.answer("pull", PullPage([row], 2, False, now_ms(), "astana", 1))
    SyncAgent(office, hub).sync_once()

    assert hub.pushes() == [[4]]
    assert [(p.cursor, p.include_own) for p in hub.pulls()] == [(12, False)]
    assert office.cursor == 2
    assert office.last_seq() == 4
    assert {r["id"] for r in office.rows("cases")} == {"c1", "c2", "c3", "c4", "c9"}


# -- batches ------------------------------------------------------------------------


def test_the_first_batch_is_small_so_the_hub_starts_while_the_next_is_read(office):
    add_cases(office, *(f"c{i}" for i in range(FIRST_BATCH_SIZE + 2 * 7 + 1)))
    hub = FakeHub()
    SyncAgent(office, hub, batch_size=7).sync_once()  # never more than asked for
    assert [len(p) for p in hub.pushes()][:2] == [7, 7]
    add_cases(office, *(f"d{i}" for i in range(FIRST_BATCH_SIZE + 5)))
    hub = FakeHub(acked=office.last_seq() - FIRST_BATCH_SIZE - 5)
    SyncAgent(office, hub).sync_once()
    assert [len(p) for p in hub.pushes()] == [FIRST_BATCH_SIZE, 5]
    assert office.pending_count() == 0


def test_the_hub_counts_what_is_left_to_pull_only_for_a_sync_that_shows_it(office):
    asked: list[bool] = []

    class CountingHub(FakeHub):
        def pull(self, cursor, limit, *, include_own=False, count=False):
            asked.append(count)
            page = super().pull(cursor, limit, include_own=include_own, count=count)
            return replace(page, remaining=7 if count else None)

    shown: list[tuple[str, int, int]] = []
    SyncAgent(office, CountingHub()).sync_once()  # as `node run` syncs
    SyncAgent(office, CountingHub()).sync_once(lambda *step: shown.append(step))
    assert asked == [False, True]
    assert shown == [("pull", 0, 7)]


# -- too large ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(HubRejectedError("too large", "too_large", 413), id="hub"),
        pytest.param(HubRejectedError("413 from nginx", "rejected", 413), id="proxy"),
    ],
)
def test_too_large_a_push_is_sent_again_in_smaller_batches(office, refusal):
    add_cases(office, "c1", "c2", "c3", "c4", "c5")
    hub = FakeHub()
    hub.answer("push", refusal, refusal)  # takes one change at a time
    SyncAgent(office, hub).sync_once()
    assert hub.pushes() == [[1, 2, 3, 4, 5], [1, 2], [1], [2], [3], [4], [5]]
    assert sorted(hub.received) == [1, 2, 3, 4, 5]
    assert office.pending_count() == 0


def test_one_change_too_large_for_any_push_is_raised_naming_it(office):
    add_cases(office, "c1", "c2")
    hub = FakeHub()
    too_large = HubRejectedError("too large", "too_large", 413)
    hub.answer("push", too_large, too_large)
    with pytest.raises(HubRejectedError, match=r"change 1 \(cases \{'id': 'c1'\}\) is larger"):
        SyncAgent(office, hub).sync_once()
    assert hub.pushes() == [[1, 2], [1]]
    assert office.pending_count() == 2
    assert status_code(office) == "too_large"


# -- identity -----------------------------------------------------------------------


def test_a_push_answered_for_another_office_is_refused_and_nothing_is_acknowledged(office):
    add_cases(office, "c1")
    hub = FakeHub(node="almaty")  # the token is almaty's
    with pytest.raises(HubRejectedError, match="belongs to office 'almaty'") as info:
        SyncAgent(office, hub).sync_once()
    assert (info.value.code, info.value.status) == ("forbidden", 403)
    assert hub.pushes() == [[1]]
    assert hub.pulls() == []
    assert office.pending_count() == 1
    assert status_code(office) == "forbidden"


def test_a_page_answered_for_another_office_is_not_applied(office):
    columns = office.schema.table("cases").column_names
    stamp = str(Timestamp(now_ms() << 16, "bishkek"))
    row = PullRow(1, "cases", {"id": "c9"}, {c: None for c in columns} | {"id": "c9"}, stamp)
    hub = FakeHub(node="almaty")
    hub.answer("pull", PullPage([row], 1, False, now_ms(), "almaty"))
    with pytest.raises(HubRejectedError, match="belongs to office 'almaty'"):
        SyncAgent(office, hub).sync_once()
    assert office.rows("cases") == []
    assert office.cursor == 0
    assert status_code(office) == "forbidden"


def test_a_page_fetched_ahead_is_refused_in_its_turn_after_the_checks_before_it(office):
    # Pages after the first are fetched, and checked, while the one before is written:
    # a bad record refuses its page only once the pages before it are applied, and a
    # page answered for another office is refused as such first.
    columns = office.schema.table("cases").column_names
    stamp = str(Timestamp(now_ms() << 16, "almaty"))

    def row(seq, key, **values):
        return PullRow(
            seq, "cases", {"id": key}, dict.fromkeys(columns) | values | {"id": key}, stamp
        )

    good = PullPage([row(1, "c1")], 1, True, now_ms(), "astana")
    bad = PullPage([row(2, "c2", household_size="three")], 2, False, now_ms(), "astana")
    hub = FakeHub()
    hub.answer("pull", good, bad)
    with pytest.raises(ProtocolError, match="household_size holds INTEGER values"):
        SyncAgent(office, hub).sync_once()
    assert [r["id"] for r in office.rows("cases")] == ["c1"]
    assert office.cursor == 1

    stranger = PullPage([row(3, "c3", household_size="three")], 3, False, now_ms(), "almaty")
    hub = FakeHub()
    hub.answer("pull", PullPage([row(2, "c2")], 2, True, now_ms(), "astana"), stranger)
    with pytest.raises(HubRejectedError, match="belongs to office 'almaty'"):
        SyncAgent(office, hub).sync_once()
    assert [r["id"] for r in office.rows("cases")] == ["c1", "c2"]
    assert office.cursor == 2

    hub = FakeHub()  # and a page that never comes is the sync's error, as it was
    hub.answer(
        "pull", PullPage([row(3, "c3")], 3, True, now_ms(), "astana"), HubUnavailableError("gone")
    )
    with pytest.raises(HubUnavailableError, match="gone"):
        SyncAgent(office, hub).sync_once()
    assert office.cursor == 3
