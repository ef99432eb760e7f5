"""A real headless browser for the dashboard's pages: Debian's Chromium, driven by Playwright (scripts/setup-system.sh
installs Chromium; Playwright comes with the test extras). Tests that need one skip, saying so, where it is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("needs chromium for a real browser (scripts/setup-system.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extras)")
    return path


@contextlib.contextmanager
def opened(url: str) -> Iterator[Any]:
    """A page at ``url``; ``page.errors`` collects its console errors and uncaught exceptions."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.errors = []
            page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.goto(url)
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot: into bench/ when P2PTRAIN_SCREENSHOTS=1 (to commit), else beside the test's files."""
    path = (BENCH if os.environ.get("P2PTRAIN_SCREENSHOTS") == "1" else tmp_path) / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, path  # a page, not a blank
    return path
