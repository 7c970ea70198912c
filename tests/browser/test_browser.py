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
    outcome = page.locator("#outcome")  # the outcome, not the old sides' labels
    assert f"kept the other value, from {conflict.other_node}" in outcome.inner_text()
    assert outcome.locator("dd.now-value").inner_text().strip() == conflict.other_value
    assert page.get_by_text("Current value (kept)").count() == 0
    done = hub.store.conflict(conflict.id)
    assert (done.status, done.resolved_by) == ("resolved", "ops")

    sync_all(astana, almaty)
    assert family_name(astana) == family_name(almaty) == conflict.other_value

    page.set_viewport_size(PHONE)
    for path in ("/", "/conflicts?status=resolved", f"/conflicts/{conflict.id}", "/hq"):
        page.goto(hub.url + path)
        assert_fits(page, path)
    assert problems == []


# -- every page on a desktop and on a phone ------------------------------------------------

DESKTOP = {"width": 1280, "height": 800}
LONG_NAME = "Abenova-Kuanyshbekova, returned from the Kostanay region in March"
LONG_TOKEN = "https://example.org/cases/" + "0123456789abcdef" * 5
# The tallest each page may be on a phone (px): usable without endless scrolling.
PHONE_HEIGHTS = {
    "offices": 1600,
    "office": 3200,
    "rejected": 3200,
    "conflicts": 2400,
    "conflict": 2000,
    "resolved": 2000,
    "history": 5000,  # 37 versions, each marked winner or loser and why: about 125 px each
    "lookup": 1200,
    "hq": 4000,
    "audit": 6000,
    "login": 900,
}


def add_case(office: Office, case_id: str, /, **values: Any) -> None:
    row = {"id": case_id, "family_name": "Nazarova", "status": "refugee", "office": office.name}
    row.update(values)
    marks = ", ".join("?" for _ in row)
    write(office, f"INSERT INTO cases ({', '.join(row)}) VALUES ({marks})", *row.values())


def conflicting(astana: Office, almaty: Office, column: str, values: tuple[Any, Any]) -> None:
    write(astana, f"UPDATE cases SET {column} = ? WHERE id = 'c1'", values[0])
    write(almaty, f"UPDATE cases SET {column} = ? WHERE id = 'c1'", values[1])
    sync_all(astana, almaty)


def measure(page: Page) -> dict[str, int]:
    return page.evaluate(
        "({scroll: document.scrollingElement.scrollWidth, inner: window.innerWidth,"
        " height: document.scrollingElement.scrollHeight})"
    )


def right_edges(page: Page, selector: str) -> list[float]:
    """The right edge (px from the page's left) of every element ``selector`` finds."""
    return page.eval_on_selector_all(
        selector, "els => els.map(e => e.getBoundingClientRect().right + window.scrollX)"
    )


# Per page: elements that must be on screen without scrolling sideways (inside a table's
# own scroll box too), at both sizes.
IN_VIEW = {
    "offices": ["tr[data-office] td", "tr[data-office] th"],
    "conflicts": ["tr[data-conflict] a", "tr[data-conflict] td"],
    "office": ["tr[data-event] td"],
    "rejected": ["tr[data-rejected] td"],
    "conflict": ['button[name="keep"]', "#value"],
    "resolved": ["#outcome dd"],
    "history": ["tr[data-seq] td"],
}


@pytest.fixture
def busy_hub(hub: Hub, make_office: Callable[..., Office]) -> dict[str, str]:
    """A hub with long values in conflicts, a long sync history, rejected changes and an
    audit log; the pages to look at, by name."""
    astana, almaty = make_office("astana"), make_office("almaty")
    kyiv = make_office("kyiv", scopes=("kyiv",))
    add_case(astana, "c1", notes="first")
    sync_all(astana, almaty)
    conflicting(astana, almaty, "family_name", (LONG_NAME + " (astana)", LONG_NAME + " (almaty)"))
    conflicting(astana, almaty, "notes", (LONG_TOKEN + "/a", LONG_TOKEN + "/b"))
    conflicting(astana, almaty, "status", ("closed", "rejected"))
    for number in range(30):  # a busy office: a sync every few seconds
        write(astana, "UPDATE cases SET household_size = ? WHERE id = 'c1'", number)
        astana.sync()
    add_case(kyiv, "k1", office="almaty")  # outside kyiv's scope: set aside
    kyiv.sync()
    assert hub.store.rejected("kyiv"), "kyiv's change was not rejected"
    conflicts = hub.store.conflicts()
    resolved = next(c for c in conflicts if c.column == "status")
    hub.store.resolve(resolved.id, "other", "ops")
    field = next(c for c in conflicts if c.column == "family_name")
    return {
        "offices": "/",
        "office": "/offices/astana",
        "rejected": "/offices/kyiv",
        "conflicts": "/conflicts",
        "conflict": f"/conflicts/{field.id}",
        "resolved": f"/conflicts/{resolved.id}",
        "history": "/records/cases?id=c1",
        "lookup": "/records",
        "hq": "/hq",
        "audit": "/audit",
    }


