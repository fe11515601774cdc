"""Typed settings of the LLM engine: endpoints, prices, cache and circuit breaker (the run config's ``llm:``).

Only the *name* of the environment variable holding an API key is ever part of a config; the key itself is
read at call time and never stored, logged or hashed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from builder.secrets import check_env_name
from processors.llm import hosts


FLEX_TIMEOUT_S = 900.0  # OpenAI's advice for flex: 15 minutes, its replies may wait in a queue


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointSettings(_Frozen):
    """One OpenAI-compatible endpoint (OpenAI, an Azure-compatible gateway, vLLM, SGLang, Ollama...)."""

    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible base URL (ends in /v1)")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="name of the env var holding the key; null for servers without auth"
    )
    model: str = Field("gpt-4o-2024-08-06", description="model id sent with every request")
    mode: Literal["online", "batch", "flex"] = Field(
        "online", description="online requests, the Batch API (half price, 24 h window) or OpenAI's flex tier "
        "(service_tier=flex: synchronous at the model's flex price, slower, may answer 429 for capacity)")
    transport: Literal["aiohttp", "openai"] = Field(
        "aiohttp",
        description="chat completions via a lean aiohttp client (fast) or the openai SDK; files/batches always "
        "use the SDK",
    )
    max_concurrency: int = Field(256, ge=1, description="requests in flight at most (AIMD lowers it on 429s)")
    min_concurrency: int = Field(4, ge=1, description="AIMD never lowers the concurrency below this")
    aimd_decrease: float = Field(0.7, gt=0, lt=1, description="concurrency factor applied on a 429")
    latency_backoff: Literal["auto", "on", "off"] = Field(
        "off", description="let rising reply latency lower the concurrency window as a 429 does (a saturated "
        "self-hosted server such as vLLM queues requests instead of answering 429), and open the window by slow "
        "start; auto = on for an online endpoint without an API key (api_key_env null) that is not "
        "api.openai.com, off otherwise (OpenAI's API answers 429, and its latency varies with reply length, not "
        "load); never in mode batch; not part of any fingerprint. Off by default: a vLLM server's latency also "
        "grows with its batch well before it saturates, so on a server you do not overload the signal could "
        "cost throughput (not measured on a real server yet); turn it on for servers a run may swamp")
    latency_backoff_factor: float = Field(
        2.0, gt=1, description="latency backoff: the recent median reply latency must exceed this many times the "
        "baseline (the lowest recent median, at low load) to count as the server queueing")
    latency_backoff_queue_poll_s: float = Field(
        1.0, ge=0, description="latency backoff: also read the server's queue from its Prometheus /metrics every "
        "this many seconds (vLLM's vllm:num_requests_waiting, SGLang's sglang:num_queue_reqs): requests waiting "
        "there lower the window as a 429 does; a server without the page is left to the latency signal; 0: off")
    latency_backoff_floor_s: float = Field(
        0.25, ge=0, description="latency backoff: a recent median latency below this never counts (a fast "
        "server's jitter)")
    rpm: int | None = Field(None, ge=1, description="requests per minute allowed by the account; null = no bucket")
    tpm: int | None = Field(None, ge=1, description="tokens per minute (prompt estimate + max_tokens); null = none")
    rate_headroom: float = Field(
        0.98, gt=0, le=1, description="fraction of rpm/tpm actually used, so clock jitter never crosses the limit"
    )
    burst_s: float = Field(
        0.0, ge=0, description="seconds of rate the buckets may save up; 0 = strict pacing (limits are often "
        "enforced per second, not per minute)"
    )
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (mode flex: 900 s unless set)")
    max_retries: int = Field(6, ge=0, description="retries after the first attempt (429/5xx/timeouts/bad replies; "
                             "at flex, capacity 429s too)")
    flex_fallback_after: int | None = Field(
        None, ge=1, description="mode flex: after this many capacity 429s (\"Resource Unavailable\") of a request at "
        "the flex tier, its next attempts are sent at the standard tier (service_tier=default) and billed at the "
        "standard price; null = never: capacity 429s are retried at flex with backoff, and count against "
        "max_retries like any retry (raise it for a patient run); must be at most max_retries")
    backoff_initial_s: float = Field(1.0, gt=0, description="first backoff; doubles per retry, with jitter")
    backoff_max_s: float = Field(60.0, gt=0, description="longest backoff (and longest Retry-After honoured)")
    image_max_side: int = Field(1024, ge=16, description="images are downscaled to this longest side")
    image_detail: Literal["low", "high", "auto"] = Field("low", description="detail sent with every image")
    image_format: Literal["jpeg", "png"] = Field("jpeg", description="encoding of the data URLs")
    supports_json_schema: bool = Field(True, description="send response_format=json_schema when a request has one")
    temperature: float | None = Field(None, ge=0, le=2, description="default temperature; a request may override")
    max_tokens: int = Field(1024, ge=1, description="default max_tokens; a request may override")
    seed: int | None = Field(None, description="sent as `seed` when set (best-effort determinism)")
    reasoning: Literal["auto", "on", "off"] = Field(
        "auto", description="an OpenAI reasoning model (GPT-5 family, o1/o3/o4): the reply limit is sent as "
        "max_completion_tokens (reasoning tokens count in it and are billed as output) and no temperature (only "
        "the default is accepted); auto = by the model id")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="sent as reasoning_effort to a reasoning model; null = the model's default (medium)")
    send_prompt_cache_key: bool = Field(
        False, description="send `prompt_cache_key` (the image id) so one image's requests meet the same prompt "
        "cache; OpenAI accepts it, other servers may reject an unknown field")
    # Batch API
    batch_max_requests: int = Field(50_000, ge=1, le=50_000, description="requests per batch file (API limit)")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="bytes per batch file (API limit 200 MB)")
    batch_poll_s: float = Field(30.0, gt=0, description="seconds between batch status polls")
    batch_completion_window: str = Field("24h", description="completion_window sent with each batch")
    batch_retry_failed_online: bool = Field(
        True, description="items a batch failed or expired are retried online; otherwise recorded as failures"
    )


    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str | None) -> str | None:
        return check_env_name(value)

    @model_validator(mode="after")
    def _flex_defaults(self) -> "EndpointSettings":
        if self.mode != "flex":
            return self
        if "timeout_s" not in self.model_fields_set:
            # Flex replies may queue for minutes: the online default would time out (and pay for) requests
            # that are only waiting. Set without marking the field as set, so a copy to another mode drops it.
            object.__setattr__(self, "timeout_s", FLEX_TIMEOUT_S)
        if self.flex_fallback_after is not None and self.flex_fallback_after > self.max_retries:
            raise ValueError(f"flex_fallback_after ({self.flex_fallback_after}) is above max_retries "
                             f"({self.max_retries}): no attempt would be left to send at the standard tier")
        return self

    def output_parts(self) -> dict:
        """The settings that change what the model answers (part of calling stages' fingerprints); speed,
        limits, retries and online/batch mode do not, so tuning them never re-runs a stage."""
        parts = self.model_dump(mode="json", include={
            "model", "image_max_side", "image_detail", "image_format", "supports_json_schema", "temperature",
            "max_tokens", "seed",
        })
        if self.reasoning_effort is not None:  # only when set: every other config keeps its fingerprint
            parts["reasoning_effort"] = self.reasoning_effort
        return parts

    @property
    def uses_latency_backoff(self) -> bool:
        """Whether rising latency lowers the concurrency window (``latency_backoff``; never for the Batch API)."""
        if self.mode == "batch" or self.latency_backoff == "off":
            return False
        if self.latency_backoff == "on":
            return True
        return self.mode == "online" and self.api_key_env is None and not self.is_openai_host

    @property
    def is_openai_host(self) -> bool:
        """Whether ``base_url`` is OpenAI's own API (not a self-hosted or other OpenAI-compatible server)."""
        return hosts.is_openai_host(self.base_url)

    @property
    def is_reasoning_model(self) -> bool:
        if self.reasoning != "auto":
            return self.reasoning == "on"
        name = self.model.rsplit("/", 1)[-1].lower()
        return name.startswith(REASONING_MODEL_PREFIXES)


# OpenAI's reasoning models: they take max_completion_tokens (not max_tokens) and only the default temperature.
REASONING_MODEL_PREFIXES = ("gpt-5", "o1", "o3", "o4")


class Price(_Frozen):
    """USD per million tokens. ``batch_discount`` is the fraction of the price paid in Batch API mode.

    Prompt tokens read from the provider's prompt cache cost ``cached_input_per_mtok`` and those written to
    it ``cache_write_per_mtok``; None = the input price (no discount or surcharge known)."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0)
    batch_discount: float = Field(0.5, gt=0, le=1)
    flex_discount: float | None = Field(
        None, gt=0, le=1, description="the fraction of the price paid at the flex tier; null = the model has no "
        "known flex price (billed at the standard price)")


def _price(input_usd: float, output_usd: float, cached_share: float, flex: float | None = None) -> Price:
    return Price(input_per_mtok=input_usd, output_per_mtok=output_usd,
                 cached_input_per_mtok=round(input_usd * cached_share, 6), flex_discount=flex)


# OpenAI's list prices (standard tier). Cached input: 50 % of the input price on the GPT-4o family, 25 % on
# GPT-4.1, 10 % on GPT-5; OpenAI bills no cache writes on these models, so cache_write_per_mtok stays None.
# Flex processing is billed at Batch prices (50 %) on the models that offer it (GPT-5 family, o3, o4-mini);
# the others have no flex price (a flex request to them is counted at the standard price).
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-2024-08-06": _price(2.50, 10.00, 0.5),
    "gpt-4o": _price(2.50, 10.00, 0.5),
    "gpt-4o-2024-11-20": _price(2.50, 10.00, 0.5),
    "gpt-4o-mini": _price(0.15, 0.60, 0.5),
    "gpt-4.1": _price(2.00, 8.00, 0.25),
    "gpt-4.1-mini": _price(0.40, 1.60, 0.25),
    "gpt-4.1-nano": _price(0.10, 0.40, 0.25),
    "gpt-5": _price(1.25, 10.00, 0.1, flex=0.5),
    "gpt-5-mini": _price(0.25, 2.00, 0.1, flex=0.5),
    "gpt-5-nano": _price(0.05, 0.40, 0.1, flex=0.5),
}


class BreakerSettings(_Frozen):
    """When to stop a stage instead of retrying into a dead endpoint."""

    consecutive_failures: int = Field(
        25, ge=1, description="failed attempts in a row (5xx, timeouts, connection errors, 4xx) that open it"
    )


class LLMSettings(_Frozen):
    """The run config's ``llm:`` section."""

    endpoints: dict[str, EndpointSettings] = Field(default_factory=lambda: {"gpt4o": EndpointSettings()})
    prices: dict[str, Price] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES), description="USD per million tokens by model, added to (and "
        "overriding) the built-in list prices; a model without a price is counted at $0")
    cache: bool = Field(True, description="persistent request cache under the run's cache folder")
    image_store_gb: float = Field(
        # strict and finite: `yes` read as 1 GB, or .inf crashing the first stage, is a typo caught up front
        0.0, ge=0, allow_inf_nan=False, strict=True,
        description="keep images' wire encodings (resized JPEG/PNG) on disk under the run's cache folder, up to "
        "this many GB, so later stages and resumed runs read them instead of encoding each image "
        "again (at 10,000 images qa used 2.1-2.5x and score 1.1-1.5x less client CPU per request); 0 = off. "
        "Costs about the size of the run's images at the endpoints' sides; never changes a request; not part of "
        "any fingerprint")
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    budget_share: float = Field(
        1.0, gt=0, le=1, description="this process's share of every endpoint's rpm, tpm and max_concurrency: "
        "1/N when N processes (machines, Ray workers) send under one account; not part of any fingerprint")
    max_cost_usd: float | None = Field(
        None, gt=0, description="hard spend cap of the run folder (earlier runs included): a request is sent only "
        "if what was spent plus the worst case of the requests in flight and its own stays within it; null = "
        "no cap; not part of any fingerprint")
    stage_max_cost_usd: dict[str, float] = Field(
        default_factory=dict, description="the same cap per stage name ({filter: 5.0}); not part of any "
        "fingerprint")

    @field_validator("prices")
    @classmethod
    def _on_top_of_list_prices(cls, value: dict[str, Price]) -> dict[str, Price]:
        # A user's entry adds to the list prices: replacing them all made one entry for another model (or a
        # typo'd one) count every GPT-4o reply at $0, and llm.max_cost_usd stop nothing.
        return {**DEFAULT_PRICES, **value}

    @field_validator("stage_max_cost_usd")
    @classmethod
    def _positive_caps(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: usd for name, usd in value.items() if not usd > 0}
        if bad:
            raise ValueError(f"every stage's cap must be above 0 USD, got {bad}")
        return value

    def endpoint_parts(self, name: str) -> dict:
        """``output_parts`` of the endpoint called ``name`` (an unknown name is reported by ``endpoint``)."""
        return self.endpoint(name).output_parts()

    def endpoint(self, name: str) -> EndpointSettings:
        try:
            return self.endpoints[name]
        except KeyError:
            raise KeyError(
                f"no LLM endpoint named {name!r} in the config's llm.endpoints; "
                f"defined: {', '.join(sorted(self.endpoints)) or '(none)'}"
            ) from None


def endpoint_parts(run_settings: object, name: str, *, key: str, overrides=None) -> dict:
    """``output_parts`` of endpoint ``name`` in a run config's ``llm`` section.

    ``overrides(endpoint) -> dict`` gives the fields a caller replaces (a referee preset's served model name).
    An unknown name is a config error naming ``key`` (the config key that named the endpoint)."""
    llm: LLMSettings = run_settings.llm
    if name not in llm.endpoints:
        raise ValueError(f"{key}: no LLM endpoint named {name!r} in llm.endpoints; "
                         f"defined: {', '.join(sorted(llm.endpoints)) or '(none)'}")
    endpoint = llm.endpoint(name)
    changed = overrides(endpoint) if overrides else {}
    return endpoint.model_copy(update=changed).output_parts() if changed else endpoint.output_parts()
