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
