"""``taskgalaxy estimate CONFIG --from-run PILOT --images N``: a run of N images projected from what a pilot did.

Per LLM stage, the requests and prompt (cached included), cached and completion tokens of the pilot's finished
shards scale by N over the pilot's images (the images stage's rows; a stage stopped part-way: the share of its
input it finished). Cost per mode is ``cost_usd`` at each tier, with the pilot's cached share online and at
flex; Batch gets no cache discount. Ranges: 95 % prediction intervals from the per-image spread of the stage's
work (output rows per image; score: votes asked per image), sd * sqrt(1/n + 1/N); tokens per request are the
pilot's mean. The taxonomy does not grow with images: shown once, as the pilot spent it.

The referee cascade (``stages.score.cascade``): replayed on the full vote table of a pilot without it (config
order; a question's remaining referees skipped once ``final.threshold`` is decided), counted (votes not in
``not_asked``) on a pilot with it. Answer and blind referees are never cascaded.
"""

from __future__ import annotations

import logging

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from processors.llm.estimate import cost_usd

MODES = {"online": "standard", "flex": "flex", "batch": "batch"}
Z95 = 1.96
BASE_LATENCY_S, OUTPUT_TOKENS_PER_S = 1.0, 50.0  # assumed per request: a run folder records no latency
FIXED_STAGES = ("taxonomy",)  # spent once, whatever the number of images

logger = logging.getLogger(__name__)


@dataclass
class StageProjection:
    stage: str
    requests: float
    prompt_tokens: float  # cached included
    cached_tokens: float
    completion_tokens: float
    usd: dict[str, float]  # by mode: online, flex, batch
    rel_range: float  # the 95 % half-width, relative: every figure of the row is figure * (1 -/+ rel_range)
    scales: bool = True  # False: a one-off (the taxonomy), not scaled by images
    pilot_images_reached: int = 0
    wall_s: float | None = None  # at the configured limits, online; None: not projected (batch, GPU)

    def range(self, value: float) -> tuple[float, float]:
        return max(0.0, value * (1 - self.rel_range)), value * (1 + self.rel_range)


@dataclass
class RefereeProjection:
    full_requests: float  # every referee asked on every question
    cascade_requests: float
    full_rel_range: float
    cascade_rel_range: float
    by_referee: dict[str, tuple[float, float]]  # name -> (asked without, asked with the cascade), projected
    measured: bool  # True: the pilot ran the cascade (counted); False: the rule replayed on its votes

    @property
    def ratio(self) -> float:
        return self.cascade_requests / self.full_requests if self.full_requests else 1.0


@dataclass
class PilotEstimate:
    images: int
    pilot_images: int
    stages: list[StageProjection]
    referees: RefereeProjection | None
    from_pilot: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)

    def total_usd(self, mode: str) -> float:
        return sum(s.usd[mode] for s in self.stages)


def cascade_asked(votes: list[int | None], threshold: int) -> list[bool]:
    """Which of ``votes`` (in asking order) the cascade asks: the next referee only while the outcome is open.
    A missing vote (None) counts no yes, as the final stage counts it."""
    asked, yes = [], 0
    for index, vote in enumerate(votes):
        if yes >= threshold or yes + len(votes) - index < threshold:
            asked.append(False)
            continue
        asked.append(True)
        yes += vote or 0
    return asked


def spread(counts: list[float], pilot_n: float, target_n: float) -> float:
    """The relative 95 % half-width of a total of ``target_n`` images projected from ``counts`` per pilot image."""
    if len(counts) < 2 or not sum(counts) or not target_n:
        return 0.0
    mean = sum(counts) / len(counts)
    sd = math.sqrt(sum((c - mean) ** 2 for c in counts) / (len(counts) - 1))
    return Z95 * sd / mean * math.sqrt(1 / max(pilot_n, 1) + 1 / target_n)


