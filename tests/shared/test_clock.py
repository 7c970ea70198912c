"""HybridClock and Timestamp: ordering, text form, and never going backwards."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings, strategies as st

from shared.clock import COUNTER_BITS, HybridClock, Timestamp, check_node_name, wall_ms

# Node names as check_node_name accepts them (ASCII only, 1-64 characters).
_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
node_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_FIRST),
    st.text(alphabet=_FIRST + "_.-", max_size=20),
)
hlcs = st.integers(min_value=0, max_value=2**63 - 1)
timestamps = st.builds(Timestamp, hlcs, node_names)


class SteppingNow:
    """A wall clock (ms) that returns the given readings in turn, then repeats the last."""

    def __init__(self, readings: list[int]) -> None:
        self._readings = iter(readings)
        self._last = readings[0] if readings else 0

    def __call__(self) -> int:
        self._last = next(self._readings, self._last)
        return self._last


# -- Timestamp ----------------------------------------------------------------


def test_text_form_is_zero_padded_hex_then_node() -> None:
    assert str(Timestamp(0x1A2B, "astana")) == "0000000000001a2b-astana"
    assert str(Timestamp(0, "a")) == "0000000000000000-a"


def test_wall_ms_is_the_high_bits() -> None:
    ts = Timestamp((1_700_000_000_123 << COUNTER_BITS) | 7, "hub")
    assert ts.wall_ms == 1_700_000_000_123
    assert wall_ms(ts.hlc) == 1_700_000_000_123


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        pytest.param(Timestamp(1, "zeta"), Timestamp(2, "alpha"), id="stamp-first"),
        pytest.param(Timestamp(5, "almaty"), Timestamp(5, "astana"), id="tie-breaks-on-node"),
        pytest.param(Timestamp(0xF, "a"), Timestamp(0x10, "a"), id="hex-digit-carry"),
        pytest.param(Timestamp(2**40, "x"), Timestamp(2**40 + 1, "x"), id="counter"),
        pytest.param(Timestamp(5, "a"), Timestamp(5, "a-b"), id="node-prefix"),
    ],
)
def test_order_of_pairs_and_text_agree(lower: Timestamp, higher: Timestamp) -> None:
    assert lower < higher
    assert str(lower) < str(higher)


@settings(max_examples=200)
@given(timestamps, timestamps)
def test_text_sorts_like_the_pair(a: Timestamp, b: Timestamp) -> None:
    assert (str(a) < str(b)) == ((a.hlc, a.node) < (b.hlc, b.node))
    assert (str(a) == str(b)) == (a == b)
    assert (a < b) == ((a.hlc, a.node) < (b.hlc, b.node))


@settings(max_examples=200)
@given(timestamps)
def test_parse_round_trips(ts: Timestamp) -> None:
    assert Timestamp.parse(str(ts)) == ts
    assert str(Timestamp.parse(str(ts))) == str(ts)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("0000000000000001", id="no-node"),
        pytest.param("0000000000000001-", id="empty-node"),
        pytest.param("0000000000000001astana", id="no-dash"),
        pytest.param("000000000000001-astana", id="15-hex-digits"),
        pytest.param("00000000000000001-astana", id="17-hex-digits"),
        pytest.param("000000000000000g-astana", id="not-hex"),
        pytest.param("0000000000000001-ast ana", id="space-in-node"),
        pytest.param("0000000000000001--astana", id="node-starts-with-dash"),
        pytest.param("0000000000000001-" + "a" * 65, id="node-too-long"),
        pytest.param("0000000000000001-astanä", id="non-ascii-node"),
        pytest.param(None, id="none"),
        pytest.param(1, id="int"),
        pytest.param(b"0000000000000001-astana", id="bytes"),
        pytest.param("0x00000000000001-a", id="0x-prefix"),
        pytest.param("+000000000000001-a", id="plus-sign"),
        pytest.param("-000000000000001-a", id="minus-sign"),
        pytest.param(" 000000000000001-a", id="leading-space"),
        pytest.param("0000_00000000001-a", id="underscore"),
        pytest.param("000000000000000A-a", id="uppercase-hex"),
        pytest.param("0000000000000001-a\n", id="trailing-newline"),
    ],
)
def test_parse_rejects_garbage(text: object) -> None:
    with pytest.raises(ValueError, match="invalid"):
        Timestamp.parse(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["astana", "a", "Almaty-2", "hq.main", "x_y", "0office", "a" * 64])
def test_node_names_accepted(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "a/b", "a" * 65, "ü", None, 3, "astana\n"])
def test_node_names_rejected(name: object) -> None:
    with pytest.raises(ValueError, match="invalid office name"):
        check_node_name(name)  # type: ignore[arg-type]


# -- HybridClock --------------------------------------------------------------


def test_tick_follows_the_wall_clock() -> None:
    clock = HybridClock("astana", now=lambda: 1_000)
    ts = clock.tick()
    assert ts == Timestamp(1_000 << COUNTER_BITS, "astana")
    assert ts.wall_ms == 1_000
    assert clock.last == ts.hlc


def test_ticks_in_the_same_millisecond_count_up() -> None:
    clock = HybridClock("astana", now=lambda: 1_000)
    stamps = [clock.tick().hlc for _ in range(5)]
    assert stamps == [(1_000 << COUNTER_BITS) + i for i in range(5)]


def test_counter_overflow_carries_into_milliseconds() -> None:
    clock = HybridClock("astana", now=lambda: 1_000)
    clock.observe((1_000 << COUNTER_BITS) | 0xFFFF)
    ts = clock.tick()
    assert ts.hlc == 1_001 << COUNTER_BITS
    assert ts.wall_ms == 1_001


def test_offset_shifts_the_wall_clock() -> None:
    clock = HybridClock("astana", now=lambda: 1_000, offset_ms=500)
    assert clock.tick().wall_ms == 1_500
    clock = HybridClock("astana", now=lambda: 10_000, offset_ms=-4_000)
    assert clock.tick().wall_ms == 6_000


def test_clock_holds_when_the_wall_clock_jumps_back() -> None:
    clock = HybridClock("astana", now=SteppingNow([5_000, 1_000, 1_000]))
    first, second, third = clock.tick(), clock.tick(), clock.tick()
    assert first.hlc == 5_000 << COUNTER_BITS
    assert second.hlc == first.hlc + 1
    assert third.hlc == first.hlc + 2


def test_clock_rejects_bad_node_name() -> None:
    with pytest.raises(ValueError, match="invalid office name"):
        HybridClock("no spaces")


def test_default_clock_is_close_to_real_time() -> None:
    before = time.time_ns() // 1_000_000
    ts = HybridClock("astana").tick()
    after = time.time_ns() // 1_000_000
    assert before <= ts.wall_ms <= after


@settings(max_examples=150)
@given(
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=40),
    st.integers(min_value=-(2**20), max_value=2**20),
)
def test_never_goes_backwards(readings: list[int], offset_ms: int) -> None:
    clock = HybridClock("astana", now=SteppingNow(readings), offset_ms=offset_ms)
    stamps = [clock.tick() for _ in readings]
    assert all(a.hlc < b.hlc for a, b in itertools.pairwise(stamps))
    # ...and each stamp is at least the wall clock it was issued at.
    for ts, reading in zip(stamps, readings, strict=True):
        assert ts.hlc >= (reading + offset_ms) << COUNTER_BITS
        assert ts.node == "astana"


@settings(max_examples=150)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("tick"), st.integers(min_value=0, max_value=2**40)),
            st.tuples(st.just("observe"), st.integers(min_value=0, max_value=2**62)),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_observe_makes_later_ticks_greater(steps: list[tuple[str, int]]) -> None:
    now = [0]
    clock = HybridClock("astana", now=lambda: now[0])
    highest = 0  # the greatest stamp issued or observed so far
    for action, value in steps:
        if action == "observe":
            clock.observe(value)
            highest = max(highest, value)
            assert clock.last == highest
        else:
            now[0] = value
            ts = clock.tick()
            assert ts.hlc > highest
            assert ts.hlc >= value << COUNTER_BITS
            highest = ts.hlc
            assert clock.last == highest


def test_observe_of_an_older_stamp_changes_nothing() -> None:
    clock = HybridClock("astana", now=lambda: 2_000)
    ts = clock.tick()
    clock.observe(1)
    assert clock.last == ts.hlc
    assert clock.tick().hlc == ts.hlc + 1


def test_observe_of_a_future_stamp_moves_later_ticks_past_it() -> None:
    clock = HybridClock("astana", now=lambda: 1_000)
    remote = Timestamp(9_999 << COUNTER_BITS, "almaty")
    clock.observe(remote.hlc)
    ts = clock.tick()
    assert ts > remote
    assert ts.hlc == remote.hlc + 1
