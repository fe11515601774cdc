"""One account per endpoint for the whole run: a 429 storm in one shard slows the next one; a budget share
splits the limits; a pickled account becomes the receiving process's own."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from llm_helpers import json_requests

from processors.llm.accounts import SERVICE, Accounts, process_accounts, run_accounts
from processors.llm.client import run_requests
from processors.llm.settings import EndpointSettings
from processors.llm.transport import AiohttpTransport


class PeakInFlight:
    """Counts requests on the wire at once (the transport's ``chat``)."""

    def __init__(self, monkeypatch):
        self.now = self.peak = 0
        real = AiohttpTransport.chat

        async def chat(transport, body, key):
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                return await real(transport, body, key)
            finally:
                self.now -= 1

        monkeypatch.setattr(AiohttpTransport, "chat", chat)

    def reset(self) -> None:
        self.now = self.peak = 0


def _shard(ctx, name: str) -> None:
    results = run_requests(json_requests(64, prefix=name), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)


@pytest.mark.parametrize("shared", [True, False])
def test_a_429_storm_in_one_shard_slows_the_next(simulator, ctx_for, monkeypatch, shared):
    # every request's first attempt is a 429: the AIMD window shrinks during the first shard
    sim = simulator(latency_ms=20, fail_first=1, fail_kind="429", retry_after_s=0.01)
    ctx = ctx_for(sim, max_concurrency=32, min_concurrency=1)
    peak = PeakInFlight(monkeypatch)
    with run_accounts() as services:
        if shared:
            ctx.services.update(services)  # what the runner gives every stage's work
        _shard(ctx, "first")
        if shared:
            (account,) = services[SERVICE]._accounts.values()
            left = int(account.admission.concurrency.limit)
            assert left < 32
        peak.reset()
        _shard(ctx, "second")
    if shared:  # the second shard starts with the window the storm left (grown by one per window of
        # successes at most), not with a fresh burst of 32
        assert peak.peak <= left + 64 // left < 32, (peak.peak, left)
    else:  # a fresh admission per call: the next shard hits the overloaded server with the full window again
        assert peak.peak == 32


def test_calls_of_one_run_share_one_account_per_endpoint(simulator, ctx_for):
    sim = simulator(latency_ms=1)
    ctx = ctx_for(sim)
    with run_accounts() as services:
        ctx.services.update(services)
        _shard(ctx, "a")
        _shard(ctx, "b")
        accounts = services[SERVICE]
        assert len(accounts._accounts) == 1
    with pytest.raises(RuntimeError, match="closed"):  # the run ended: nothing more is sent through it
        accounts.run(asyncio.sleep(0))


def test_a_budget_share_splits_every_limit_of_the_account():
    endpoint = EndpointSettings(rpm=3000, tpm=1_000_000, max_concurrency=64, min_concurrency=4)
    quarter = Accounts(0.25).scaled(endpoint)
    assert (quarter.rpm, quarter.tpm, quarter.max_concurrency, quarter.min_concurrency) == (750, 250_000, 16, 1)
    assert Accounts(1.0).scaled(endpoint) is endpoint
    with pytest.raises(ValueError, match="budget_share"):
        Accounts(0)


def test_a_pickled_account_is_the_receiving_process_own_one_per_run():
    with run_accounts(0.5) as services:
        accounts = services[SERVICE]
        # unpickled where the original lives: the original (the budget is not doubled)
        assert pickle.loads(pickle.dumps(accounts)) is accounts
    # elsewhere (a worker) it becomes that process's accounts of the run: same share, its own loop
    foreign = Accounts(0.25)  # a run of another process, never registered here
    copy = pickle.loads(pickle.dumps(foreign))
    assert copy is not foreign and copy.budget_share == 0.25 and copy.run_id == foreign.run_id
    assert pickle.loads(pickle.dumps(foreign)) is copy  # one per run in this process
    later = pickle.loads(pickle.dumps(Accounts(0.25)))  # the next run: the previous run's accounts are closed
    assert later is not copy and copy._closed and not later._closed
    later.close()


def test_stages_and_referees_calling_one_server_and_model_share_one_account(simulator, ctx_for):
    from processors.llm.api import RequestGroup
    from processors.llm.client import run_request_groups

    sim = simulator(latency_ms=1)
    ctx = ctx_for(sim)
    with run_accounts() as services:
        ctx.services.update(services)
        requests = json_requests(4, prefix="override")
        run_request_groups([RequestGroup(requests, "sim"), RequestGroup(json_requests(4, prefix="plain"), "sim",
                                                                        {"image_max_side": 128})], ctx=ctx)
        assert len(services[SERVICE]._accounts) == 1


def test_a_stopped_call_sends_nothing_more_and_caches_every_answer_it_paid_for(simulator, ctx_for):
    import threading
    import time

    from builder.stage import ShardScope, UsageMeter, shard_scope
    from processors.llm.cache import RequestCache

    sim = simulator(latency_ms=150)
    ctx = ctx_for(sim, max_concurrency=8)
    scope = ShardScope(UsageMeter())
    outcome: list[BaseException] = []

    def shard() -> None:
        with shard_scope(scope):
            try:
                run_requests(json_requests(200, prefix="stop"), endpoint="sim", ctx=ctx)
            except BaseException as exc:  # noqa: BLE001 - what the shard thread sees
                outcome.append(exc)

    with run_accounts() as services:
        ctx.services.update(services)
        thread = threading.Thread(target=shard)
        thread.start()
        while sim.stats()["received"] < 20:  # a few rounds of 8 answered, 8 more on the wire
            time.sleep(0.01)
        scope.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive() and isinstance(outcome[0], asyncio.CancelledError)
        received = sim.stats()["received"]
        time.sleep(0.5)  # more than three latencies: an orphaned request would show here
        assert sim.stats()["received"] == received < 200
    answered = sum(sim.stats()["ok_per_key"].values())
    with RequestCache(ctx.cache_dir / "llm-requests.sqlite") as cache:
        assert len(cache) == answered  # the requests on the wire at the stop came back and were cached
    assert scope.meter.usage["requests"] == answered  # ...and counted, in the shard's own meter


def test_accounts_that_lease_from_a_budget_take_its_buckets_and_split_the_window():
    # The Ray engine's wiring, without Ray: a worker's accounts (lease_from) get the budget's buckets, its
    # 429s reach the shared rate, and a pool member takes its share of the concurrency window.
    from processors.llm.accounts import WORKER_SHARE, call_accounts
    from processors.llm.ray_budget import LeasedBucket
    from processors.llm.transport import Secret

    accounts = Accounts(lease_from="llm-budget-test")
    endpoint = EndpointSettings(base_url="http://127.0.0.1:9/v1", api_key_env=None, rpm=600, tpm=100_000,
                                max_concurrency=64)
    try:
        with call_accounts({SERVICE: accounts, WORKER_SHARE: 0.25}) as same:
            assert same is accounts
        account = accounts.run(accounts.account("e", endpoint, base_url=endpoint.base_url, api_key=Secret(None),
                                                key_env=None, breaker_threshold=5))
        assert isinstance(account.admission.rpm, LeasedBucket) and isinstance(account.admission.tpm, LeasedBucket)
        assert account.admission.concurrency.listener is not None
        assert account.admission.concurrency.maximum == 16
    finally:
        accounts.close()
