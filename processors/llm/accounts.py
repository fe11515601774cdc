"""The run's LLM accounts: one event loop, and per endpoint one admission, one breaker and one connection pool.

Every LLM call of the run (``LLMClient.send_groups`` in ``processors.llm.client``, from any shard or stage) is a
coroutine on the one long-lived loop of ``Accounts`` (a daemon thread), and calls to the same endpoint share
its account: its ``Admission`` (RPM/TPM buckets, AIMD window), breaker and connection pool last as long as the
run, not one call. So the rate limit is not left unused at a shard, taxonomy round or score batch boundary,
a 429 storm in one shard slows the next one too, and two shards in flight fill one window.

``budget_share`` scales every account's RPM, TPM and concurrency, so N processes (Ray workers) that share one
provider account can each take 1/N of its limit. Pickled (into a Ray worker or a subprocess), an ``Accounts``
becomes that process's own registry with the same share: the loop and sockets never travel.

``lease_from`` names the run's shared budget (``processors.llm.ray_budget``, a named Ray actor): the RPM/TPM
buckets of every account then lease their capacity from it, so every process of the run together keeps to
the account's limit (times ``budget_share``), whatever the number of workers.

``spend`` (a ``SpendCap``) is the run's hard spend cap: every account's admission reserves a request's worst-case
cost there before it is sent, so all shards, stages and endpoints of the run together stay within
``llm.max_cost_usd`` (and ``llm.stage_max_cost_usd``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from builder.live import LIVE_ENDPOINTS
from processors.llm.breaker import CircuitBreaker
from processors.llm.limits import Admission, SpendCap
from processors.llm.settings import EndpointSettings
from processors.llm.transport import Transport, make_transport

logger = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE = "llm_accounts"  # the key of the run's accounts in ``StageContext.services``
WORKER_SHARE = "llm_worker_share"  # services key: an LLM stage's ``limit_share`` (the Ray engine sets it per pool member)
STOP_POLL_S = 0.05  # how often a waiting caller looks at its stop event
UNWIND_S = 15.0  # after a stop, how long a cancelled call may take to unwind (> the engine's WIRE_WAIT_S)


@dataclass
class Account:
    """One endpoint's shared state in this process."""

    admission: Admission
    breaker: CircuitBreaker
    transport: Transport
    label: str = ""  # the endpoint name that opened it, for the live view
    queue_task: "asyncio.Task | None" = None  # polls the server's /metrics (``_watch_queue``), kept referenced


def _watch_queue(account: Account, endpoint: EndpointSettings, base_url: str) -> None:
    """Where the latency backoff is on, also read the server's queue from its /metrics (a task on the accounts'
    loop for the rest of the run; ``close`` cancels it with every other task)."""
    if not endpoint.uses_latency_backoff or not endpoint.latency_backoff_queue_poll_s:
        return
    from processors.llm.server_queue import QueueWatch

    watch = QueueWatch(base_url, interval_s=endpoint.latency_backoff_queue_poll_s)
    account.admission.concurrency.queue = watch
    account.queue_task = asyncio.get_running_loop().create_task(watch.run(), name=f"queue-watch {base_url}")


