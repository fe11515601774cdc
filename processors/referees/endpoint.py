"""The OpenAI-compatible referee backend: ``max_tokens=1`` + logprobs against any endpoint (vLLM in practice).

p(yes) = p("1") / (p("0") + p("1")), each digit's probability summed over every top-logprob token that is
that digit after stripping whitespace (" 1", "1", "▁1"). When the server returns no logprobs, the reply text
itself is the vote and p(yes) is 0 or 1. Several endpoints can share one referee's load: the config lists
them (``endpoint: {endpoints: [vllm_a, vllm_b]}``) and each *image* goes to one of them, so all questions
about an image hit the same server's prefix cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from builder.ids import text_id
from processors.referees.prompt import PROMPT_VERSION, build_messages
from processors.referees.protocol import RefereeItem, Vote
from processors.referees.settings import RefereeSettings

TOP_LOGPROBS = 10
DIGITS = ("0", "1")


def endpoint_factory(ctx: Any) -> Callable[[RefereeSettings], "EndpointReferee"]:
    return lambda settings: EndpointReferee(settings, ctx)


def endpoint_names(settings: RefereeSettings) -> list[str]:
    """The ``llm.endpoints`` this referee uses: ``endpoint.endpoints`` or ``endpoint.endpoint`` or its name."""
    return list(settings.endpoint.endpoints) or [settings.endpoint.endpoint or settings.name]


def digit_probabilities(logprobs: list[dict[str, Any]] | None) -> tuple[float, float] | None:
    """(p0, p1) from the first generated token's top logprobs; None when neither digit is among them."""
    if not logprobs:
        return None
    candidates = logprobs[0].get("top_logprobs") or [logprobs[0]]
    mass = {digit: 0.0 for digit in DIGITS}
    for candidate in candidates:
        token = str(candidate.get("token", "")).strip().lstrip("▁Ġ")
        if token in mass:
            mass[token] += math.exp(float(candidate["logprob"]))
    return (mass["0"], mass["1"]) if mass["0"] + mass["1"] > 0 else None


class EndpointReferee:
    def __init__(self, settings: RefereeSettings, ctx: Any):
        self.settings = settings
        self.name = settings.name
        self.ctx = ctx
        self.preset = settings.resolved_preset()

    def _request(self, item: RefereeItem):
        from processors.llm.request import LLMRequest

        messages = build_messages(item.task_type, item.question, item.answer,
                                  image_part={"type": "image_path", "path": item.image_path})
        if self.preset.system_prompt:
            messages.insert(0, {"role": "system", "content": self.preset.system_prompt})
        extra = {"mm_processor_kwargs": dict(self.preset.mm_processor_kwargs)} if self.preset.mm_processor_kwargs else {}
        return LLMRequest(key=item.qa_id, messages=messages, prompt_version=PROMPT_VERSION, max_tokens=1,
                          temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS, accept_truncated=True,
                          extra_body=extra)

    def score(self, items: Sequence[RefereeItem]) -> list[Vote]:
        from processors.llm.api import run_requests

        names = endpoint_names(self.settings)
        by_endpoint: dict[str, list[RefereeItem]] = {name: [] for name in names}
        for item in items:  # one image -> one endpoint, deterministically
            by_endpoint[names[int(text_id(item.image_path), 16) % len(names)]].append(item)
        votes: dict[str, Vote] = {}
        for name, share in by_endpoint.items():
            if share:
                results = run_requests([self._request(item) for item in share], endpoint=name, ctx=self.ctx)
                votes.update((result.key, _vote(result)) for result in results)
        return [votes[item.qa_id] for item in items]


def _vote(result) -> Vote:
    if not result.ok:
        return Vote(result.key, None, None, error=result.reason or "api_error", detail=result.detail)
    probabilities = digit_probabilities(result.logprobs)
    if probabilities is not None:
        p0, p1 = probabilities
        return Vote(result.key, int(p1 > p0), p1 / (p0 + p1))
    text = (result.raw_text or "").strip()
    if text[:1] in DIGITS:
        return Vote(result.key, int(text[0]), float(text[0]))
    return Vote(result.key, None, None, error="unparsable", detail=f"referee reply {text[:40]!r} is not 0 or 1")
