"""Admission control: a concurrency window that shrinks on 429s (AIMD), request/token buckets and the run's
spend cap.

Order matters: a request first takes a concurrency slot, *then* passes the buckets, and is sent right
after. Taking bucket tokens first and then queueing for a slot would let paced requests pile up behind the
slots and leave in a burst, which is exactly what a per-second rate limit punishes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from collections.abc import AsyncIterator

from typing import Protocol

from processors.llm.errors import SpendCapReached
from processors.llm.settings import EndpointSettings

logger = logging.getLogger(__name__)


class TokenBucket:
    """A rate limit of ``rate`` units per second with a burst of at most ``capacity`` units, FIFO.

    Implemented as GCRA (a virtual schedule) rather than a refilling counter: each grant moves a theoretical
    arrival time forward by ``amount / rate``, so a sleep that wakes a millisecond late does not push every
    later request back (a strictly paced counter loses ~5% of its rate to timer lateness that way). A request
    larger than the capacity is charged the capacity, so one huge request cannot block forever.
    """

    def __init__(self, rate: float, capacity: float):
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._tat = time.monotonic()  # theoretical arrival time of the next unit
        self._lock = asyncio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:
            now = time.monotonic()
            new_tat = max(self._tat, now) + amount / self.rate
            allowed_at = new_tat - self.capacity / self.rate
            self._tat = new_tat
            if allowed_at > now:
                await asyncio.sleep(allowed_at - now)


class AdaptiveConcurrency:
    """A concurrency limit that halves-ish on 429s and grows back by one slot per window of successes.

    At most one decrease per ``cooldown_s``: a burst of 429s from one overload is one signal, not fifty.

    With ``latency`` (a ``LatencySignal``: self-hosted servers, which queue instead of answering 429), rising
    reply latency lowers the window too, at most once per window's worth of replies, and the window opens by
    slow start (from ``SLOW_START`` slots, one more per reply, until the first decrease) instead of sending
    ``maximum`` requests at once onto a server that may serve far fewer. With ``queue`` as well (a
    ``processors.llm.server_queue.QueueWatch``: the server's own count of requests waiting, from its
    /metrics), a queue the server reports lowers it the same way, before latency has grown.
    """

    SLOW_START = 8

    def __init__(self, maximum: int, minimum: int, decrease: float, cooldown_s: float = 1.0,
                 latency: "LatencySignal | None" = None):
        self.maximum, self.minimum, self.decrease = maximum, min(minimum, maximum), decrease
        self.limit = float(maximum)
        self.cooldown_s = cooldown_s
        self.in_flight = 0
        self.listener: RateListener | None = None  # told of every success and 429 (a shared budget's AIMD)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._last_decrease = -1e9
        self.latency = latency
        self._slow_start = latency is not None and maximum > self.SLOW_START
        if self._slow_start:
            self.limit = float(max(self.minimum, self.SLOW_START))
        self._since_decrease = 0  # replies since the last decrease (latency decreases: one per window of them)
        self.latency_decreases = 0  # decreases for a queueing server (its latency or its reported queue)
        self.queue = None  # a QueueWatch, set by the accounts where the server's /metrics is read
        self.queue_decreases = 0  # of which the server's reported queue was the reason

    async def acquire(self) -> None:
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # woken and cancelled at once: pass the slot on
                self.release()
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def on_success(self, latency_s: float | None = None) -> None:
        """A reply came back; ``latency_s`` (seconds on the wire) feeds the latency signal, if there is one."""
        if self.listener is not None:
            self.listener.on_success()
        self._since_decrease += 1
        timed = self.latency is not None and latency_s is not None
        if timed:
            self.latency.add(latency_s)
        reported = self.queue is not None and self.queue.congested  # the server's own count, first
        if reported or (timed and self.latency.congested):
            if self._since_decrease >= int(self.limit) and self.limit > self.minimum:
                self._lower(time.monotonic())
                self.latency_decreases += 1
                self.queue_decreases += reported
                logger.info("%s: the server queues; concurrency lowered to %d", self._why(reported), int(self.limit))
            return  # no growth while the server queues
        if self.limit < self.maximum:
            step = 1.0 if self._slow_start else 1.0 / self.limit
            self.limit = min(self.maximum, self.limit + step)
            self._wake()

    def _why(self, reported: bool) -> str:
        """For the log: the server's reported queue, else its latency."""
        if reported:
            return f"the server reports {self.queue.waiting:g} requests waiting ({self.queue.url})"
        latency = self.latency
        return (f"reply latency {latency.recent:.3f} s is {latency.recent / latency.baseline:.1f}x its baseline "
                f"{latency.baseline:.3f} s")

    def on_rate_limited(self) -> None:
        if self.listener is not None:
            self.listener.on_rate_limited()
        now = time.monotonic()
        if now - self._last_decrease >= self.cooldown_s:
            self._lower(now)
            logger.info("429 from the endpoint: concurrency lowered to %d", int(self.limit))

    def _lower(self, now: float) -> None:
        self._last_decrease = now
        self._since_decrease = 0
        self._slow_start = False
        self.limit = max(float(self.minimum), self.limit * self.decrease)


