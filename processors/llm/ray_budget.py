"""One account's RPM/TPM budget shared by every Ray worker of a run: a named actor that leases small grants.

With ``run.engine: ray``, N workers send to one provider account. Each holding its own buckets at the full
rate would send N times the limit; holding 1/N each would waste the shares of idle workers. So the driver
starts one ``BudgetActor`` per run (``shared_budget``), and each worker's ``Accounts(lease_from=name)`` gives
its admissions buckets that lease capacity from it (``LeasedBucket``): a grant is ``GRANT_S`` seconds of the
rate (or one request's tokens, if more), placed by the actor on one schedule per account (GCRA, like
``TokenBucket``) and spent by the worker evenly over its slot, so the cluster's requests are paced as one
process's would be. Capacity a worker leaves unused lapses with its slot, never saved up into a burst.

AIMD on 429s acts on the shared rate: a worker's 429 lowers the account's rate in the actor for everyone (at
most once per ``COOLDOWN_S``); each worker reports its successes with its next lease, and the rate grows
back by ``RECOVERY`` of the limit per success. Each worker's concurrency window still adapts locally.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

NAMESPACE = "taskgalaxy"
GRANT_S = 0.2  # a grant: this many seconds of the account's rate (small, so idle workers waste little)
COOLDOWN_S = 1.0  # one decrease per second at most: a burst of 429s from one overload is one signal
RECOVERY = 0.002  # after a 429, each success gives back this fraction of the limit (500 to recover from 0)
MIN_FRACTION = 0.05  # AIMD never lowers a rate below this fraction of the limit


@dataclass
class _Schedule:
    limit: float  # units per second the account allows (after headroom)
    rate: float
    tat: float = field(default_factory=time.monotonic)  # when the next unit may start
    granted: float = 0.0


class BudgetActor:
    """The shared schedules, one per (account, kind). Its methods are quick and run one at a time."""

    def __init__(self, decrease: float = 0.7):
        self.decrease = decrease
        self._schedules: dict[tuple[str, str], _Schedule] = {}
        self._last_decrease: dict[str, float] = {}
        self.rate_limited_count = 0

    def lease(self, account: str, kind: str, limit: float, units: float, successes: int = 0) -> tuple[float, float]:
        """Grant ``units`` of ``kind`` ("rpm": requests, "tpm": tokens) on ``account``: returns (seconds from
        now until the grant starts, the rate to spend it at)."""
        if successes:
            self._grow(account, successes)
        schedule = self._schedules.get((account, kind))
        if schedule is None:
            schedule = self._schedules[(account, kind)] = _Schedule(limit=limit, rate=limit)
        now = time.monotonic()
        start = max(schedule.tat, now)
        schedule.tat = start + units / schedule.rate
        schedule.granted += units
        return start - now, schedule.rate

    def rate_limited(self, account: str) -> None:
        self.rate_limited_count += 1
        now = time.monotonic()
        if now - self._last_decrease.get(account, -1e9) < COOLDOWN_S:
            return
        self._last_decrease[account] = now
        for (name, kind), schedule in self._schedules.items():
            if name == account:
                schedule.rate = max(schedule.limit * MIN_FRACTION, schedule.rate * self.decrease)
                logger.info("429 on %s: the shared %s rate lowered to %.1f/s", account, kind, schedule.rate)

    def _grow(self, account: str, successes: int) -> None:
        for (name, _), schedule in self._schedules.items():
            if name == account and schedule.rate < schedule.limit:
                schedule.rate = min(schedule.limit, schedule.rate + successes * RECOVERY * schedule.limit)

    def stats(self) -> dict:
        return {"rate_limited": self.rate_limited_count,
                "schedules": {f"{a}/{k}": {"limit": s.limit, "rate": s.rate, "granted": s.granted}
                              for (a, k), s in self._schedules.items()}}


@contextmanager
def shared_budget(decrease: float = 0.7) -> Iterator[str]:
    """Start the run's budget actor (on a Ray this process has joined) and yield its name; it ends with the
    run (and with the driver, which owns it: a killed driver leaves no budget behind)."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"llm-budget-{uuid.uuid4().hex[:12]}"
    # On the driver's node (not a preemptible GPU node), and never restarted: a restarted budget would forget
    # the grants it has handed out and the rate its 429s lowered, and hand the same capacity out again; if it
    # dies, the workers' next leases fail and the stage stops, to resume on a rerun.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(BudgetActor).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                                            scheduling_strategy=here).remote(decrease)
    ray.get(actor.stats.remote())  # started before any worker asks for it
    try:
        yield name
    finally:
        ray.kill(actor, no_restart=True)


def budget_stats(name: str) -> dict:
    import ray

    return ray.get(ray.get_actor(name, namespace=NAMESPACE).stats.remote())


class RayLimits:
    """``limits.SharedLimits`` for one endpoint's account in one worker: buckets that lease from the actor,
    and the AIMD signals sent to it."""

    def __init__(self, lease_from: str, account: tuple):
        self.lease_from = lease_from
        self.account = hashlib.sha256(repr(account).encode()).hexdigest()[:16]
        self._handle = None
        self._successes = 0
        self._lock = threading.Lock()

    def handle(self):
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.lease_from, namespace=NAMESPACE)
        return self._handle

    def bucket(self, kind: str, rate: float, capacity: float) -> "LeasedBucket":
        return LeasedBucket(self, kind, rate)

    async def lease(self, kind: str, limit: float, units: float) -> tuple[float, float]:
        with self._lock:
            successes, self._successes = self._successes, 0
        ref = self.handle().lease.remote(self.account, kind, limit, units, successes)
        return await asyncio.wrap_future(ref.future())

    def on_success(self) -> None:
        with self._lock:
            self._successes += 1

    def on_rate_limited(self) -> None:
        self.handle().rate_limited.remote(self.account)  # no reply needed: the next lease sees the new rate


class LeasedBucket:
    """``TokenBucket``'s interface over leased grants: ``take`` waits for this request's place in the
    worker's current grant, leasing the next grant when this one is spent. FIFO, like ``TokenBucket``."""

    def __init__(self, limits: RayLimits, kind: str, limit: float):
        self.limits, self.kind, self.limit = limits, kind, limit
        self.rate = limit
        self._tat = 0.0  # when the next unit of the current grant starts
        self._credit = 0.0  # units left in the current grant
        self._lock = asyncio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._tat < now:  # the grant's time passed unused: that capacity lapses, it is not saved up
                self._credit = max(0.0, self._credit - (now - self._tat) * self.rate)
                self._tat = now
            if self._credit < amount:
                # Whole requests: a grant of 9.8 requests spends 9 and loses 0.8 (measured: 8 % of the rate)
                units = max(amount, math.ceil(self.limit * GRANT_S))
                delay, self.rate = await self.limits.lease(self.kind, self.limit, units)
                self._tat, self._credit = time.monotonic() + delay, units
            start = self._tat
            self._tat += amount / self.rate
            self._credit -= amount
            wait = start - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
