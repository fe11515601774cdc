"""OpenAI's flex tier (``mode: flex``): service_tier on the wire but not in the cache key, capacity 429s retried
and (when configured) sent at the standard tier, each reply billed at the tier that served it."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import pytest
from llm_helpers import fast_settings, json_requests, make_ctx

from processors.llm import EndpointSettings, LLMSettings, run_requests
from processors.llm import flex as fx
from processors.llm.breaker import CircuitBreaker
from processors.llm.engine import OnlineEngine, Tally
from processors.llm.errors import SpendCapReached, from_status
from processors.llm.estimate import cost_usd, request_tokens
from processors.llm.prepare import prepare
from processors.llm.request import RATE_LIMITED
from processors.llm.settings import DEFAULT_PRICES, FLEX_TIMEOUT_S

GPT5_IN, GPT5_OUT = 1.25, 10.00  # USD per million tokens, standard tier (flex: half)
CAPACITY_BODY = json.dumps({"error": {"message": "Resource Unavailable", "type": "resource_unavailable",
                                      "param": None, "code": "resource_unavailable"}})
RATE_BODY = json.dumps({"error": {"message": "Rate limit reached for gpt-5 on requests per min (RPM)",
                                  "type": "requests", "param": None, "code": "rate_limit_exceeded"}})


def flex_ctx(sim, run_dir, **overrides):
    values = dict(model="gpt-5", mode="flex", max_retries=4)
    values.update(overrides)
    return make_ctx(run_dir, fast_settings(sim.base_url, **values))


def usd(results, share: float) -> float:
    """What the replies cost at gpt-5's list price times ``share``."""
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    return (prompt * GPT5_IN + completion * GPT5_OUT) / 1e6 * share


# --- settings -------------------------------------------------------------------------------------------------

def test_flex_waits_long_unless_told_and_changes_no_fingerprint():
    assert EndpointSettings(mode="flex").timeout_s == FLEX_TIMEOUT_S == 900.0
    assert EndpointSettings(mode="flex", timeout_s=30).timeout_s == 30
    assert EndpointSettings().timeout_s == EndpointSettings(mode="online").timeout_s == 120.0
    flexed = EndpointSettings(mode="flex", flex_fallback_after=3)
    assert flexed.output_parts() == EndpointSettings().output_parts()
    # A copy to another mode (with_overrides re-validates the fields set) does not keep flex's timeout.
    assert EndpointSettings.model_validate({**flexed.model_dump(exclude_unset=True), "mode": "online"}).timeout_s == 120
    with pytest.raises(ValueError, match="flex_fallback_after"):
        EndpointSettings(mode="flex", max_retries=2, flex_fallback_after=3)
    assert {m: DEFAULT_PRICES[m].flex_discount for m in ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4o")} == {
        "gpt-5": 0.5, "gpt-5-mini": 0.5, "gpt-5-nano": 0.5, "gpt-4o": None}


def test_service_tier_is_sent_only_at_flex_and_is_never_part_of_the_cache_key():
    request = json_requests(1)[0]
    online = prepare(request, EndpointSettings(model="gpt-5"))
    flexed = prepare(request, EndpointSettings(model="gpt-5", mode="flex", flex_fallback_after=1))
    assert online.cache_key == flexed.cache_key
    assert "service_tier" not in online.body_sync() and flexed.body_sync()["service_tier"] == "flex"
    assert fx.with_tier(flexed.body_sync(), fx.sent_tier(flexed.endpoint, 1))["service_tier"] == "default"


def test_switching_online_to_flex_asks_nothing_again(simulator, tmp_path, api_key):
    sim = simulator()
    requests = json_requests(6)
    run_dir = tmp_path / "run"
    first = run_requests(requests, endpoint="sim", ctx=flex_ctx(sim, run_dir, mode="online"))
    again = run_requests(requests, endpoint="sim", ctx=flex_ctx(sim, run_dir))
    assert all(r.ok for r in first) and all(r.from_cache for r in again)
    assert sim.stats()["received"] == 6 and sim.stats()["service_tiers"] == {}


