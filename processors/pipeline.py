"""The explicit stage list and the services a dry run needs. Adding a stage adds one line here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from builder.stage import Stage

DRY_RUN_API_KEY = "sk-dry-run-simulator"  # the simulator accepts any key; this one is not a secret


def default_stages() -> list[Stage]:
    """The product's pipeline, in order (imports deferred so ``import processors`` stays cheap)."""
    from processors.stages.filter import FilterStage
    from processors.stages.final import FinalStage
    from processors.stages.images import ImagesStage
    from processors.stages.match import Match
    from processors.stages.qa import QAStage
    from processors.stages.score import ScoreStage
    from processors.stages.taxonomy import TaxonomyStage

    return [TaxonomyStage(), ImagesStage(), Match(), FilterStage(), QAStage(), ScoreStage(), FinalStage()]


def config_sections() -> dict[str, type[BaseModel]]:
    """Top-level config sections besides ``run`` and ``stages``."""
    from processors.llm.settings import LLMSettings

    return {"llm": LLMSettings}


@contextlib.contextmanager
def start_dry_run_services() -> Iterator[dict[str, Any]]:
    """The OpenAI-compatible simulator, in a background thread, for every LLM endpoint of the run."""
    from processors.llm.sim_thread import SimulatorThread

    with SimulatorThread() as simulator:
        yield {"llm_base_url": simulator.base_url, "llm_api_key": DRY_RUN_API_KEY}
