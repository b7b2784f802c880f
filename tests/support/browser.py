"""Real Chromium (Debian's, driven by Playwright) for the dashboard's browser tests: the launch, and a page that
records JavaScript errors and every URL it requests (the dashboard must work offline)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import REPO_ROOT

SHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORTS = {"desktop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (the test is skipped where it is not installed)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A Playwright page that records page errors and every URL it requests (for the offline check)."""

    def __init__(self, browser: Any, stack: Any, viewport: str = "desktop") -> None:
        self.viewport = viewport
        self.page = browser.new_page(viewport=VIEWPORTS[viewport])
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("request", lambda req: self.urls.append(req.url))
        self.stack = stack

    def open(self, path: str, ready: str) -> Any:
        self.page.goto(self.stack.base + path)
        self.page.wait_for_selector(ready, timeout=30_000)
        return self.page

    def attr(self, selector: str, name: str) -> str | None:
        return self.page.get_attribute(selector, name)

    def wait_attr(self, selector: str, name: str, check: Callable[[str], bool], timeout_ms: int = 60_000) -> str:
        self.page.wait_for_function(
            "([sel, name]) => { const e = document.querySelector(sel); return e && e.getAttribute(name) !== null; }",
            arg=[selector, name], timeout=timeout_ms)
        deadline = time.monotonic() + timeout_ms / 1000
        value = self.attr(selector, name) or ""
        while not check(value):
            assert time.monotonic() < deadline, f"{selector}[{name}] stayed {value!r}"
            time.sleep(0.2)
            value = self.attr(selector, name) or ""
        return value

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}-{self.viewport}.png"), full_page=True)

    def close(self) -> None:
        own = [u for u in self.urls if not u.startswith(self.stack.base) and not u.startswith("data:")]
        assert not own, f"the page requested other origins: {own}"
        assert not self.errors, f"JavaScript errors: {self.errors}"
        self.page.close()


def chart_data(page: Any, chart_id: str) -> list[list[float | None]]:
    return page.evaluate("id => document.querySelector(`[data-chart='${id}']`).excbChart.lastData", chart_id)
