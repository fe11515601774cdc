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


def test_running_cost_is_recorded_on_disk_while_a_call_is_in_flight(simulator, ctx_for, tmp_path):
    # What a hard kill mid-call would leave: the live record written after billed replies, before the call
    # returns and adds its usage (the runner turns a leftover record into counted spend on the resume).
    sim = simulator(latency_ms=2)
    ctx = ctx_for(sim, max_concurrency=4)
    ctx.live_usage_path, ctx.live_usage_interval_s = tmp_path / "live.json", 0.0
    seen: list[tuple[int, float]] = []
    write = ctx.note_live_usage

    def spy(in_flight=None, *, force=False):
        if in_flight is not None and not ctx.usage:  # only snapshots taken during the call
            seen.append((in_flight["requests"], in_flight["cost_usd"]))
        write(in_flight, force=force)

    ctx.note_live_usage = spy
    run_requests(json_requests(12), endpoint="sim", ctx=ctx)
    assert [n for n, _ in seen] == list(range(1, 13))  # one snapshot per billed reply, growing
    assert all(later > earlier > 0 for (_, earlier), (_, later) in zip(seen, seen[1:]))
    assert json.loads(ctx.live_usage_path.read_text())["requests"] == 12 == ctx.usage["requests"]


def test_the_running_cost_on_disk_is_complete_when_a_call_returns(simulator, ctx_for, tmp_path):
    sim = simulator(latency_ms=1)
    ctx = ctx_for(sim, max_concurrency=8)
    ctx.live_usage_path = tmp_path / "live.json"  # default throttle: at most one snapshot a second
    run_requests(json_requests(40), endpoint="sim", ctx=ctx)
    assert json.loads(ctx.live_usage_path.read_text()) == pytest.approx(ctx.usage)


def test_a_running_cost_that_cannot_be_written_never_stops_paid_work(simulator, ctx_for, tmp_path, caplog):
    sim = simulator(latency_ms=1)
    ctx = ctx_for(sim, max_concurrency=8)
    (tmp_path / "full").write_text("a file where the stats folder should be")
    ctx.live_usage_path = tmp_path / "full" / "live.json"  # every write fails (NotADirectoryError)
    results = run_requests(json_requests(10), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results) and ctx.usage["requests"] == 10
    assert "could not record the running usage" in caplog.text


@pytest.mark.parametrize("kind", ["500", "429", "timeout", "drop", "bad_body", "malformed", "length"])
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
    assert result.raw_text and result.raw_text.startswith('{"oops"')
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
