"""Shared test setup: offline Hugging Face, caches in a temporary folder, the test-only toy stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TESTS_DIR = Path(__file__).parent
# Tests import their helper modules (toy_stages, local_http, llm_helpers...) by name; with pytest's
# importlib import mode the test folders are not on sys.path by themselves.
for folder in (TESTS_DIR, *sorted(p for p in TESTS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__")):
    sys.path.insert(0, str(folder))


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))


def pytest_terminal_summary(terminalreporter):
    """Say so when the browser tests did not run (no Chromium or no Playwright here): CI installs Chromium
    (``.ci/run``), a plain ``./scripts/test.sh`` on a machine without one skips them."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "chromium" in reason.lower() or "playwright" in reason.lower():
            reasons.append(reason.removeprefix("Skipped: "))
    if reasons:
        terminalreporter.write_line(
            f"browser tests skipped: {len(reasons)} ({'; '.join(sorted(set(reasons)))}). They run where Chromium "
            "is installed: apt-get install chromium (CI's .ci/run does it as root).", yellow=True)
