"""The runtime settings for bulk work."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from shared.runtime import BULK_GC_THRESHOLD, fewer_collections


@pytest.fixture(autouse=True)
def default_threshold() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_fewer_collections_while_inside_and_as_before_after() -> None:
    with fewer_collections():
        assert gc.get_threshold() == (BULK_GC_THRESHOLD, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_overlapping_users_restore_the_threshold_only_when_the_last_leaves() -> None:
    entered, leave = threading.Event(), threading.Event()

    def other_sync() -> None:
        with fewer_collections():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other_sync)
    thread.start()
    assert entered.wait(10)
    with fewer_collections():
        pass  # this one leaves first: the other is still at work
    assert gc.get_threshold()[0] == BULK_GC_THRESHOLD
    leave.set()
    thread.join(10)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_higher_threshold_set_by_the_application_is_kept() -> None:
    gc.set_threshold(BULK_GC_THRESHOLD * 2, 10, 10)
    with fewer_collections():
        assert gc.get_threshold()[0] == BULK_GC_THRESHOLD * 2
    assert gc.get_threshold()[0] == BULK_GC_THRESHOLD * 2


def test_the_threshold_comes_back_when_the_work_fails() -> None:
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("the sync failed")
    assert gc.get_threshold() == (700, 10, 10)
