"""A real browser (Debian's headless Chromium, driven by Playwright) uses the balancer-manager:
it logs in, sees the members, disables one through the form, and the proxy then sends that
member nothing. The page is saved as ``test-artifacts/manager.png`` (and a phone-sized one)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancerpool.proxy.admin import AdminAuth, hash_password, start_admin

from .conftest import Backends, get, pool_doc

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).exists(),
    reason="needs Playwright for Python (pip install playwright) and Debian's chromium "
           "(apt-get install chromium)")


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
async def test_browser_disables_a_member_through_the_form(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    a, b, c = backends.start("alpha"), backends.start("beta"), backends.start("gamma")
    proxy = await start_proxy(pool_doc([
        {"url": a.url, "name": "alpha", "route": "a"},
        {"url": b.url, "name": "beta", "route": "b", "loadfactor": 2},
        {"url": c.url, "name": "gamma", "route": "c", "status": "H"},
    ], stickysession="JSESSIONID|jsessionid"))
    for _ in range(6):
        assert (await get(client, proxy.url + "/"))[0] == 200
    auth = AdminAuth({"operator": hash_password("s3cret-pass", iterations=10_000)})
    runner, url = await start_admin(proxy.server.forwarder, "127.0.0.1", 0, auth=auth)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        async with async_playwright() as pw:
            # A fresh profile (--user-data-dir) for every run: Playwright sets it itself.
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
                http_credentials={"username": "operator", "password": "s3cret-pass"},
                viewport={"width": 1500, "height": 900})
            try:
                page = await context.new_page()
                response = await page.goto(url + "/balancer-manager")
                assert response is not None and response.status == 200
                for name in ("alpha", "beta", "gamma"):
                    assert await page.locator(f'form[data-member="{name}"]').count() == 1
                assert "balancer://test" in await page.content()
                # Disable beta with its edit form, as an operator would.
                row = page.locator("#member-test-beta")
                await row.locator("summary").click()
                await row.locator('input[name="status"][value="D"]').check()
                async with page.expect_navigation():
                    await row.locator('button[type="submit"]').click()
                assert "/balancer-manager?changed=" in page.url
                notice = await page.locator(".notice").inner_text()
                assert "member beta" in notice
                row = page.locator("#member-test-beta")
                assert "disabled" in await row.inner_text()
                await page.screenshot(path=str(ARTIFACTS / "manager.png"), full_page=True)
                await page.set_viewport_size({"width": 400, "height": 860})
                await page.screenshot(path=str(ARTIFACTS / "manager-phone.png"), full_page=False)
            finally:
                await context.close()
    finally:
        await runner.cleanup()
    beta = proxy.member("beta")
    assert beta.flags & 1 and beta.last_change.signal == "manager"
    served = len(b.requests())
    for _ in range(9):
        status, text, _ = await get(client, proxy.url + "/")
        assert status == 200 and text.strip() == "alpha"
    assert len(b.requests()) == served  # the disabled member got nothing
    assert (ARTIFACTS / "manager.png").stat().st_size > 10_000
