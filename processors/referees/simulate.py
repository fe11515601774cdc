"""The simulator's referee: answers the referee prompt with "1" (fits) about three times in four, else "0".

With ``logprobs`` on, the simulator reports the other digit as the runner-up, so p(yes) is a real number
between 0 and 1, as from vLLM. Deterministic per request.
"""

from __future__ import annotations

import random

from processors.llm.sim_responders import Messages, Responder, message_text
from processors.referees.prompt import REPLY_RULE

YES_SHARE = 0.75


def respond(messages: Messages, rng: random.Random) -> str:
    return "1" if rng.random() < YES_SHARE else "0"


SIM_RESPONDER = Responder("referee", matches=lambda m: REPLY_RULE in message_text(m), respond=respond)
