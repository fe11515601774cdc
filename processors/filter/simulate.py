"""The simulator's answers to the filter prompt: deterministic, protocol-shaped, sometimes messy.

Most replies keep one to three of the candidates; some use the paper's unquoted bracket form or curly
quotes, some add a label that is not a candidate, a few say ``None`` — what the stage must survive.
"""

from __future__ import annotations

import json
import random
import re

from processors.filter.prompt import MARKER
from processors.simulator.responders import Messages, Responder, message_text


def _candidates(text: str) -> list[str]:
    listing = text.split(MARKER, 1)[1].split("\n\n", 1)[0]
    return [re.sub(r"^\d+\.\s*", "", line).strip() for line in listing.strip().splitlines() if line.strip()]


def respond(messages: Messages, rng: random.Random) -> str:
    candidates = _candidates(message_text(messages))
    roll = rng.random()
    if roll < 0.06 or not candidates:
        return "None"
    kept = rng.sample(candidates, k=min(len(candidates), rng.randint(1, 3)))
    if roll < 0.16:
        kept.append("Invented category~Made-up skill")
    if roll < 0.30:
        return "[" + ", ".join(kept) + "]"
    if roll < 0.40:
        return "[" + ", ".join(f"“{k}”" for k in kept) + "]"
    return json.dumps({"task_types": kept}, ensure_ascii=False)


def respond_fused(messages: Messages, rng: random.Random) -> str:
    """The fused filter + QA request (``processors.filter.fused``): kept labels as the filter's responder keeps
    them (an invented one now and then, ``None`` sometimes), then the QA responder's items, defects included,
    for the real candidates it kept."""
    from processors.filter.fused import FUSED_MARKER
    from processors.qa.simulate import make_items, spoil

    text = message_text(messages)
    candidates = _candidates(text.replace(FUSED_MARKER, MARKER))
    per_type = int(re.search(r"question\(s\) per task type:\s*(\d+)", text).group(1))
    roll = rng.random()
    if roll < 0.06 or not candidates:
        return json.dumps({"task_types": [], "qa": []})
    kept = rng.sample(candidates, k=min(len(candidates), rng.randint(1, 3)))
    labels = kept + (["Invented category~Made-up skill"] if roll < 0.16 else [])
    return json.dumps({"task_types": labels, "qa": spoil(make_items(kept, per_type, rng), rng)}, ensure_ascii=False)


def _is_fused(messages: Messages) -> bool:
    from processors.filter.fused import FUSED_MARKER

    return FUSED_MARKER in message_text(messages)


def respond_any(messages: Messages, rng: random.Random) -> str:
    return respond_fused(messages, rng) if _is_fused(messages) else respond(messages, rng)


# One responder for the filter stage's requests, plain or fused (``stages.filter.fuse_qa``).
SIM_RESPONDER = Responder("filter", matches=lambda m: MARKER in message_text(m) or _is_fused(m), respond=respond_any)
