#!/usr/bin/env python
"""What a run costs, and what each lever saves: the same synthetic images through filter, qa, score and final
under the simulator (``--dry-run``, priced as the configured models), one variant per lever.

  cascade    the score stage with and without ``stages.score.cascade`` (three endpoint referees, threshold
             2): referee requests with over without -> referee_calls_ratio, the final samples identical ->
             kept_identical; beside it the ratio the pilot's pairwise agreement predicts
             (``predicted_ratio``: 2 + share of questions where the first two disagree, over 3)
  modes      usd_per_1k_final online, flex and batch (``mode`` of the GPT endpoint; flex with capacity 429s
             and a fall-back to the standard tier), and online with ``stages.filter.fuse_qa`` (filter and QA in one request)
  cap        the filter stage under stage caps from one request's worth up: the largest amount spent above a
             cap -> cap_overshoot_usd (must be 0)
  estimate   a pilot of ``--pilot`` images projects the ``--images`` run (``estimate --from-run``): the largest
             relative error over requests, tokens and cost of the LLM stages -> estimate_error (goal <= 0.10)
  cache      filter then QA on each image with the cache-friendly prompt layout at image_detail high and the
             simulator's model of OpenAI's prompt cache -> qa_cached_share (QA input tokens served from it)

The GPT endpoint is ``--model`` (default gpt-5: it has a flex tier; gpt-4o has none and bills flex at the
standard price). The last line printed is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_cost")
LLM_STAGES = ("filter", "qa", "score")
REFEREES = [
    {"name": "glm4v_9b", "preset": "glm-4v-9b", "endpoint": {"endpoint": "referee_a"}},
    {"name": "internvl_chat_v15", "preset": "internvl-chat-v1.5", "endpoint": {"endpoint": "referee_b"}},
    {"name": "internvl2_26b", "preset": "internvl2-26b", "endpoint": {"endpoint": "referee_c"}},
]


def base_config(images: int, model: str) -> dict:
    gpt = {"model": model, "image_detail": "low", "image_max_side": 512, "max_concurrency": 128,
           "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "batch_poll_s": 0.2}
    referee = {"api_key_env": None, "max_concurrency": 64}
    return {
        "run": {"name": "bench-cost", "shard_size": 250},
        "llm": {"endpoints": {
            "gpt4o": gpt,
            "referee_a": {**referee, "base_url": "http://localhost:8001/v1", "model": "glm-4v-9b"},
            "referee_b": {**referee, "base_url": "http://localhost:8002/v1", "model": "internvl-chat-v1.5"},
            "referee_c": {**referee, "base_url": "http://localhost:8003/v1", "model": "internvl2-26b"},
        }},
        "stages": {
            "taxonomy": {"levels": 3, "rounds_per_level": 1, "children_per_request": 5,
                         "new_first_level_per_round": 8, "max_tokens": 400, "plots": False},
            "images": {"sources": [{"type": "synthetic", "count": images, "seed": 11}]},
            "match": {"model": "tg-tiny-clip", "pretrained": None, "top_k": 10},
            "filter": {"endpoint": "gpt4o"},
            "qa": {"endpoint": "gpt4o"},
            "score": {"referees": REFEREES},
            "final": {"threshold": 2, "reports": False},
        },
    }


def variant(config: dict, **changes) -> dict:
    """``config`` with dotted keys replaced: ``variant(c, **{"stages.score.cascade": True})``."""
    out = copy.deepcopy(config)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = out
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return out


class Bench:
    def __init__(self, tmp: Path, sim_options: dict):
        from processors.pipeline import DRY_RUN_API_KEY, default_responders
        from processors.simulator.core import SimulatorOptions
        from processors.simulator.thread import SimulatorThread

        self.tmp = tmp
        self.sim = SimulatorThread(SimulatorOptions(**sim_options), responders=default_responders()).start()
        self.services = {"llm_base_url": self.sim.base_url, "llm_api_key": DRY_RUN_API_KEY}
        self.count = 0

    def close(self) -> None:
        self.sim.close()

    def write(self, config: dict) -> Path:
        self.count += 1
        path = self.tmp / f"config-{self.count}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def run(self, config: dict, run_dir: Path, stages) -> tuple[int, float]:
        """(exit code, seconds): 0, or the exit code of the error that stopped the run (3: the spend cap)."""
        from processors.session import open_run

        started = time.monotonic()
        try:
            open_run(self.write(config), run_dir=run_dir, dry_run=True, services=self.services,
                     progress=False).run(set(stages))
            code = 0
        except Exception as exc:  # noqa: BLE001 - a capped run stops with the cap's error, which is measured
            from processors.llm.errors import SpendCapReached

            cause = exc
            while cause is not None and not isinstance(cause, SpendCapReached):  # the runner wraps it
                cause = cause.__cause__
            if cause is None:
                raise
            code = cause.exit_code
        return code, time.monotonic() - started


def copy_base(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("run.lock"))
    return target


def stages_of(run_dir: Path) -> dict[str, dict]:
    from builder.status import stage_summaries

    return {s["stage"]: s for s in stage_summaries(run_dir)}


def kept_ids(run_dir: Path) -> set[str]:
    from builder.outputs import column_values, load_stage_output

    return set(column_values(load_stage_output(run_dir, "final"), "qa_id"))


def usd_per_1k_final(run_dir: Path) -> float:
    stages = stages_of(run_dir)
    spent = sum(stages[name].get("cost_usd") or 0.0 for name in ("filter", "qa", "score"))
    return round(1000 * spent / max(1, stages["final"]["rows_out"]), 4)


def predicted_ratio(run_dir: Path) -> float:
    """What the pairwise agreement of the first two referees predicts: they vote on every question, the third
    only where they disagree."""
    from builder.outputs import column_values, load_stage_output

    votes = column_values(load_stage_output(run_dir, "score"), "votes")
    first, second = REFEREES[0]["name"], REFEREES[1]["name"]
    disagree = sum(1 for v in votes if v[first] != v[second]) / max(1, len(votes))
    return round((2 + disagree) / 3, 4)


def cascade_and_modes(bench: Bench, config: dict, base: Path) -> dict:
    rest = ("filter", "qa", "score", "final")
    runs = {
        "online": variant(config),
        "cascade": variant(config, **{"stages.score.cascade": True}),
        "flex": variant(config, **{"llm.endpoints.gpt4o.mode": "flex", "llm.endpoints.gpt4o.flex_fallback_after": 3}),
        "batch": variant(config, **{"llm.endpoints.gpt4o.mode": "batch"}),
        "fused": variant(config, **{"stages.filter.fuse_qa": True}),
    }
    out, dirs = {}, {}
    for name, cfg in runs.items():
        dirs[name] = copy_base(base, bench.tmp / name)
        _, seconds = bench.run(cfg, dirs[name], rest)
        out[f"{name}_s"] = round(seconds, 1)
        print(f"{name}: {seconds:.1f} s, usd/1k final {usd_per_1k_final(dirs[name])}", flush=True)
    score_full, score_cascade = stages_of(dirs["online"])["score"], stages_of(dirs["cascade"])["score"]
    out["referee_calls_ratio"] = round(score_cascade["requests"] / score_full["requests"], 4)
    out["predicted_ratio"] = predicted_ratio(dirs["online"])
    out["kept_identical"] = int(kept_ids(dirs["cascade"]) == kept_ids(dirs["online"]))
    for name in ("online", "flex", "batch", "fused"):
        out[f"usd_per_1k_final_{name}"] = usd_per_1k_final(dirs[name])
    out["final_rows"] = stages_of(dirs["online"])["final"]["rows_out"]
    out["questions"] = score_full["rows_out"]
    return out, dirs["online"]


def cap_overshoot(bench: Bench, config: dict, base: Path, reference: Path) -> dict:
    from processors.llm.estimate import cost_usd
    from processors.session import load_run_config

    filt = stages_of(reference)["filter"]
    usage = filt["usage"]
    settings = load_run_config(bench.write(config)).llm
    # One request's worst case as the cap admits it: its prompt (the pilot's largest is below 1.5x the mean)
    # and all of its max_tokens at the standard price.
    prompt = 1.5 * usage["prompt_tokens"] / max(1, usage["requests"])
    worst = cost_usd(settings, settings.endpoint("gpt4o").model, prompt, config["stages"]["filter"].get("max_tokens", 400))
    # The smallest cap: about one request wide (the engine's own worst case also counts the image at its
    # largest size, so it may be a little more than this one: then nothing fits, which is measured too).
    caps = [worst * 1.5, worst * 3, filt["cost_usd"] / 4, filt["cost_usd"] / 1.5]
    worst, stopped = 0.0, 0
    for i, cap in enumerate(caps):
        run_dir = copy_base(base, bench.tmp / f"cap-{i}")
        code, _ = bench.run(variant(config, **{"llm.stage_max_cost_usd": {"filter": cap}}), run_dir, ("filter",))
        spent = stages_of(run_dir)["filter"].get("cost_usd") or 0.0
        stopped += code == 3
        worst = max(worst, spent - cap)
        print(f"cap ${cap:.5f}: exit {code}, spent ${spent:.5f}", flush=True)
    return {"cap_overshoot_usd": round(max(0.0, worst), 6), "caps_tried": len(caps), "caps_stopped": stopped}


def estimate_error(bench: Bench, config: dict, pilot_images: int, images: int, reference: Path) -> dict:
    from processors.estimate_pilot import project_from_run

    pilot = bench.tmp / "pilot"
    bench.run(variant(config, **{"stages.images.sources": [{"type": "synthetic", "count": pilot_images,
                                                               "seed": 11}]}),
              pilot, ("taxonomy", "images", "match", "filter", "qa", "score", "final"))
    from processors.session import load_run_config

    projected = project_from_run(pilot, load_run_config(bench.write(config)), images)
    actual = stages_of(reference)
    errors, outside = {}, []
    by_stage = {figures.stage: figures for figures in projected.stages}
    for stage in LLM_STAGES:
        figures = by_stage[stage]
        for key, got in (("requests", figures.requests), ("prompt_tokens", figures.prompt_tokens),
                         ("completion_tokens", figures.completion_tokens), ("cost_usd", figures.usd["online"])):
            want = actual[stage]["usage"].get(key, 0)
            if want:
                errors[f"{stage}.{key}"] = abs(got - want) / want
                low, high = figures.range(got)
                if not low <= want <= high:
                    outside.append(f"{stage}.{key}")
    worst = max(errors, key=errors.get)
    print("estimate errors: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(errors.items())), flush=True)
    return {"estimate_error": round(errors[worst], 4), "estimate_worst": worst,
            "estimate_outside_range": len(outside)}


def cached_share(bench: Bench, config: dict, images: int) -> dict:
    """QA's cached share on photos of two sizes: at 640x480 (COCO's typical size) the preamble and the image
    stay under the 1,024 tokens OpenAI caches; at 1024x768 they pass it."""
    out = {}
    for width, height in ((640, 480), (1024, 768)):
        sized = variant(config, **{"stages.images.sources": [{"type": "synthetic", "count": images, "seed": 11,
                                                              "size": [width, height]}]})
        base = bench.tmp / f"base-{width}"
        bench.run(sized, base, ("taxonomy", "images", "match"))
        for layout in ("paper", "cache_friendly"):
            # A second endpoint for filter and QA: the taxonomy (already done) keeps calling gpt4o as it did.
            high = {**config["llm"]["endpoints"]["gpt4o"], "image_detail": "high", "image_max_side": 1024,
                    "send_prompt_cache_key": True}
            cfg = variant(sized, **{"llm.endpoints.gpt_high": high, "stages.filter.endpoint": "gpt_high",
                                    "stages.qa.endpoint": "gpt_high", "stages.filter.prompt_layout": layout,
                                    "stages.qa.prompt_layout": layout})
            run_dir = copy_base(base, bench.tmp / f"cache-{width}-{layout}")
            bench.run(cfg, run_dir, ("filter", "qa"))
            qa = stages_of(run_dir)["qa"]
            share = qa["usage"].get("cached_tokens", 0) / max(1, qa["usage"].get("prompt_tokens", 0))
            out[f"qa_cached_share_{layout}_{width}"] = round(share, 4)
    out["qa_cached_share"] = out["qa_cached_share_cache_friendly_1024"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--pilot", type=int, default=300)
    parser.add_argument("--model", default="gpt-5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    config = base_config(args.images, args.model)
    # Flex: 5 % of flex attempts find no capacity; OpenAI's prompt cache modelled for every request.
    bench = Bench(Path(tempfile.mkdtemp(prefix="bench-cost-")), {"flex_rate_429": 0.05, "prompt_cache": True,
                                                                  "batch_duration_s": 0.5})
    try:
        base = bench.tmp / "base"
        bench.run(config, base, ("taxonomy", "images", "match"))
        results, reference = cascade_and_modes(bench, config, base)
        results.update(cap_overshoot(bench, config, base, reference))
        results.update(estimate_error(bench, config, args.pilot, args.images, reference))
        results.update(cached_share(bench, config, min(args.images, 400)))
    finally:
        bench.close()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    keys = ("referee_calls_ratio", "predicted_ratio", "kept_identical", "usd_per_1k_final_online",
            "usd_per_1k_final_flex", "usd_per_1k_final_batch", "usd_per_1k_final_fused", "cap_overshoot_usd",
            "estimate_error", "estimate_worst", "estimate_outside_range", "qa_cached_share",
            "qa_cached_share_paper_1024", "qa_cached_share_cache_friendly_640", "questions",
            "final_rows")
    print(" ".join(f"{k}={results[k]}" for k in keys)
          + f" images={args.images} pilot={args.pilot} model={args.model} load1={load:.1f}->{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
