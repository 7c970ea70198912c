"""The dashboard in a real browser: Debian's Chromium driven by Playwright (sync API),
against a real uvicorn hub and two real offices (tests/conftest.py).

Skipped, saying why, only when /usr/bin/chromium or Playwright is missing (``make
browser`` installs Chromium when it can).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import Hub, Office

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"the browser test drives Debian's Chromium, and {CHROMIUM} is missing")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed"
    )
    with sync_api.sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile, removed on close.
        found = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield found
        finally:
            found.close()


def write(office: Office, sql: str, *params: Any) -> None:
    with sqlite3.connect(office.path) as conn:
        conn.execute(sql, params)
    conn.close()


def family_name(office: Office) -> Any:
    with sqlite3.connect(office.path) as conn:
        row = conn.execute("SELECT family_name FROM cases WHERE id = 'c1'").fetchone()
    conn.close()
    return row[0]


def sync_all(*offices: Office) -> None:
    for _ in range(2):
        for office in offices:
            office.sync()


def assert_fits(page: Page, path: str) -> None:
    """The page is no wider than a phone's screen (tables scroll inside their wrapper)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 2, f"{path} is {width} px wide on a phone"


def test_an_admin_settles_a_conflict_in_the_browser(
    hub: Hub, make_office: Callable[..., Office], browser: Browser
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    write(astana, "INSERT INTO cases (id, family_name, office) VALUES ('c1', 'Abenova', 'astana')")
    sync_all(astana, almaty)
    write(astana, "UPDATE cases SET family_name = 'Abenova (astana)' WHERE id = 'c1'")
    write(almaty, "UPDATE cases SET family_name = 'Abenova (almaty)' WHERE id = 'c1'")
    sync_all(astana, almaty)
    [conflict] = hub.store.conflicts()
    token = hub.store.add_admin("ops", "owner")

    page = browser.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []  # e.g. what the Content-Security-Policy refused
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )

    page.goto(hub.url + "/")
    assert page.url.startswith(hub.url + "/login?next=")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(hub.url + "/")
    assert page.locator('tr[data-office="astana"][data-health="ok"]').count() == 1
    assert page.locator('tr[data-office="almaty"][data-health="ok"]').count() == 1

    page.get_by_role("link", name="Conflicts", exact=True).click()
    row = page.locator(f'tr[data-conflict="{conflict.id}"]')
    assert conflict.other_value in row.inner_text()
    row.get_by_role("link", name="Review").click()
    page.wait_for_url(f"{hub.url}/conflicts/{conflict.id}")

    # Enter in the value box must not press the first button (keep the current value).
    page.get_by_label(f"Or set {conflict.column} to").fill("typed by mistake")
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    assert page.url == f"{hub.url}/conflicts/{conflict.id}"
    assert hub.store.conflict(conflict.id).status == "logged"

    page.get_by_role("button", name="Keep the other value").click()
    page.wait_for_url(f"{hub.url}/conflicts/{conflict.id}?done=1")
    assert "Conflict resolved" in page.get_by_role("status").inner_text()
    done = hub.store.conflict(conflict.id)
    assert (done.status, done.resolved_by) == ("resolved", "ops")

    sync_all(astana, almaty)
    assert family_name(astana) == family_name(almaty) == conflict.other_value

    page.set_viewport_size(PHONE)
    for path in ("/", "/conflicts?status=resolved", f"/conflicts/{conflict.id}", "/hq"):
        page.goto(hub.url + path)
        assert_fits(page, path)
    assert problems == []