class Accounts:
    def __init__(self, budget_share: float = 1.0, lease_from: str | None = None, run_id: str | None = None,
                 spend: SpendCap | None = None):
        if not 0 < budget_share <= 1:
            raise ValueError(f"budget_share must be in (0, 1], got {budget_share}")
        self.budget_share = budget_share
        self.lease_from = lease_from
        # Names the run: a worker that receives this (pickled) gets one registry per run, not per process,
        # so a breaker opened in one run never refuses the next run's calls there.
        self.run_id = run_id or uuid.uuid4().hex
        self.worker_share = 1.0  # set where a pool member runs (``call_accounts``), before its first call
        # The run's spend caps, checked by every account's admission (local to this process: a Ray run with a
        # cap is refused at its start, ``processors.session.run_services``).
        self.spend = spend if spend is not None else SpendCap()
        self._accounts: dict[tuple, Account] = {}
        self._limits: dict[tuple, tuple] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __reduce__(self):  # a process's loop, sockets and breakers stay in it
        return (process_accounts, (self.budget_share, self.lease_from, self.run_id))

    # -- the loop -----------------------------------------------------------------------------------
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("the run's LLM accounts are closed (the run ended)")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name="llm-accounts", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], *, stop: Callable[[], bool] | None = None) -> T:
        """Run ``coro`` on the accounts' loop and return its result, from any thread but that loop's.

        When ``stop()`` turns true, or this thread is interrupted (Ctrl-C, SIGTERM raised here), the call is
        cancelled and this waits for it to unwind (answers on the wire cached, spend journalled; the engine
        bounds that by ``WIRE_WAIT_S``) before raising."""
        try:
            loop = self._running_loop()
        except RuntimeError:
            coro.close()  # never started: no "was never awaited" warning
            raise
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Accounts.run called from the accounts' own loop: await the coroutine instead")
        if stop is not None and stop():
            coro.close()
            raise asyncio.CancelledError("stopped before the call started")
        result: concurrent.futures.Future = concurrent.futures.Future()
        started: list[asyncio.Task] = []

        def start() -> None:  # on the loop; runs before any cancel() below (call_soon_threadsafe is FIFO)
            task = loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda t: _settle(result, t))

        def cancel_and_wait() -> None:
            loop.call_soon_threadsafe(lambda: started[0].cancel())
            concurrent.futures.wait([result], timeout=UNWIND_S)

        loop.call_soon_threadsafe(start)
        try:
            while not concurrent.futures.wait([result], timeout=STOP_POLL_S).done:
                if stop is not None and stop():
                    cancel_and_wait()
                    raise asyncio.CancelledError("stopped: another shard failed or the run was interrupted")
            return result.result()
        except BaseException:
            if not result.done():
                cancel_and_wait()
            raise

    # -- accounts (called on the loop) -------------------------------------------------------------
    async def account(self, name: str, endpoint: EndpointSettings, *, base_url: str, api_key, key_env: str | None,
                      breaker_threshold: int) -> Account:
        """The shared account of this endpoint (same name, settings and server), opened on first use."""
        # One account per server, credentials and model - what a provider's limits are counted by - whatever
        # the endpoint's name or its per-call overrides (a referee preset's image size): every stage and
        # referee calling it shares one window. The first caller's limits apply (the rest are logged if they
        # differ); the transport settings are part of it because the connection pool is shared too.
        key = (base_url, key_env, endpoint.model, endpoint.transport, endpoint.timeout_s, breaker_threshold)
        account = self._accounts.get(key)
        if account is not None and self._limits.get(key) != _limits_of(endpoint):
            logger.debug("llm endpoint %r shares the account of an earlier one (%s, model %s) and its limits",
                         name, base_url, endpoint.model)
        if account is None:
            share = self.scaled(endpoint)
            transport = make_transport(endpoint.transport, base_url, api_key, timeout_s=endpoint.timeout_s,
                                       max_connections=share.max_concurrency)
            await transport.__aenter__()
            shared = None
            if self.lease_from is not None:
                from processors.llm.ray_budget import RayLimits

                shared = RayLimits(self.lease_from, key[:4])
            breaker = CircuitBreaker(breaker_threshold, endpoint=name, base_url=base_url, model=endpoint.model,
                                     key_env=key_env)
            account = Account(Admission(share, shared, self.spend), breaker, transport, label=name)
            if key in self._accounts:  # opened by a concurrent call meanwhile
                await transport.__aexit__(None, None, None)
                return self._accounts[key]
            self._accounts[key] = account
            self._limits[key] = _limits_of(endpoint)
            _watch_queue(account, endpoint, base_url)
        return account

    def live_endpoints(self) -> dict[str, dict[str, float]]:
        """Each endpoint's figures in this process (``Admission.gauges``), for the live view: the run's
        ``builder.live.LIVE_ENDPOINTS`` service. Read from any thread (plain ints; the dict is copied)."""
        figures: dict[str, dict[str, float]] = {}
        for account in list(self._accounts.values()):
            label = account.label if account.label not in figures else f"{account.label}#{len(figures)}"
            figures[label] = account.admission.gauges()
        return figures

    def scaled(self, endpoint: EndpointSettings) -> EndpointSettings:
        """The endpoint's limits times this process's share of the account; the concurrency also times its
        share among the workers of a stage's pool (``worker_share``: a vLLM server's only protection is its
        window, which N workers must split, not multiply)."""
        if self.budget_share == 1 and self.worker_share == 1:
            return endpoint
        share, window = self.budget_share, self.budget_share * self.worker_share
        return endpoint.model_copy(update={
            "max_concurrency": max(1, math.floor(endpoint.max_concurrency * window)),
            "min_concurrency": max(1, math.floor(endpoint.min_concurrency * window)),
            "rpm": endpoint.rpm * share if endpoint.rpm else endpoint.rpm,
            "tpm": endpoint.tpm * share if endpoint.tpm else endpoint.tpm,
        })

    # -- the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection pool and stop the loop (the run ended)."""
        with self._lock:
            loop, self._loop, self._closed = self._loop, None, True
        if loop is None:
            return

        async def close_all() -> None:
            # Whatever still runs (a call whose caller gave up waiting) is cancelled and awaited first: its
            # sessions must not close under it, and an answer it is committing must land.
            current = asyncio.current_task()
            others = [task for task in asyncio.all_tasks() if task is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            for account in self._accounts.values():
                try:
                    await account.transport.__aexit__(None, None, None)
                except Exception:  # noqa: BLE001 - a pool that will not close must not hide the run's outcome
                    logger.debug("closing a connection pool failed", exc_info=True)
            self._accounts.clear()

        try:
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=UNWIND_S)
        except Exception:  # noqa: BLE001
            logger.debug("closing the LLM accounts failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=UNWIND_S)
        if not loop.is_running():
            loop.close()


def _settle(result: concurrent.futures.Future, task: asyncio.Task) -> None:
    if task.cancelled():
        result.set_exception(asyncio.CancelledError("the call was cancelled"))
    elif task.exception() is not None:
        result.set_exception(task.exception())
    else:
        result.set_result(task.result())


_PROCESS: dict[str, Accounts] = {}  # run id -> this process's accounts of that run
_PROCESS_LOCK = threading.Lock()


def process_accounts(budget_share: float = 1.0, lease_from: str | None = None, run_id: str | None = None
                     ) -> Accounts:
    """This process's accounts of run ``run_id`` (what a pickled ``Accounts`` becomes): the original where it
    lives (so unpickling in the driver never doubles the budget), else one made here. A worker serves one run
    at a time: a new run's accounts close the previous run's (their loop, sockets and breakers)."""
    with _PROCESS_LOCK:
        accounts = _PROCESS.get(run_id) if run_id is not None else None
        if accounts is not None and not accounts._closed:
            return accounts
        stale = [other for key, other in _PROCESS.items() if key != run_id]
        _PROCESS.clear()
        accounts = _PROCESS[run_id or uuid.uuid4().hex] = Accounts(budget_share, lease_from, run_id)
    for other in stale:
        other.close()
    return accounts


def _register(accounts: Accounts) -> Accounts:
    with _PROCESS_LOCK:
        _PROCESS[accounts.run_id] = accounts
    return accounts


def _limits_of(endpoint: EndpointSettings) -> tuple:
    return (endpoint.max_concurrency, endpoint.min_concurrency, endpoint.rpm, endpoint.tpm, endpoint.aimd_decrease)


@contextlib.contextmanager
def run_accounts(budget_share: float = 1.0, lease_from: str | None = None, spend: SpendCap | None = None
                 ) -> Iterator[dict[str, Any]]:
    """The services of one run: its accounts, closed when the run ends (``Runner.run_scope``); ``spend`` holds
    the run's spend caps and what the run folder had spent when the run started."""
    accounts = _register(Accounts(budget_share, lease_from, spend=spend))
    try:
        yield {SERVICE: accounts, LIVE_ENDPOINTS: accounts.live_endpoints}
    finally:
        accounts.close()
        with _PROCESS_LOCK:
            _PROCESS.pop(accounts.run_id, None)


@contextlib.contextmanager
def call_accounts(services: dict[str, Any], spend: SpendCap | None = None) -> Iterator[Accounts]:
    """The run's accounts, or - for a call outside a run (a tool, a test) - accounts for this call alone, with
    ``spend`` as their spend caps (nothing spent before the call)."""
    accounts = services.get(SERVICE)
    if accounts is not None:
        share = services.get(WORKER_SHARE)
        if share and not accounts._accounts:  # a pool member's share, before any account is opened
            accounts.worker_share = float(share)
        yield accounts
        return
    accounts = Accounts(spend=spend)
    try:
        yield accounts
    finally:
        accounts.close()