class LatencySignal:
    """Whether a server queues requests, read from its reply latencies (it never says so with a 429).

    Replies are taken in blocks of ``BLOCK``; a block's median is the recent latency. The baseline is the
    lowest block median seen, allowed to drift up by ``DRIFT`` per block (so a lasting change of the work,
    longer replies, is learnt within a few hundred replies, while a queue that the lowered window drains
    brings it back down). Congested: the recent latency is over ``factor`` times the baseline and over
    ``floor_s`` (a fast server's jitter never counts). A slow server whose latency does not grow with the
    load (OpenAI-like, constant latency) never counts as congested, however slow."""

    BLOCK = 16
    DRIFT = 0.05

    def __init__(self, factor: float = 2.0, floor_s: float = 0.25):
        self.factor, self.floor_s = factor, floor_s
        self.baseline: float | None = None
        self.recent: float | None = None
        self.congested = False
        self._block: list[float] = []

    def add(self, latency_s: float) -> None:
        self._block.append(latency_s)
        if len(self._block) < self.BLOCK:
            return
        block, self._block = sorted(self._block), []
        median = block[len(block) // 2]
        self.recent = median
        if self.baseline is None:
            self.baseline = median
            return
        self.congested = median > self.factor * self.baseline and median > self.floor_s
        self.baseline = min(median, self.baseline * (1 + self.DRIFT))


class Bucket(Protocol):
    async def take(self, amount: float = 1.0) -> None: ...


class RateListener(Protocol):
    def on_success(self) -> None: ...

    def on_rate_limited(self) -> None: ...


class SharedLimits(RateListener, Protocol):
    """An account's rate limits held elsewhere, shared with other processes (``processors.llm.ray_budget``):
    it makes the buckets and hears every success and 429, so AIMD acts on the shared rate."""

    def bucket(self, kind: str, rate: float, capacity: float) -> Bucket: ...


def _local_bucket(kind: str, rate: float, capacity: float) -> TokenBucket:
    return TokenBucket(rate, capacity)


class SpendCap:
    """The run's hard spend caps (``llm.max_cost_usd``, ``llm.stage_max_cost_usd``), shared by every account
    of the run: a request is sent only if what was spent (``spent``: the run folder's record when the run
    started, plus every reply billed since) plus the worst case of the requests in flight plus its own worst
    case stays within each cap that applies. A reply's reservation gives way to its real cost (``bill``, then
    ``Hold.release``); a request that does not fit raises ``SpendCapReached`` and is not sent.

    Runs on the accounts' one loop (no lock): reserving and billing never await, so they cannot interleave."""

    def __init__(self, max_usd: float | None = None, stage_max_usd: dict[str, float] | None = None,
                 spent: dict[str, float] | None = None):
        self.max_usd, self.stage_max_usd = max_usd, dict(stage_max_usd or {})
        self.spent: dict[str, float] = dict(spent or {})  # USD by stage name (None: a call outside any stage)
        self.reserved: dict[str | None, float] = {}
        self.settling: dict[str | None, float] = {}  # the part of ``reserved`` online attempts hold
        self._released: asyncio.Event | None = None  # set when a reservation is released (``admit`` waits)

    @property
    def active(self) -> bool:
        return self.max_usd is not None or bool(self.stage_max_usd)

    def reserve(self, stage: str | None, worst_usd: float, *, settles: bool = False) -> "Hold":
        """Reserve now, or raise ``SpendCapReached`` when the request does not fit beside those in flight.

        ``settles``: the hold is one online attempt's, released when its reply is billed without anything
        else having to happen first, so ``admit`` may wait for it. A Batch API call's hold is not: it lasts
        for the whole call, online retries of its failed items included, which would wait for it for ever."""
        if worst_usd > 0:
            for setting, cap, spent, reserved in self._caps(stage):
                if spent + reserved + worst_usd > cap:
                    raise SpendCapReached(setting, cap, spent, reserved, worst_usd)
            self.reserved[stage] = self.reserved.get(stage, 0.0) + worst_usd
            if settles:
                self.settling[stage] = self.settling.get(stage, 0.0) + worst_usd
        return Hold(self, stage, worst_usd, settles)

    async def admit(self, stage: str | None, worst_usd: float) -> "Hold":
        """Reserve as soon as the request fits. While it does not fit only because of the worst cases of
        requests in flight, it waits for their replies (a reply's bill is usually far below its worst case,
        so most of the cap is still spent); it raises ``SpendCapReached`` once it could not fit even if every
        request in flight cost nothing. Only the holds of online attempts (``settles``) are waited for."""
        while True:
            blocked = [(setting, cap, spent, reserved) for setting, cap, spent, reserved in self._caps(stage)
                       if worst_usd > 0 and spent + reserved + worst_usd > cap]
            if not blocked:
                return self.reserve(stage, worst_usd, settles=True)
            setting, cap, spent, reserved = blocked[0]
            lasting = reserved - self._settling(setting, stage)  # holds that no reply of ours will release
            if spent + lasting + worst_usd > cap or reserved - lasting <= 1e-12:
                raise SpendCapReached(setting, cap, spent, reserved, worst_usd)
            if self._released is None:
                self._released = asyncio.Event()
            released = self._released
            await released.wait()

    def _on_release(self) -> None:
        if self._released is not None:  # wake every waiter; each checks the cap again
            self._released.set()
            self._released = None

    def _settling(self, setting: str, stage: str | None) -> float:
        if setting == "llm.max_cost_usd":
            return sum(self.settling.values())
        return self.settling.get(stage, 0.0)

    def bill(self, stage: str | None, usd: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + usd

    def _caps(self, stage: str | None) -> list[tuple[str, float, float, float]]:
        caps = []
        if self.max_usd is not None:
            caps.append(("llm.max_cost_usd", self.max_usd, sum(self.spent.values()), sum(self.reserved.values())))
        if stage is not None and stage in self.stage_max_usd:
            caps.append((f"llm.stage_max_cost_usd.{stage}", self.stage_max_usd[stage], self.spent.get(stage, 0.0),
                         self.reserved.get(stage, 0.0)))
        return caps


@dataclass
class Hold:
    """A request's worst-case reservation under the spend cap, released once its reply is billed (or it failed)."""

    cap: SpendCap
    stage: str | None
    usd: float
    settles: bool = False

    def release(self) -> None:
        if self.usd > 0:
            self.cap.reserved[self.stage] -= self.usd
            if self.settles:
                self.cap.settling[self.stage] -= self.usd
            self.usd = 0.0
            self.cap._on_release()


class Admission:
    """Everything a request passes before it is sent: a concurrency slot, then the RPM and TPM buckets; then
    (``reserve``) the run's spend cap.

    With ``shared``, the buckets lease their capacity from a budget that other processes share (the Ray
    workers of one account) instead of holding this process's own; the concurrency window stays local."""

    def __init__(self, endpoint: EndpointSettings, shared: SharedLimits | None = None,
                 spend: SpendCap | None = None):
        self.spend = spend if spend is not None else SpendCap()
        # Counters the live view reads (``gauges``), counted by the online engine on the accounts' loop.
        self.sent = self.rate_limited = self.retries = 0
        latency = (LatencySignal(endpoint.latency_backoff_factor, endpoint.latency_backoff_floor_s)
                   if endpoint.uses_latency_backoff else None)
        self.concurrency = AdaptiveConcurrency(endpoint.max_concurrency, endpoint.min_concurrency,
                                               endpoint.aimd_decrease, latency=latency)
        bucket = _local_bucket if shared is None else shared.bucket
        self.rpm = self.tpm = None
        if endpoint.rpm:
            rate = endpoint.rpm / 60.0 * endpoint.rate_headroom
            self.rpm = bucket("rpm", rate, rate * endpoint.burst_s)
        if endpoint.tpm:
            rate = endpoint.tpm / 60.0 * endpoint.rate_headroom
            self.tpm = bucket("tpm", rate, max(rate * endpoint.burst_s, rate))
        if shared is not None:
            self.concurrency.listener = shared

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        await self.concurrency.acquire()
        try:
            if self.tpm is not None:
                await self.tpm.take(tokens)
            if self.rpm is not None:
                await self.rpm.take(1)
            yield
        finally:
            self.concurrency.release()

    def gauges(self) -> dict[str, float]:
        """This endpoint's figures for the live view (``builder.live``): requests holding a slot now, the
        current AIMD window, and since the run started the requests sent, the 429s and the retries."""
        return {"in_flight": self.concurrency.in_flight, "limit": int(self.concurrency.limit), "requests": self.sent,
                "rate_limited": self.rate_limited, "retries": self.retries}

    def reserve(self, stage: str | None, worst_usd: float) -> Hold:
        """Reserve a request's worst-case cost under the run's spend cap; raises ``SpendCapReached`` when it
        does not fit (the caller then sends nothing more)."""
        return self.spend.reserve(stage, worst_usd)

    async def admit(self, stage: str | None, worst_usd: float) -> Hold:
        """``SpendCap.admit``: reserve once the request fits, waiting for replies in flight if they may make room."""
        return await self.spend.admit(stage, worst_usd)
