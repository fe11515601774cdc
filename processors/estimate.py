"""``taskgalaxy estimate``: requests, tokens and dollars of a config's LLM stages, before anything is spent.

The figures are projections, not promises: the number of images comes from a finished ``images`` stage or
from ``--images``; how many task types the filter keeps per image, the taxonomy's growth and the reply
lengths are assumptions printed beside the table (the paper kept 413,648 samples from ~825k images after
the referees). Endpoint referees run on your own GPUs: their requests are counted, their dollars are 0
unless the config prices their model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from processors.llm.estimate import Projection

@dataclass
class Assumptions:
    images: int
    kept_per_image: float = 2.5  # task types the filter keeps per image that passes
    filter_pass: float = 0.85  # share of images with at least one kept task type
    notes: list[str] = field(default_factory=list)


def estimate(run_config, assumptions: Assumptions, stages) -> list[tuple[str, Projection]]:
    """Every stage's own projection (``Stage.estimate``), in the order of ``stages`` (the pipeline's: the
    composer passes ``processors.pipeline.default_stages()``)."""
    rows: list[tuple[str, Projection]] = []
    for stage in stages:
        rows += stage.estimate(getattr(run_config.stages, stage.name), run_config, assumptions)
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
