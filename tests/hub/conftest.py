"""Fixtures of the hub's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.store import SqliteHubStore


@pytest.fixture
def hub_store(tmp_path: Path) -> Iterator[SqliteHubStore]:
    """A hub store on a fresh file, closed at teardown."""
    with SqliteHubStore(tmp_path / "hub.db") as store:
        yield store
