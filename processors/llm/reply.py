"""From a chat completion to the stage's value: normalise the reply, then judge it.

A *normalised reply* (what the cache stores and the Batch API path produces too) is
``{"text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}, "logprobs"}``.
"""

from __future__ import annotations

from typing import Any

from processors.llm import errors
from processors.llm import request as rq
from processors.llm.transport import bad_body


def normalise(completion: dict[str, Any]) -> dict[str, Any]:
    """The parts of a chat completion we keep; raises a retryable ``AttemptError`` if it has no choice."""
    try:
        choice = completion["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise bad_body(str(completion)) from None
    usage = completion.get("usage") or {}
    logprobs = (choice.get("logprobs") or {}).get("content")
    return {
        "text": message.get("content"),
        "refusal": message.get("refusal"),
        "finish_reason": choice.get("finish_reason"),
        "usage": {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        },
        "logprobs": logprobs,
    }


PADDED_SHARE = 0.3  # a structured reply this much whitespace was padded by the server's grammar
COMPACT_JSON_FLAG = '{"backend": "xgrammar", "disable_any_whitespace": true}'  # vLLM's cure (xgrammar/guidance only)


def whitespace_share(text: str | None) -> float:
    return sum(ch.isspace() for ch in text) / len(text) if text else 0.0


def interpret(reply: dict[str, Any], request: rq.LLMRequest) -> Any:
    """The parsed value, or an ``AttemptError``: truncated and unparsable replies are retried (sampling may
    do better next time); refusals are not."""
    text = reply.get("text")
    finish = reply.get("finish_reason")
    if reply.get("refusal") or finish == "content_filter":
        raise errors.AttemptError(rq.REFUSED, f"the model refused: {reply.get('refusal') or finish}",
                                  retryable=False, breaker=False, raw_text=text)
    if finish == "length" and not request.accept_truncated:
        if request.json_schema is not None and whitespace_share(text) >= PADDED_SHARE:
            # The server pads structured output with free whitespace (vLLM's default grammar): asking again
            # pays for the same padding, and only the server's setting cures it.
            raise errors.AttemptError(rq.TRUNCATED, (
                f"finish_reason=length: {whitespace_share(text):.0%} of the reply is whitespace between JSON "
                "tokens, so it ran out of max_tokens. The server pads structured output; start vLLM with "
                f"--structured-outputs-config '{COMPACT_JSON_FLAG}' (or raise max_tokens)"),
                retryable=False, breaker=False, raw_text=text)
        raise errors.AttemptError(rq.TRUNCATED, "finish_reason=length: the reply hit max_tokens",
                                  retryable=True, breaker=False, raw_text=text)
    if text is None:
        raise errors.AttemptError(rq.UNPARSABLE, "the reply has no text content", retryable=True,
                                  breaker=False, raw_text=None)
    try:
        return request.parse(text)
    except ValueError as exc:  # includes pydantic.ValidationError and json.JSONDecodeError
        raise errors.AttemptError(rq.UNPARSABLE, f"{type(exc).__name__}: {exc}"[:500], retryable=True,
                                  breaker=False, raw_text=text) from None
