#!/usr/bin/env python
"""Score stage throughput with endpoint referees: all referees and replicas at once vs one after another.

Three simulated vLLM servers (each its own process, 200 ms latency), endpoint referees with
``max_concurrency`` 64 each, 506 QA rows over 120 images (the issue 14 set-up). Both sides run the same
request building and vote reading in one run:

- baseline: the loop the stage had: referee after referee, and within a referee server after server, one
  ``run_requests`` call each;
- ours: ``processors.stages.score.score_all`` — every referee's calls on every server on one event loop, over
  the run's accounts (one connection pool, admission and breaker per endpoint), each referee's images spread
  over its servers by load (``spread_by_image``).

Figures (last line, key=value): ``referees_parallel_ratio`` = time with three referees on three servers over
the time with one referee (goal <= 1.15); ``replica_speedup`` = one referee on one server over the same
referee spread over two servers (goal >= 1.8); the baseline's figures beside them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_llm import SimProcess  # noqa: E402
from PIL import Image  # noqa: E402

from builder.stage import StageContext  # noqa: E402
from processors.llm.accounts import run_accounts  # noqa: E402
from processors.llm.client import LLMClient  # noqa: E402
from processors.llm.settings import EndpointSettings, LLMSettings  # noqa: E402
from processors.referees import RefereeItem, RefereeSettings  # noqa: E402
from processors.referees.endpoint import EndpointReferee  # noqa: E402
from processors.stages.score import score_all  # noqa: E402

ROWS, IMAGES = 506, 120


def make_items(folder: Path) -> list[RefereeItem]:
    paths = []
    for i in range(IMAGES):
        path = folder / f"{i}.png"
        Image.new("RGB", (64, 48), (i % 255, 90, 160)).save(path)
        paths.append(str(path))
    return [RefereeItem(f"qa{i}", paths[i % IMAGES], "OCR~Scene text", f"What does sign {i} say?")
            for i in range(ROWS)]


def context(folder: Path, urls: list[str]) -> StageContext:
    endpoints = {f"s{i}": EndpointSettings(base_url=url, api_key_env=None, max_concurrency=64)
                 for i, url in enumerate(urls)}
    folder.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=folder, stage_dir=folder, cache_dir=folder / "cache", dry_run=False,
                        settings=SimpleNamespace(llm=LLMSettings(endpoints=endpoints, cache=False)),
                        load_stage=lambda name: None)


def referees(servers: list[list[str]]) -> list[RefereeSettings]:
    presets = ["glm-4v-9b", "internvl-chat-v1.5", "internvl2-26b"]
    return [RefereeSettings(name=f"r{i}", preset=presets[i % 3], endpoint={"endpoints": names})
            for i, names in enumerate(servers)]


def timed(settings: list[RefereeSettings], ctx: StageContext, items: list[RefereeItem], *, ours: bool) -> float:
    client = LLMClient.for_stage(ctx)
    built = [EndpointReferee(s, client) for s in settings]
    start = time.perf_counter()
    if ours:
        ballots = score_all(settings, built, {s.name: items for s in settings}, client)
    else:  # the loop it replaces: referee by referee, server by server, each image to a server by its hash
        ballots = {}
        for s, referee in zip(settings, built):
            plan = hashed_plan(referee, items)
            results = [client.send_groups([group])[0] for group, _ in plan]
            ballots[s.name] = {v.qa_id: v for v in referee.votes(items, plan, results)}
    elapsed = time.perf_counter() - start
    assert all(v.ok for votes in ballots.values() for v in votes.values())
    return elapsed


def hashed_plan(referee: EndpointReferee, items: list[RefereeItem]) -> list:
    """The plan as it was: each image to ``hash % servers`` (uneven: 309/197 questions here)."""
    from builder.ids import text_id
    from processors.referees import endpoint as module

    real = module.spread_by_image

    def hashed(items, capacity):
        names = list(capacity)
        spread = {name: [] for name in names}
        for item in items:
            spread[names[int(text_id(item.image_path), 16) % len(names)]].append(item)
        return spread

    module.spread_by_image = hashed
    try:
        return referee.plan(items)
    finally:
        module.spread_by_image = real


def main() -> None:
    sims = [SimProcess("--latency-ms", "200", "--jitter-ms", "10") for _ in range(3)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "images").mkdir()
            items = make_items(folder / "images")
            ctx = context(folder / "run", [sim.base_url for sim in sims])
            warm_up = items[:50]  # imports, image encoding paths, every server's first connections
            timed(referees([["s0"], ["s1"], ["s2"]]), ctx, warm_up, ours=True)
            figures = {}
            for ours in (False, True):
                label = "ours" if ours else "baseline"
                # ours: the stage's path in a run - one account per endpoint for the whole run (its connection
                # pool, admission and breaker), as processors/session.py gives every stage
                with run_accounts() if ours else contextlib.nullcontext({}) as services:
                    ctx.services = dict(services)
                    if ours:
                        timed(referees([["s0"], ["s1"], ["s2"]]), ctx, warm_up, ours=True)
                    one = timed(referees([["s0"]]), ctx, items, ours=ours)
                    three = timed(referees([["s0"], ["s1"], ["s2"]]), ctx, items, ours=ours)
                    spread = timed(referees([["s0", "s1"]]), ctx, items, ours=ours)
                figures[label] = (three / one, one / spread)
                print(f"{label}: one referee {one:.2f} s, three on three servers {three:.2f} s, one over two "
                      f"servers {spread:.2f} s", flush=True)
    finally:
        for sim in sims:
            sim.__exit__(None, None, None)
    (ratio, speedup), (base_ratio, base_speedup) = figures["ours"], figures["baseline"]
    print(f"referees_parallel_ratio={ratio:.2f} replica_speedup={speedup:.2f} "
          f"baseline_parallel_ratio={base_ratio:.2f} baseline_replica_speedup={base_speedup:.2f}")


if __name__ == "__main__":
    main()
