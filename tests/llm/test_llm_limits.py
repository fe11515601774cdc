"""Admission control: the RPM bucket keeps the simulator's per-second limit, AIMD reacts to 429s."""

from __future__ import annotations

import asyncio
import time

from llm_helpers import json_requests

from processors.llm import run_requests
from processors.llm.limits import AdaptiveConcurrency, TokenBucket


def test_rpm_limit_is_never_exceeded(simulator, ctx_for):
    sim = simulator(rpm_limit=1200, latency_ms=20)  # 20 per sliding second
    # 10 % headroom: the simulator stamps arrivals after its own event loop picks them up, and on a loaded
    # 2-core CI machine that lag (tens of ms) would otherwise let 21 paced sends land inside one second.
    ctx = ctx_for(sim, rpm=1200, max_concurrency=64, rate_headroom=0.9)
    start = time.monotonic()
    results = run_requests(json_requests(70), endpoint="sim", ctx=ctx)
    elapsed = time.monotonic() - start
    stats = sim.stats()
    assert all(r.ok for r in results)
    assert stats["outcomes"].get("429_rpm", 0) == 0
    assert stats["arrivals_peak_1s"] <= 20
    assert 70 / elapsed > 0.8 * 20  # and the limit is used, not just respected


def test_without_a_bucket_the_simulator_enforces_and_the_engine_recovers(simulator, ctx_for):
    sim = simulator(rpm_limit=1200)
    ctx = ctx_for(sim, max_concurrency=64, max_retries=10)
    results = run_requests(json_requests(50), endpoint="sim", ctx=ctx)
    stats = sim.stats()
    assert all(r.ok for r in results)  # 429s were retried after their Retry-After
    assert stats["outcomes"]["429_rpm"] > 0 and stats["accepted_peak_1s"] <= 20
    assert max(stats["ok_per_key"].values()) == 1


def test_token_bucket_paces_to_its_rate():
    async def go() -> float:
        bucket = TokenBucket(rate=200.0, capacity=1.0)
        start = time.monotonic()
        for _ in range(41):
            await bucket.take(1)
        return time.monotonic() - start

    assert 0.19 <= asyncio.run(go()) < 1.0  # 40 intervals of 5 ms (upper bound loose: a busy CI machine oversleeps)


def test_aimd_shrinks_on_429_and_grows_back():
    limiter = AdaptiveConcurrency(maximum=100, minimum=4, decrease=0.5, cooldown_s=0.0)
    limiter.on_rate_limited()
    assert int(limiter.limit) == 50
    for _ in range(10):
        limiter.on_rate_limited()
    assert int(limiter.limit) == 4
    for _ in range(2000):
        limiter.on_success()
    assert limiter.limit > 50


def test_aimd_decreases_once_per_cooldown():
    limiter = AdaptiveConcurrency(maximum=100, minimum=4, decrease=0.5, cooldown_s=60)
    for _ in range(5):
        limiter.on_rate_limited()
    assert int(limiter.limit) == 50
