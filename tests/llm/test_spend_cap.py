"""The hard spend cap (``llm.max_cost_usd``, ``llm.stage_max_cost_usd``): a request is sent only if what was spent
plus the worst case of the requests in flight and its own stays within the cap; else the call stops."""

from __future__ import annotations

import pytest
from llm_helpers import fast_settings, json_requests, make_ctx

from processors.llm import run_requests
from processors.llm.errors import SpendCapReached
from processors.llm.estimate import cost_usd, request_tokens
from processors.llm.limits import SpendCap


def worst_usd(settings, request) -> float:
    endpoint = settings.endpoint("sim")
    prompt, completion = request_tokens(request, endpoint)
    return cost_usd(settings, endpoint.model, prompt, completion, batch=False)


def capped_ctx(sim, run_dir, **caps):
    settings = fast_settings(sim.base_url, max_concurrency=64).model_copy(update=caps)
    return make_ctx(run_dir, settings), settings


def test_a_cap_one_request_wide_is_never_crossed_with_64_in_flight(simulator, tmp_path, api_key):
    import time

    latency_s = 0.1
    sim = simulator(latency_ms=latency_s * 1000)
    requests = json_requests(64)
    probe = fast_settings(sim.base_url)
    worst = max(worst_usd(probe, r) for r in requests)
    cap = 1.5 * worst  # room for one request's worst case, not two
    ctx, _ = capped_ctx(sim, tmp_path / "run", max_cost_usd=cap)
    started = time.monotonic()
    with pytest.raises(SpendCapReached) as caught:
        run_requests(requests, endpoint="sim", ctx=ctx)
    elapsed = time.monotonic() - started
    usage = ctx.meter.usage
    # every request sent was answered and counted, and what they cost stays within the cap
    assert 1 <= usage["requests"] == sim.stats()["received"] < 64
    assert 0 < usage["cost_usd"] <= cap
    # one at a time: a second request could only be admitted once the first one's bill replaced its worst case
    assert elapsed >= usage["requests"] * latency_s * 0.9
    # stopped only when the next request could not fit even with nothing in flight
    assert usage["cost_usd"] + caught.value.next_usd > cap and caught.value.in_flight == 0
    assert caught.value.cap == cap and caught.value.setting == "llm.max_cost_usd"
    assert "raise llm.max_cost_usd and rerun the same command" in str(caught.value)


def test_a_cap_lets_requests_through_until_the_next_could_cross_it(simulator, tmp_path, api_key):
    sim = simulator(latency_ms=20)
    requests = json_requests(64)
    worst = max(worst_usd(fast_settings(sim.base_url), r) for r in requests)
    clean, _ = capped_ctx(sim, tmp_path / "clean")
    run_requests(requests, endpoint="sim", ctx=clean)  # what all 64 cost (far less than 64 worst cases)
    cap = worst + clean.meter.usage["cost_usd"] / 2  # about half of them fit beside one worst case
    sim.reset()
    ctx, _ = capped_ctx(sim, tmp_path / "run", max_cost_usd=cap)
    with pytest.raises(SpendCapReached):
        run_requests(requests, endpoint="sim", ctx=ctx)
    usage = ctx.meter.usage
    assert 16 <= usage["requests"] == sim.stats()["received"] < 64
    # the cap is used, not just its first slice: requests waited for the bills of those in flight
    assert cap - worst < usage["cost_usd"] <= cap


def test_a_stage_cap_counts_that_stage_only(simulator, tmp_path, api_key):
    sim = simulator()
    requests = json_requests(8)
    worst = max(worst_usd(fast_settings(sim.base_url), r) for r in requests)
    ctx, _ = capped_ctx(sim, tmp_path / "run", stage_max_cost_usd={"other": worst / 2})
    assert all(r.ok for r in run_requests(requests, endpoint="sim", ctx=ctx))  # make_ctx's stage is "filter"
    ctx, _ = capped_ctx(sim, tmp_path / "run2", stage_max_cost_usd={"filter": worst / 2})
    with pytest.raises(SpendCapReached) as caught:
        run_requests(json_requests(8, prefix="again"), endpoint="sim", ctx=ctx)
    assert caught.value.setting == "llm.stage_max_cost_usd.filter"
    assert "requests" not in ctx.meter.usage or ctx.meter.usage["requests"] == 0


def test_no_cap_and_an_unpriced_model_never_block(simulator, tmp_path, api_key):
    sim = simulator()
    ctx, _ = capped_ctx(sim, tmp_path / "run")
    assert all(r.ok for r in run_requests(json_requests(8), endpoint="sim", ctx=ctx))
    settings = fast_settings(sim.base_url, model="self-hosted-referee").model_copy(update={"max_cost_usd": 1e-9})
    ctx = make_ctx(tmp_path / "run2", settings)
    assert all(r.ok for r in run_requests(json_requests(8), endpoint="sim", ctx=ctx))  # no price: costs 0


