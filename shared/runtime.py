"""Settings of the Python runtime for bulk work: syncing batches of changes."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# A sync makes and drops hundreds of thousands of small objects (the values of each
# change, the changes themselves) that hold no reference cycles. At the default
# threshold (700 new objects) the cycle collector runs every few hundred changes and
# walks the batch in hand each time. At this threshold it runs a seventieth as often;
# objects without cycles are freed when dropped all the same.
BULK_GC_THRESHOLD = 50_000

_lock = threading.Lock()
_users = 0
_saved = gc.get_threshold()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cycle collector less often while inside; as before once every user left.

    Counted, so that concurrent syncs (threads of one hub) can overlap.
    """
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(max(_saved[0], BULK_GC_THRESHOLD), *_saved[1:])
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                gc.set_threshold(*_saved)
