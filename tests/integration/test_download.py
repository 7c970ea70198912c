"""The dashboard's downloads through a real hub (uvicorn on 127.0.0.1), on both
engines: what `hub export` writes, byte for byte; a text a spreadsheet would run as a
formula arrives with a quote in front."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from hub.app import create_app
from hub.export import export_rows
from hub.store import open_store
from tests.conftest import Hub, Office, serve
from tests.engines import Engine
from tests.hub.test_export import push_records
from tests.integration.test_dashboard import add_case, sign_in, sync_all

pytestmark = pytest.mark.integration


def test_a_downloaded_csv_neutralises_formulas(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    astana = make_office("astana")
    add_case(astana, "c1", family_name="=cmd|' /C calc'!A0", notes="@SUM(1)", household_size=-2)
    sync_all(astana)
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert sign_in(web, hub.store.add_admin("ops", "owner")).status_code == 303
        response = web.get("/export/cases.csv")
    assert response.status_code == 200, response.text[:300]
    [row] = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert (row["family_name"], row["notes"]) == ("'=cmd|' /C calc'!A0", "'@SUM(1)")
    assert row["household_size"] == "-2"


def test_hq_figures_per_office_match_each_offices_download(
    hub: Hub, make_office: Callable[..., Office]
) -> None:
    """Issue 15 point 7: the figure headquarters shows for an office is the row count of
    that office's download, for cases and for assistance (which follows its case),
    although another office changed some of them last; the files are named by table,
    office and date."""
    astana, almaty = make_office("astana", scopes=()), make_office("almaty", scopes=())
    hq = make_office("hq")  # holds every record
    for i in range(5):
        add_case(astana, f"a{i}")
    for i in range(3):
        add_case(almaty, f"m{i}")
    sync_all(astana, almaty, hq)
    # Headquarters edits two of astana's cases and records assistance for both offices:
    # the last change of those records is headquarters', yet they stay astana's.
    with sqlite3.connect(hq.path) as conn:
        conn.execute("UPDATE cases SET notes = 'checked by HQ' WHERE id IN ('a0', 'a1')")
        conn.executemany(
            "INSERT INTO assistance (id, case_id, kind, quantity, office) "
            "VALUES (?, ?, 'food', 1, 'hq')",
            [("s1", "a0"), ("s2", "a3"), ("s3", "m1")],
        )
    conn.close()
    sync_all(hq, astana, almaty)
    today = datetime.now(UTC).date().isoformat()
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        assert sign_in(web, hub.store.add_admin("ops", "owner")).status_code == 303
        figures = {t["table"]: t for t in hub.store.figures()["tables"]}
        page = web.get("/hq").text
        seen: dict[tuple[str, str], int] = {}
        for table in ("cases", "assistance"):
            for entry in figures[table]["by_office"]:
                office, count = entry["office"], entry["records"]
                assert f'data-office="{office}" data-records="{count}"' in page
                response = web.get(f"/export/{table}.csv", params={"office": office})
                assert response.status_code == 200, response.text[:300]
                downloaded = list(csv.DictReader(io.StringIO(response.text, newline="")))
                assert len(downloaded) == count, (table, office)
                name = f"{table}-{office}-{today}.csv"
                disposition = response.headers["content-disposition"]
                assert disposition == f'attachment; filename="{name}"'
                seen[(table, office)] = count
        whole = web.get("/export/cases.json").headers["content-disposition"]
    assert seen == {
        ("cases", "almaty"): 3,
        ("cases", "astana"): 5,
        ("assistance", "almaty"): 1,
        ("assistance", "astana"): 2,
    }
    assert whole == f'attachment; filename="cases-{today}.json"'


def test_downloads_on_either_engine_are_what_export_writes(tmp_path: Path, engine: Engine) -> None:
    """A hub on SQLite or PostgreSQL serves every download (never 501), byte for byte
    what `hub export` writes from the same database, whole or for one office."""
    with open_store(engine.db(tmp_path)) as store:
        push_records(store)
        server = serve(create_app(store))
        url = next(server)
        try:
            with httpx.Client(base_url=url, timeout=30) as web:
                assert sign_in(web, store.add_admin("ops", "owner")).status_code == 303
                for table in ("cases", "assistance"):
                    for fmt in ("csv", "json"):
                        for office in (None, "almaty"):
                            params = {"office": office} if office else {}
                            response = web.get(f"/export/{table}.{fmt}", params=params)
                            assert response.status_code == 200, response.text[:300]
                            expected = io.BytesIO()
                            count = export_rows(store, table, fmt, expected, office)
                            assert response.content == expected.getvalue()
                            assert count > 0 or office is not None
                refused = web.get("/export/cases.csv", params={"office": "nobody"})
                assert refused.status_code == 400 and "unknown office" in refused.text
        finally:
            server.close()
