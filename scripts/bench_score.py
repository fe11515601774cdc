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

``--client`` measures the client instead (issue 24, ``score_client_rps``): one simulator in its own process at
zero latency, three endpoint referees (``max_concurrency`` 64, the request cache on, as ``bench_scale.py``),
``--questions`` questions over ``--images`` images scored by ``score_all`` in batches of the stage's
``batch_size`` (256). Last line: ``client_rps`` (referee requests per second), ``cpu_ms_per_request`` (this
process's CPU over them), then the same over a second pass answered from the request cache, and ``digest``: a
hash of every vote, p_yes, cache key and usage counter, which must not change when the client is made faster.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_llm import SimProcess  # noqa: E402
from PIL import Image  # noqa: E402

from builder.stage import StageContext, UsageMeter  # noqa: E402
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


def client_items(folder: Path, questions: int, images: int) -> list[RefereeItem]:
    """``questions`` questions spread evenly over ``images`` distinct photos-like images (320x240 JPEG)."""
    import random

    rng = random.Random(0)
    paths = []
    for i in range(images):
        path = folder / f"{i}.jpg"
        noise = Image.frombytes("RGB", (80, 60), rng.randbytes(80 * 60 * 3)).resize((320, 240))
        noise.save(path, quality=85)
        paths.append(str(path))
    return [RefereeItem(f"qa{i}", paths[i % images], "OCR~Scene text", f"What does sign {i} say?", f"Exit {i}")
            for i in range(questions)]


def client_pass(ctx: StageContext, settings: list[RefereeSettings], items: list[RefereeItem], batch: int
                ) -> tuple[float, float, dict]:
    """Score ``items`` batch by batch as the stage does; (wall s, CPU s, ballots by referee and qa_id)."""
    client = LLMClient.for_stage(ctx)
    built = [EndpointReferee(s, client) for s in settings]
    ballots: dict[str, dict] = {s.name: {} for s in settings}
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(items), batch):
        shown = {s.name: items[start:start + batch] for s in settings}
        for name, votes in score_all(settings, built, shown, client).items():
            ballots[name].update(votes)
    return time.perf_counter() - wall, time.process_time() - cpu, ballots


def client_digest(ballots: dict, cache_file: Path, usage: dict) -> str:
    """A hash of what the client produced: votes, p_yes, errors, every cache key and reply, the usage."""
    with contextlib.closing(sqlite3.connect(cache_file)) as db:
        stored = db.execute("SELECT key, reply FROM replies ORDER BY key").fetchall()
    votes = {name: sorted((qa, v.vote, v.p_yes, v.error) for qa, v in b.items()) for name, b in ballots.items()}
    text = json.dumps([votes, stored, sorted(usage.items())], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def client_main(args: argparse.Namespace) -> None:
    presets = ["glm-4v-9b", "internvl-chat-v1.5", "internvl2-26b"]
    with SimProcess() as sim, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        items = client_items(folder / "images", args.questions, args.images)
        endpoints = {f"referee_{i}": EndpointSettings(base_url=f"http://localhost:800{i + 1}/v1", model=presets[i],
                                                      api_key_env=None, max_concurrency=64) for i in range(3)}
        settings = [RefereeSettings(name=f"r{i}", preset=presets[i], endpoint={"endpoint": f"referee_{i}"})
                    for i in range(args.referees)]
        run = folder / "run"
        run.mkdir()
        with run_accounts() as services:
            ctx = StageContext(run_dir=run, stage_dir=run, cache_dir=run / "cache", dry_run=True,
                               settings=SimpleNamespace(llm=LLMSettings(endpoints=endpoints)),
                               load_stage=lambda name: None,
                               services={**services, "llm_base_url": sim.base_url},
                               meter=UsageMeter(run / "stats" / "live-00000.jsonl"))  # journalled, as a shard
            warm = StageContext(**{**ctx.__dict__, "cache_dir": folder / "warm-cache"})
            client_pass(warm, settings, items[:200], args.batch)  # imports, first connections
            before = sim.stats()["received"]
            wall, cpu, ballots = client_pass(ctx, settings, items, args.batch)
            sent = sim.stats()["received"] - before
            digest = client_digest(ballots, run / "cache" / "llm-requests-dry-run.sqlite", ctx.meter.usage)
            hit_wall, hit_cpu, again = client_pass(ctx, settings, items, args.batch)
        assert all(v.ok for votes in ballots.values() for v in votes.values())
        assert again == ballots or all(again[n][q].p_yes == ballots[n][q].p_yes for n in ballots for q in ballots[n])
    asked = len(items) * len(settings)
    print(f"client_rps={sent / wall:.0f} cpu_ms_per_request={1000 * cpu / max(1, sent):.3f} sent={sent} "
          f"wall_s={wall:.2f} cached_rps={asked / hit_wall:.0f} cached_cpu_ms_per_request={1000 * hit_cpu / asked:.3f} "
          f"digest={digest} load1={os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="store_true", help="measure the client at zero latency instead")
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--referees", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--batch", type=int, default=256, help="the score stage's batch_size")
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
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
