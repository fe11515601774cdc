"""The shared LLM budget: four Ray workers leasing from one budget actor together keep to one account's rate
(never 4x), and a 429 from any of them lowers the rate for all (AIMD on the shared budget)."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.timeout(300)
LIMIT = 25.0  # units per second
PER_WORKER = 30


def most_in_one_second(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_four_workers_never_exceed_the_shared_limit(ray_cluster):
    import ray

    from processors.llm.ray_budget import budget_stats, shared_budget

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

    @ray.remote(num_cpus=0.5)
    class Sender:
        def send(self, budget: str, n: int) -> list[float]:
            import asyncio
            import time

            from processors.llm.ray_budget import RayLimits

            bucket = RayLimits(budget, ("one account",)).bucket("rpm", LIMIT, 0.0)

            async def go() -> list[float]:
                stamps = []
                for _ in range(n):
                    await bucket.take(1)
                    stamps.append(time.time())  # one clock: every node of this cluster is this machine
                return stamps

            return asyncio.run(go())

    with shared_budget() as budget:
        senders = [Sender.remote() for _ in range(4)]
        per_worker = ray.get([s.send.remote(budget, PER_WORKER) for s in senders])
        stats = budget_stats(budget)
    stamps = [t for worker in per_worker for t in worker]
    assert len(stamps) == 4 * PER_WORKER
    assert most_in_one_second(stamps) <= LIMIT + 1  # a window holds at most rate + 1 starts (fenceposts)
    assert max(stamps) - min(stamps) >= (len(stamps) - LIMIT - 1) / LIMIT  # one account's pace, not 4x
    assert all(len(w) == PER_WORKER for w in per_worker)
    (schedule,) = stats["schedules"].values()
    assert schedule["granted"] >= 4 * PER_WORKER


def test_a_429_lowers_the_shared_rate_and_successes_restore_it():
    from processors.llm.ray_budget import COOLDOWN_S, BudgetActor  # the actor's logic, without Ray

    budget = BudgetActor(decrease=0.5)
    budget.lease("acct", "rpm", 10.0, 1.0)
    budget.lease("acct", "tpm", 1000.0, 100.0)
    budget.rate_limited("acct")
    budget.rate_limited("acct")  # the same overload within the cooldown: one decrease
    rates = {k: s["rate"] for k, s in budget.stats()["schedules"].items()}
    assert rates == {"acct/rpm": 5.0, "acct/tpm": 500.0}
    delay, rate = budget.lease("acct", "rpm", 10.0, 1.0)
    assert rate == 5.0  # every worker's next grant is paced at the lowered rate
    budget.lease("acct", "rpm", 10.0, 1.0, successes=10_000)
    assert budget.stats()["schedules"]["acct/rpm"]["rate"] == 10.0  # back to the limit, never above
    assert COOLDOWN_S > 0 and budget.stats()["rate_limited"] == 2
