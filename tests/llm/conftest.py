"""Fixtures for the LLM engine tests: a simulator over real HTTP on 127.0.0.1 and a StageContext around it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # llm_helpers

from llm_helpers import KEY_ENV, TEST_KEY, fast_settings, make_ctx  # noqa: E402

from processors.pipeline import default_responders  # noqa: E402
from processors.simulator.core import SimulatorOptions  # noqa: E402
from processors.simulator.thread import SimulatorThread  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    return TEST_KEY


@pytest.fixture
def simulator():
    """``simulator(responders=None, **options)`` starts one answering with ``responders`` (None: the pipeline's,
    as under ``--dry-run``); all are stopped at the end of the test."""
    started: list[SimulatorThread] = []

    def start(responders=None, **options) -> SimulatorThread:
        chosen = default_responders() if responders is None else responders
        sim = SimulatorThread(SimulatorOptions(**options), responders=chosen).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.close()


@pytest.fixture
def ctx_for(tmp_path, api_key):
    """``ctx_for(sim, **endpoint_overrides)``: a StageContext whose llm endpoint "sim" points at ``sim``."""

    def build(sim, *, run_dir: Path | None = None, breaker: int = 25, cache: bool = True, **overrides):
        settings = fast_settings(sim.base_url, breaker=breaker, cache=cache, **overrides)
        return make_ctx(run_dir or tmp_path / "run", settings)

    return build
