"""Sending one chat completion: a lean aiohttp client or the openai SDK, both raising ``AttemptError``.

The SDK (``AsyncOpenAI`` on ``DefaultAioHttpClient``) costs ~1 ms of CPU per request in request building and
response validation; the lean path posts the JSON body and reads the JSON reply, which is what lets one
process drive thousands of requests per second. Both send the same body, so replies and cache keys agree.
Each request carries ``X-Request-Key`` (the cache key, not a secret) so a server or proxy can count
requests per key; the simulator does.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Protocol

import aiohttp

from processors.llm import errors, images
from processors.llm import request as rq

logger = logging.getLogger(__name__)

KEY_HEADER = "X-Request-Key"


class Secret:
    """An API key that does not print: ``repr``/``str`` show ``***``; only ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __reduce__(self):  # never pickled along into a Ray worker or a file
        raise TypeError("an API key is not picklable; read it from the environment in the worker")


class Transport(Protocol):
    async def __aenter__(self) -> "Transport": ...
    async def __aexit__(self, *exc_info: object) -> None: ...
    async def chat(self, body: dict[str, Any], key: str) -> dict[str, Any]: ...


def bad_body(text: str) -> errors.AttemptError:
    text = errors.redact(text, None)  # key-shaped strings masked before the cut, so no prefix survives
    return errors.AttemptError(rq.API_ERROR, f"reply body is not a chat completion: {text[:200]!r}",
                               retryable=True, breaker=True, what="malformed reply body")


# Stands for an image's data URL while the rest of a body is JSON-encoded (unique to this process, so no text
# of a request can hold it by chance; a body that does anyway is encoded whole).
_MARK_TEXT = f"tg-data-url-{uuid.uuid4().hex}"
_URL_MARK = json.dumps(_MARK_TEXT)  # as it reads in the encoded body


def body_json(body: dict[str, Any]) -> str:
    """``json.dumps(body)``, the same text, with each image's ``DataURL`` spliced in between quotes rather than
    run through the encoder, which escape-checks and copies its ~40 KB on every request (71 of the 89 us a
    referee body took, ~5 % of the client's CPU at zero latency). Only a ``DataURL`` is spliced: base64 behind
    a fixed prefix, which JSON writes unchanged."""
    urls: list[str] = []
    messages = [_marked(message, urls) for message in body.get("messages") or ()]
    if not urls:
        return json.dumps(body)
    pieces = json.dumps({**body, "messages": messages}).split(_URL_MARK)
    if len(pieces) != len(urls) + 1:  # the mark in a request's own text: never spliced wrongly
        return json.dumps(body)
    out = [pieces[0]]
    for url, piece in zip(urls, pieces[1:]):
        out += ['"', url, '"', piece]
    return "".join(out)


def _marked(message: Any, urls: list[str]) -> Any:
    """``message`` with each ``DataURL`` replaced by the mark (appended to ``urls``); the body is not changed."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image_url = part.get("image_url") if isinstance(part, dict) else None
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if isinstance(url, images.DataURL):
            urls.append(url)
            part = {**part, "image_url": {**image_url, "url": _MARK_TEXT}}
        parts.append(part)
    return {**message, "content": parts}


class AiohttpTransport:
    def __init__(self, base_url: str, api_key: Secret, *, timeout_s: float, max_connections: int):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._key = api_key
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "AiohttpTransport":
        headers = {"Content-Type": "application/json"}
        if self._key.reveal():
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        connector = aiohttp.TCPConnector(limit=self._max_connections + 8, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def chat(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        assert self._session is not None, "use the transport as an async context manager"
        try:
            async with self._session.post(self._url, data=body_json(body), headers={KEY_HEADER: key}) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise errors.from_status(resp.status, raw.decode("utf-8", "replace"), resp.headers,
                                             self._key.reveal())
        except TimeoutError:
            raise errors.timeout_error(self._timeout_s) from None
        except aiohttp.ClientError as exc:
            raise errors.connection_error(exc, self._key.reveal()) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise bad_body(raw.decode("utf-8", "replace")) from None


class OpenAITransport:
    """The same request through ``openai.AsyncOpenAI`` with its aiohttp transport and its retries off."""

    def __init__(self, base_url: str, api_key: Secret, *, timeout_s: float, max_connections: int):
        self._base_url, self._key, self._timeout_s = base_url, api_key, timeout_s
        self._client: Any = None

    async def __aenter__(self) -> "OpenAITransport":
        self._client = make_sdk_client(self._base_url, self._key, self._timeout_s)
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.__aexit__(*exc_info)

    async def chat(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        import openai

        rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
        try:
            completion = await self._client.chat.completions.create(
                model=body["model"], messages=body["messages"], extra_body=rest, extra_headers={KEY_HEADER: key}
            )
        except openai.APIStatusError as exc:
            raise errors.from_status(exc.status_code, exc.response.text, exc.response.headers,
                                     self._key.reveal()) from None
        except openai.APITimeoutError as exc:
            refused = _connection_cause(exc)  # the SDK's aiohttp client reports a refused connection as a timeout
            if refused is not None:
                raise errors.connection_error(refused, self._key.reveal()) from None
            raise errors.timeout_error(self._timeout_s) from None
        except openai.APIConnectionError as exc:
            raise errors.connection_error(exc, self._key.reveal()) from None
        except (openai.APIError, ValueError) as exc:  # a 200 whose body is not a chat completion
            raise bad_body(errors.redact(str(exc), self._key.reveal())) from None
        return completion.model_dump()


def _connection_cause(exc: BaseException) -> BaseException | None:
    """The connection failure (refused, unreachable, DNS) somewhere in ``exc``'s chain of causes, if any."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 10:
        if isinstance(cause, (aiohttp.ClientConnectorError, ConnectionError)) and not isinstance(cause, TimeoutError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def make_sdk_client(base_url: str, api_key: Secret, timeout_s: float) -> Any:
    import openai

    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key.reveal() or "EMPTY", max_retries=0, timeout=timeout_s,
        http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
    )


def make_transport(kind: str, base_url: str, api_key: Secret, *, timeout_s: float, max_connections: int) -> Transport:
    cls = AiohttpTransport if kind == "aiohttp" else OpenAITransport
    return cls(base_url, api_key, timeout_s=timeout_s, max_connections=max_connections)
