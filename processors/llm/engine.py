"""The online engine: every distinct request of a call as one task through admission, retries and parsing.

One attempt = take a concurrency slot, build the body (images encoded here, so at most ``max_concurrency``
bodies exist at once), pass the RPM/TPM buckets, send, release the slot, then judge the reply. Retries
(tenacity) wait *outside* the slot: a request sleeping on a Retry-After blocks nobody.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from processors.llm import flex
from processors.llm import reply as rp
from processors.llm.breaker import CircuitBreaker
from processors.llm.cache import RequestCache
from processors.llm.errors import AttemptError, SpendCapReached, redact
from processors.llm.estimate import Tier
from processors.llm.limits import Admission, Hold
from processors.llm.prepare import Prepared
from processors.llm.request import RATE_LIMITED, TRUNCATED, UNPARSABLE, LLMResult, Usage
from processors.llm.settings import EndpointSettings
from processors.llm.transport import Transport

logger = logging.getLogger(__name__)

_PADDING_WARNED: set[str] = set()  # servers (base URL and model) already warned about padded structured output
WIRE_WAIT_S = 5.0  # on a stop, how long requests already sent may take to bring back the answer they pay for


@dataclass
class Tally:
    """What a call did, summed into the stage's usage (``StageContext.add_usage``)."""

    requests: int = 0  # requests the API answered (billed), cache hits excluded
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    flex_fallbacks: int = 0  # requests of a flex endpoint sent at the standard tier after capacity 429s
    usage: Usage = field(default_factory=Usage)  # everything billed
    batch_usage: Usage = field(default_factory=Usage)  # the part billed at the Batch API discount
    # Called with each billed reply's usage and the tier that billed it ("standard", "batch" or "flex"): the
    # stage journals its spend there, reply by reply (``StageContext.add_usage``).
    on_billed: Callable[[Usage, Tier], None] | None = field(default=None, repr=False)
    # Called once per call with the counters that cost nothing (cache hits, retries).
    on_free: Callable[..., None] = field(default=lambda **counters: None, repr=False)
    # USD of (prompt tokens, completion tokens, tier) at the call's model (0 without a price): what a request
    # reserves under the run's spend cap before it is sent; ``stage`` names the cap it counts against too.
    price: Callable[[float, float, Tier], float] = field(default=lambda prompt, completion, tier: 0.0, repr=False)
    stage: str | None = None

    def billed(self, usage: Usage, *, batch: bool = False, tier: Tier | None = None) -> None:
        """Count one billed reply at ``tier`` (``batch=True``: the Batch API's; default: the standard tier)."""
        tier = tier or ("batch" if batch else "standard")
        self.requests += 1
        self.usage.add(usage)
        if tier == "batch":
            self.batch_usage.add(usage)
        if self.on_billed is not None:
            self.on_billed(usage, tier)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, AttemptError) and exc.retryable


