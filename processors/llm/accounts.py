"""The run's LLM accounts: one event loop, and per endpoint one admission, one breaker and one connection pool.

Before, every ``run_requests`` call made its own event loop, ``Admission`` (RPM/TPM buckets, AIMD window) and
breaker, so an account's state restarted at every shard, taxonomy round and score batch: the rate limit went
unused at each boundary, and a 429 storm in one shard taught the next one nothing. ``Accounts`` keeps them for
as long as the run: every call of every shard and stage is a coroutine on its one long-lived loop (a daemon
thread), and calls to the same endpoint share its account. Two shards in flight then fill one window.

``budget_share`` scales every account's RPM, TPM and concurrency, so N processes (Ray workers) that share one
provider account can each take 1/N of its limit. Pickled (into a Ray worker or a subprocess), an ``Accounts``
becomes that process's own registry with the same share: the loop and sockets never travel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from processors.llm.breaker import CircuitBreaker
from processors.llm.limits import Admission
from processors.llm.settings import EndpointSettings
from processors.llm.transport import Transport, make_transport

logger = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE = "llm_accounts"  # the key of the run's accounts in ``StageContext.services``
STOP_POLL_S = 0.05  # how often a waiting caller looks at its stop event
UNWIND_S = 10.0  # after a stop, how long a cancelled call may take to close its cache and journal


@dataclass
class Account:
    """One endpoint's shared state in this process."""

    admission: Admission
    breaker: CircuitBreaker
    transport: Transport


class Accounts:
    def __init__(self, budget_share: float = 1.0):
        if not 0 < budget_share <= 1:
            raise ValueError(f"budget_share must be in (0, 1], got {budget_share}")
        self.budget_share = budget_share
        self._accounts: dict[tuple, Account] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __reduce__(self):  # a process's loop, sockets and breakers stay in it
        return (process_accounts, (self.budget_share,))

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
        cancelled and this waits for it to unwind (answers cached, spend journalled) before raising."""
        try:
            loop = self._running_loop()
        except RuntimeError:
            coro.close()  # never started: no "was never awaited" warning
            raise
        finished = threading.Event()

        async def tracked() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), loop)
        try:
            while True:
                try:
                    return future.result(timeout=STOP_POLL_S)
                except concurrent.futures.TimeoutError:
                    if stop is not None and stop():
                        future.cancel()
                        finished.wait(UNWIND_S)
                        raise asyncio.CancelledError("stopped: another shard failed or the run was interrupted") \
                            from None
        except BaseException:
            if not future.done():
                future.cancel()
                finished.wait(UNWIND_S)
            raise

    # -- accounts (called on the loop) -------------------------------------------------------------
    async def account(self, name: str, endpoint: EndpointSettings, *, base_url: str, api_key, key_env: str | None,
                      breaker_threshold: int) -> Account:
        """The shared account of this endpoint (same name, settings and server), opened on first use."""
        key = (name, endpoint.model_dump_json(), base_url, key_env, breaker_threshold)
        account = self._accounts.get(key)
        if account is None:
            share = self.scaled(endpoint)
            transport = make_transport(endpoint.transport, base_url, api_key, timeout_s=endpoint.timeout_s,
                                       max_connections=share.max_concurrency)
            await transport.__aenter__()
            account = Account(Admission(share), CircuitBreaker(breaker_threshold, endpoint=name, base_url=base_url,
                                                                model=endpoint.model, key_env=key_env), transport)
            if key in self._accounts:  # opened by a concurrent call meanwhile
                await transport.__aexit__(None, None, None)
                return self._accounts[key]
            self._accounts[key] = account
        return account

    def scaled(self, endpoint: EndpointSettings) -> EndpointSettings:
        """The endpoint's limits times this process's share of the account."""
        if self.budget_share == 1:
            return endpoint
        share = self.budget_share
        return endpoint.model_copy(update={
            "max_concurrency": max(1, math.floor(endpoint.max_concurrency * share)),
            "min_concurrency": max(1, math.floor(endpoint.min_concurrency * share)),
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


_PROCESS: dict[float, Accounts] = {}
_PROCESS_LOCK = threading.Lock()


def process_accounts(budget_share: float = 1.0) -> Accounts:
    """This process's accounts at ``budget_share`` (what a pickled ``Accounts`` becomes in a worker)."""
    with _PROCESS_LOCK:
        accounts = _PROCESS.get(budget_share)
        if accounts is None or accounts._closed:
            accounts = _PROCESS[budget_share] = Accounts(budget_share)
        return accounts


@contextlib.contextmanager
def run_accounts(budget_share: float = 1.0) -> Iterator[dict[str, Any]]:
    """The services of one run: its accounts, closed when the run ends (``Runner.run_scope``)."""
    accounts = Accounts(budget_share)
    try:
        yield {SERVICE: accounts}
    finally:
        accounts.close()


@contextlib.contextmanager
def call_accounts(services: dict[str, Any]) -> Iterator[Accounts]:
    """The run's accounts, or - for a call outside a run (a tool, a test) - accounts for this call alone."""
    accounts = services.get(SERVICE)
    if accounts is not None:
        yield accounts
        return
    accounts = Accounts()
    try:
        yield accounts
    finally:
        accounts.close()
