"""The simulator's referee: answers the referee prompt with "1" (fits) about three times in four, else "0";
answers the blind check's question itself (the sum of a sum question, else mostly "unknown").

With ``logprobs`` on, the simulator reports the other digit as the runner-up, so p(yes) is a real number
between 0 and 1, as from vLLM. Deterministic per request.
"""

from __future__ import annotations

import random

from processors.simulator.responders import Messages, Responder, message_text
from processors.referees.prompt import REPLY_RULE

YES_SHARE = 0.75


BLIND_GUESS_SHARE = 0.1  # the text-only model: most questions need the image, it says "unknown" to them


def respond(messages: Messages, rng: random.Random) -> str:
    from processors.referees.blind import BLIND_INSTRUCTION

    text = message_text(messages)
    if BLIND_INSTRUCTION in text:
        # The simulated text-only model can do arithmetic: a question with a sum in it needs no image.
        answer = _text_only_answer(text)
        if answer is not None:
            return answer
        return rng.choice(["yes", "two", "red"]) if rng.random() < BLIND_GUESS_SHARE else "unknown"
    return "1" if rng.random() < YES_SHARE else "0"


def _text_only_answer(text: str) -> str | None:
    import re

    question = re.search(r"Question: (.*)", text)
    sums = re.search(r"(-?\d+)\s*([+*-])\s*(-?\d+)", question.group(1)) if question else None
    if not sums:
        return None
    a, op, b = int(sums.group(1)), sums.group(2), int(sums.group(3))
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def _matches(messages: Messages) -> bool:
    from processors.referees.blind import BLIND_INSTRUCTION

    text = message_text(messages)
    return REPLY_RULE in text or BLIND_INSTRUCTION in text


SIM_RESPONDER = Responder("referee", matches=_matches, respond=respond)
