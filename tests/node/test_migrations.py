"""The office database's migrations (node/migrations.py), numbered in _fieldsync_version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node import migrations
from node.store import NodeStore

HUB_URL = "http://127.0.0.1:9"


def pragma(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        conn.close()


def layout(path: Path) -> int:
    with NodeStore(path) as store:
        return migrations.version(store.db)


def set_layout(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    try:
        if version:
            conn.execute("UPDATE _fieldsync_version SET version = ?", [version])
        else:  # made before fieldsync kept the number
            conn.execute("DROP TABLE _fieldsync_version")
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    NodeStore.init(tmp_path / "astana.db", "astana", HUB_URL, "tok").close()
    return tmp_path / "astana.db"


def test_a_new_database_is_at_the_newest_version(path: Path) -> None:
    assert migrations.VERSION == len(migrations.MIGRATIONS) > 0
    assert layout(path) == migrations.VERSION


def test_the_applications_user_version_is_left_alone(tmp_path: Path) -> None:
    # An application's own database, adopted: PRAGMA user_version is the application's.
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    NodeStore.init(path, "astana", HUB_URL, "tok").close()
    assert pragma(path, "user_version") == 7
    assert layout(path) == migrations.VERSION
    set_layout(path, 0)  # and a number of its own never makes fieldsync skip a step
    NodeStore(path).close()
    assert pragma(path, "user_version") == 7
    assert layout(path) == migrations.VERSION


def test_an_up_to_date_database_is_only_read_when_opened(path: Path) -> None:
    before = path.read_bytes()
    NodeStore(path).close()
    assert path.read_bytes() == before


def test_a_database_of_an_older_fieldsync_gets_the_number_it_lacked(path: Path) -> None:
    """Made by fieldsync before it kept a number, with every step taken: only the
    number is written, nothing else changes."""
    set_layout(path, 0)
    NodeStore(path).close()
    assert layout(path) == migrations.VERSION


def test_every_step_of_an_older_fieldsync_can_tell_it_was_taken(path: Path) -> None:
    """Databases with no number may have taken any of the first steps already."""
    with NodeStore(path) as store:
        assert all(m.present is not None and m.present(store.db) for m in migrations.MIGRATIONS)


def test_a_store_is_a_context_manager(path: Path) -> None:
    with NodeStore(path) as store:
        assert store.pending_count() == 0
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        store.pending_count()


def test_a_database_behind_takes_the_steps_it_lacks(path: Path) -> None:
    step = [m.name for m in migrations.MIGRATIONS].index("sent mark")
    conn = sqlite3.connect(path)
    try:
        conn.execute("ALTER TABLE _fieldsync_state DROP COLUMN sent_seq")
        conn.execute("UPDATE _fieldsync_version SET version = ?", [step])
        conn.commit()
    finally:
        conn.close()
    with NodeStore(path) as store:
        assert "sent_seq" in store.db.table("_fieldsync_state").columns_dict
    assert layout(path) == migrations.VERSION