def test_every_page_fits_a_desktop_and_a_phone(
    hub: Hub, busy_hub: dict[str, str], browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    token = hub.store.add_admin("ops", "owner")
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.goto(hub.url + "/login")
    pages = {**busy_hub, "login": "/login"}
    heights: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for size_name, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        for name, path in pages.items():
            if name == "login":
                page.context.clear_cookies()
            elif "fieldsync_session" not in {c["name"] for c in page.context.cookies()}:
                page.goto(hub.url + "/login")
                page.get_by_label("Admin token").fill(token)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(hub.url + "/")
            response = page.goto(hub.url + path)
            assert response is not None and response.status == 200, f"{path}: {response}"
            found = measure(page)
            heights.setdefault(name, {})[size_name] = found["height"]
            if found["scroll"] > found["inner"]:
                problems.append(f"{size_name} {name}: page {found['scroll']} px wide")
            for selector in IN_VIEW.get(name, []):
                edges = right_edges(page, selector)
                assert edges, f"{name}: nothing matches {selector}"
                if max(edges) > found["inner"] + 1:
                    problems.append(f"{size_name} {name}: {selector} reaches {max(edges):.0f} px")
            if size_name == "phone" and found["height"] > PHONE_HEIGHTS[name]:
                problems.append(f"phone {name}: {found['height']} px tall")
    with capsys.disabled():
        print("\npage heights (px) at 1280x800 and 390x844:")
        for name, measured in heights.items():
            print(f"  {name:10} {measured['desktop']:6} {measured['phone']:6}")
    context.close()
    assert problems == []


def test_values_wrap_by_words_on_a_phone(
    hub: Hub, busy_hub: dict[str, str], browser: Browser
) -> None:
    """A long value takes a few lines at most, never one character per line."""
    token = hub.store.add_admin("ops", "owner")
    page = browser.new_page(viewport=PHONE)
    page.goto(hub.url + "/login")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(hub.url + "/")
    for path in (busy_hub["conflicts"], busy_hub["history"], busy_hub["conflict"]):
        page.goto(hub.url + path)
        boxes = page.eval_on_selector_all(
            ".value", "els => els.map(e => [e.textContent, e.getBoundingClientRect().width])"
        )
        for text, width in boxes:
            if len(text) >= 20:  # room for at least ~15 characters a line
                assert width >= 120, f"{path}: {text[:30]!r}… is {width:.0f} px wide"


def test_a_status_is_chosen_from_its_allowed_values(
    hub: Hub, make_office: Callable[..., Office], browser: Browser
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    sync_all(astana, almaty)
    conflicting(astana, almaty, "status", ("closed", "rejected"))
    [conflict] = hub.store.conflicts()
    token = hub.store.add_admin("ops", "resolver")
    for size in (DESKTOP, PHONE):
        page = browser.new_page(viewport=size)
        page.goto(f"{hub.url}/login?next=/conflicts/{conflict.id}")
        page.get_by_label("Admin token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{hub.url}/conflicts/{conflict.id}")
        choice = page.get_by_label("Or set status to")
        options = choice.locator("option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["asylum_seeker", "refugee", "rejected", "closed", "null"]
        box = choice.bounding_box()
        assert box is not None and box["x"] + box["width"] <= size["width"]
        page.close()
    page = browser.new_page(viewport=PHONE)
    page.goto(f"{hub.url}/login?next=/conflicts/{conflict.id}")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("Or set status to").select_option("refugee")
    page.get_by_role("button", name="Use this value").click()
    page.wait_for_url(f"{hub.url}/conflicts/{conflict.id}?done=1")
    assert page.locator("#outcome dd.kept-value").inner_text().strip() == "refugee"
    assert page.locator("#outcome dd.now-value").inner_text().strip() == "refugee"
    sync_all(astana, almaty)
    for office in (astana, almaty):
        with sqlite3.connect(office.path) as conn:
            [status] = conn.execute("SELECT status FROM cases WHERE id = 'c1'").fetchone()
        conn.close()
        assert status == "refugee"
