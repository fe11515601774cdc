"""The one way a stage calls an LLM: ``LLMClient`` (a stage's calls) and ``EndpointCall`` (one endpoint of it).

A stage builds its client once, when its batch function is built::

    client = LLMClient.for_stage(ctx)                  # the run's ``llm:`` settings, cache, meter, stop event
    call = client.endpoint(config.endpoint)            # settings (+ overrides) and connection, resolved once
    results = call.send(requests)                      # same order; per-request failures come back ok=False

``LLMStage.llm_call(config, ctx)`` does the first two lines for a stage with one ``endpoint``. Several
endpoints at once (the score stage's referees, each on its own servers) go through ``client.send_groups``.

Resolving an endpoint reads its API key from the environment (``MissingApiKeyError`` when unset) or, under
``--dry-run``, takes the simulator's URL from the stage's services. What depends on the shard that calls -
its usage meter and stop event - is read at each ``send`` on the calling thread, so one client serves the
shards in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processors.llm.accounts import call_accounts
from processors.llm.api import (CACHE_FILE, DRY_RUN_CACHE_FILE, Connection, RequestGroup, execute,
                                resolve_connection, with_overrides)
from processors.llm.encoded_store import ENCODED_STORE_FOLDER
from processors.llm.engine import Tally
from processors.llm.estimate import Tier, cost_usd, worst_cost_usd
from processors.llm.images import use_encoded_store
from processors.llm.limits import SpendCap
from processors.llm.request import LLMRequest, LLMResult, Usage
from processors.llm.settings import EndpointSettings, LLMSettings

if TYPE_CHECKING:
    from builder.stage import StageContext, UsageMeter


@dataclass(frozen=True, eq=False)
class EndpointCall:
    """One endpoint as a stage calls it: the run's LLM settings with ``overrides`` applied to endpoint
    ``name`` (a referee preset's served model name and image size), where requests go, and the request cache."""

    client: "LLMClient"
    name: str
    overrides: dict[str, Any] | None
    settings: LLMSettings
    connection: Connection
    cache_path: Path | None

    @property
    def endpoint(self) -> EndpointSettings:
        return self.settings.endpoint(self.name)

    @property
    def model(self) -> str:
        return self.endpoint.model

    def group(self, requests: list[LLMRequest], *, cache_only: bool = False) -> RequestGroup:
        """``requests`` as one group of a ``LLMClient.send_groups`` call to this endpoint."""
        return RequestGroup(requests, self.name, self.overrides, cache_only)

    def send(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer ``requests`` (results in the same order; per-request failures come back as ``ok=False``).

        Raises ``CircuitOpenError`` when the endpoint keeps failing. Usage (requests, cache_hits, retries,
        prompt/completion tokens, the cached and cache-write parts of the prompt tokens, cost_usd) goes to the calling shard's meter, journalled reply by reply."""
        return self.client.send_groups([self.group(requests)])[0]


@dataclass(eq=False)
class LLMClient:
    """How one stage calls LLMs. ``meter`` and ``stop_event`` are the stage context's: called at each send,
    on the calling thread, they give that shard's usage meter and stop event."""

    settings: LLMSettings
    cache_dir: Path
    state_dir: Path  # where a Batch API call keeps its state (the stage folder)
    dry_run: bool
    services: dict[str, Any]
    meter: Callable[[], "UsageMeter"]
    stop_event: Callable[[], threading.Event | None]
    stage: str | None = None  # the stage's name: ``llm.stage_max_cost_usd`` caps are by stage
    _calls: dict[tuple[str, str], EndpointCall] = field(default_factory=dict, repr=False)

    @classmethod
    def for_stage(cls, ctx: "StageContext", settings: LLMSettings | None = None) -> "LLMClient":
        """The client of the stage running in ``ctx``; ``settings`` default to the run config's ``llm:``."""
        settings = settings if settings is not None else ctx.settings.llm
        use_encoded_store(Path(ctx.cache_dir) / ENCODED_STORE_FOLDER, settings.image_store_gb)
        return cls(settings, cache_dir=Path(ctx.cache_dir),
                   state_dir=Path(ctx.stage_dir), dry_run=ctx.dry_run, services=ctx.services,
                   meter=ctx.current_meter, stop_event=ctx.stop_event, stage=_stage_name(Path(ctx.stage_dir)))

    def endpoint(self, name: str, overrides: dict[str, Any] | None = None) -> EndpointCall:
        """Endpoint ``name`` (with ``overrides``), resolved once per client. Raises ``KeyError`` for a name
        not in ``llm.endpoints`` and ``MissingApiKeyError`` when its key's environment variable is unset."""
        memo = (name, json.dumps(overrides or {}, sort_keys=True, default=str))
        call = self._calls.get(memo)
        if call is None:
            settings = with_overrides(self.settings, name, overrides)
            connection = resolve_connection(settings.endpoint(name), dry_run=self.dry_run, services=self.services)
            cache = self.cache_dir / (DRY_RUN_CACHE_FILE if self.dry_run else CACHE_FILE) if settings.cache else None
            call = self._calls.setdefault(memo, EndpointCall(self, name, overrides or None, settings, connection,
                                                             cache))
        return call

    def send_groups(self, groups: list[RequestGroup], *, stop: threading.Event | None = None,
                    return_exceptions: bool = False) -> list[list[LLMResult] | BaseException]:
        """Several calls at once, on the run's one event loop (``processors.llm.accounts``): every endpoint is
        kept busy at the same time, and calls to one endpoint - from any shard or stage of the run - share its
        admission and breaker. Results per group, in order. If an endpoint's breaker opens, the other calls
        still finish (their answers are cached for the rerun), then its ``CircuitOpenError`` is raised; with
        ``return_exceptions`` a group's error takes its place in the list instead (a referee moves the share
        of a server whose breaker opened to its other servers). A group with ``cache_only`` sends nothing.
        Setting ``stop`` (from another thread), or the calling shard's own stop event, cancels every call."""
        calls = [self.endpoint(group.endpoint, group.overrides) for group in groups]  # a missing key fails here
        tallies: list[Tally] = []
        stops = [event for event in (stop, self.stop_event()) if event is not None]

        def stopped() -> bool:
            return any(event.is_set() for event in stops)

        try:
            alone = SpendCap(self.settings.max_cost_usd, self.settings.stage_max_cost_usd)  # a call outside a run
            with call_accounts(self.services, alone) as accounts:
                tallies.extend(self._tally(call, accounts.spend) for call in calls)

                async def all_calls() -> list[Any]:
                    return await asyncio.gather(
                        *(execute(group.requests, call.settings, call.name, call.connection,
                                  cache_path=call.cache_path, state_dir=self.state_dir, tally=tally,
                                  accounts=accounts, cache_only=group.cache_only)
                          for group, call, tally in zip(groups, calls, tallies)),
                        return_exceptions=True)

                outcomes = accounts.run(all_calls(), stop=stopped if stops else None)
        finally:  # the counters that cost nothing, once per call (zeros keep every key present)
            for call, tally in zip(calls, tallies):
                # flex_fallbacks only where a flex endpoint was called: other stages' usage keeps its keys
                fallbacks = {"flex_fallbacks": tally.flex_fallbacks} if call.endpoint.mode == "flex" else {}
                tally.on_free(cache_hits=tally.cache_hits, retries=tally.retries, **fallbacks)
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        stopped_by = [exc for exc in failed if not isinstance(exc, Exception)]  # a cancellation, a KeyboardInterrupt
        if stopped_by or (failed and not return_exceptions):
            raise (stopped_by or failed)[0]
        return outcomes

    def _tally(self, call: EndpointCall, spend: SpendCap) -> Tally:
        # The meter of the shard that makes this call, taken here on its thread: the replies are counted on the
        # accounts' loop thread, where the shard's context is not.
        add = self.meter().add
        settings, model = call.settings, call.model

        stage = self.stage

        def price(prompt: float, completion: float, tier: Tier) -> float:
            return worst_cost_usd(settings, model, prompt, completion, tier=tier)

        def billed(usage: Usage, tier: Tier) -> None:  # journalled reply by reply: a kill loses none of it
            # The reservation (``price``, a worst case) is at the full input price; the bill at the cache's,
            # and at the tier that served the reply (a flex request that fell back is billed at standard).
            dollars = cost_usd(settings, model, usage.prompt_tokens, usage.completion_tokens, tier=tier,
                               cached_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens)
            spend.bill(stage, dollars)  # on the accounts' loop, before the reply's reservation is released
            add(requests=1, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens, cost_usd=dollars)

        def free(**counters: float) -> None:
            add(requests=0, prompt_tokens=0, completion_tokens=0, cached_tokens=0, cache_write_tokens=0,
                cost_usd=0.0, **counters)

        tally = Tally(price=price, stage=stage)
        tally.on_billed = billed
        tally.on_free = free
        return tally


def _stage_name(stage_dir: Path) -> str:
    """The stage's name from its folder (``03_filter`` -> ``filter``, ``builder.runfolder.stage_dir_name``)."""
    index, _, name = stage_dir.name.partition("_")
    return name if index.isdigit() and name else stage_dir.name


def run_requests(requests: list[LLMRequest], *, endpoint: str, ctx: "StageContext",
                 overrides: dict[str, Any] | None = None) -> list[LLMResult]:
    """``LLMClient.for_stage(ctx).endpoint(endpoint, overrides).send(requests)``: a one-off call (tests,
    tools); a stage builds its ``EndpointCall`` once instead (``processors.llm.client``)."""
    return LLMClient.for_stage(ctx).endpoint(endpoint, overrides).send(requests)


def run_request_groups(groups: list[RequestGroup], *, ctx: "StageContext", stop: threading.Event | None = None,
                       return_exceptions: bool = False) -> list[list[LLMResult] | BaseException]:
    """``LLMClient.for_stage(ctx).send_groups(...)``: a one-off grouped call (tests, benchmarks)."""
    return LLMClient.for_stage(ctx).send_groups(groups, stop=stop, return_exceptions=return_exceptions)