def project_from_run(run_dir: Path, config, images: int, *, latency_s: float | None = None) -> PilotEstimate:
    """Project a run of ``images`` images under ``config`` (a loaded run config) from the pilot in ``run_dir``."""
    from builder.outputs import load_stage_output
    from builder.status import stage_summaries

    run_dir = Path(run_dir)
    pilot_n = len(load_stage_output(run_dir, "images", require_done=False))
    if not pilot_n:
        raise ValueError(f"{run_dir}: the pilot's images stage has no rows: nothing to project from")
    estimate = PilotEstimate(images=images, pilot_images=pilot_n, stages=[], referees=None)
    for summary in stage_summaries(run_dir):
        usage = _finished_usage(summary)
        if usage.get("requests", 0) <= 0 and summary["stage"] != "score":
            continue
        stage = summary["stage"]
        if usage.get("cache_hits"):  # replies from the request cache were not billed, so not counted either
            estimate.assumed.append(f"{stage}: {int(usage['cache_hits'])} of the pilot's replies came from its "
                                    "request cache and are NOT counted: rerun the pilot in a fresh run folder")
        covered = pilot_n * summary["rows_processed"] / max(summary["rows_in"], 1)  # a stage stopped part-way
        if stage == "score":
            counts, factor, shares = _score(run_dir, config, estimate, covered)
            if not usage.get("requests"):
                continue  # only local referees: GPU time, no API requests
        else:
            counts, factor, shares = _per_image_rows(run_dir, stage), 1.0, None
        estimate.stages.append(_stage(stage, usage, config, counts, covered, images, factor, shares, latency_s))
    _notes(estimate, run_dir, config, latency_s)
    return estimate


def _finished_usage(summary: dict) -> dict[str, float]:
    """What the finished shards paid: attempts that stopped, or ran under an earlier config, are left out."""
    stopped = summary.get("stopped_usage") or {}
    return {k: v - stopped.get(k, 0) for k, v in summary["usage"].items()}


def _per_image_rows(run_dir: Path, stage: str) -> list[int]:
    from builder.outputs import column_values, load_stage_output

    output = load_stage_output(run_dir, stage, require_done=False)
    if "image_id" not in output.column_names:
        return []
    return list(Counter(column_values(output, "image_id")).values())


def _stage(stage: str, usage: dict, config, counts: list[float], covered: float, images: int, factor: float,
           shares: dict[str, float] | None, latency_s: float | None) -> StageProjection:
    scales = stage not in FIXED_STAGES and bool(counts)
    if not scales and stage not in FIXED_STAGES:  # no output row to scale by: the pilot's spend as it is
        logger.warning("estimate: the pilot's %s stage has no output rows; its spend is shown unscaled", stage)
    k = (images / covered if covered else 0.0) * factor if scales else 1.0
    padded = counts + [0] * max(0, round(covered) - len(counts))  # images that never reached the stage
    requests, prompt, cached, completion, written = (k * usage.get(name, 0.0) for name in (
        "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cache_write_tokens"))
    models = shares if shares is not None else {getattr(getattr(config.stages, stage, None), "endpoint", None): 1.0}
    usd = {}
    for mode, tier in MODES.items():
        cache = (cached, written) if mode != "batch" else (0.0, 0.0)
        usd[mode] = sum(cost_usd(config.llm, _model(config, name), prompt * share, completion * share, tier=tier,
                                 cached_tokens=cache[0] * share, cache_write_tokens=cache[1] * share)
                        for name, share in models.items() if name)
    projection = StageProjection(stage, requests, prompt, cached, completion, usd,
                                 spread(padded, covered, images) if scales else 0.0, scales, len(counts))
    projection.wall_s = _wall(config, models, requests, prompt, completion, stage, latency_s)
    return projection


def _model(config, endpoint: str) -> str:  # an endpoint the config lacks: no price, $0
    return config.llm.endpoint(endpoint).model if endpoint in config.llm.endpoints else endpoint


