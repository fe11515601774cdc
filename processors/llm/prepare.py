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
import weakref
from dataclasses import dataclass, field
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
    # What the cache key was made of, per local image file: the part's ``id`` -> (the part, kept alive so the
    # id is never reused, and its file's hash and pixel size).
    image_files: dict[int, tuple[dict[str, Any], images.FileInfo]] = field(default_factory=dict, repr=False)

    def body_sync(self) -> dict[str, Any]:
        messages = self.request.messages
        if self.has_images:
            messages = [self._wire_message(m) for m in messages]
        return self._body(messages)

    async def body(self) -> dict[str, Any]:
        """The JSON body to POST. Images whose encoding this process keeps are put in on the loop (a look-up:
        no file is touched); otherwise they are read, decoded and encoded in a worker thread - by one request
        per image: the others that need it meanwhile (its other questions, the other referees) wait for that
        one on the loop, then take the kept encoding, instead of each taking a thread to wait in."""
        if not self.has_images:
            return self._body(self.request.messages)
        kept = self._kept_messages()
        if kept is not None:
            return self._body(kept)
        loop = asyncio.get_running_loop()
        encoding = _ENCODING.setdefault(loop, {})
        keys = self._encoding_keys()
        running = {encoding[key] for key in keys if key in encoding}
        if running:
            await asyncio.wait(running)
            kept = self._kept_messages()
            if kept is not None:
                return self._body(kept)
        return await self._body_in_thread(encoding, loop)

    async def _body_in_thread(self, encoding: dict[tuple, asyncio.Future], loop) -> dict[str, Any]:
        """``body_sync`` in a worker thread, its images marked as being encoded until it returns."""
        done = loop.create_future()
        mine = [key for key in self._encoding_keys() if key not in encoding]
        encoding.update(dict.fromkeys(mine, done))
        try:
            return await asyncio.to_thread(self.body_sync)
        finally:
            for key in mine:
                encoding.pop(key, None)
            done.set_result(None)

    def _encoding_keys(self) -> list[tuple[str, int, str]]:
        """The ``images.encoding_key`` of each local image file read at prepare time."""
        ep = self.endpoint
        return [images.encoding_key(info, ep.image_max_side, ep.image_format)
                for _, info in self.image_files.values()]

    def _body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": self.endpoint.model, "messages": messages, **self.params, **self.wire_params()}

    def _kept_messages(self) -> list[dict[str, Any]] | None:
        """The wire messages from kept encodings alone, or None when an image's is not kept (or the image is
        no file read at prepare time). Each image is the encoding of the content its cache key names. On the
        loop because a thread hop per request cost far more than these look-ups."""
        out = []
        for message in self.request.messages:
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for part in content:
                if images.is_image_part(part) and part["type"] != "image_url":
                    info = _file_of(self.image_files, part)
                    url = images.cached_url(images.encoding_key(info, self.endpoint.image_max_side,
                                                                self.endpoint.image_format)) if info else None
                    if url is None:
                        return None
                    part = {"type": "image_url", "image_url": {"url": url, "detail": self.endpoint.image_detail}}
                elif images.is_image_part(part):
                    part = self._wire_part(part)  # a URL passed through: no I/O
                parts.append(part)
            out.append({**message, "content": parts})
        return out

    def wire_params(self) -> dict[str, Any]:
        """What is sent but is not part of the cache key (it never changes the answer): the service tier and
        the prompt-cache routing key."""
        return wire_params(self.request, self.endpoint)

    def _wire_message(self, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        parts = [self._wire_part(p) if images.is_image_part(p) else p for p in content]
        return {**message, "content": parts}

    def _wire_part(self, part: dict[str, Any]) -> dict[str, Any]:
        ep = self.endpoint
        return images.to_wire_part(part, max_side=ep.image_max_side, detail=ep.image_detail, fmt=ep.image_format)


# Per event loop: the encoding keys some request is encoding now (in a worker thread), and the future set when
# it is done. Weak: a loop that ends (``asyncio.run``) takes its entry along.
_ENCODING: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, asyncio.Future]]" = (
    weakref.WeakKeyDictionary())

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


def _file_of(files: dict[int, tuple[dict[str, Any], images.FileInfo]], part: dict[str, Any]
             ) -> images.FileInfo | None:
    found = files.get(id(part))
    return found[1] if found is not None and found[0] is part else None


def _canonical_messages(messages: list[dict[str, Any]]
                        ) -> tuple[list[dict[str, Any]], bool, dict[int, tuple[dict[str, Any], images.FileInfo]]]:
    """The messages as the cache key sees them (images by content), whether there are images, and what was
    read of each local image file (by the part's ``id``)."""
    out, has_images, files = [], False, {}
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if images.is_image_part(part):
                    has_images = True
                    ref, info = images.content_ref_and_info(part)
                    parts.append(ref)
                    if info is not None:
                        files[id(part)] = (part, info)
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out, has_images, files


def prepare(request: LLMRequest, endpoint: EndpointSettings) -> Prepared:
    params = request_params(request, endpoint)
    messages, has_images, files = _canonical_messages(request.messages)
    image_settings = (
        {"max_side": endpoint.image_max_side, "detail": endpoint.image_detail, "format": endpoint.image_format}
        if has_images else None
    )
    identity = endpoint_identity(endpoint.base_url)
    parts = ("llm-request", CACHE_KEY_VERSION, endpoint.model, request.prompt_version, params, messages,
             image_settings)
    key = fingerprint(*parts) if identity is None else fingerprint(*parts, {"server": identity})

    def image_size(part: dict[str, Any]) -> tuple[int, int] | None:  # the size read above: no second stat
        info = _file_of(files, part)
        return info.size if info is not None else images.image_size(part)

    prompt, completion = estimate.request_tokens(request, endpoint, read_images=has_images, image_size=image_size)
    return Prepared(request, key, params, has_images, prompt + completion, endpoint, files)
