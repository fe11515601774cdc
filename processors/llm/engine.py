"""The online engine: every distinct request of a call as one task through admission, retries and parsing.

One attempt = take a concurrency slot, build the body (images encoded here, so at most ``max_concurrency``
bodies exist at once), pass the RPM/TPM buckets, send, release the slot, then judge the reply. Retries
(tenacity) wait *outside* the slot: a request sleeping on a Retry-After blocks nobody.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from processors.llm import reply as rp
from processors.llm.breaker import CircuitBreaker
from processors.llm.cache import RequestCache
from processors.llm.errors import AttemptError, redact
from processors.llm.limits import Admission
from processors.llm.prepare import Prepared
from processors.llm.request import RATE_LIMITED, TRUNCATED, UNPARSABLE, LLMResult, Usage
from processors.llm.settings import EndpointSettings
from processors.llm.transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class Tally:
    """What a call did, summed into the stage's usage (``StageContext.add_usage``)."""

    requests: int = 0  # requests the API answered (billed), cache hits excluded
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)  # everything billed
    batch_usage: Usage = field(default_factory=Usage)  # the part billed at the Batch API discount
    on_billed: Callable[[], None] | None = field(default=None, repr=False)  # after each billed reply

    def billed(self, usage: Usage, *, batch: bool = False) -> None:
        """Count one billed reply (and let the stage record its running cost)."""
        self.requests += 1
        self.usage.add(usage)
        if batch:
            self.batch_usage.add(usage)
        if self.on_billed is not None:
            self.on_billed()


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, AttemptError) and exc.retryable


class OnlineEngine:
    def __init__(self, endpoint: EndpointSettings, transport: Transport, breaker: CircuitBreaker,
                 cache: RequestCache | None, tally: Tally, secret: str | None):
        self.endpoint = endpoint
        self.transport = transport
        self.breaker = breaker
        self.cache = cache
        self.tally = tally
        self._secret = secret
        self.admission = Admission(endpoint)
        # Attempts 2..N go through tenacity; the first attempt runs bare (see ``one``).
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, endpoint.max_retries)), wait=self._wait,
            retry=retry_if_exception(_retryable), reraise=True,
        )

    def backoff(self, failed_attempts: int, exc: BaseException | None) -> float:
        """Retry-After when the server gave one (capped), else exponential backoff with equal jitter.

        A bad reply from a healthy server (unparsable, cut by max_tokens) is asked again at once: waiting
        helps an overloaded server, not a model that wrote broken JSON."""
        cap = self.endpoint.backoff_max_s
        if isinstance(exc, AttemptError) and exc.retry_after is not None:
            return min(cap, exc.retry_after) * random.uniform(1.0, 1.1)
        if isinstance(exc, AttemptError) and exc.reason in (UNPARSABLE, TRUNCATED):
            return 0.0
        base = min(cap, self.endpoint.backoff_initial_s * 2 ** (failed_attempts - 1))
        return base / 2 + random.uniform(0, base / 2)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return self.backoff(state.attempt_number + 1, exc)  # tenacity's attempt 1 is our attempt 2

    async def run(self, prepared: list[Prepared]) -> dict[str, LLMResult]:
        """Results by cache key. Raises ``CircuitOpenError`` (after cancelling the rest) if the breaker opens."""
        tasks = [asyncio.ensure_future(self.one(p)) for p in prepared]
        if not tasks:
            return {}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Retrieve every task's exception, not just the first: an unretrieved one is printed at shutdown as
        # "Task exception was never retrieved", with whatever its message holds.
        errors = [task.exception() for task in tasks if not task.cancelled() and task.exception() is not None]
        if errors:
            raise errors[0]
        return {p.cache_key: task.result() for p, task in zip(prepared, tasks)}

    async def one(self, p: Prepared) -> LLMResult:
        attempts = [0]
        try:
            try:  # the common case, one attempt, without tenacity's ~0.3 ms of bookkeeping
                reply, value = await self._attempt(p, attempts)
            except AttemptError as first:
                if not first.retryable or self.endpoint.max_retries == 0:
                    raise
                await asyncio.sleep(self.backoff(1, first))
                reply, value = await self._retrying.copy()(self._attempt, p, attempts)
        except AttemptError as exc:
            self.tally.failed += 1
            self._count(attempts[0])
            return LLMResult(key=p.request.key, ok=False, reason=exc.reason, detail=redact(exc.detail, self._secret),
                             raw_text=exc.raw_text, attempts=attempts[0])
        self._count(attempts[0])
        if self.cache is not None:
            self.cache.put(p.cache_key, reply)
        return LLMResult(key=p.request.key, ok=True, value=value, raw_text=reply["text"],
                         usage=Usage(**reply["usage"]), logprobs=reply["logprobs"],
                         finish_reason=reply["finish_reason"], attempts=attempts[0])

    def _count(self, attempts: int) -> None:
        self.tally.attempts += attempts
        self.tally.retries += max(0, attempts - 1)

    async def _attempt(self, p: Prepared, attempts: list[int]) -> tuple[dict[str, Any], Any]:
        attempts[0] += 1
        self.breaker.check()
        async with self.admission.slot(p.est_tokens):
            self.breaker.check()
            try:
                body = await p.body()
            except (OSError, ValueError) as exc:  # the image will not decode: a fault of this row, not the API
                reason = "image_missing" if isinstance(exc, FileNotFoundError) else "image_unreadable"
                raise AttemptError(reason, f"{type(exc).__name__}: {exc}", retryable=False, breaker=False) from None
            try:
                completion = await self.transport.chat(body, p.cache_key)
            except AttemptError as exc:
                if exc.reason == RATE_LIMITED and exc.retryable:
                    self.admission.concurrency.on_rate_limited()
                if exc.breaker:
                    self.breaker.failure(exc.what, redact(exc.detail, self._secret))
                    self.breaker.check()  # the attempt that opens the breaker stops the call
                raise
        self.breaker.success()
        self.admission.concurrency.on_success()
        reply = rp.normalise(completion)
        self.tally.billed(Usage(**reply["usage"]))
        return reply, rp.interpret(reply, p.request)
