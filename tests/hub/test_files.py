"""What the hub writes to disk: its database files readable by their owner only, and
CSV cells a spreadsheet would run as formulas neutralised (real SQLite files)."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fieldsync.cli import cli
from hub.export import export_rows, export_to_path, stream_export
from hub.store import SqliteHubStore
from shared.clock import COUNTER_BITS, Timestamp, now_ms
from shared.protocol import Change

FORMULAS = {
    "case_number": '=HYPERLINK("http://x.example/","click")',
    "family_name": "+7 701 000 00 00",
    "given_name": "-2+3",
    "country_of_origin": "@SUM(A1:A9)",
    "notes": "\tTab first",
    "registered_on": "\rCR first",
}


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that lets every user read new files (0022, a common default)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def case(key: str, seq: int, **values: object) -> Change:
    ts = Timestamp((now_ms() << COUNTER_BITS) + seq, "astana")
    return Change(seq, "cases", {"id": key}, "insert", ts, {"id": key, **values})


def test_the_hub_database_wal_and_shm_are_private(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "hub.db"
    with SqliteHubStore(path) as hub:
        hub.add_node("astana")
        hub.set_scopes("astana", ["*"])
        hub.push("astana", [case("c1", 1, family_name="Ali")])
        files = [path, path.with_name("hub.db-wal"), path.with_name("hub.db-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


def test_a_hub_made_by_the_cli_is_private(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "hub.db"
    result = CliRunner().invoke(cli, ["hub", "add-admin", "ops", "--db", str(path)])
    assert result.exit_code == 0, result.output
    assert mode(path) == 0o600
    out = tmp_path / "cases.csv"
    result = CliRunner().invoke(
        cli, ["hub", "export", "cases", "--format", "csv", "--db", str(path), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o600


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[SqliteHubStore]:
    with SqliteHubStore(tmp_path / "hub.db") as hub:
        hub.add_node("astana")
        hub.set_scopes("astana", ["*"])
        hub.push(
            "astana",
            [
                case("c1", 1, **FORMULAS, household_size=-3),
                case("c2", 2, family_name="O'Brien", given_name="a=b", notes="x-1"),
            ],
        )
        yield hub


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_cells_a_spreadsheet_would_run_get_a_quote_in_front(hub: SqliteHubStore) -> None:
    out = io.BytesIO()
    export_rows(hub, "cases", "csv", out)
    first, second = csv_rows(out.getvalue().decode("utf-8"))
    assert {name: first[name] for name in FORMULAS} == {
        name: "'" + value for name, value in FORMULAS.items()
    }
    assert first["household_size"] == "-3"  # a number, held as INTEGER: as it is
    # only the first character counts
    assert (second["family_name"], second["given_name"], second["notes"]) == (
        "O'Brien",
        "a=b",
        "x-1",
    )


def test_the_dashboard_download_and_the_file_are_neutralised_alike(
    hub: SqliteHubStore, tmp_path: Path
) -> None:
    _name, chunks = stream_export(hub, "cases", "csv")
    streamed = b"".join(chunks).decode("utf-8")
    export_to_path(hub, "cases", "csv", tmp_path / "cases.csv")
    assert (tmp_path / "cases.csv").read_bytes().decode("utf-8") == streamed
    assert csv_rows(streamed)[0]["case_number"].startswith("'=")


def test_json_exports_keep_every_value_as_it_is(hub: SqliteHubStore) -> None:
    out = io.StringIO()
    export_rows(hub, "cases", "json", out)
    assert '"case_number": "=HYPERLINK' in out.getvalue()
