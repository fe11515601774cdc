"""Turn an ``LLMRequest`` into its cache key, its token estimate and (lazily) its wire body.

The cache key is the hash of the canonical request: the endpoint's identity (base URL and model), prompt
version, every sampling parameter and the messages with each image replaced by the hash of its bytes plus the
settings that shape what is sent (longest side, detail, encoding). The key itself, headers and timeouts are
never part of it.

Two servers that serve models under the same name are different referees, so the base URL is part of the
identity. For OpenAI's own URL it is left out, which keeps every cache written before the URL counted
(``CACHE_KEY_VERSION`` 1) valid for the OpenAI endpoint; entries of other servers written then no longer
match and are asked again (they could have been answered by another server).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from urllib.parse import urlsplit

from builder.ids import fingerprint
from processors.llm import estimate, images
from processors.llm.request import LLMRequest
from processors.llm.settings import EndpointSettings

CACHE_KEY_VERSION = 1  # bump when the canonical form below changes meaning


@dataclass
class Prepared:
    request: LLMRequest
    cache_key: str
    params: dict[str, Any]  # the body without messages
    has_images: bool
    est_tokens: int  # prompt estimate + max_tokens, what a TPM limit charges up front
    endpoint: EndpointSettings

    def body_sync(self) -> dict[str, Any]:
        messages = self.request.messages
        if self.has_images:
            messages = [self._wire_message(m) for m in messages]
        return {"model": self.endpoint.model, "messages": messages, **self.params, **self.wire_params()}

    async def body(self) -> dict[str, Any]:
        """The JSON body to POST; images are decoded and encoded in a worker thread."""
        if not self.has_images:
            return {"model": self.endpoint.model, "messages": self.request.messages, **self.params,
                    **self.wire_params()}
        return await asyncio.to_thread(self.body_sync)

    def wire_params(self) -> dict[str, Any]:
        """What is sent but is not part of the cache key (it never changes the answer): the service tier and
        the prompt-cache routing key."""
        return wire_params(self.request, self.endpoint)

    def _wire_message(self, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        ep = self.endpoint
        parts = [
            images.to_wire_part(p, max_side=ep.image_max_side, detail=ep.image_detail, fmt=ep.image_format)
            if images.is_image_part(p) else p
            for p in content
        ]
        return {**message, "content": parts}


OPENAI_BASE_URL = "https://api.openai.com/v1"


def endpoint_identity(base_url: str) -> str | None:
    """The server part of a cache key: the normalised base URL, or None for OpenAI's (see the module doc)."""
    parts = urlsplit(base_url.strip())
    normalised = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    return None if normalised == OPENAI_BASE_URL else normalised


def request_params(request: LLMRequest, endpoint: EndpointSettings) -> dict[str, Any]:
    limit = request.max_tokens or endpoint.max_tokens
    temperature = request.temperature if request.temperature is not None else endpoint.temperature
    if endpoint.is_reasoning_model:
        # OpenAI answers a reasoning model's max_tokens, and any temperature but the default, with a 400.
        params: dict[str, Any] = {"max_completion_tokens": limit}
        if endpoint.reasoning_effort is not None:
            params["reasoning_effort"] = endpoint.reasoning_effort
    else:
        params = {"max_tokens": limit}
        if temperature is not None:
            params["temperature"] = temperature
    if endpoint.seed is not None:
        params["seed"] = endpoint.seed
    if request.logprobs:
        params["logprobs"] = True
        if request.top_logprobs is not None:
            params["top_logprobs"] = request.top_logprobs
    if request.json_schema is not None and endpoint.supports_json_schema:
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": request.schema_name, "schema": request.json_schema},
        }
    params.update(request.extra_body)
    return params


def wire_params(request: LLMRequest, endpoint: EndpointSettings) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if endpoint.mode == "flex":
        params["service_tier"] = "flex"
    if endpoint.send_prompt_cache_key and request.prompt_cache_key:
        params["prompt_cache_key"] = request.prompt_cache_key
    return params


def _canonical_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    out, has_images = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if images.is_image_part(part):
                    has_images = True
                    parts.append(images.content_ref(part))
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out, has_images


def prepare(request: LLMRequest, endpoint: EndpointSettings) -> Prepared:
    params = request_params(request, endpoint)
    messages, has_images = _canonical_messages(request.messages)
    image_settings = (
        {"max_side": endpoint.image_max_side, "detail": endpoint.image_detail, "format": endpoint.image_format}
        if has_images else None
    )
    identity = endpoint_identity(endpoint.base_url)
    parts = ("llm-request", CACHE_KEY_VERSION, endpoint.model, request.prompt_version, params, messages,
             image_settings)
    key = fingerprint(*parts) if identity is None else fingerprint(*parts, {"server": identity})
    prompt, completion = estimate.request_tokens(request, endpoint, read_images=has_images)
    return Prepared(request, key, params, has_images, prompt + completion, endpoint)
