"""An operator asks the console "where is this change, and is the portal right?" in a real browser
(headless Chromium, JavaScript off): the History page, the Reconcile page and a confirmed repair.

Every state is made for real (``tests/support/history.py``: the worker against the sandbox, a
reconcile, a replay and a discard). With ``CERTSYNC_SCREENSHOT_DIR=docs/images`` these tests also
refresh the screenshots in docs/console.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from certsync.app import Runtime, open_runtime
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.e2e.conftest import ARTIFACTS
from tests.support.console import PASSWORD, USERNAME, console_settings
from tests.support.history import Planted, plant_every_state

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def screenshot_dir() -> Path:
    target = Path(os.environ.get("CERTSYNC_SCREENSHOT_DIR") or ARTIFACTS)
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    async with open_runtime(console_settings(database_url, sandbox)) as rt:
        yield rt


@pytest.fixture
async def planted(pool: Pool, runtime: Runtime, sandbox: SandboxServer) -> Planted:
    return await plant_every_state(pool, runtime, sandbox)


async def sign_in(page: Page, console_url: str, goto: str = "/") -> None:
    await page.goto(console_url + goto)
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    await page.get_by_label("Username").fill(USERNAME)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in", exact=True).click()


async def test_an_operator_searches_a_history_and_sees_its_changes(
    page: Page, console_url: str, planted: Planted
) -> None:
    await sign_in(page, console_url)
    await page.get_by_role("link", name="History", exact=True).click()
    await page.get_by_label("Id").fill(str(planted.superseded))
    await page.get_by_role("button", name="Show history").click()

    rows = page.locator(f"#certification-{planted.superseded} table.changes tbody tr")
    await expect(rows).to_have_count(3)
    await expect(rows.nth(0)).to_have_attribute("data-state", "superseded")
    await expect(rows.nth(0)).to_contain_text("by v3")
    await expect(rows.nth(2)).to_have_attribute("data-state", "delivered")
    await expect(page.locator(".verdict")).to_contain_text("agreed")

    # The queued change: every failed call with its answer, the operator's replay, a link to its entry.
    await page.get_by_label("Id").fill(str(planted.queued))
    await page.get_by_role("button", name="Show history").click()
    row = page.locator(f"#certification-{planted.queued} table.changes tbody tr")
    await expect(row).to_have_attribute("data-state", "queued")
    await expect(row.locator(".attempts li")).to_have_count(5)
    await expect(row.locator(".attempts li").nth(3)).to_contain_text("call 4: transient 503")
    await expect(row.locator(".attempts li").nth(4)).to_contain_text(f"replay by {USERNAME}: replayed")
    await page.screenshot(path=str(screenshot_dir() / "console-history.png"), full_page=True)

    # From the queue entry back to the history, and a deleted certification is still found.
    await row.get_by_role("link", name=f"entry {planted.queued_entry}").click()
    await page.locator("#entry-history").click()
    await expect(page.locator(f"#certification-{planted.queued}")).to_be_visible()
    await page.get_by_label("Id").fill(str(planted.deleted))
    await page.get_by_role("button", name="Show history").click()
    deleted = page.locator(f"#certification-{planted.deleted} table.changes tbody tr")
    await expect(deleted).to_have_count(2)
    await expect(deleted.nth(1)).to_have_attribute("data-state", "deleted")

    # A mentor's certifications, and an id nobody knows.
    await page.get_by_label("Id").fill(str(planted.mentor))
    await page.get_by_label("Of").select_option("mentor")
    await page.get_by_role("button", name="Show history").click()
    await expect(page.locator("section.history-of")).to_have_count(2)
    await page.get_by_label("Id").fill("00000000-0000-0000-0000-000000000000")
    await page.get_by_label("Of").select_option("certification")
    await page.get_by_role("button", name="Show history").click()
    await expect(page.locator("#history-error")).to_contain_text("no captured change for it")


async def test_an_operator_sees_the_mismatches_and_confirms_a_repair(
    page: Page, console_url: str, planted: Planted, runtime: Runtime
) -> None:
    await sign_in(page, console_url)
    await expect(page.locator('#reconcile dd[data-kind="missing"]')).to_have_text("1")
    await page.get_by_role("link", name="See the mismatches").click()

    mismatch = page.locator("table.mismatches tbody tr")
    await expect(mismatch).to_have_count(1)
    await expect(mismatch).to_contain_text("missing")
    await expect(mismatch).to_contain_text(str(planted.refused))
    await page.screenshot(path=str(screenshot_dir() / "console-reconcile.png"), full_page=True)
    await mismatch.get_by_role("link", name=str(planted.refused)).click()
    await expect(page.locator(".verdict")).to_contain_text("missing")
    await page.get_by_role("link", name="Reconcile", exact=True).click()

    # A POST without the session's CSRF token is refused, and nothing is queued.
    refused = await page.request.post(console_url + "/reconcile/repair", form={"csrf_token": "forged"})
    assert refused.status == 403
    assert (await runtime.history().certification(planted.refused)).counts.get("waiting", 0) == 0

    await page.get_by_role("link", name="Reconcile and repair…").click()
    await expect(page.locator('input[name="csrf_token"]')).to_have_count(2)  # sign-out and this form
    await page.get_by_role("button", name="Yes, reconcile and repair").click()
    await expect(page.locator("#repair-outcome h1")).to_have_text("Queued 1 correction")
    await expect(page.locator('#repair-outcome td[data-kind="missing"]')).to_have_text("1")

    history = await runtime.history().certification(planted.refused)
    assert [(c.operation_type, c.state) for c in history.changes][-1] == ("certification.repaired", "waiting")
