"""An operator at the console in a real browser (headless Chromium, JavaScript off: plain forms must do).

The entries are made by real failed deliveries: the worker sends to the sandbox while it answers 503.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, expect

from certsync.app import Runtime, open_runtime
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.e2e.conftest import ARTIFACTS
from tests.support.console import (
    PASSWORD,
    USERNAME,
    console_settings,
    failed_deliveries,
    portal_answers,
)
from tests.support.runtime import FAST
from tests.support.seed import seed_certifications

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    """The worker's side: delivers (and fails) in the test's own loop, like a separate process."""
    async with open_runtime(console_settings(database_url, sandbox)) as rt:
        yield rt


async def sign_in(page: Page, console_url: str, goto: str = "/") -> None:
    await page.goto(console_url + goto)
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    await page.get_by_label("Username").fill(USERNAME)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in", exact=True).click()


async def test_an_operator_sees_a_real_failed_delivery_and_replays_it_once_the_portal_recovers(
    page: Page, console_url: str, pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    await seed_certifications(pool, 3)
    await runtime.worker(FAST, listen=False).run(once=True)
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    portal_answers(sandbox, 503)  # still down while the operator looks

    await sign_in(page, console_url)
    await expect(page.get_by_role("heading", name=re.compile("^Overview"))).to_be_visible()
    await expect(page.locator('td[data-status="pending"]')).to_have_text("1")
    await expect(page.locator("#deliveries .big")).to_contain_text("3")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-overview.png"), full_page=True)

    await page.get_by_role("link", name="pending").click()
    row = page.locator("table.entries tbody tr")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("retries exhausted after 4 attempt(s)")
    await row.get_by_role("link", name=str(entry_id)).click()
    await expect(page.locator("#entry-status")).to_have_text("pending")

    portal_answers(sandbox, None)  # the portal is back
    await page.get_by_role("button", name="Replay now").click()

    await expect(page.locator("#entry-status")).to_have_text("replayed")
    await expect(page.get_by_role("status")).to_contain_text("Replayed")
    await expect(page.locator("table.history")).to_contain_text(USERNAME)
    entry = await runtime.queue.get(entry_id)
    assert (entry.status, entry.last_replayed_by) == ("replayed", USERNAME)


async def test_an_operator_discards_an_entry_giving_a_reason(
    page: Page, console_url: str, pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    await sign_in(page, console_url, goto=f"/queue/{entry_id}")
    await expect(page.locator("#entry-status")).to_have_text("pending")

    await page.get_by_label("Reason").fill("certification withdrawn by HLF")
    await page.get_by_role("button", name="Discard").click()

    await expect(page.locator("#entry-status")).to_have_text("discarded")
    await expect(page.locator("dl.facts")).to_contain_text(f"{USERNAME}: certification withdrawn by HLF")
    entry = await runtime.queue.get(entry_id)
    assert (entry.discarded_reason, entry.discarded_by) == ("certification withdrawn by HLF", USERNAME)


async def test_a_filtered_replay_shows_how_many_before_it_acts(
    page: Page, console_url: str, pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    ids = await failed_deliveries(pool, runtime, sandbox, count=2)
    await sign_in(page, console_url, goto="/queue")
    await page.get_by_label("Status").select_option("pending")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_role("link", name="Replay selection…").click()

    await expect(page.get_by_role("heading", name="Replay 2 entries?")).to_be_visible()
    await page.get_by_role("button", name="Yes, replay 2").click()

    await expect(page.get_by_role("heading", name="Replay: 2 entries")).to_be_visible()
    assert {(await runtime.queue.get(i)).status for i in ids} == {"replayed"}


async def test_a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing(
    page: Page, console_url: str, pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    portal_answers(sandbox, None)
    await sign_in(page, console_url, goto=f"/queue/{entry_id}")
    await expect(page.locator("#entry-status")).to_have_text("pending")

    # The browser's own session cookie goes with it; only the form's token is missing.
    response = await page.request.post(f"{console_url}/queue/{entry_id}/replay", form={"reason": "x"})

    assert response.status == 403
    assert "CSRF" in await response.text()
    assert (await runtime.queue.get(entry_id)).status == "pending"


async def test_another_site_cannot_post_a_form_with_the_operators_session(
    page: Page, console_url: str, pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    await sign_in(page, console_url)
    # A page from elsewhere with a self-made form: the strict same-site cookie does not go with it.
    attacker = f'<form method="post" action="{console_url}/queue/{entry_id}/discard">'
    attacker += '<input name="reason" value="gone"><button>Win a prize</button></form>'
    await page.goto("data:text/html," + attacker)
    await page.get_by_role("button", name="Win a prize").click()

    await expect(page.locator("body")).to_contain_text("Not signed in")
    assert (await runtime.queue.get(entry_id)).status == "pending"
