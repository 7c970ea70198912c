"""Fixtures of the hub's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.store import SqlHubStore, open_store
from tests.engines import Engine


@pytest.fixture
def hub_store(tmp_path: Path, engine: Engine) -> Iterator[SqlHubStore]:
    """A hub store on a fresh database of each engine, closed at teardown."""
    with open_store(engine.db(tmp_path)) as store:
        yield store
