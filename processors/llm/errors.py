"""Errors of the LLM engine and the classification of one failed attempt.

Per-request failures never leave ``run_requests`` as exceptions: an ``AttemptError`` drives the retry loop and
its ``reason`` ends up in ``LLMResult``. Only ``CircuitOpenError`` (the endpoint is down, stop the stage),
``SpendCapReached`` (the next request could cross ``llm.max_cost_usd``) and ``MissingApiKeyError`` (nothing can
work) are raised to the caller.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping

from builder.secrets import mask_keys
from processors.llm import request as rq


class CircuitOpenError(RuntimeError):
    """The endpoint failed so often in a row that continuing would only spin; the stage stops."""


class SpendCapReached(RuntimeError):
    """The next request could cross a spend cap (``llm.max_cost_usd`` or ``llm.stage_max_cost_usd``): nothing
    more is sent and the stage stops like on an open breaker. The command line exits with ``exit_code``."""

    exit_code = 3

    def __init__(self, setting: str, cap: float, spent: float, in_flight: float, next_usd: float):
        in_flight = max(0.0, in_flight)  # a sum of reservations less their releases: -1e-17 is nothing in flight
        self.setting, self.cap, self.spent, self.in_flight, self.next_usd = setting, cap, spent, in_flight, next_usd
        super().__init__(
            f"spend cap reached: {setting} is ${cap:.4f}; ${spent:.4f} is spent in this run folder (earlier runs "
            f"included), requests in flight may cost up to ${in_flight:.4f} more, and the next request could "
            f"cost up to ${next_usd:.4f}. Nothing more was sent; answers already on the wire were cached and "
            f"counted. To go on, raise {setting} and rerun the same command: answers already paid come from the "
            "request cache, nothing is paid twice")


class MissingApiKeyError(RuntimeError):
    """The env var that should hold the API key is not set."""


class AttemptError(Exception):
    """One attempt failed. ``retryable`` decides the retry loop; ``breaker`` whether it counts as the
    endpoint failing (a bad reply from a healthy server does not); ``retry_after`` is the server's hint."""

    def __init__(self, reason: str, detail: str, *, retryable: bool, breaker: bool,
                 retry_after: float | None = None, raw_text: str | None = None, what: str | None = None,
                 capacity: bool | None = None):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.retryable, self.breaker = retryable, breaker
        self.retry_after, self.raw_text = retry_after, raw_text
        self.what = what or reason  # short label for the breaker's summary ("HTTP 503", "timeout", ...)
        # A 429's cause as its body tells it: True = the server lacks capacity (flex's "Resource Unavailable"),
        # False = the account's rate limit, None = the body does not say (``capacity_429``)
        self.capacity = capacity


SERVER_WORDS_MAX = 4000  # characters of the server's own message kept in a failure detail (its advice lives there)


def server_message(body: str) -> str:
    """The server's words: ``error.message`` of an OpenAI-style body, the ``error`` string of vLLM's 401, or
    the body itself; at most ``SERVER_WORDS_MAX`` characters."""
    text = body.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail", parsed.get("message")))
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str):
            text = error
    if len(text) > SERVER_WORDS_MAX:
        text = text[:SERVER_WORDS_MAX] + f"... [{len(text) - SERVER_WORDS_MAX} more characters]"
    return text


def from_status(status: int, body: str, headers: Mapping[str, str], secret: str | None = None) -> AttemptError:
    """Classify an HTTP error reply the way the OpenAI SDK does: 408, 409, 429 and 5xx are retried.

    The detail keeps the server's message (redacted of ``secret`` and of anything shaped like an API key)."""
    detail = f"HTTP {status}: {server_message(redact(body, secret))}"  # masked before it is cut
    if status == 429:
        if "insufficient_quota" in body:  # out of money, not out of rate: retrying cannot help
            return AttemptError(rq.RATE_LIMITED, detail, retryable=False, breaker=True, what="HTTP 429 quota")
        capacity = capacity_429(body)
        return AttemptError(rq.RATE_LIMITED, detail, retryable=True, breaker=False,
                            retry_after=parse_retry_after(headers), capacity=capacity,
                            what="HTTP 429 capacity" if capacity else "HTTP 429")
    retryable = status in (408, 409) or status >= 500
    return AttemptError(rq.API_ERROR, detail, retryable=retryable, breaker=True,
                        retry_after=parse_retry_after(headers) if retryable else None, what=f"HTTP {status}")


def capacity_429(body: str) -> bool | None:
    """Whether a 429 says the server has no capacity (OpenAI's flex tier: "429 Resource Unavailable", code
    ``resource_unavailable``, not billed) rather than that the account's rate limit was hit (code
    ``rate_limit_exceeded``, "Rate limit reached for ..."); None when the body says neither."""
    text = body.lower()
    if "resource_unavailable" in text or "resource unavailable" in text:
        return True
    if "rate_limit_exceeded" in text or "rate limit reached" in text:
        return False
    return None


def timeout_error(timeout_s: float) -> AttemptError:
    return AttemptError(rq.TIMEOUT, f"no reply within {timeout_s:g} s", retryable=True, breaker=True,
                        what="timeout")


def connection_error(exc: BaseException, secret: str | None = None) -> AttemptError:
    return AttemptError(rq.API_ERROR, redact(f"connection error: {type(exc).__name__}: {exc}", secret)[:1000],
                        retryable=True, breaker=True, what="connection error")


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass  # fall through to Retry-After
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass  # not a number: an HTTP date
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def redact(text: str, secret: str | None) -> str:
    """``text`` with the secret (and any long fragment of it a server echoed back) and key-shaped strings masked."""
    text = mask_keys(text)
    if not secret or len(secret) < 4:
        return text
    text = text.replace(secret, "***")
    for size in (12, 8):
        if len(secret) > size * 2:
            text = text.replace(secret[:size], "***").replace(secret[-size:], "***")
    return text
