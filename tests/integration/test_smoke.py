from __future__ import annotations

import sqlite3

import pytest

pytestmark = pytest.mark.integration


def test_two_offices_converge(hub, make_office):
    astana, almaty = make_office("astana"), make_office("almaty")
    with sqlite3.connect(astana.path) as conn:
        conn.execute(
            "INSERT INTO cases (id, family_name, status) VALUES ('c1', 'Karimov', 'refugee')"
        )
    astana.sync()
    almaty.sync()
    assert almaty.store.rows("cases") == astana.store.rows("cases") == hub.store.rows("cases")
    assert almaty.store.rows("cases")[0]["family_name"] == "Karimov"