def test_earlier_spend_counts_and_a_reply_replaces_its_reservation():
    cap = SpendCap(1.0, {"qa": 0.5}, spent={"filter": 0.6})
    hold = cap.reserve("filter", 0.3)
    with pytest.raises(SpendCapReached) as caught:
        cap.reserve("filter", 0.2)  # 0.6 spent + 0.3 in flight + 0.2 > 1.0
    assert (caught.value.spent, caught.value.in_flight, caught.value.next_usd) == (0.6, 0.3, 0.2)
    cap.bill("filter", 0.05)
    hold.release()  # the reply cost 0.05, not its worst case 0.3
    cap.reserve("filter", 0.2)
    cap.reserve("referee", 0.0)  # an unpriced model never blocks
    stage = SpendCap(None, {"qa": 0.5}, spent={"qa": 0.45, "filter": 9.0})
    stage.reserve("filter", 1.0)  # no run-wide cap, none for filter
    with pytest.raises(SpendCapReached) as caught:
        stage.reserve("qa", 0.1)
    assert caught.value.setting == "llm.stage_max_cost_usd.qa" and caught.value.spent == 0.45


def test_a_request_never_waits_for_a_hold_only_its_own_call_can_release():
    # A Batch API call holds its worst case for the whole call, online retries of its failed items included:
    # an online retry that fits only without that hold must stop (exit 3), not wait for it for ever.
    import asyncio

    cap = SpendCap(1.0)
    batch_hold = cap.reserve("filter", 0.8)  # a batch call's hold (not settles)
    cap.bill("filter", 0.3)

    async def retry():
        return await asyncio.wait_for(cap.admit("filter", 0.5), timeout=5)

    with pytest.raises(SpendCapReached):
        asyncio.run(retry())
    batch_hold.release()


def test_a_request_waits_for_the_bills_of_online_attempts_in_flight():
    import asyncio

    async def scenario():
        cap = SpendCap(1.0)
        first = await cap.admit("filter", 0.6)  # an online attempt on the wire
        waiting = asyncio.ensure_future(cap.admit("filter", 0.6))
        await asyncio.sleep(0)
        assert not waiting.done()  # 0.6 + 0.6 > 1.0: it waits for the first one's bill
        cap.bill("filter", 0.05)
        first.release()  # the reply cost 0.05, not 0.6
        second = await asyncio.wait_for(waiting, timeout=5)
        assert cap.reserved["filter"] == pytest.approx(0.6) and cap.spent["filter"] == pytest.approx(0.05)
        second.release()
        cap.bill("filter", 0.5)
        with pytest.raises(SpendCapReached):  # 0.55 spent + 0.6 > 1.0 with nothing in flight: stop
            await cap.admit("filter", 0.6)

    asyncio.run(scenario())


def test_the_worst_case_counts_cache_writes_priced_above_the_input():
    from processors.llm.estimate import worst_cost_usd
    from processors.llm.settings import LLMSettings, Price

    settings = LLMSettings(prices={"w": Price(input_per_mtok=1.0, output_per_mtok=2.0, cache_write_per_mtok=1.25),
                                   "r": Price(input_per_mtok=1.0, output_per_mtok=2.0, cached_input_per_mtok=0.5)})
    # a reply may bill every prompt token as a cache write: the reservation must cover it
    assert worst_cost_usd(settings, "w", 1_000_000, 1_000_000) == pytest.approx(1.25 + 2.0)
    assert worst_cost_usd(settings, "r", 1_000_000, 1_000_000) == pytest.approx(1.0 + 2.0)
    assert worst_cost_usd(settings, "r", 1_000_000, 0, tier="batch") == pytest.approx(0.5)


def test_a_batch_calls_hold_is_released_before_its_failed_items_go_online(simulator, tmp_path, api_key):
    """A batch of 12 of which about half fail, retried online, under a cap with room for the batch's worst case
    plus one online request's worst (with a little to spare): the hold on the whole batch must be gone once its replies are billed
    (kept, it counted the answered items twice and the retried ones twice, and the run stopped with exit 3
    at a fraction of its cap, every rerun again)."""
    sim = simulator(batch_duration_s=0.2, batch_fail_rate=0.5, seed=1)
    requests = json_requests(12)
    probe = fast_settings(sim.base_url, mode="batch")
    endpoint = probe.endpoint("sim")
    batch_worst = sum(cost_usd(probe, endpoint.model, *request_tokens(r, endpoint), batch=True) for r in requests)
    online_worst = max(worst_usd(probe, r) for r in requests)
    cap = batch_worst + 1.05 * online_worst  # the retries go one at a time, each bill before the next
    ctx = make_ctx(tmp_path / "run", probe.model_copy(update={"max_cost_usd": cap}))
    results = run_requests(requests, endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)
    assert 0 < sim.stats()["received"] < 12  # some went online after the batch
    assert 0 < ctx.meter.usage["cost_usd"] <= cap


def test_float_dust_in_the_reservations_never_reads_as_negative_money():
    caught = SpendCapReached("llm.max_cost_usd", 0.2, 0.1959, -1.3e-17, 0.0046)
    assert caught.in_flight == 0.0 and "$-" not in str(caught) and "may cost up to $0.0000 more" in str(caught)
