"""A real headless Chromium for the page tests: the system's browser (CI's ``.ci/run`` installs it as root),
driven by Playwright's real key events where a test types. Tests skip, saying why, where either is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(n)), None)
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the dev extra is not installed
    sync_playwright = None


def skip_reason(*, playwright: bool = True) -> str | None:
    """Why a browser test cannot run here, or None."""
    if CHROMIUM is None:
        return "no Chromium installed (apt-get install chromium)"
    if playwright and sync_playwright is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium_browser() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``), closed on leaving."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()
