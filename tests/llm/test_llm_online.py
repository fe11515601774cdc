"""Online requests against the simulator: order, usage, and a retry for every kind of fault."""

from __future__ import annotations

import json
import time

import pytest
from llm_helpers import json_requests

from processors.llm import LLMRequest, run_requests


def test_round_trip_keeps_order_and_counts_usage(simulator, ctx_for):
    sim = simulator(latency_ms=5, jitter_ms=2)
    ctx = ctx_for(sim)
    requests = json_requests(40)
    results = run_requests(requests, endpoint="sim", ctx=ctx)
    assert [r.key for r in results] == [r.key for r in requests]
    assert all(r.ok and isinstance(r.value, dict) for r in results)
    assert ctx.usage["requests"] == 40 and ctx.usage["cache_hits"] == 0
    assert ctx.usage["prompt_tokens"] > 0 and ctx.usage["completion_tokens"] > 0
    expected = (ctx.usage["prompt_tokens"] * 2.5 + ctx.usage["completion_tokens"] * 10) / 1e6
    assert ctx.usage["cost_usd"] == pytest.approx(expected)
    assert sim.stats()["received"] == 40


def test_every_billed_reply_is_journalled_after_it_is_cached_and_before_the_call_returns(simulator, ctx_for,
                                                                                         tmp_path):
    # What a hard kill mid-call would leave: one journal line per billed reply, each written only once that
    # reply was in the request cache (the runner turns a leftover journal into counted spend on the resume).
    from builder.outputs import read_journal
    from processors.llm.cache import RequestCache

    sim = simulator(latency_ms=2)
    ctx = ctx_for(sim, max_concurrency=4)
    ctx.live_usage_path = tmp_path / "live.jsonl"
    cached_when_counted: list[bool] = []
    count = ctx.meter.add  # the shard's usage meter: the engine counts each billed reply there

    def spy(**counters):
        if counters.get("requests") == 1:  # a billed reply: the cache must already hold as many answers
            with RequestCache(ctx.cache_dir / "llm-requests.sqlite") as cache:
                cached_when_counted.append(len(cache) >= int(ctx.usage.get("requests", 0)) + 1)
        count(**counters)

    ctx.meter.add = spy
    run_requests(json_requests(12), endpoint="sim", ctx=ctx)
    assert cached_when_counted == [True] * 12
    lines = ctx.live_usage_path.read_text().splitlines()
    assert sum(json.loads(line).get("requests", 0) for line in lines) == 12 == ctx.usage["requests"]
    assert read_journal(ctx.live_usage_path) == pytest.approx(ctx.usage)


def test_a_spend_journal_that_cannot_be_written_never_stops_paid_work(simulator, ctx_for, tmp_path, caplog):
    sim = simulator(latency_ms=1)
    ctx = ctx_for(sim, max_concurrency=8)
    (tmp_path / "full").write_text("a file where the stats folder should be")
    ctx.live_usage_path = tmp_path / "full" / "live.jsonl"  # every write fails (NotADirectoryError)
    results = run_requests(json_requests(10), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results) and ctx.usage["requests"] == 10
    assert ctx.unrecorded["requests"] == 10  # said plainly, and reported by the runner if the shard stops
    assert "could not record spend" in caplog.text


@pytest.mark.parametrize("kind", ["500", "429", "timeout", "drop", "bad_body", "malformed", "length", "empty"])
def test_each_fault_kind_is_retried(simulator, ctx_for, kind):
    sim = simulator(fail_kind=kind, fail_first=2, retry_after_s=0.05, hang_s=5)
    ctx = ctx_for(sim, timeout_s=0.3)
    results = run_requests(json_requests(5, prefix=kind), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results), [(r.reason, r.detail) for r in results]
    assert [r.attempts for r in results] == [3] * 5
    stats = sim.stats()
    assert sorted(stats["per_key"].values()) == [3] * 5  # every request: two faults, one answer
    assert ctx.usage["retries"] == 10


def test_malformed_json_is_retried_then_recorded_unparsable_with_raw_text(simulator, ctx_for):
    sim = simulator(fail_kind="malformed", fail_first=100)
    ctx = ctx_for(sim, max_retries=2)
    [result] = run_requests(json_requests(1), endpoint="sim", ctx=ctx)
    assert not result.ok and result.reason == "unparsable" and result.attempts == 3
    assert result.raw_text and result.raw_text.startswith('{"oops')
    assert "JSONDecodeError" in result.detail
    assert sim.stats()["received"] == 3
    assert ctx.usage["requests"] == 3  # billed replies count even when they did not parse