def _wall(config, shares: dict[str, float], requests: float, prompt: float, completion: float, stage: str,
          latency_s: float | None) -> float | None:
    """Seconds at the configured limits, online: each endpoint runs its share in parallel, bounded by its rpm,
    its tpm (prompt + the reply cap, as admission reserves it) and max_concurrency x the latency."""
    if not requests:
        return None
    reply_cap = getattr(getattr(config.stages, stage, None), "max_tokens", None)
    latency = latency_s if latency_s is not None else BASE_LATENCY_S + completion / requests / OUTPUT_TOKENS_PER_S
    worst = 0.0
    for name, share in shares.items():
        if name not in config.llm.endpoints:
            continue
        endpoint = config.llm.endpoint(name)
        if endpoint.mode == "batch":
            return None  # the Batch API answers within its completion window, at its own pace
        n, headroom = requests * share, endpoint.rate_headroom * config.llm.budget_share
        bounds = [n * latency / endpoint.max_concurrency]
        if endpoint.rpm:
            bounds.append(n * 60 / (endpoint.rpm * headroom))
        if endpoint.tpm:
            bounds.append(n * (prompt / requests + (reply_cap or endpoint.max_tokens)) * 60 / (endpoint.tpm * headroom))
        worst = max(worst, *bounds)
    return worst or None


def _score(run_dir: Path, config, estimate: PilotEstimate, covered: float):
    """Per-image votes asked (as the config asks them), the factor from the pilot's asked votes to those, each
    endpoint's share of them, and ``estimate.referees``: requests with and without the cascade."""
    from builder.outputs import column_values, load_stage_output
    from processors.referees.factory import llm_endpoints

    rows = load_stage_output(run_dir, "score", require_done=False)
    score, final = config.stages.score, config.stages.final
    special = set(getattr(final, "answer_referees", [])) | set(getattr(final, "blind_referees", []))
    names = [r.name for r in score.referees]
    voting = [n for n in names if n not in special]
    endpoints = {r.name: llm_endpoints(r) for r in score.referees}
    has_cascade = "not_asked" in rows.column_names
    skipped = column_values(rows, "not_asked") if has_cascade else [[] for _ in range(len(rows))]
    full, cascade, pilot_asked = Counter(), Counter(), 0
    per_image_full, per_image_cascade = Counter(), Counter()
    for image, votes, not_asked in zip(column_values(rows, "image_id"), column_values(rows, "votes"), skipped):
        if has_cascade:
            asked = {n: n not in not_asked for n in voting}
        else:
            asked = dict(zip(voting, cascade_asked([votes.get(n) for n in voting], final.threshold)))
        for name in names:
            full[name] += 1
            cascade[name] += asked.get(name, True)  # answer and blind referees: always asked
            per_image_full[image] += 1 if endpoints[name] else 0
            per_image_cascade[image] += asked.get(name, True) if endpoints[name] else 0
            pilot_asked += (asked.get(name, True) if has_cascade else 1) if endpoints[name] else 0
    use = cascade if getattr(score, "cascade", False) else full
    target = sum(use[n] for n in names if endpoints[n])
    k = estimate.images / covered if covered else 0.0
    pad = [0] * max(0, round(covered) - len(per_image_full))
    estimate.referees = RefereeProjection(
        k * sum(full.values()), k * sum(cascade.values()),
        spread(list(per_image_full.values()) + pad, covered, estimate.images),
        spread(list(per_image_cascade.values()) + pad, covered, estimate.images),
        {n: (k * full[n], k * cascade[n]) for n in names}, measured=has_cascade)
    shares: Counter = Counter()
    for name in names:
        for endpoint in endpoints[name]:  # replicas share the referee's requests evenly
            shares[endpoint] += use[name] / len(endpoints[name]) / target if target else 0.0
    counts = list((per_image_cascade if use is cascade else per_image_full).values())
    return counts, (target / pilot_asked if pilot_asked else 1.0), dict(shares)


def _notes(estimate: PilotEstimate, run_dir: Path, config, latency_s: float | None) -> None:
    from builder.outputs import stage_state

    dry = bool(stage_state(run_dir, "images")[1].get("dry_run"))
    estimate.from_pilot += [
        f"{estimate.pilot_images:,} pilot images in {run_dir}" + (" (a dry run: simulated replies)" if dry else ""),
        "per stage: requests, prompt/cached/completion tokens per image (finished shards; stopped attempts left out)",
        "the cached share of prompt tokens (online and flex cost)",
        "the ranges: the per-image spread of each stage's output rows (score: votes asked per image), 95 %",
    ]
    if estimate.referees is not None:
        estimate.from_pilot.append("referee requests with the cascade: " + (
            "counted (the pilot ran it)" if estimate.referees.measured else "the rule replayed on the pilot's votes"))
    latency = (f"{latency_s:g} s per request" if latency_s is not None else
               f"latency per request = {BASE_LATENCY_S:g} s + reply tokens / {OUTPUT_TOKENS_PER_S:g} tok/s")
    estimate.assumed += [
        "tokens per request as the pilot's mean; the same share of images reaches each stage",
        f"wall time at the config's rpm, tpm (prompt + reply cap), max_concurrency; {latency} (not recorded)",
        "batch: no cache discount; no wall time (the Batch API's completion window); flex: at the flex price",
        "taxonomy: spent once, as in the pilot (it does not grow with images)",
        "prices and endpoints: the config's (CONFIG), not the pilot's",
    ]
    estimate.assumed += _gaps(estimate, config)


