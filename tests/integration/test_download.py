"""The dashboard's CSV download through a real hub (uvicorn on 127.0.0.1): a text a
spreadsheet would run as a formula arrives with a quote in front."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Hub, Office
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
