"""``taskgalaxy estimate``: requests, tokens and dollars of a config's LLM stages, before anything is spent.

The figures are projections, not promises: the number of images comes from a finished ``images`` stage or
from ``--images``; how many task types the filter keeps per image, the taxonomy's growth and the reply
lengths are assumptions printed beside the table (the paper kept 413,648 samples from ~825k images after
the referees). Endpoint referees run on your own GPUs: their requests are counted, their dollars are 0
unless the config prices their model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from processors.llm.estimate import Projection, project
from processors.llm.settings import LLMSettings

TAXONOMY_PROMPT_CHARS = 1_600  # instruction + the parent's existing children
TAXONOMY_REPLY_TOKENS_PER_CHILD = 14
FILTER_PROMPT_CHARS_PER_CANDIDATE = 48
FILTER_PROMPT_BASE_CHARS = 900
FILTER_REPLY_TOKENS = 60
REFEREE_PROMPT_CHARS = 700


@dataclass
class Assumptions:
    images: int
    kept_per_image: float = 2.5  # task types the filter keeps per image that passes
    filter_pass: float = 0.85  # share of images with at least one kept task type
    notes: list[str] = field(default_factory=list)


def taxonomy_requests(config) -> int:
    """Order of magnitude of the taxonomy's requests: rounds x parents per level (growth depends on replies)."""
    if not config.expand:
        return 0
    first = min(config.max_first_level, 30 + config.new_first_level_per_round * config.rounds_per_level)
    children = min(config.max_children, config.children_per_request * config.rounds_per_level)
    requests, parents = (config.rounds_per_level if config.new_first_level else 0), first
    for _ in range(2, config.levels + 1):
        requests += parents * config.rounds_per_level
        parents *= children
    return requests


def estimate(run_config, assumptions: Assumptions) -> list[tuple[str, Projection]]:
    llm: LLMSettings = getattr(run_config, "llm", None) or LLMSettings()
    stages = run_config.stages
    rows: list[tuple[str, Projection]] = []
    tax = stages.taxonomy
    rows.append(("taxonomy", project(
        llm, tax.endpoint, requests=taxonomy_requests(tax), prompt_text_chars=TAXONOMY_PROMPT_CHARS,
        completion_tokens=tax.children_per_request * TAXONOMY_REPLY_TOKENS_PER_CHILD)))
    flt = stages.filter
    candidates = min(flt.max_candidates, stages.match.top_k)
    rows.append(("filter", project(
        llm, flt.endpoint, requests=assumptions.images, images_per_request=1,
        prompt_text_chars=FILTER_PROMPT_BASE_CHARS + candidates * FILTER_PROMPT_CHARS_PER_CANDIDATE,
        completion_tokens=FILTER_REPLY_TOKENS)))
    from processors.qa.estimate import estimate_per_image

    passing = assumptions.images * assumptions.filter_pass
    per_image = estimate_per_image(stages.qa, llm, types_per_image=assumptions.kept_per_image)
    rows.append(("qa", Projection(math.ceil(passing * per_image.requests), round(passing * per_image.prompt_tokens),
                                  round(passing * per_image.completion_tokens), passing * per_image.cost_usd)))
    questions = round(passing * assumptions.kept_per_image * stages.qa.questions_per_type)
    for referee in stages.score.referees:
        if referee.resolved_preset().backend != "endpoint":
            assumptions.notes.append(f"referee {referee.name} runs locally: GPU time, no API requests")
            continue
        from processors.referees.endpoint import endpoint_names

        name = endpoint_names(referee)[0]
        if name in llm.endpoints:
            rows.append((f"score:{referee.name}", project(
                llm, name, requests=questions, images_per_request=1, prompt_text_chars=REFEREE_PROMPT_CHARS,
                completion_tokens=1)))
    return rows


def format_estimate(rows: list[tuple[str, Projection]], assumptions: Assumptions) -> str:
    lines = [f"{'stage':<24} {'requests':>12} {'prompt tok':>14} {'compl. tok':>12} {'cost $':>11}"]
    for name, p in rows:
        lines.append(f"{name:<24} {p.requests:>12,} {p.prompt_tokens:>14,} {p.completion_tokens:>12,} {p.cost_usd:>11,.2f}")
    lines.append(f"{'total':<24} {sum(p.requests for _, p in rows):>12,} {'':>14} {'':>12} "
                 f"{sum(p.cost_usd for _, p in rows):>11,.2f}")
    lines.append(f"assumptions: {assumptions.images:,} images, {assumptions.filter_pass:.0%} keep >= 1 task type, "
                 f"{assumptions.kept_per_image} kept types per image; taxonomy growth is an order of magnitude")
    lines += [f"note: {note}" for note in assumptions.notes]
    return "\n".join(lines)
