"""An idle pull (nothing after the office's cursor) is answered without opening a
snapshot of its own; a pull with records to serve still reads on one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hub.store import SqliteHubStore
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change


def test_an_idle_pull_opens_no_snapshot(
    hub_store: SqliteHubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_store.add_node("astana")
    hub_store.add_node("almaty")
    stamp = Timestamp((now_ms() << COUNTER_BITS) + 1, "almaty")
    change = Change(1, "cases", {"id": "c1"}, "insert", stamp, {"id": "c1", "office": "x"}, {})
    hub_store.set_scopes("almaty", ["*"])
    hub_store.set_scopes("astana", ["*"])
    assert hub_store.push("almaty", [change]).applied == 1
    opened = []
    snapshot = hub_store.database.snapshot

    @contextmanager
    def counted() -> Iterator[object]:
        opened.append(1)
        with snapshot() as conn:
            yield conn

    monkeypatch.setattr(hub_store.database, "snapshot", counted)
    page = hub_store.pull("astana", 0, 100, count=True)
    assert [row.pk for row in page.rows] == [{"id": "c1"}] and len(opened) == 1
    idle = hub_store.pull("astana", page.cursor, 100, count=True)
    assert (idle.rows, idle.remaining, idle.more) == ([], 0, False) and len(opened) == 1
    assert idle.acked == 0 and idle.epoch == hub_store.epoch
    (office,) = [o for o in hub_store.offices() if o.name == "astana"]
    assert office.last_pull_at is not None and office.lag == 0
