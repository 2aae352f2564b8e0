"""A real headless Chromium driven by Playwright (the server is the shared one of tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = "install it with: apt-get update && apt-get install -y chromium (or set CHROMIUM=/path/to/chromium)"


@pytest.fixture(scope="module")
def browser():
    # Module scope: Playwright's sync API keeps an event loop running until it stops, which would
    # break asyncio.run() in tests that come after.
    # Fail, never skip: a missing browser must not pass CI silently.
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package 'playwright' is missing: pip install -r requirements-dev.txt")
    executable = shutil.which(CHROMIUM) or CHROMIUM
    if not Path(executable).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: {INSTALL_HINT}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    yield page
    context.close()
