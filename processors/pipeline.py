"""The explicit stage list and the services a dry run needs. Adding a stage adds one line here (an LLM stage
one more: its simulator responder, in ``default_responders``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from builder.stage import Stage

if TYPE_CHECKING:
    from processors.simulator.responders import Responder

DRY_RUN_API_KEY = "sk-dry-run-simulator"  # the simulator accepts any key; this one is not a secret


def default_stages() -> list[Stage]:
    """The product's pipeline, in order (imports deferred so ``import processors`` stays cheap)."""
    from processors.stages.filter import FilterStage
    from processors.stages.final import FinalStage
    from processors.stages.images import ImagesStage
    from processors.stages.match import MatchStage
    from processors.stages.qa import QAStage
    from processors.stages.score import ScoreStage
    from processors.stages.taxonomy import TaxonomyStage

    return [TaxonomyStage(), ImagesStage(), MatchStage(), FilterStage(), QAStage(), ScoreStage(), FinalStage()]


def default_responders() -> list[Responder]:
    """The simulator's answer to each LLM stage's prompt, in pipeline order (taxonomy, filter, qa, score's
    referees), for ``--dry-run`` and ``taskgalaxy simulate-api``. The simulator imports no stage: it answers
    with what it is handed, this list unless a caller composes another."""
    from processors.filter.simulate import SIM_RESPONDER as filter_responder
    from processors.qa.simulate import SIM_RESPONDER as qa_responder
    from processors.referees.simulate import SIM_RESPONDER as referee_responder
    from processors.taxonomy.simulate import SIM_RESPONDER as taxonomy_responder

    return [taxonomy_responder, filter_responder, qa_responder, referee_responder]


def config_sections() -> dict[str, type[BaseModel]]:
    """Top-level config sections besides ``run`` and ``stages``."""
    from processors.publish.card import CardSettings
    from processors.llm.settings import LLMSettings

    return {"llm": LLMSettings, "card": CardSettings}


def check_credentials(config: Any, stages: list[Stage], *, dry_run: bool) -> None:
    """Before anything runs: every API key the selected stages will need is set (a dry run needs none).

    Raises ``MissingApiKeyError`` naming each stage, endpoint and environment variable at once."""
    if dry_run:
        return
    from processors.llm.errors import MissingApiKeyError

    llm = config.llm
    missing = []
    for stage in stages:
        for name in stage.llm_endpoints(getattr(config.stages, stage.name)):
            env = llm.endpoint(name).api_key_env
            if env and not os.environ.get(env):
                missing.append(f"stages.{stage.name} calls llm.endpoints.{name}, whose key is read from ${env}")
    if missing:
        raise MissingApiKeyError("API keys are missing, nothing was run:\n  - " + "\n  - ".join(missing)
                                 + "\nexport them (or set api_key_env: null for servers without authentication)")


def check_consistency(config: Any) -> None:
    """Settings that are each valid but cannot work together; raises ``ConfigError`` before anything runs."""
    from builder.config import ConfigError

    stages = config.stages
    problems = []
    score, final = getattr(stages, "score", None), getattr(stages, "final", None)
    if score is not None and final is not None:
        problems += _referee_problems(score, final)
    match, filt = getattr(stages, "match", None), getattr(stages, "filter", None)
    if match is not None and filt is not None and match.coverage_min \
            and filt.max_candidates < match.top_k + match.coverage_max_extra:
        problems.append(f"stages.match.coverage_min is on, but stages.filter.max_candidates "
                        f"({filt.max_candidates}) is less than stages.match.top_k + coverage_max_extra "
                        f"({match.top_k + match.coverage_max_extra}): the filter would never see the added candidates")
    qa = getattr(stages, "qa", None)
    if filt is not None and qa is not None and getattr(filt, "fuse_qa", False) and filt.endpoint != qa.endpoint:
        problems.append(f"stages.filter.fuse_qa is on, so the filter's endpoint ({filt.endpoint}) writes the questions "
                        f"and answers too, but stages.qa.endpoint names {qa.endpoint}: make them the same")
    llm = getattr(config, "llm", None)
    stage_caps = getattr(llm, "stage_max_cost_usd", None) or {}
    unknown = [name for name in stage_caps if not hasattr(stages, name)]
    if unknown:  # a typo would leave that stage without the cap its owner asked for
        problems.append(f"llm.stage_max_cost_usd names {', '.join(map(repr, unknown))}, which is no stage of this "
                        f"pipeline (its stages: {', '.join(type(stages).model_fields)})")
    if problems:
        raise ConfigError("config error: " + "; ".join(problems) + "; nothing was run")


def _referee_problems(score: Any, final: Any) -> list[str]:
    """The final stage's answer and text-only referees against the score stage's referees."""
    problems = []
    by_name = {r.name: r for r in score.referees}
    known = ", ".join(by_name)
    for key in ("answer_referees", "blind_referees"):
        unknown = [name for name in getattr(final, key) if name not in by_name]
        if unknown:
            problems.append(f"stages.final.{key} names {', '.join(map(repr, unknown))}, which stages.score does "
                            f"not have (its referees: {known})")
    unseen = [n for n in final.answer_referees if n in by_name and not by_name[n].see_answer]
    if unseen:
        problems.append(f"stages.final.answer_referees names {', '.join(map(repr, unseen))}, which never see the "
                        "answer: give them see_answer: true in stages.score.referees (an answer check must read it)")
    not_blind = [n for n in final.blind_referees if n in by_name and not by_name[n].blind]
    if not_blind:
        problems.append(f"stages.final.blind_referees names {', '.join(map(repr, not_blind))}, which see the image: "
                        "give them blind: true in stages.score.referees")
    from processors.referees.factory import runs_on_device

    for referee in score.referees:
        if referee.blind and runs_on_device(referee):
            problems.append(f"stages.score.referees[{referee.name}] has blind: true but runs locally (a local "
                            "referee always sees the image): serve it as an endpoint referee (docs/referees.md)")
        if referee.blind and referee.name not in final.blind_referees:
            problems.append(f"stages.score.referees[{referee.name}] has blind: true but is not named in "
                            "stages.final.blind_referees: its answers without the image would count as votes")
    special = set(final.answer_referees) | set(final.blind_referees)
    protocol = [r.name for r in score.referees if r.name not in special]
    if final.threshold > len(protocol):
        problems.append(f"stages.final.threshold is {final.threshold}, but stages.score has only {len(protocol)} "
                        f"referees that vote on the sample ({', '.join(protocol) or 'none'}; answer and blind "
                        "referees do not count): no sample could ever be kept")
    return problems


@contextlib.contextmanager
def start_dry_run_services(responders: Iterable[Responder] | None = None) -> Iterator[dict[str, Any]]:
    """The OpenAI-compatible simulator, in a background thread, for every LLM endpoint of the run; it answers
    with ``responders`` (None: ``default_responders()``)."""
    from processors.simulator.thread import SimulatorThread

    chosen = default_responders() if responders is None else responders
    with SimulatorThread(responders=chosen) as simulator:
        yield {"llm_base_url": simulator.base_url, "llm_api_key": DRY_RUN_API_KEY}
