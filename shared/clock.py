"""
Hybrid logical clock (HLC).

A stamp is one 64-bit integer, ``hlc = wall_ms << 16 | counter``: milliseconds since
the Unix epoch in the high bits and a logical counter in the low 16 bits. A clock
issues ``max(last + 1, now_ms << 16)``, so every stamp is later than every stamp the
clock has issued or observed, and close to real time while the wall clock is sane.
When the counter overflows it simply carries into the millisecond part.

A :class:`Timestamp` pairs a stamp with the name of the node that issued it. Its text
form, ``f"{hlc:016x}-{node}"``, sorts like the pair (stamp first, node name breaks
ties), so versions stored as text in SQLite or JSON compare correctly as strings.

Nodes stamp their changes inside SQLite triggers, which compute the same formula in
SQL (see ``node/capture.py``); :class:`HybridClock` is the Python twin, used by the hub
and by tests. The wall clock is injected so tests never patch time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

COUNTER_BITS = 16
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HLC_HEX = re.compile(r"[0-9a-f]{16}")
_STAMP = re.compile(r"[0-9a-f]{16}-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


_STAMPS = re.compile(rf"(?:{_STAMP.pattern}\n)*{_STAMP.pattern}")


def are_stamps(texts: Iterable[object]) -> bool:
    """True if every item is the canonical text form of a Timestamp (cheaper than parse)."""
    items = list(texts)
    if not items:
        return True
    try:
        joined = "\n".join(items)  # type: ignore[arg-type]
    except TypeError:
        return False
    return joined.count("\n") == len(items) - 1 and _STAMPS.fullmatch(joined) is not None


def check_node_name(name: str) -> str:
    """Return ``name`` if it can name a node (office), else raise ``ValueError``."""
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid office name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def wall_ms(hlc: int) -> int:
    """Return the wall-clock milliseconds part of a stamp."""
    return hlc >> COUNTER_BITS


def now_ms() -> int:
    """Return the current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A hybrid-logical-clock stamp and the node that issued it; ordered by both."""

    hlc: int
    node: str

    def __str__(self) -> str:
        return f"{self.hlc:016x}-{self.node}"

    @property
    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch at which the stamp was issued."""
        return wall_ms(self.hlc)

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """Parse the text form ``0123456789abcdef-node``; raise ``ValueError`` if malformed."""
        # Only the canonical form: versions are compared as text, so two spellings
        # of one stamp must not both be accepted.
        if (
            not isinstance(text, str)
            or len(text) < 18
            or text[16] != "-"
            or not _HLC_HEX.fullmatch(text[:16])
        ):
            raise ValueError(f"invalid timestamp {text!r}")
        return cls(int(text[:16], 16), check_node_name(text[17:]))


class HybridClock:
    """Issue stamps that never go backwards, even when the wall clock does."""

    def __init__(self, node: str, now: Callable[[], int] = now_ms, offset_ms: int = 0) -> None:
        self.node = check_node_name(node)
        self._now = now
        self.offset_ms = offset_ms
        self._last = 0
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        """The latest stamp issued or observed."""
        return self._last

    def tick(self) -> Timestamp:
        """Return a new stamp, later than every stamp issued or observed so far."""
        with self._lock:
            physical = (self._now() + self.offset_ms) << COUNTER_BITS
            self._last = max(self._last + 1, physical)
            return Timestamp(self._last, self.node)

    def observe(self, hlc: int) -> None:
        """Remember a stamp seen from elsewhere, so later stamps come after it."""
        with self._lock:
            self._last = max(self._last, hlc)