def test_truncated_reply_is_recorded_unless_accepted(simulator, ctx_for):
    sim = simulator()
    ctx = ctx_for(sim, max_retries=1)
    long = LLMRequest(key="long", prompt_version="v1", max_tokens=2,
                      messages=[{"role": "user", "content": "Say something long."}])
    one_token = LLMRequest(key="vote", prompt_version="v1", max_tokens=1, logprobs=True, top_logprobs=2,
                           accept_truncated=True, messages=[{"role": "user", "content": "Answer 0 or 1."}])
    truncated, vote = run_requests([long, one_token], endpoint="sim", ctx=ctx)
    assert not truncated.ok and truncated.reason == "truncated" and truncated.raw_text
    assert vote.ok and vote.logprobs and {"token", "logprob", "top_logprobs"} <= vote.logprobs[0].keys()


@pytest.mark.parametrize("fmt,wait,least", [("seconds", 0.6, 0.55), ("date", 2.0, 0.9)])
def test_retry_after_is_honoured(simulator, ctx_for, fmt, wait, least):
    sim = simulator(fail_kind="429", fail_first=1, retry_after_s=wait, retry_after_format=fmt)
    ctx = ctx_for(sim, backoff_initial_s=0.01)
    start = time.monotonic()
    [result] = run_requests(json_requests(1), endpoint="sim", ctx=ctx)
    elapsed = time.monotonic() - start
    assert result.ok and result.attempts == 2
    assert elapsed >= least  # our own backoff alone would have waited ~10 ms
    assert elapsed < wait + 1.5


def test_permanent_client_error_is_not_retried(simulator, ctx_for):
    sim = simulator()
    ctx = ctx_for(sim)
    bad = LLMRequest(key="bad", prompt_version="v1", messages=[{"role": "user", "content": "hi"}],
                     extra_body={"messages": "not-a-list"})  # the simulator cannot read it: 400
    good = json_requests(1)[0]
    results = run_requests([bad, good], endpoint="sim", ctx=ctx)
    assert results[1].ok
    assert results[0].reason == "api_error" and results[0].attempts == 1 and "HTTP 400" in results[0].detail


def test_duplicate_requests_are_sent_once(simulator, ctx_for):
    sim = simulator()
    ctx = ctx_for(sim)
    [req] = json_requests(1)
    twin = LLMRequest(key="other-row", prompt_version=req.prompt_version, messages=req.messages, parse=req.parse)
    first, second = run_requests([req, twin], endpoint="sim", ctx=ctx)
    assert first.ok and second.ok and second.key == "other-row" and first.value == second.value
    assert sim.stats()["received"] == 1


def test_json_schema_is_sent_and_answered(simulator, ctx_for):
    sim = simulator()
    ctx = ctx_for(sim)
    schema = {"type": "object", "properties": {"labels": {"type": "array", "items": {"type": "string"}}}}
    request = LLMRequest(key="s", prompt_version="v1", json_schema=schema, parse=json.loads,
                         messages=[{"role": "user", "content": "labels please"}])
    [result] = run_requests([request], endpoint="sim", ctx=ctx)
    assert result.ok and isinstance(result.value["labels"], list)


@pytest.mark.parametrize("transport", ["aiohttp", "openai"])
def test_a_refused_connection_is_reported_as_one_not_as_a_timeout(tmp_path, api_key, transport):
    import socket

    from llm_helpers import fast_settings, make_ctx

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = make_ctx(tmp_path / "run", fast_settings(f"http://127.0.0.1:{port}/v1", transport=transport, max_retries=0))
    [result] = run_requests(json_requests(1), endpoint="sim", ctx=ctx)
    assert result.reason == "api_error" and "connection error" in result.detail
    assert "no reply within" not in result.detail


