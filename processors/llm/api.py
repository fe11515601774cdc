"""The async core of an LLM call (``execute``) and what it needs: the connection, the request group.

``execute`` answers what it can from the request cache and sends the rest online or through the Batch API.
Identical requests in one call are sent once and their answer is shared. Stages never call it directly: they
go through ``processors.llm.client`` (``LLMClient`` / ``EndpointCall``), which resolves the endpoint once and
runs every call on the run's one event loop (``processors.llm.accounts``); ``run_requests`` and
``run_request_groups`` are one-off wrappers around that client for tests and tools.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from builder.ids import fingerprint
from processors.llm import flex
from processors.llm import reply as rp
from processors.llm.accounts import Accounts
from processors.llm.breaker import CircuitBreaker
from processors.llm.cache import RequestCache
from processors.llm.engine import OnlineEngine, Tally
from processors.llm.errors import AttemptError, MissingApiKeyError
from processors.llm.limits import Admission
from processors.llm.prepare import Prepared, prepare
from processors.llm.request import LLMRequest, LLMResult, Usage
from processors.llm.settings import EndpointSettings, LLMSettings
from processors.llm.transport import Secret, make_transport

logger = logging.getLogger(__name__)

NOT_CACHED = "not_cached"  # a cache-only look-up that found no answer (``RequestGroup.cache_only``)
CACHE_FILE = "llm-requests.sqlite"
DRY_RUN_CACHE_FILE = "llm-requests-dry-run.sqlite"  # simulator answers must never satisfy a real run


@dataclasses.dataclass
class Connection:
    """Where requests go. The key is a ``Secret``: it prints as ``***``."""

    base_url: str
    api_key: Secret
    key_env: str | None = None


def resolve_connection(endpoint: EndpointSettings, *, dry_run: bool, services: dict[str, Any]) -> Connection:
    if dry_run:
        if "llm_base_url" not in services:
            raise RuntimeError("--dry-run needs the simulator: ctx.services['llm_base_url'] is not set")
        return Connection(services["llm_base_url"], Secret(services.get("llm_api_key", "sim-key")), None)
    if endpoint.api_key_env is None:
        return Connection(endpoint.base_url, Secret(None), None)
    value = os.environ.get(endpoint.api_key_env)
    if not value:
        raise MissingApiKeyError(
            f"the API key for {endpoint.base_url} is read from the environment variable "
            f"{endpoint.api_key_env}, which is not set; export it (or set api_key_env: null for a server "
            "without authentication)"
        )
    return Connection(endpoint.base_url, Secret(value), endpoint.api_key_env)


@dataclasses.dataclass
class RequestGroup:
    """The requests of one call to one endpoint; ``overrides`` replace settings of that endpoint for it (a
    referee preset's served model name and image size where the endpoint leaves them unset)."""

    requests: list[LLMRequest]
    endpoint: str
    overrides: dict[str, Any] | None = None
    # Answer from the request cache only, sending nothing (a miss fails ``not_cached``): what a server that
    # went down had answered before, so moving its share to another server pays for none of it again.
    cache_only: bool = False


def with_overrides(settings: LLMSettings, endpoint: str, overrides: dict[str, Any] | None) -> LLMSettings:
    """``settings`` with endpoint ``endpoint``'s fields replaced by ``overrides`` (validated like the config)."""
    if not overrides:
        return settings
    ep = settings.endpoint(endpoint)
    changed = EndpointSettings.model_validate({**ep.model_dump(exclude_unset=True), **overrides})
    return settings.model_copy(update={"endpoints": {**settings.endpoints, endpoint: changed}})


def _from_cache(prepared: list[Prepared], cache: RequestCache | None, tally: Tally) -> dict[str, LLMResult]:
    if cache is None:
        return {}
    hits: dict[str, LLMResult] = {}
    stored = cache.get_many(p.cache_key for p in prepared)
    for p in prepared:
        reply = stored.get(p.cache_key)
        if reply is None:
            continue
        try:
            value = rp.interpret(reply, p.request)
        except AttemptError as exc:  # parse changed meaning without a new prompt_version: ask again
            logger.warning("cached reply for %s no longer parses (%s); sending the request again", p.request.key,
                           exc.detail)
            continue
        tally.cache_hits += 1
        hits[p.cache_key] = LLMResult(key=p.request.key, ok=True, value=value, raw_text=reply["text"],
                                      from_cache=True, logprobs=reply.get("logprobs"),
                                      finish_reason=reply.get("finish_reason"))
    return hits


async def execute(requests: list[LLMRequest], settings: LLMSettings, endpoint: str, connection: Connection, *,
                  cache_path: Path | None, state_dir: Path, tally: Tally, accounts: Accounts | None = None,
                  cache_only: bool = False) -> list[LLMResult]:
    """The async core of ``EndpointCall.send``, usable without a StageContext (benchmarks, tools). Without
    ``accounts`` (awaited on the caller's own loop) the call has an admission and breaker of its own. With
    ``cache_only`` nothing is sent: what the cache lacks fails ``not_cached``."""
    ep = settings.endpoint(endpoint)
    # Reading and hashing the images, and the cache look-up, block: off the loop, which every shard and
    # endpoint of the run shares (a shard of 2,000 images would stall the others' replies and buckets).
    prepared, unreadable = await asyncio.to_thread(_prepare_all, requests, ep)
    unique = list({p.cache_key: p for p in reversed(prepared)}.values())[::-1]  # first occurrence wins
    cache = await asyncio.to_thread(RequestCache, cache_path) if cache_path is not None else None
    try:
        results = await asyncio.to_thread(_from_cache, unique, cache, tally)
        todo = [p for p in unique if p.cache_key not in results]
        if cache_only:
            results.update((p.cache_key, LLMResult(key=p.request.key, ok=False, reason=NOT_CACHED,
                                                   detail="not in the request cache (nothing was sent)"))
                           for p in todo)
        elif todo:
            call_id = fingerprint("llm-call", sorted(p.cache_key for p in unique))  # stable across a restart
            results.update(await _send(todo, settings, endpoint, connection, cache, state_dir, tally, call_id,
                                        accounts))
    finally:
        if cache is not None:
            cache.close()
    logger.info("llm %s: %d requests, %d from cache, %d sent, %d failed, %d with unreadable images", endpoint,
                len(requests), tally.cache_hits, tally.requests, tally.failed, len(unreadable))
    if tally.flex_fallbacks:
        logger.info("llm %s: %d requests found no capacity at the flex tier and were sent at the standard tier "
                    "(flex_fallback_after)", endpoint, tally.flex_fallbacks)
    answered = iter(_in_order(prepared, results))
    return [unreadable[i] if i in unreadable else next(answered) for i in range(len(requests))]


def _prepare_all(requests: list[LLMRequest], ep) -> tuple[list[Prepared], dict[int, LLMResult]]:
    """Prepare every request; one whose image cannot be read fails alone (``image_missing``/``image_unreadable``)
    instead of stopping the call: the cache key itself needs the image's bytes."""
    prepared, unreadable = [], {}
    for index, request in enumerate(requests):
        try:
            prepared.append(prepare(request, ep))
        except FileNotFoundError as exc:
            unreadable[index] = LLMResult(key=request.key, ok=False, reason="image_missing",
                                          detail=f"image file not found: {exc.filename}")
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            unreadable[index] = LLMResult(key=request.key, ok=False, reason="image_unreadable",
                                          detail=f"{type(exc).__name__}: {exc}")
    return prepared, unreadable


async def _send(todo: list[Prepared], settings: LLMSettings, endpoint: str, connection: Connection,
                cache: RequestCache | None, state_dir: Path, tally: Tally, call_id: str,
                accounts: Accounts | None) -> dict[str, LLMResult]:
    ep = settings.endpoint(endpoint)
    secret = connection.api_key.reveal()
    flex.warn_if_unpriced(settings, endpoint)
    if accounts is not None:
        account = await accounts.account(endpoint, ep, base_url=connection.base_url, api_key=connection.api_key,
                                         key_env=connection.key_env,
                                         breaker_threshold=settings.breaker.consecutive_failures)
        return await _send_with(todo, ep, connection, account.transport, account.breaker, account.admission,
                                cache, state_dir, tally, call_id, secret)
    breaker = CircuitBreaker(settings.breaker.consecutive_failures, endpoint=endpoint,
                             base_url=connection.base_url, model=ep.model, key_env=connection.key_env)
    transport = make_transport(ep.transport, connection.base_url, connection.api_key, timeout_s=ep.timeout_s,
                               max_connections=ep.max_concurrency)
    async with transport:
        return await _send_with(todo, ep, connection, transport, breaker, Admission(ep), cache, state_dir, tally,
                                call_id, secret)


async def _send_with(todo, ep, connection, transport, breaker, admission, cache, state_dir, tally, call_id,
                     secret) -> dict[str, LLMResult]:
    online = OnlineEngine(ep, transport, breaker, cache, tally, secret, admission=admission)
    if ep.mode == "batch":
        from processors.llm.batch import BatchRunner  # only batch runs need it

        runner = BatchRunner(ep, connection, online, cache, tally, state_dir)
        # The whole call's worst case at the Batch price is reserved under the spend cap before anything is
        # uploaded (or SpendCapReached); its replies are billed as they are read back, and the hold is released
        # then, before the items the batch did not answer reserve their own online worst case.
        hold = admission.reserve(tally.stage, sum(online.worst_usd(p, batch=True) for p in todo))
        try:
            return await runner.run(todo, call_id, on_batches_read=hold.release)
        finally:
            hold.release()
    return await online.run(todo, call_id)


def _in_order(prepared: list[Prepared], results: dict[str, LLMResult]) -> list[LLMResult]:
    out, seen = [], set()
    for p in prepared:
        result = results[p.cache_key]
        if result.key != p.request.key or p.cache_key in seen:  # a duplicate request shares the answer, once billed
            result = dataclasses.replace(result, key=p.request.key, usage=Usage())
        seen.add(p.cache_key)
        out.append(result)
    return out