def _gaps(estimate: PilotEstimate, config) -> list[str]:
    """What the table leaves out or prices at another rate than it seems to."""
    from processors.pipeline import default_stages

    notes, projected = [], {s.stage for s in estimate.stages}
    for stage in default_stages():
        stage_config = getattr(config.stages, stage.name, None)
        fused = stage.name == "qa" and getattr(getattr(config.stages, "filter", None), "fuse_qa", False)
        if fused:  # its questions come from the filter's fused requests: nothing of its own to project
            continue
        if stage_config is not None and stage.llm_endpoints(stage_config) and stage.name not in projected:
            notes.append(f"{stage.name}: calls an LLM but the pilot has no finished shard of it: NOT projected")
    if any(s.usd["online"] and s.usd["flex"] == s.usd["online"] for s in estimate.stages):
        notes.append("flex: a model without a flex price in llm.prices is shown at the standard price")
    return notes


def format_pilot_estimate(estimate: PilotEstimate) -> str:
    head = (f"{'stage':<10} {'requests':>19} {'prompt tok':>19} {'cached':>7} {'compl. tok':>19} "
            f"{'online $':>25} {'flex $':>11} {'batch $':>11} {'wall h':>7}")
    lines = [f"projected from a pilot of {estimate.pilot_images:,} images to {estimate.images:,} images "
             "(each figure [its 95 % range])", head]
    for s in estimate.stages:
        wall = f"{s.wall_s / 3600:.1f}" if s.wall_s is not None else "-"
        lines.append(f"{s.stage:<10} {_ranged(s, s.requests):>19} {_ranged(s, s.prompt_tokens):>19} "
                     f"{_compact(s.cached_tokens):>7} {_ranged(s, s.completion_tokens):>19} "
                     f"{_ranged(s, s.usd['online'], money=True):>25} {s.usd['flex']:>11,.2f} "
                     f"{s.usd['batch']:>11,.2f} {wall:>7}")
    lines.append(f"{'total':<10} {_compact(sum(s.requests for s in estimate.stages)):>19} {'':>19} {'':>7} "
                 f"{'':>19} {estimate.total_usd('online'):>25,.2f} {estimate.total_usd('flex'):>11,.2f} "
                 f"{estimate.total_usd('batch'):>11,.2f}")
    r = estimate.referees
    if r is not None:
        lines.append(f"referee votes: {r.full_requests:,.0f} without the cascade (+/-{r.full_rel_range:.0%}), "
                     f"{r.cascade_requests:,.0f} with it (+/-{r.cascade_rel_range:.0%}): ratio {r.ratio:.2f}")
        lines += [f"  {name}: {full:,.0f} -> {cascaded:,.0f}" for name, (full, cascaded) in r.by_referee.items()]
    lines += [f"from the pilot: {note}" for note in estimate.from_pilot]
    lines += [f"assumed: {note}" for note in estimate.assumed]
    return "\n".join(lines)


def _ranged(s: StageProjection, value: float, *, money: bool = False) -> str:
    show = (lambda v: f"{v:,.2f}") if money else _compact
    if not s.rel_range:
        return show(value)
    low, high = s.range(value)
    return f"{show(value)} [{show(low)}-{show(high)}]"


def _compact(value: float) -> str:
    for unit, size, above in (("G", 1e9, 1e9), ("M", 1e6, 1e6), ("k", 1e3, 1e4)):
        if abs(value) >= above:
            return f"{value / size:.1f}{unit}"
    return f"{value:,.0f}"
