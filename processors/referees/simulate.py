"""The simulator's referee: answers the referee prompt with "1" (fits) about three times in four, else "0".

With ``logprobs`` on, the simulator reports the other digit as the runner-up, so p(yes) is a real number
between 0 and 1, as from vLLM. Deterministic per request.
"""

from __future__ import annotations

import random

from processors.llm.sim_responders import Messages, Responder, message_text
from processors.referees.prompt import REPLY_RULE

YES_SHARE = 0.75


BLIND_YES_SHARE = 0.1  # the text-only referee: most questions need the image


def respond(messages: Messages, rng: random.Random) -> str:
    from processors.referees.blind import BLIND_REPLY_RULE

    text = message_text(messages)
    if BLIND_REPLY_RULE in text:
        # The simulated text-only model can do arithmetic: a question whose sum the answer states needs no image.
        return "1" if _text_only_answerable(text) or rng.random() < BLIND_YES_SHARE else "0"
    return "1" if rng.random() < YES_SHARE else "0"


def _text_only_answerable(text: str) -> bool:
    import re

    question = re.search(r"Question: (.*)", text)
    answer = re.search(r"Proposed answer: (.*)", text)
    sums = re.search(r"(\d+)\s*([+*-])\s*(\d+)", question.group(1)) if question else None
    if not sums or not answer:
        return False
    a, op, b = int(sums.group(1)), sums.group(2), int(sums.group(3))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return str(result) in re.findall(r"-?\d+", answer.group(1))


def _matches(messages: Messages) -> bool:
    from processors.referees.blind import BLIND_REPLY_RULE

    text = message_text(messages)
    return REPLY_RULE in text or BLIND_REPLY_RULE in text


SIM_RESPONDER = Responder("referee", matches=_matches, respond=respond)
