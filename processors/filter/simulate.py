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


SIM_RESPONDER = Responder("filter", matches=lambda m: MARKER in message_text(m), respond=respond)