def test_replies_that_never_parse_fail_as_unparsable_even_when_a_429_ended_the_last_attempt(simulator, ctx_for):
    # The stage's repair turn acts on "unparsable"; a transient error at the end must not hide it, and the
    # reply kept is the model's usual one, not a fault-spoiled one.
    def never(text: str):
        raise ValueError("not what was asked")

    requests = [LLMRequest(key=f"k{i}", prompt_version="v1", parse=never,
                           messages=[{"role": "user", "content": f"Reply in JSON about item {i}."}]) for i in range(12)]
    stormy = simulator(rate_429=0.3, retry_after_s=0.01, seed=4)
    results = run_requests(requests, endpoint="sim", ctx=ctx_for(stormy, max_retries=10))
    assert [r.reason for r in results] == ["unparsable"] * 12, [(r.reason, r.attempts, r.detail) for r in results]
    spoiled_first = simulator(fail_kind="malformed", fail_first=1, seed=4)  # every request's 1st reply is broken
    results = run_requests(requests, endpoint="sim", ctx=ctx_for(spoiled_first, max_retries=3, cache=False))
    clean = run_requests(requests, endpoint="sim", ctx=ctx_for(simulator(seed=4), max_retries=1, cache=False))
    assert [r.raw_text for r in results] == [r.raw_text for r in clean]
    assert not any(r.raw_text.startswith('{"oops') for r in results)


def test_unusable_replies_paid_by_an_earlier_attempt_of_the_call_count_against_its_retry_budget(simulator,
                                                                                               ctx_for):
    # A resume after a kill makes the same call again: the attempts a killed process paid for are not
    # paid for a second time (the budget is 1 + max_retries attempts, over all attempts of the call).
    def never(text: str):
        raise ValueError("not what was asked")

    requests = [LLMRequest(key=f"k{i}", prompt_version="v1", parse=never,
                           messages=[{"role": "user", "content": f"Reply in JSON about item {i}."}]) for i in range(3)]
    sim = simulator()
    first = run_requests(requests, endpoint="sim", ctx=ctx_for(sim, max_retries=2))
    assert [r.reason for r in first] == ["unparsable"] * 3 and sim.stats()["received"] == 9
    again = run_requests(requests, endpoint="sim", ctx=ctx_for(sim, max_retries=2))  # the same call, resumed
    assert sim.stats()["received"] == 9  # nothing left to try: nothing paid again
    assert [(r.reason, r.raw_text) for r in again] == [(r.reason, r.raw_text) for r in first]
    more = run_requests(requests, endpoint="sim", ctx=ctx_for(sim, max_retries=4))  # a larger budget: 2 more each
    assert sim.stats()["received"] == 15 and all(r.reason == "unparsable" for r in more)


def test_the_same_unusable_reply_twice_at_temperature_zero_is_not_paid_for_again(simulator, ctx_for):
    def never(text: str):
        raise ValueError("not what was asked")

    sim = simulator()
    greedy = [LLMRequest(key=f"g{i}", prompt_version="v1", parse=never, temperature=0.0,
                         messages=[{"role": "user", "content": f"Reply in JSON about {i}."}]) for i in range(3)]
    results = run_requests(greedy, endpoint="sim", ctx=ctx_for(sim, max_retries=6))
    assert [r.reason for r in results] == ["unparsable"] * 3 and all("twice at temperature 0" in r.detail for r in results)
    assert sim.stats()["received"] == 6  # two tries each, not seven
    sampled = [LLMRequest(key=f"s{i}", prompt_version="v1", parse=never, temperature=0.7,
                          messages=[{"role": "user", "content": f"Reply in JSON about {i}."}]) for i in range(3)]
    run_requests(sampled, endpoint="sim", ctx=ctx_for(sim, max_retries=6))
    assert sim.stats()["received"] == 6 + 21  # sampling may do better: every try is made


def test_replies_committed_in_a_turn_whose_tasks_are_cancelled_are_still_counted():
    # The breaker opening (or Ctrl-C) cancels every pending task; replies already handed to the commit are in
    # the cache, so they must be counted as paid too.
    import asyncio

    from processors.llm.engine import OnlineEngine, Tally

    class Cache:
        def __init__(self):
            self.rows = []

        def put_many(self, items):
            self.rows.extend(items)

    engine = OnlineEngine.__new__(OnlineEngine)
    engine.cache, engine.tally, engine._to_commit = Cache(), Tally(), []
    reply = {"text": "{}", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    async def scenario():
        tasks = [asyncio.ensure_future(engine._committed(f"k{i}", reply)) for i in range(2)]
        await asyncio.sleep(0)  # both replies wait for the commit scheduled for the next turn
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert len(engine.cache.rows) == 2 and engine.tally.requests == 2 and engine.tally.usage.prompt_tokens == 6
