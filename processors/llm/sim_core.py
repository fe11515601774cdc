"""The simulator's options, its counters, and the deterministic chat completion it builds for a request."""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from builder.ids import fingerprint
from processors.llm.sim_responders import Responder, message_text, reply_text

FAULT_KINDS = ("429", "500", "timeout", "drop", "malformed", "length", "bad_body")


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
    arrivals_peak_1s: int = 0
    accepted_peak_1s: int = 0
    files_uploaded: int = 0
    batches_created: int = 0
    batch_items: collections.Counter = field(default_factory=collections.Counter)
    first_at: float | None = None
    last_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data = {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in data.items()}
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


def _logprobs(text: str, rng: random.Random, top: int) -> list[dict[str, Any]]:
    """Token logprobs: 4-character tokens; for a one-token 0/1 answer the alternatives are "0" and "1"."""
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)] or [""]
    out = []
    for piece in pieces:
        p = 0.55 + 0.44 * rng.random()
        alternatives = [("1" if piece == "0" else "0") if piece in ("0", "1") else piece.upper() + " "]
        tops = [{"token": piece, "logprob": math.log(p), "bytes": list(piece.encode())}]
        tops += [{"token": a, "logprob": math.log(1 - p), "bytes": list(a.encode())} for a in alternatives]
        out.append({"token": piece, "logprob": math.log(p), "bytes": list(piece.encode()), "top_logprobs": tops[:top]})
    return out


def completion(body: dict[str, Any], responders: list[Responder], seed: int, fault: str | None = None) -> dict:
    """The chat completion for ``body``: deterministic text; ``fault`` "length"/"malformed" spoil it."""
    rng = request_rng(body, seed)
    text = reply_text(responders, body, rng)
    finish = "stop"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if max_tokens and _tokens(text) > max_tokens:
        text, finish = text[: max_tokens * 4], "length"
    if fault == "length":
        text, finish = text[: max(1, len(text) // 2)], "length"
    elif fault == "malformed":
        text = "{\"oops\": " + text[: len(text) // 2] + " ,,"
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                              "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None}
    if body.get("logprobs"):
        choice["logprobs"] = {"content": _logprobs(text, rng, int(body.get("top_logprobs") or 0) or 1)}
    usage_prompt = prompt_tokens(body["messages"])
    return {
        "id": f"chatcmpl-sim{rng.getrandbits(48):012x}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "sim"), "choices": [choice],
        "usage": {"prompt_tokens": usage_prompt, "completion_tokens": _tokens(text),
                  "total_tokens": usage_prompt + _tokens(text)},
    }
