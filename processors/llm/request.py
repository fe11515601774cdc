"""What a stage hands the engine (``LLMRequest``) and what it gets back (``LLMResult``).

Messages use the OpenAI chat format. Images are given as one of these content parts and are turned into
downscaled data URLs by the engine (``processors.llm.images``); the cache key uses their content hash::

    {"type": "image_path", "path": "/data/img.jpg"}
    {"type": "image_bytes", "data": b"..."}
    {"type": "image_url", "image_url": {"url": "https://... or data:..."}}   # passed through as given
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Failure reason codes an LLMResult may carry (builder.rows requires snake_case).
API_ERROR = "api_error"  # a non-retryable HTTP error, or retryable ones until the retries ran out
RATE_LIMITED = "rate_limited"  # 429s until the retries ran out
TIMEOUT = "timeout"  # the request timed out on every attempt
UNPARSABLE = "unparsable"  # the reply never passed ``parse``; raw_text keeps the last one
TRUNCATED = "truncated"  # finish_reason="length" on every attempt
REFUSED = "refused"  # finish_reason="content_filter" or a refusal
BATCH_FAILED = "batch_failed"  # a Batch API item failed or expired and was not retried online
REASONS = (API_ERROR, RATE_LIMITED, TIMEOUT, UNPARSABLE, TRUNCATED, REFUSED, BATCH_FAILED)
# The reasons that say the server did not answer (no verdict on the request): a stage declares them as its
# ``Stage.unanswered_reasons``, so the rows are asked again on the next run instead of being sealed as failed.
UNANSWERED = frozenset({API_ERROR, RATE_LIMITED, TIMEOUT, BATCH_FAILED})


def _identity(text: str) -> str:
    return text


@dataclass
class LLMRequest:
    """One chat completion a stage needs.

    ``parse`` turns the reply text into the value the stage wants and raises ``ValueError`` (pydantic's
    ``ValidationError`` is one) when the reply is unusable; that is retried like an HTTP error and, after the
    retries, recorded as ``unparsable``. ``prompt_version`` is part of the cache key: bump it when the prompt
    template or ``parse`` changes meaning. ``accept_truncated`` keeps replies cut by ``max_tokens`` (a referee
    asking for one token with logprobs always gets finish_reason="length").
    """

    key: str
    messages: list[dict[str, Any]]
    prompt_version: str
    parse: Callable[[str], Any] = _identity
    json_schema: dict[str, Any] | None = None
    schema_name: str = "reply"
    max_tokens: int | None = None
    temperature: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    accept_truncated: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)  # sent as is and part of the cache key
    # Sent as ``prompt_cache_key`` where the endpoint says it accepts one (``send_prompt_cache_key``): routes
    # requests that share a prefix (one image's filter and QA) to the same cache. Not part of the cache key:
    # it never changes the answer.
    prompt_cache_key: str | None = None

    def __repr__(self) -> str:  # messages may hold megabytes of image bytes
        return f"LLMRequest(key={self.key!r}, prompt_version={self.prompt_version!r}, messages={len(self.messages)})"


@dataclass
class Usage:
    """Tokens billed. ``cached_tokens`` (read from the provider's prompt cache) and ``cache_write_tokens``
    (written to it, where the API reports them) are parts of ``prompt_tokens``, not added to it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_write_tokens += other.cache_write_tokens


@dataclass
class LLMResult:
    """The outcome of one request, in the order the requests were given. ``ok=False`` carries ``reason``.

    ``usage`` is what the API billed for this answer (zero when it came from the cache). ``logprobs`` is the
    OpenAI ``choices[0].logprobs.content`` list (token, logprob, top_logprobs) when asked for.
    """

    key: str
    ok: bool
    value: Any = None
    raw_text: str | None = None
    reason: str | None = None
    detail: str | None = None
    usage: Usage = field(default_factory=Usage)
    from_cache: bool = False
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    attempts: int = 0

    def failure(self, *, shown_chars: int = 300) -> tuple[str, str]:
        """(reason, detail) for a failure row: the engine's detail plus the start of the last reply, if any."""
        detail = self.detail or ""
        if self.raw_text:
            detail = f"{detail}; last reply: {self.raw_text[:shown_chars]!r}"
        return self.reason or API_ERROR, detail
