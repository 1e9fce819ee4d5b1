"""Headless Chromium for the browser tests: Playwright drives Debian's /usr/bin/chromium (no `playwright install`,
no download); a test that needs it is skipped with the reason when either is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """One Chromium for all the tests of a module."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package when it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