class OnlineEngine:
    def __init__(self, endpoint: EndpointSettings, transport: Transport, breaker: CircuitBreaker,
                 cache: RequestCache | None, tally: Tally, secret: str | None, *, admission: Admission | None = None):
        self.endpoint = endpoint
        self.transport = transport
        self.breaker = breaker
        self.cache = cache
        self.tally = tally
        self._secret = secret
        # Shared by every call to this endpoint in the run (``processors.llm.accounts``), or this call's own.
        self.admission = admission if admission is not None else Admission(endpoint)
        # cache key -> (reason, text) of every paid reply that was unusable (did not parse, cut by max_tokens),
        # this run's and those a killed attempt of the same call paid for (kept in the request cache): they
        # count against the retry budget, so a resume never pays for more attempts than one run would
        self._unusable: dict[str, list[tuple[str, str]]] = {}
        self._call_id: str | None = None
        self._to_commit: list[tuple[str, dict[str, Any], Tier, asyncio.Future]] = []  # replies awaiting commit
        self._capacity_429s: dict[str, int] = {}  # cache key -> capacity 429s it had at the flex tier
        self._on_wire: set[asyncio.Task] = set()  # attempts whose request is sent and not yet answered
        self._stopping = False
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

    async def run(self, prepared: list[Prepared], call_id: str | None = None) -> dict[str, LLMResult]:
        """Results by cache key. Raises ``CircuitOpenError`` (after cancelling the rest) if the breaker opens,
        ``SpendCapReached`` (after the requests on the wire came back) when the next request could cross a cap.

        ``call_id`` (stable across a restart) names the call whose earlier unusable replies count against
        each request's retry budget."""
        self._call_id = call_id
        if self.cache is not None and call_id is not None:
            self._unusable = self.cache.unusable(call_id, [p.cache_key for p in prepared])
        tasks = [asyncio.ensure_future(self.one(p)) for p in prepared]
        if not tasks:
            return {}
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # the shard stops (Ctrl-C, SIGTERM, another shard failed)
            await self._stop(tasks)
            raise
        if pending and any(isinstance(t.exception(), SpendCapReached) for t in done if not t.cancelled()):
            await self._stop(list(pending))  # what is on the wire is paid for: it finishes, cached and counted
        elif pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Retrieve every task's exception, not just the first: an unretrieved one is printed at shutdown as
        # "Task exception was never retrieved", with whatever its message holds.
        errors = [task.exception() for task in tasks if not task.cancelled() and task.exception() is not None]
        if errors:
            raise errors[0]
        return {p.cache_key: task.result() for p, task in zip(prepared, tasks)}

    async def _stop(self, tasks: list[asyncio.Task]) -> None:
        """Stop the call: nothing more is sent; requests already on the wire may finish (for ``WIRE_WAIT_S`` at
        most) so the answers they pay for are cached and counted instead of thrown away; then every task is
        cancelled and awaited, and replies waiting for their commit are committed before the caller closes
        the cache. (``asyncio.wait`` does not cancel what it waits on: before this, orphaned tasks of a
        cancelled call went on sending into a closed cache.)"""
        self._stopping = True
        on_wire = [task for task in tasks if task in self._on_wire]
        for task in tasks:
            if task not in self._on_wire:
                task.cancel()
        try:
            if on_wire:
                await asyncio.wait(on_wire, timeout=min(WIRE_WAIT_S, self.endpoint.timeout_s))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._to_commit and self.cache is not None:
                self._commit_pending()

    async def one(self, p: Prepared) -> LLMResult:
        attempts = [0]
        budget = 1 + self.endpoint.max_retries - len(self._unusable.get(p.cache_key, ()))
        try:
            if budget <= 0:  # a killed attempt already paid for every try this request had
                reason, text = Counter(self._unusable[p.cache_key]).most_common(1)[0][0]
                raise AttemptError(reason, "every attempt allowed for this request was already paid for by an "
                                   "earlier attempt of this call (its replies were unusable); raise max_retries "
                                   "or change the prompt version to ask again", retryable=False, breaker=False,
                                   raw_text=text)
            try:  # the common case, one attempt, without tenacity's ~0.3 ms of bookkeeping
                reply, value = await self._attempt(p, attempts)
            except AttemptError as first:
                if not first.retryable or budget <= 1:
                    raise
                await asyncio.sleep(self.backoff(1, first))
                retrying = self._retrying.copy(stop=stop_after_attempt(budget - 1))
                reply, value = await retrying(self._attempt, p, attempts)
        except AttemptError as exc:
            self.tally.failed += 1
            self._count(attempts[0])
            self._capacity_429s.pop(p.cache_key, None)
            reason, detail, raw_text = self._verdict(exc, p.cache_key)
            return LLMResult(key=p.request.key, ok=False, reason=reason, detail=redact(detail, self._secret),
                             raw_text=raw_text, attempts=attempts[0])
        self._count(attempts[0])
        self._unusable.pop(p.cache_key, None)
        self._capacity_429s.pop(p.cache_key, None)
        return LLMResult(key=p.request.key, ok=True, value=value, raw_text=reply["text"],
                         usage=Usage(**reply["usage"]), logprobs=reply["logprobs"],
                         finish_reason=reply["finish_reason"], attempts=attempts[0])

    def _verdict(self, exc: AttemptError, cache_key: str) -> tuple[str, str, str | None]:
        """(reason, detail, reply text) of a request whose attempts ran out.

        When the model's replies were unusable, that is the verdict, whatever transient error (a 429, a 5xx)
        ended the last attempt: the stage's repair turn acts on it. The reply kept is the one the model gave
        most often, so a fault that spoiled one attempt's text cannot change what is repaired."""
        unusable = self._unusable.pop(cache_key, [])
        if not unusable:
            return exc.reason, exc.detail, exc.raw_text
        (reason, text), _ = Counter(unusable).most_common(1)[0]
        if exc.reason in (UNPARSABLE, TRUNCATED):
            return exc.reason, exc.detail, text
        return reason, f"{len(unusable)} replies were unusable ({reason}); the last attempt: {exc.detail}", text

    def _count(self, attempts: int) -> None:
        self.tally.attempts += attempts
        self.tally.retries += max(0, attempts - 1)

    async def _attempt(self, p: Prepared, attempts: list[int]) -> tuple[dict[str, Any], Any]:
        hold: list[Hold] = []  # the request's reservation under the spend cap, held until its reply is billed
        try:
            return await self._attempt_held(p, attempts, hold)
        finally:
            for reservation in hold:
                reservation.release()

    def worst_usd(self, p: Prepared, *, batch: bool = False, tier: Tier | None = None) -> float:
        """The most ``p`` can cost: its prompt estimate and all of its max_tokens, at ``tier``'s price (default:
        the standard price, what an online or flex attempt can cost at most; ``batch``: the Batch API's)."""
        completion = p.params.get("max_tokens") or p.params.get("max_completion_tokens") or self.endpoint.max_tokens
        tier = tier or ("batch" if batch else "standard")
        return self.tally.price(max(0, p.est_tokens - completion), completion, tier)

    async def _attempt_held(self, p: Prepared, attempts: list[int], hold: list[Hold]
                            ) -> tuple[dict[str, Any], Any]:
        if self._stopping:  # a retry of a stopped call: not sent
            raise asyncio.CancelledError
        attempts[0] += 1
        self.breaker.check()
        async with self.admission.slot(p.est_tokens):
            self.breaker.check()
            if self._stopping:
                raise asyncio.CancelledError
            tier = flex.sent_tier(self.endpoint, self._capacity_429s.get(p.cache_key, 0))
            # Reserved at the standard price even at flex: a reply is billed at the tier that served it, which
            # OpenAI may report as another than the one asked for (and a fallback is standard), so only the
            # standard price bounds what an attempt can cost; a reply's bill then replaces its reservation.
            hold.append(await self.admission.admit(self.tally.stage, self.worst_usd(p)))  # or SpendCapReached
            try:
                body = flex.with_tier(await p.body(), tier)
            except (OSError, ValueError) as exc:  # the image will not decode: a fault of this row, not the API
                reason = "image_missing" if isinstance(exc, FileNotFoundError) else "image_unreadable"
                raise AttemptError(reason, f"{type(exc).__name__}: {exc}", retryable=False, breaker=False) from None
            task = asyncio.current_task()
            self._on_wire.add(task)  # sent: a stop lets it finish (its answer is paid for)
            self.admission.sent += 1
            self.admission.retries += int(attempts[0] > 1)  # the attempt is a retry
            try:
                started = time.monotonic()
                completion = await self.transport.chat(body, p.cache_key)
                latency = time.monotonic() - started  # told to the admission: a queueing server's signal
            except AttemptError as exc:
                if exc.reason == RATE_LIMITED:
                    self.admission.rate_limited += 1
                if exc.reason == RATE_LIMITED and exc.retryable:
                    self._rate_limited(p, tier, exc)
                if exc.breaker:
                    self.breaker.failure(exc.what, redact(exc.detail, self._secret))
                    self.breaker.check()  # the attempt that opens the breaker stops the call
                raise
            finally:
                self._on_wire.discard(task)
        billed_at = flex.billed_tier(completion, tier)
        reply = self._answer_of(completion, billed_at)
        self.breaker.success()
        self.admission.concurrency.on_success(latency)
        if p.request.json_schema is not None:
            self._note_padding(reply)
        try:
            value = rp.interpret(reply, p.request)
        except AttemptError as exc:
            if exc.reason in (UNPARSABLE, TRUNCATED):  # paid for, though unusable: remembered, never cached
                record = (exc.reason, exc.raw_text or "")
                seen = self._unusable.setdefault(p.cache_key, [])
                repeated = record in seen
                seen.append(record)
                if self.cache is not None and self._call_id is not None:
                    self.cache.add_unusable(self._call_id, p.cache_key, record)
                if repeated and p.params.get("temperature") == 0 and exc.retryable:
                    # Greedy decoding gave the same unusable reply twice: a third try would pay for it again.
                    self.tally.billed(Usage(**reply["usage"]), tier=billed_at)
                    raise AttemptError(exc.reason, f"{exc.detail} (the same reply twice at temperature 0: not "
                                       "asked again)", retryable=False, breaker=False, raw_text=exc.raw_text) from None
            self.tally.billed(Usage(**reply["usage"]), tier=billed_at)
            raise
        # The answer is committed to the cache *before* it is counted as paid: a kill between the two can then
        # only under-count one reply, never make a resume pay for an answer it already has.
        if self.cache is not None:
            await self._committed(p.cache_key, reply, billed_at)  # counted there, right after the commit
        else:
            self.tally.billed(Usage(**reply["usage"]), tier=billed_at)
        return reply, value

    def _rate_limited(self, p: Prepared, tier: str | None, exc: AttemptError) -> None:
        """React to a retryable 429. A capacity 429 at flex is counted for the request's fallback and leaves
        the concurrency alone: it says the shared flex pool is full, not that this account sends too fast, so
        sending fewer at once would not bring capacity back (and a fallback would then run slower for it).
        A rate-limit 429 lowers the concurrency (AIMD)."""
        if not flex.is_capacity(exc, tier):
            self.admission.concurrency.on_rate_limited()
            return
        count = self._capacity_429s[p.cache_key] = self._capacity_429s.get(p.cache_key, 0) + 1
        if flex.sent_tier(self.endpoint, count) == flex.STANDARD:
            self.tally.flex_fallbacks += 1
            exc.retry_after = 0.0  # the next attempt goes at the standard tier, which has capacity: no wait
            logger.debug("llm %s: request %s had %d capacity 429s at the flex tier; sending it at the standard "
                         "tier", self.endpoint.model, p.request.key, count)

    def _answer_of(self, completion: dict[str, Any], tier: Tier = "standard") -> dict[str, Any]:
        """The normalised reply, or a retryable ``AttemptError`` that counts for the breaker when the body is
        no answer of the model (``rp.fault``): a proxy's empty stub is a fault on the way, like a 502, never
        "the same unusable reply twice" (which ends a greedy request's retries)."""
        try:
            reply = rp.normalise(completion)
            why = rp.fault(reply)
            if why is not None:
                usage = Usage(**reply["usage"])
                if usage.prompt_tokens or usage.completion_tokens:  # the server says it billed it
                    self.tally.billed(usage, tier=tier)
                raise rp.no_answer(why, completion)
        except AttemptError as exc:
            self.breaker.failure(exc.what, redact(exc.detail, self._secret))
            self.breaker.check()
            raise
        return reply

    def _note_padding(self, reply: dict[str, Any]) -> None:
        """Warn once per server when its structured replies are padded with whitespace (vLLM's default
        grammar): the padding is paid for on every reply, and only a server flag stops it. OpenAI's own API has
        no such flag (its padding is the model's): the advice names vLLM's flag only for other servers."""
        where = f"{self.endpoint.base_url} {self.endpoint.model}"
        if where in _PADDING_WARNED:
            return
        excess = rp.padding(reply.get("text"))
        if excess >= rp.PADDED_CHARS:
            _PADDING_WARNED.add(where)
            logger.warning("LLM endpoint %s (model %s): structured replies are padded with whitespace between "
                           "their JSON tokens (%d characters beyond pretty-printing in one reply of %d): every "
                           "reply pays for it, and a long one runs out of max_tokens. %s", self.endpoint.base_url,
                           self.endpoint.model, excess, len(reply.get("text") or ""),
                           rp.padding_advice(openai_host=self.endpoint.is_openai_host))

    async def _committed(self, key: str, reply: dict[str, Any], tier: Tier = "standard") -> None:
        """Returns once ``reply`` is committed and counted as paid. Replies that arrive in the same turn of the
        event loop share one transaction (a commit per reply cost ~15% of the engine's throughput at zero
        latency), and are counted in the same synchronous step, so a kill can fall between the commit and the
        count of at most that batch, and only for the microseconds the counting takes."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._to_commit:
            loop.call_soon(self._commit_pending)
        self._to_commit.append((key, reply, tier, done))
        await done

    def _commit_pending(self) -> None:
        batch, self._to_commit = self._to_commit, []
        try:
            self.cache.put_many([(key, reply) for key, reply, _, _ in batch])
        finally:  # a reply that could not be stored is still used (put_many logs why): never leave one waiting
            for _, reply, tier, done in batch:
                self.tally.billed(Usage(**reply["usage"]), tier=tier)
                if not done.done():
                    done.set_result(None)
