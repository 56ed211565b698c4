"""/docs in a real browser: Swagger UI's "Try it out" creates a ticket on a real `headoni serve`.

Opt-in: needs Chromium (Debian's `chromium` package) and Playwright's Python package (the `browser`
extra); skips with the reason where either is missing. Playwright drives the system Chromium through
`executable_path`, so no browser is downloaded. Run it with:

    apt-get install -y chromium && .venv/bin/pip install -e '.[test,browser]' && .venv/bin/pytest tests/test_browser.py
"""

import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from bench.server import Server
from tests.support.desks import Desk

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = os.environ.get("HEADONI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Fit for a root user in a container without a display: no sandbox, no GPU, nothing fetched in the background.
FLAGS = [
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


async def test_try_it_out_on_docs_creates_a_ticket_in_chromium(
    server: Server, desk: Desk, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    playwright = pytest.importorskip(
        "playwright.async_api", reason="Playwright is not installed: pip install -e '.[browser]'"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set HEADONI_CHROMIUM)")

    origin = f"http://{desk.host}:{server.port}"  # the desk's own host, as the README says to open /docs
    screenshot = tmp_path / "docs-try-it-out.png"
    async with playwright.async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, chromium_sandbox=False, args=FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            await page.goto(f"{origin}/docs")
            await page.click("button.authorize")
            await page.fill(".auth-container input", desk.secret)
            await page.click(".auth-btn-wrapper button.authorize")
            await page.click("button.btn-done")

            operation = page.locator("#operations-tickets-createTicket")
            await operation.locator(".opblock-summary").click()
            await operation.locator("button.try-out__btn").click()
            await operation.locator("button.execute").click()
            answer = operation.locator(".live-responses-table tbody .response")
            await answer.wait_for(timeout=20_000)
            status = (await answer.locator(".response-col_status").inner_text()).strip()
            body = await answer.locator(".response-col_description pre").first.inner_text()
            request_url = await operation.locator(".request-url pre").inner_text()
            await answer.scroll_into_view_if_needed()
            await page.screenshot(path=screenshot)

            # The decision on CORS, as a browser applies it: a page of another origin (here the same
            # server on a host that names no desk) cannot call the API.
            await page.goto(f"http://localhost:{server.port}/docs")
            cross_origin = await page.evaluate(
                """async ([url, secret]) => {
                    try {
                        const r = await fetch(url, {headers: {Authorization: "Bearer " + secret}});
                        return "answered " + r.status;
                    } catch (e) { return "refused: " + e.message; }
                }""",
                [f"{origin}/api/v1/departments", desk.secret],
            )
        finally:
            await context.close()

    assert status == "201", (status, body, f"screenshot: {screenshot}")
    assert request_url.strip() == f"{origin}/api/v1/tickets"
    assert '"number": 1' in body and '"subject": "Login broken on staging"' in body, body
    ticket = await pool.fetchrow(
        "SELECT number, subject, priority FROM tickets WHERE desk_id = $1", desk.desk_id
    )
    assert ticket is not None and tuple(ticket) == (1, "Login broken on staging", "high")
    assert cross_origin.startswith("refused"), cross_origin
    assert screenshot.stat().st_size > 10_000, "the screenshot is empty"