# --- the engine against the simulator --------------------------------------------------------------------------

def test_capacity_429s_are_retried_at_flex_then_answered_and_billed_at_the_flex_price(simulator, tmp_path, api_key):
    sim = simulator(flex_fail_first=2)
    ctx = flex_ctx(sim, tmp_path / "run")
    results = run_requests(json_requests(5), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results) and [r.attempts for r in results] == [3] * 5
    stats = sim.stats()
    assert stats["outcomes"]["429_flex"] == 10 and stats["service_tiers"] == {"flex": 15}
    assert ctx.usage["requests"] == 5 and ctx.usage["retries"] == 10 and ctx.usage["flex_fallbacks"] == 0
    assert ctx.usage["cost_usd"] == pytest.approx(usd(results, 0.5), rel=1e-9)


def test_after_n_capacity_429s_a_request_is_sent_at_the_standard_tier_and_billed_there(simulator, tmp_path, api_key):
    sim = simulator(flex_fail_first=100)  # flex never has room; the standard tier answers
    ctx = flex_ctx(sim, tmp_path / "run", flex_fallback_after=2)
    results = run_requests(json_requests(4), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results) and [r.attempts for r in results] == [3] * 4
    assert sim.stats()["service_tiers"] == {"flex": 8, "default": 4}
    assert ctx.usage["flex_fallbacks"] == 4
    assert ctx.usage["cost_usd"] == pytest.approx(usd(results, 1.0), rel=1e-9)


