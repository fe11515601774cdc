"""The simulator's model of OpenAI's flex tier, for requests whose body carries ``service_tier: "flex"``.

A flex attempt may be refused with OpenAI's capacity 429 ("Resource Unavailable", code
``resource_unavailable``, not billed): the first ``flex_fail_first`` flex attempts of every request key,
then a share ``flex_rate_429`` drawn from a hash of (seed, key, attempt number), so the outcome of each
attempt does not depend on the order in which concurrent requests arrive. An answered flex request waits
``flex_latency_factor`` times the configured latency. Any reply to a request that names a service_tier
reports the tier that served it in ``service_tier``, as OpenAI's does. A request without service_tier is
not touched.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from builder.ids import fingerprint
from processors.simulator.core import SimStats, SimulatorOptions

FLEX = "flex"
CAPACITY_MESSAGE = ("Resource Unavailable: the flex tier has no capacity for this request right now (simulated). "
                    "You are not charged for it; retry later, or send it with service_tier 'default'.")


def asked_tier(body: dict[str, Any]) -> str | None:
    tier = body.get("service_tier")
    return tier if isinstance(tier, str) else None


def count(stats: SimStats, body: dict[str, Any], key: str) -> None:
    """Count the attempt by the tier it asked for (and, at flex, per key)."""
    tier = asked_tier(body)
    if tier is None:
        return
    stats.service_tiers[tier] += 1
    if tier == FLEX:
        stats.flex_per_key[key] += 1


def refusal(options: SimulatorOptions, stats: SimStats, body: dict[str, Any], key: str) -> web.Response | None:
    """OpenAI's capacity 429 for this flex attempt, or None (answered). Call after ``count``."""
    if asked_tier(body) != FLEX:
        return None
    attempt = stats.flex_per_key[key]
    refused = attempt <= options.flex_fail_first or _draw(options.seed, key, attempt) < options.flex_rate_429
    if not refused:
        return None
    stats.outcomes["429_flex"] += 1
    error = {"message": CAPACITY_MESSAGE, "type": "resource_unavailable", "param": None,
             "code": "resource_unavailable"}
    return web.json_response({"error": error}, status=429)


def latency_factor(options: SimulatorOptions, body: dict[str, Any]) -> float:
    return options.flex_latency_factor if asked_tier(body) == FLEX else 1.0


def served(reply: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """``reply`` reporting the tier that served it when the request named one ("auto" is served at
    "default"); a request that named none gets the reply unchanged."""
    tier = asked_tier(body)
    if tier is None:
        return reply
    reply["service_tier"] = "default" if tier == "auto" else tier
    return reply


def _draw(seed: int, key: str, attempt: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key, attempt)."""
    return int(fingerprint("sim-flex", seed, key, attempt)[:13], 16) / 16 ** 13
