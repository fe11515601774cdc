#!/usr/bin/env python
"""Benchmark: does an LLM stage keep the account's rate limit busy across shard boundaries? (issue 14)

6,000 requests through the runner's LLM-stage path (a source stage of prompts and a stage that sends one
request per row with ``EndpointCall.send``, like ``filter``), ``shard_size`` 2,000, against the simulator in its
own process enforcing 10,000 RPM per sliding second with 3 s latency. Two runs, same machine, same run:

- baseline: shards one after the other, each ``run_requests`` call with its own admission (no run-level
  accounts) - what the code did before;
- ours: the stage's two shards in flight (``Stage.shards_in_flight``) over the run's shared account.

``stream_rpm_utilisation`` = requests the server accepted / (limit x the time from its first to its last
acceptance): how much of the paid limit the run used while it was sending. (Wall-clock figures, which add one
latency of start-up, are printed too.) The endpoint paces at ``rate_headroom`` 0.98 of the limit, so 0.98 is
the ceiling. Last line: ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
from pydantic import Field  # noqa: E402

from bench_llm import SimProcess  # noqa: E402
from builder.config import build_config_model, validate_config  # noqa: E402
from builder.rows import BatchOutput  # noqa: E402
from builder.runner import Runner  # noqa: E402
from builder.stage import Stage, StageConfig  # noqa: E402

LIMIT_RPM = 10_000


class PromptsConfig(StageConfig):
    count: int = Field(6000, ge=1)


class Prompts(Stage):
    name = "prompts"
    Config = PromptsConfig
    key = "row_id"

    def source_rows(self, config, ctx):
        ids = [f"r{i:06d}" for i in range(config.count)]
        return datasets.Dataset.from_dict({"row_id": ids, "text": [f"Reply in JSON about item {i}." for i in ids]})

    def input_key(self, config):
        return "row_id"

    def features(self, config):
        return datasets.Features({"row_id": datasets.Value("string"), "text": datasets.Value("string")})

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            out = BatchOutput(["row_id", "text"])
            for key, text in zip(batch["row_id"], batch["text"]):
                out.add(key, {"row_id": key, "text": text})
            return out.to_columns()

        return fn


class AskConfig(StageConfig):
    in_flight: int = 2


class Ask(Stage):
    """One request per row, the whole shard in one ``EndpointCall.send`` (the filter stage's shape)."""

    name = "ask"
    Config = AskConfig
    key = "row_id"
    upstream = "prompts"
    batch_size = None

    def shards_in_flight(self, config):
        return config.in_flight

    def input_key(self, config):
        return "row_id"

    def features(self, config):
        return datasets.Features({"row_id": datasets.Value("string"), "reply": datasets.Value("string")})

    def make_batch_fn(self, config, ctx):
        from processors.llm.client import LLMClient
        from processors.llm.request import LLMRequest

        call = LLMClient.for_stage(ctx).endpoint("bench")

        def fn(batch):
            requests = [LLMRequest(key=key, prompt_version="bench-stream-v1", max_tokens=32, parse=json.loads,
                                   messages=[{"role": "user", "content": text}])
                        for key, text in zip(batch["row_id"], batch["text"])]
            out = BatchOutput(["row_id", "reply"])
            for result in call.send(requests):
                if result.ok:
                    out.add(result.key, {"row_id": result.key, "reply": result.raw_text})
                else:
                    out.fail(result.key, result.reason, result.detail)
            return out.to_columns()

        return fn


def run_once(base_url: str, folder: Path, *, ours: bool, count: int, shard_size: int) -> dict:
    from processors.llm.accounts import run_accounts
    from processors.llm.settings import LLMSettings

    stages = [Prompts(), Ask()]
    config = validate_config({
        "run": {"name": "stream", "shard_size": shard_size},
        "llm": {"cache": False, "endpoints": {"bench": {
            "base_url": base_url, "api_key_env": None, "rpm": LIMIT_RPM, "max_concurrency": 1024,
            "timeout_s": 60, "max_retries": 10}}},
        "stages": {"prompts": {"count": count}, "ask": {"in_flight": 2 if ours else 1}},
    }, build_config_model(stages, {"llm": LLMSettings}), base_dir=folder)
    runner = Runner(stages, config, folder / "run", progress=False,
                    run_scope=run_accounts if ours else None)
    runner.run({"prompts"})
    start = time.time()
    states = runner.run({"ask"})
    wall = time.time() - start
    return {"wall_s": wall, "rows_out": states["ask"]["totals"]["rows_out"]}


def measure(base_url: str, sim: SimProcess, **kwargs) -> dict:
    sim.reset()
    with tempfile.TemporaryDirectory() as tmp:
        out = run_once(base_url, Path(tmp), **kwargs)
    stats = sim.stats()
    answers = sorted(t for times in stats["answered_at"].values() for t in times)
    span = answers[-1] - answers[0]
    rate = LIMIT_RPM / 60
    out.update(accepted=len(answers), span_s=span, utilisation=(len(answers) - 1) / (rate * span),
               wall_utilisation=len(answers) / (rate * out["wall_s"]),
               rate_429=stats["outcomes"].get("429_rpm", 0) / max(1, stats["received"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=3000)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(SimProcess("--rpm-limit", str(LIMIT_RPM), "--latency-ms", str(args.latency_ms)))
        base = measure(sim.base_url, sim, ours=False, count=args.count, shard_size=args.shard_size)
        print(f"baseline (shards one after the other, an admission per call): {base}", flush=True)
        ours = measure(sim.base_url, sim, ours=True, count=args.count, shard_size=args.shard_size)
        print(f"ours (two shards in flight, one account for the run): {ours}", flush=True)
    assert base["rows_out"] == ours["rows_out"] == args.count, (base, ours)
    print(f"stream_rpm_utilisation={ours['utilisation']:.3f} baseline_rpm_utilisation={base['utilisation']:.3f} "
          f"ratio={ours['utilisation'] / base['utilisation']:.2f} wall_utilisation={ours['wall_utilisation']:.3f} "
          f"baseline_wall_utilisation={base['wall_utilisation']:.3f} rate_429={ours['rate_429']:.4f} "
          f"wall_s={ours['wall_s']:.1f} baseline_wall_s={base['wall_s']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