def test_some_fall_back_and_some_do_not_each_billed_at_its_own_tier(simulator, tmp_path, api_key):
    sim = simulator(flex_rate_429=0.5, seed=7)  # refusals drawn per key and attempt: the same on every run
    ctx = flex_ctx(sim, tmp_path / "run", flex_fallback_after=1, max_retries=1)
    results = run_requests(json_requests(40), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)
    at_flex = [r for r in results if r.attempts == 1]
    fell_back = [r for r in results if r.attempts == 2]
    assert at_flex and fell_back and len(at_flex) + len(fell_back) == 40
    assert ctx.usage["flex_fallbacks"] == len(fell_back) == sim.stats()["service_tiers"]["default"]
    expected = usd(at_flex, 0.5) + usd(fell_back, 1.0)
    assert ctx.usage["cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_without_a_fallback_a_request_stays_at_flex_until_its_retries_run_out(simulator, tmp_path, api_key):
    sim = simulator(flex_fail_first=100)
    ctx = flex_ctx(sim, tmp_path / "run", max_retries=3)
    results = run_requests(json_requests(3), endpoint="sim", ctx=ctx)
    assert [(r.ok, r.reason, r.attempts) for r in results] == [(False, RATE_LIMITED, 4)] * 3
    assert "Resource Unavailable" in results[0].detail
    assert sim.stats()["service_tiers"] == {"flex": 12}  # never sent at the standard tier
    assert ctx.usage.get("requests", 0) == 0 and ctx.usage.get("cost_usd", 0) == 0  # 429s are not billed


def test_rate_limit_429s_at_flex_do_not_count_towards_the_fallback(simulator, tmp_path, api_key):
    sim = simulator(fail_kind="429", fail_first=2, retry_after_s=0.01)  # "Rate limit reached", not capacity
    ctx = flex_ctx(sim, tmp_path / "run", flex_fallback_after=1)
    results = run_requests(json_requests(3), endpoint="sim", ctx=ctx)
    assert all(r.ok and r.attempts == 3 for r in results)
    assert sim.stats()["service_tiers"] == {"flex": 9} and ctx.usage["flex_fallbacks"] == 0


def test_a_flex_request_reserves_the_standard_price_under_the_spend_cap(simulator, tmp_path, api_key):
    # The served tier may differ from the one asked (and a fallback is standard): only the standard price
    # bounds what an attempt can be billed, so a cap with room for a flex worst case but not a standard one
    # sends nothing.
    sim = simulator()
    request = json_requests(1)
    settings = fast_settings(sim.base_url, model="gpt-5", mode="flex", flex_fallback_after=1)
    prompt, completion = request_tokens(request[0], settings.endpoint("sim"))
    standard_worst = cost_usd(settings, "gpt-5", prompt, completion, tier="standard")
    capped = settings.model_copy(update={"max_cost_usd": 0.75 * standard_worst})  # 1.5 flex worst cases
    with pytest.raises(SpendCapReached) as caught:
        run_requests(request, endpoint="sim", ctx=make_ctx(tmp_path / "run", capped))
    assert caught.value.next_usd == pytest.approx(standard_worst) and sim.stats()["received"] == 0
    roomy = settings.model_copy(update={"max_cost_usd": 1.01 * standard_worst})
    results = run_requests(request, endpoint="sim", ctx=make_ctx(tmp_path / "run2", roomy))
    assert results[0].ok and sim.stats()["service_tiers"] == {"flex": 1}


def test_flex_on_a_model_without_a_flex_price_warns_once_and_bills_the_standard_price(simulator, tmp_path, api_key,
                                                                                      caplog):
    fx._UNPRICED_WARNED.discard("gpt-4o-2024-08-06")
    sim = simulator()
    with caplog.at_level(logging.WARNING, logger="processors.llm.flex"):
        for run in ("a", "b"):
            ctx = flex_ctx(sim, tmp_path / run, model="gpt-4o-2024-08-06")
            results = run_requests(json_requests(2, prefix=run), endpoint="sim", ctx=ctx)
    warnings = [r for r in caplog.records if "no flex price" in r.getMessage()]
    assert len(warnings) == 1 and "gpt-4o-2024-08-06" in warnings[0].getMessage()
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    assert ctx.usage["cost_usd"] == pytest.approx((prompt * 2.50 + completion * 10.00) / 1e6, rel=1e-9)


# --- the engine alone: AIMD and the billed tier ----------------------------------------------------------------

class Scripted:
    """A transport answering from a script: an HTTP error body (status 429) or a completion dict."""

    def __init__(self, script):
        self.script, self.sent = list(script), []

    async def chat(self, body, key):
        self.sent.append(body.get("service_tier"))
        step = self.script.pop(0)
        if isinstance(step, str):
            raise from_status(429, step, {})
        return step


def completion(tier=None):
    body = {"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
    return {**body, "service_tier": tier} if tier else body


def run_engine(script, **endpoint):
    ep = EndpointSettings(model="gpt-5", mode="flex", max_retries=4, backoff_initial_s=0.001,
                          max_concurrency=64, min_concurrency=1, **endpoint)
    settings = LLMSettings(endpoints={"e": ep})
    tiers = []
    tally = Tally(price=lambda prompt, done, tier: cost_usd(settings, "gpt-5", prompt, done, tier=tier))
    tally.on_billed = lambda usage, tier: tiers.append(tier)
    transport = Scripted(script)
    engine = OnlineEngine(ep, transport, CircuitBreaker(25, endpoint="e", base_url=ep.base_url, model=ep.model,
                                                        key_env=None), None, tally, None)
    results = asyncio.run(engine.run([prepare(json_requests(1)[0], ep)]))
    return list(results.values())[0], engine, transport.sent, tiers


def test_capacity_429s_leave_the_concurrency_alone_rate_limit_429s_lower_it():
    result, engine, sent, tiers = run_engine([CAPACITY_BODY, CAPACITY_BODY, completion("flex")])
    assert result.ok and sent == ["flex"] * 3 and tiers == ["flex"]
    assert engine.admission.concurrency.limit == 64
    result, engine, sent, _ = run_engine([RATE_BODY, completion("flex")])
    assert result.ok and engine.admission.concurrency.limit < 64


def test_a_429_at_flex_whose_body_says_nothing_counts_as_capacity():
    result, engine, sent, tiers = run_engine(['{"error": {"message": "Too Many Requests"}}', completion()],
                                             flex_fallback_after=1)
    assert result.ok and sent == ["flex", "default"] and engine.tally.flex_fallbacks == 1
    assert tiers == ["standard"]  # no service_tier in the reply: billed at the tier it was sent at


def test_the_reply_says_which_tier_billed_it():
    _, _, sent, tiers = run_engine([completion("default")])  # sent at flex, served (so billed) at standard
    assert sent == ["flex"] and tiers == ["standard"]
    _, _, _, tiers = run_engine([completion()])
    assert tiers == ["flex"]


# --- the simulator ---------------------------------------------------------------------------------------------

def post(sim, body):
    request = urllib.request.Request(sim.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_simulator_models_flex_only_for_requests_that_ask_for_it(simulator):
    sim = simulator(flex_fail_first=1)
    body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
    status, plain = post(sim, body)
    assert status == 200 and "service_tier" not in plain
    status, refused = post(sim, {**body, "service_tier": "flex"})
    assert status == 429 and refused["error"]["code"] == "resource_unavailable"
    assert "Resource Unavailable" in refused["error"]["message"]
    status, answered = post(sim, {**body, "service_tier": "flex"})
    assert status == 200 and answered["service_tier"] == "flex"
    assert post(sim, {**body, "service_tier": "auto"})[1]["service_tier"] == "default"


def test_an_estimate_of_flex_requests_is_at_the_flex_price():
    from processors.llm.estimate import estimate_requests

    def priced(mode):
        settings = LLMSettings(endpoints={"e": EndpointSettings(model="gpt-5", mode=mode)})
        return estimate_requests(settings, "e", json_requests(3)).cost_usd

    assert priced("flex") == pytest.approx(priced("online") / 2, rel=1e-12)


# --- prices: added to the list prices, and a paid model without one said out loud -----------------------------
def test_a_price_for_another_model_keeps_the_list_prices():
    """One entry (another model, or a typo'd name) once replaced the whole list: GPT-4o counted at $0 and
    llm.max_cost_usd stopped nothing."""
    from processors.llm.settings import LLMSettings, Price

    mini = Price(input_per_mtok=0.15, output_per_mtok=0.6)
    settings = LLMSettings(prices={"gpt-4o-2024-08-6": mini})  # a typo of gpt-4o-2024-08-06
    assert settings.prices["gpt-4o"] == DEFAULT_PRICES["gpt-4o"] and settings.prices["gpt-4o-2024-08-6"] == mini
    own = LLMSettings(prices={"gpt-4o": mini})  # a user's own rate for a listed model still wins
    assert own.prices["gpt-4o"] == mini and own.prices["gpt-5"] == DEFAULT_PRICES["gpt-5"]
    assert LLMSettings.model_validate(own.model_dump()).prices == own.prices  # the written config reads back


@pytest.mark.parametrize("base_url, key_env, warned", [
    ("https://api.openai.com/v1", "OPENAI_API_KEY", True),  # OpenAI: paid
    ("https://gw.example.com/v1", "GW_KEY", True),  # a keyed gateway: paid
    ("http://localhost:8001/v1", None, False),  # a self-hosted vLLM without a key (the paper's referees): free
])
def test_a_paid_endpoint_whose_model_has_no_price_warns_once(caplog, base_url, key_env, warned):
    from processors.llm.settings import EndpointSettings, LLMSettings

    fx._UNPRICED_WARNED.discard("my-finetune")
    settings = LLMSettings(endpoints={"e": EndpointSettings(base_url=base_url, api_key_env=key_env,
                                                            model="my-finetune")})
    with caplog.at_level(logging.WARNING, logger="processors.llm.flex"):
        fx.warn_if_unpriced(settings, "e")
        fx.warn_if_unpriced(settings, "e")
    said = [r.getMessage() for r in caplog.records if "has no price in llm.prices" in r.getMessage()]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert "llm.max_cost_usd cannot stop them" in said[0] and "llm.prices.my-finetune" in said[0]
