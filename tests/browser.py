"""Headless Chromium for the page tests: Debian's `chromium`, driven by Playwright.

Without chromium the browser tests skip with the reason, except in CI (CI=true),
where they fail: CI installs chromium, so a missing one is a broken CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # This machine's network is closed: keep Chromium from dialling out at start.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Records every <progress> value change and every EventSource the page opens, so
# tests can check what happened over time, not just the final state.
RECORDER = """
window.__bars = [];
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target;
    if (el.tagName === "PROGRESS") {
      const card = el.closest(".task");
      window.__bars.push({ id: card?.querySelector(".task-id")?.textContent,
                           value: el.getAttribute("value"), max: el.getAttribute("max") });
    }
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["value", "max"] });
window.__streams = { opened: [], open: 0, maxOpen: 0 };
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    const s = window.__streams;
    s.opened.push(String(url)); s.open += 1; s.maxOpen = Math.max(s.maxOpen, s.open);
    this.__closed = false;
  }
  close() {
    if (!this.__closed) { this.__closed = true; window.__streams.open -= 1; }
    super.close();
  }
};
"""


def chromium_path() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    reason = None
    if found is None:
        reason = "Debian's chromium is not installed (apt-get install chromium): browser tests skipped"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -e '.[test]'): browser tests skipped"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason.replace("skipped", "required in CI"))
        pytest.skip(reason)
    assert found is not None
    return found


class Page:
    """A Playwright page plus what the page did: console errors, dialogs, screenshots."""

    def __init__(self, page: Any, shots: Path, name: str) -> None:
        self.page = page
        self.shots = shots
        self.name = name
        self.errors: list[str] = []
        self.forgiven: list[str] = []
        self.dialogs: list[str] = []

    def forgive(self, *fragments: str) -> None:
        """Drop console errors a test caused on purpose (Chromium logs every failed
        request), including ones Chromium reports later, up to the end of the test."""
        self.forgiven.extend(fragments)
        self.errors[:] = self.unexpected_errors()

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(f in e for f in self.forgiven)]

    async def screenshot(self, label: str) -> Path:
        path = self.shots / f"{self.name}--{label}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def card(self, task_id: str) -> Any:
        return self.page.locator(".task", has=self.page.locator(".task-id", has_text=task_id))

    async def wait_state(self, task_id: str, *states: str, timeout: float = 30) -> str:
        card = self.card(task_id)
        selector = ", ".join(f'[data-state="{s}"]' for s in states)
        await card.and_(self.page.locator(selector)).wait_for(timeout=timeout * 1000)
        state: str = await card.get_attribute("data-state")
        return state

    async def bar_values(self, task_id: str) -> list[dict[str, Any]]:
        values: list[dict[str, Any]] = await self.page.evaluate(
            "(id) => window.__bars.filter((b) => b.id === id)", task_id
        )
        return values

    async def streams(self) -> dict[str, Any]:
        streams: dict[str, Any] = await self.page.evaluate("() => window.__streams")
        return streams


@contextlib.asynccontextmanager
async def open_browser(shots: Path, name: str) -> AsyncIterator[Page]:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1100, "height": 900})
            await context.add_init_script(RECORDER)
            page = await context.new_page()
            wrapped = Page(page, shots, name)
            page.on("console", lambda m: wrapped.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: wrapped.errors.append(str(e)))

            async def on_dialog(dialog: Any) -> None:
                wrapped.dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            yield wrapped
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def page_for_test(test_name: str, output_dir: Path, *init_scripts: str) -> AsyncIterator[Page]:
    """The page of one browser test (screenshots named after it), and afterwards the
    check every page passes: no CSP violation, no script error, no alert from task text."""
    shots = output_dir / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    async with open_browser(shots, name) as browser_page:
        for script in init_scripts:
            await browser_page.page.context.add_init_script(script)
        yield browser_page
    assert browser_page.unexpected_errors() == [], browser_page.errors
    assert browser_page.dialogs == []
