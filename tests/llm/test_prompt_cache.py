"""Cached prompt tokens (OpenAI's prompt caching): read from the reply, priced at the cached rate, counted per
stage, and modelled by the simulator when its ``prompt_cache`` option is on."""

from __future__ import annotations

import pytest

from processors.llm import LLMRequest, LLMSettings, Price, Usage, cost_usd, run_requests
from processors.llm.reply import normalise
from processors.simulator.core import prompt_tokens


def _completion(usage: dict) -> dict:
    return {"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}], "usage": usage}


def test_cached_and_cache_write_tokens_are_read_as_parts_of_the_prompt():
    reply = normalise(_completion({"prompt_tokens": 2000, "completion_tokens": 100,
                                   "prompt_tokens_details": {"cached_tokens": 1536, "cache_write_tokens": 64}}))
    assert reply["usage"] == {"prompt_tokens": 2000, "completion_tokens": 100, "cached_tokens": 1536,
                              "cache_write_tokens": 64}
    bare = normalise(_completion({"prompt_tokens": 2000, "completion_tokens": 100}))
    assert bare["usage"] == {"prompt_tokens": 2000, "completion_tokens": 100, "cached_tokens": 0,
                             "cache_write_tokens": 0}
    # a reply cached before the counters existed still loads (a cache hit costs nothing anyway)
    assert Usage(**{"prompt_tokens": 5, "completion_tokens": 2}) == Usage(5, 2, 0, 0)


@pytest.mark.parametrize(("model", "expected"), [
    # 1,000,000 prompt tokens of which 400,000 cached, 100,000 completion tokens, at the default prices
    ("gpt-4o", 0.6 * 2.50 + 0.4 * 1.25 + 0.1 * 10.00),  # cached at 50 % of the input price
    ("gpt-4.1", 0.6 * 2.00 + 0.4 * 0.50 + 0.1 * 8.00),  # 25 %
    ("gpt-5", 0.6 * 1.25 + 0.4 * 0.125 + 0.1 * 10.00),  # 10 %
])
def test_cached_tokens_are_priced_at_the_models_cached_rate(model, expected):
    settings = LLMSettings()
    dollars = cost_usd(settings, model, 1_000_000, 100_000, batch=False, cached_tokens=400_000)
    assert dollars == pytest.approx(expected, abs=1e-9)
    assert cost_usd(settings, model, 1_000_000, 100_000, batch=True, cached_tokens=400_000) == pytest.approx(
        expected * 0.5, abs=1e-9)


def test_without_cached_tokens_the_price_is_as_before():
    settings = LLMSettings()
    assert cost_usd(settings, "gpt-4o", 1_000_000, 100_000, batch=False) == pytest.approx(2.50 + 1.00)
    # a price without a cached rate (a custom table) charges cached tokens at the full input price
    custom = LLMSettings(prices={"m": Price(input_per_mtok=3.0, output_per_mtok=15.0)})
    assert cost_usd(custom, "m", 1_000_000, 0, batch=False, cached_tokens=500_000) == pytest.approx(3.0)


def test_cache_writes_are_priced_at_the_write_rate():
    settings = LLMSettings(prices={"m": Price(input_per_mtok=3.0, output_per_mtok=15.0, cached_input_per_mtok=0.3,
                                               cache_write_per_mtok=3.75)})
    dollars = cost_usd(settings, "m", 1_000_000, 0, batch=False, cached_tokens=200_000, cache_write_tokens=400_000)
    assert dollars == pytest.approx(0.4 * 3.0 + 0.2 * 0.3 + 0.4 * 3.75)


LONG_SYSTEM = "You label images with task types. " * 150  # ~5,000 characters: over 1,024 tokens by itself


def _request(key: str, system: str) -> LLMRequest:
    return LLMRequest(key=key, prompt_version="v1", messages=[
        {"role": "system", "content": system}, {"role": "user", "content": f"Describe item {key}."}])


def test_the_simulator_reports_a_long_shared_prefix_as_cached_and_the_bill_is_lower(simulator, ctx_for):
    sim = simulator(prompt_cache=True)
    ctx = ctx_for(sim, model="gpt-4o")
    first, = run_requests([_request("a", LONG_SYSTEM)], endpoint="sim", ctx=ctx)
    second, = run_requests([_request("b", LONG_SYSTEM)], endpoint="sim", ctx=ctx)
    assert first.usage.cached_tokens == 0  # nothing seen before
    shared = prompt_tokens([{"role": "system", "content": LONG_SYSTEM}])
    assert shared >= 1024 and second.usage.cached_tokens == shared // 128 * 128
    assert ctx.usage["cached_tokens"] == second.usage.cached_tokens and ctx.usage["cache_write_tokens"] == 0
    full = (ctx.usage["prompt_tokens"] * 2.50 + ctx.usage["completion_tokens"] * 10.00) / 1e6
    assert ctx.usage["cost_usd"] == pytest.approx(full - second.usage.cached_tokens * (2.50 - 1.25) / 1e6)


def test_the_simulator_caches_no_short_prompt_and_nothing_unless_asked(simulator, ctx_for):
    sim = simulator(prompt_cache=True)
    ctx = ctx_for(sim)
    results = run_requests([_request("a", "Short system prompt.")], endpoint="sim", ctx=ctx)
    results += run_requests([_request("b", "Short system prompt.")], endpoint="sim", ctx=ctx)
    assert [r.usage.cached_tokens for r in results] == [0, 0] and ctx.usage["cached_tokens"] == 0
    plain = simulator()  # prompt_cache off by default: no prompt_tokens_details at all, as before
    ctx = ctx_for(plain, run_dir=ctx.run_dir.parent / "plain")
    results = run_requests([_request("a", LONG_SYSTEM)], endpoint="sim", ctx=ctx)
    results += run_requests([_request("b", LONG_SYSTEM)], endpoint="sim", ctx=ctx)
    assert [r.usage.cached_tokens for r in results] == [0, 0]


def test_the_prompt_cache_is_per_prompt_cache_key_and_expires():
    from processors.simulator.core import PromptCache

    cache = PromptCache(ttl_s=600)
    body = {"model": "m", "messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "x"}]}
    assert cache.cached_tokens(body, now=0.0) == 0
    assert cache.cached_tokens({**body, "prompt_cache_key": "other"}, now=1.0) == 0  # another key: another cache
    assert cache.cached_tokens(body, now=2.0) > 0  # the whole prompt seen before
    assert cache.cached_tokens(body, now=2.0 + 601) == 0  # unused for longer than the expiry
