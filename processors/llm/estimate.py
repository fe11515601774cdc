"""Pure estimates: tokens of a request before it is sent (for the TPM bucket and ``taskgalaxy estimate``) and
cost from the price table.

Text tokens are estimated as characters / 4 (+ 4 per message), the usual rule of thumb for English with
GPT-4o's tokenizer; it errs on the high side for code-like text. No tokenizer download is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from processors.llm import images
from processors.llm.image_tokens import image_tokens, scaled_size
from processors.llm.request import LLMRequest
from processors.llm.settings import EndpointSettings, LLMSettings, Price

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_tokens(messages: list[dict[str, Any]], endpoint: EndpointSettings, *, read_images: bool = True,
                   image_size: Callable[[dict[str, Any]], tuple[int, int] | None] = images.image_size) -> int:
    """Prompt tokens of ``messages``. Images count by their downscaled size at the endpoint's detail, under the
    image-token rule of the endpoint's model family (``processors.llm.image_tokens``; an unknown model, a self-hosted
    vLLM say, counts as GPT-4o); an image whose size is unknown (or ``read_images=False``) counts as a square
    of ``image_max_side``. ``image_size`` gives an image part's pixel size (a caller that has read the file
    already passes what it read)."""
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            total += text_tokens(content)
            continue
        for part in content or []:
            if images.is_image_part(part):
                size = image_size(part) if read_images else None
                size = scaled_size(size, endpoint.image_max_side) if size else (endpoint.image_max_side,) * 2
                total += image_tokens(*size, endpoint.image_detail, model=endpoint.model)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
    return total


def request_tokens(request: LLMRequest, endpoint: EndpointSettings, *, read_images: bool = True,
                   image_size: Callable[[dict[str, Any]], tuple[int, int] | None] = images.image_size
                   ) -> tuple[int, int]:
    """(prompt tokens estimated, completion tokens at most) for one request; images by ``endpoint.model``'s rule."""
    prompt = message_tokens(request.messages, endpoint, read_images=read_images, image_size=image_size)
    if request.json_schema is not None:
        prompt += text_tokens(str(request.json_schema))
    return prompt, request.max_tokens or endpoint.max_tokens


Tier = Literal["standard", "batch", "flex"]


def tier_discount(price: Price, tier: Tier) -> float:
    """The fraction of the list price paid at ``tier`` (flex without a known flex price: the standard price)."""
    if tier == "batch":
        return price.batch_discount
    if tier == "flex" and price.flex_discount is not None:
        return price.flex_discount
    return 1.0


def mode_tier(endpoint: EndpointSettings) -> Tier:
    """The tier an endpoint's requests are billed at when nothing goes wrong (a flex request that falls back
    to the standard tier is billed there instead: see ``processors.llm.flex``)."""
    return "batch" if endpoint.mode == "batch" else "flex" if endpoint.mode == "flex" else "standard"


def cost_usd(settings: LLMSettings, model: str, prompt_tokens: float, completion_tokens: float, *,
             batch: bool = False, tier: Tier | None = None, cached_tokens: float = 0,
             cache_write_tokens: float = 0) -> float:
    """Dollars for the given tokens; 0 for a model without a price (a self-hosted vLLM, say).

    ``tier`` is the service tier billed (``batch=True`` is ``tier="batch"``, the older spelling).

    ``cached_tokens`` and ``cache_write_tokens`` are the parts of ``prompt_tokens`` read from and written to
    the provider's prompt cache, priced at the model's cached and cache-write rates; without them (an
    estimate, a worst case) every prompt token is at the full input price."""
    price = settings.prices.get(model)
    if price is None:
        return 0.0
    cached_rate = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    write_rate = price.input_per_mtok if price.cache_write_per_mtok is None else price.cache_write_per_mtok
    full = max(0.0, prompt_tokens - cached_tokens - cache_write_tokens)
    dollars = (full * price.input_per_mtok + cached_tokens * cached_rate + cache_write_tokens * write_rate
               + completion_tokens * price.output_per_mtok) / 1e6
    return dollars * tier_discount(price, tier or ("batch" if batch else "standard"))


def worst_cost_usd(settings: LLMSettings, model: str, prompt_tokens: float, completion_tokens: float, *,
                   tier: Tier = "standard") -> float:
    """The most a request can be billed (the spend cap's reservation): every prompt token at the input price,
    or at the cache-write price where the model bills writes above it (which tokens the provider's cache
    takes is known only from the reply), and every completion token."""
    return max(cost_usd(settings, model, prompt_tokens, completion_tokens, tier=tier),
               cost_usd(settings, model, prompt_tokens, completion_tokens, tier=tier,
                        cache_write_tokens=prompt_tokens))


@dataclass
class Projection:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


def project(
    settings: LLMSettings,
    endpoint_name: str,
    *,
    requests: int,
    prompt_text_chars: int,
    images_per_request: int = 0,
    completion_tokens: int,
) -> Projection:
    """What ``requests`` similar requests will cost, for ``taskgalaxy estimate`` before any row exists.

    ``completion_tokens`` is the expected reply length per request (not max_tokens, which is only a cap).
    """
    endpoint = settings.endpoint(endpoint_name)
    side = endpoint.image_max_side
    per_prompt = TOKENS_PER_MESSAGE * 2 + math.ceil(prompt_text_chars / CHARS_PER_TOKEN)
    per_prompt += images_per_request * image_tokens(side, side, endpoint.image_detail, model=endpoint.model)
    prompt_total, completion_total = requests * per_prompt, requests * completion_tokens
    dollars = cost_usd(settings, endpoint.model, prompt_total, completion_total, tier=mode_tier(endpoint))
    return Projection(requests, prompt_total, completion_total, dollars)


def estimate_requests(settings: LLMSettings, endpoint_name: str, requests: list[LLMRequest],
                      *, completion_tokens: int | None = None) -> Projection:
    """Tokens and cost of concrete requests; completions counted at ``completion_tokens`` each (default:
    their max_tokens, an upper bound)."""
    endpoint = settings.endpoint(endpoint_name)
    prompt_total = completion_total = 0
    for request in requests:
        prompt, completion_max = request_tokens(request, endpoint)
        prompt_total += prompt
        completion_total += completion_tokens if completion_tokens is not None else completion_max
    dollars = cost_usd(settings, endpoint.model, prompt_total, completion_total, tier=mode_tier(endpoint))
    return Projection(len(requests), prompt_total, completion_total, dollars)
