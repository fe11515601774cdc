"""OpenAI's flex tier (``mode: flex``): which tier an attempt is sent at, which 429s mean "no capacity", and
which tier billed a reply.

Flex is the online engine with ``service_tier: "flex"`` on the wire (``prepare.wire_params``; never part of
a cache key, so switching online <-> flex asks nothing again). When flex lacks capacity OpenAI answers
``429 Resource Unavailable`` (not billed); such a 429 is retried with the engine's backoff and, once a
request had ``flex_fallback_after`` of them, its next attempts go at the standard tier
(``service_tier: "default"``). A reply is billed at the tier that served it: the ``service_tier`` its body
reports, else the tier it was sent at. Under a spend cap every attempt reserves the standard price (the
engine's ``worst_usd``): the most it can be billed, whichever tier serves it.
"""

from __future__ import annotations

import logging
from typing import Any

from processors.llm.errors import AttemptError
from processors.llm.estimate import Tier
from processors.llm.settings import EndpointSettings, LLMSettings

logger = logging.getLogger(__name__)

FLEX = "flex"
STANDARD = "default"  # OpenAI's name of the standard tier in service_tier

_UNPRICED_WARNED: set[str] = set()  # models already warned about (once per process)


def sent_tier(endpoint: EndpointSettings, capacity_429s: int) -> str | None:
    """The service_tier of a request's next attempt: None outside flex mode (the body is sent as built),
    ``flex``, or ``default`` once the request had ``flex_fallback_after`` capacity 429s."""
    if endpoint.mode != "flex":
        return None
    after = endpoint.flex_fallback_after
    return STANDARD if after is not None and capacity_429s >= after else FLEX


def with_tier(body: dict[str, Any], sent: str | None) -> dict[str, Any]:
    """``body`` with ``sent`` as its service_tier (the body is built with flex's; a fallback replaces it)."""
    if sent is None or body.get("service_tier") == sent:
        return body
    return {**body, "service_tier": sent}


def is_capacity(exc: AttemptError, sent: str | None) -> bool:
    """A retryable 429 at the flex tier that means "no capacity". Its body decides; a body that says
    neither capacity nor rate limit counts as capacity at flex (OpenAI documents only the status and the
    words "Resource Unavailable"), and never outside it."""
    return sent == FLEX and exc.retryable and exc.capacity is not False


def billed_tier(completion: dict[str, Any], sent: str | None) -> Tier:
    """The tier that served ``completion``: its body's ``service_tier`` when present ("flex" -> flex price,
    "default", "auto", "scale"... -> standard), else the tier it was sent at."""
    served = completion.get("service_tier") if isinstance(completion, dict) else None
    if not isinstance(served, str):
        served = sent
    return "flex" if served == FLEX else "standard"


def warn_if_unpriced(settings: LLMSettings, endpoint_name: str) -> None:
    """Warn once per model when a paid endpoint's model has no price (its replies are counted at $0 and the
    spend caps cannot stop them), or a flex endpoint's model has no known flex price (counted at the standard
    price, which overstates what flex costs). Paid: OpenAI's API, or any server that takes an API key; a
    self-hosted server without one (the paper's referees) costs nothing per token."""
    ep = settings.endpoint(endpoint_name)
    if ep.model in _UNPRICED_WARNED:
        return
    price = settings.prices.get(ep.model)
    if price is None and (ep.is_openai_host or ep.api_key_env is not None) and ep.mode != "flex":
        _UNPRICED_WARNED.add(ep.model)
        logger.warning("LLM endpoint %s sends model %s, which has no price in llm.prices: its replies are counted "
                       "at $0 in status and the estimate, and llm.max_cost_usd cannot stop them. Add "
                       "llm.prices.%s: {input_per_mtok: ..., output_per_mtok: ...} (USD per million tokens), or "
                       "check the model's name (priced: %s)", endpoint_name, ep.model, ep.model,
                       ", ".join(sorted(settings.prices)))
        return
    if ep.mode != "flex":
        return
    if price is not None and price.flex_discount is not None:
        return
    _UNPRICED_WARNED.add(ep.model)
    counted = "at the standard price" if price is not None else "at $0 (the model has no price in llm.prices)"
    logger.warning("LLM endpoint %s sends model %s at the flex tier, but llm.prices knows no flex price for it: "
                   "its replies are counted %s. OpenAI offers flex (at Batch prices) on the GPT-5 family, o3 "
                   "and o4-mini; for another model that offers it, set llm.prices.%s.flex_discount (0.5 = half "
                   "price); a model without flex may refuse the request", endpoint_name, ep.model, counted,
                   ep.model)
