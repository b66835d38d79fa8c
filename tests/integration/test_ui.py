"""The web page in a real browser: Debian's Chromium, driven by Playwright,
against `dbprov serve --no-auth` on the real engine. A person creates a
database, copies its URI, connects with it and deletes it.

``DBPROV_UI_SCREENSHOT=docs/ui.png`` also saves the list, with a few
databases in it, as the README's picture.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psycopg
import pytest

# Its module-scoped fixture is made once: the module runs on one xdist worker.
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("test_ui")]

# Debian's package (apt-get install chromium); Playwright never downloads a browser here.
CHROMIUM = os.environ.get("DBPROV_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("DBPROV_UI_SCREENSHOT")
# Each step waits at most this long (ms); the whole test stays well under a minute.
STEP = 20_000


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what}, and CI must run the browser test")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def test_create_copy_the_uri_connect_and_delete_in_a_browser(service, browser):
    from playwright.sync_api import expect

    context = browser.new_context(base_url=service.url, viewport={"width": 1280, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    page = context.new_page()
    page.set_default_timeout(STEP)
    # A script error or a refused resource (CSP) shows up on the console.
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))

    # --no-auth: no sign-in, straight to the list.
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/databases$"))
    expect(page.get_by_text("authentication off")).to_be_visible()

    page.get_by_label("PostgreSQL version").select_option("17")
    page.get_by_label("Name").fill("from-the-browser")
    page.get_by_label("Expires after").select_option(label="1 hour")
    page.get_by_role("button", name="Create database").click()
    expect(page).to_have_url(re.compile(r"/ui/databases/[0-9a-f]{12}$"))
    database_id = page.url.rsplit("/", 1)[1]
    # The page follows the status by itself until the server is ready.
    expect(page.locator("#status")).to_have_text("ready", timeout=45_000)

    page.get_by_role("button", name="Copy URI").click()
    expect(page.locator("#copy-result")).to_have_text(re.compile("^Copied"))
    uri = page.evaluate("navigator.clipboard.readText()")
    assert uri.startswith("postgresql://app:") and "•" not in uri
    with psycopg.connect(uri, connect_timeout=10) as connection:
        assert connection.execute("SELECT current_user, 1 + 1").fetchone() == ("app", 2)
    # The password the page reveals is the one copied.
    page.get_by_role("button", name="Reveal password").click()
    expect(page.locator("#uri")).to_have_text(uri)
    expect(page.get_by_role("cell", name="ready", exact=True)).to_be_visible()  # its events

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Databases").click()
    row = page.locator(f'tr[data-id="{database_id}"]')
    expect(row.locator('[data-field="status"]')).to_have_text("ready")
    expect(row.locator('[data-field="expires"]')).to_have_text(re.compile(r"in (59|60) min"))
    if SCREENSHOT:
        _screenshot(service, page, SCREENSHOT)

    row.get_by_role("link", name="from-the-browser").click()
    page.get_by_role("link", name="Delete…").click()
    expect(page.get_by_role("heading", name="Delete from-the-browser?")).to_be_visible()
    page.get_by_role("button", name="Delete database").click()
    expect(page.get_by_role("status").filter(has_text="is being deleted")).to_be_visible()
    # The list drops it once it is gone.
    expect(page.locator(f'tr[data-id="{database_id}"]')).to_have_count(0, timeout=30_000)
    assert service.request("GET", f"/databases/{database_id}").json()["status"] == "deleted"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(uri, connect_timeout=3).close()

    assert problems == []
    context.close()


def _screenshot(service, page, path: str) -> None:
    """The list with a few more databases in it, in several states."""
    from playwright.sync_api import expect

    more = [
        service.request("POST", "/databases", json={"name": "orders-ci", "version": "15", "ttl": 1800}).json(),
        service.request("POST", "/databases", json={"name": "reporting", "plan": "default"}).json(),
    ]
    service.request("POST", f"/databases/{more[1]['id']}/stop")
    service.wait_for_status(more[1]["id"], "stopped")
    service.request("POST", "/databases", json={"name": "feature-login"}, headers={"Prefer": "respond-async"})
    page.reload()
    expect(page.locator("tbody tr")).to_have_count(4)
    # As tall as the page's content, no more.
    page.set_viewport_size({"width": 1100, "height": 300})
    page.screenshot(path=path, full_page=True)
    page.set_viewport_size({"width": 1280, "height": 860})
