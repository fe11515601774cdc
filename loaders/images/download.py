"""Download many image URLs at once with aiohttp: bounded concurrency, timeouts, retries, size cap, SSRF guard.

``fetch_urls(urls, config)`` is synchronous (it runs one event loop per call: the images stage calls it once
per batch) and returns one ``Fetched`` per URL, in order, each either holding the body or a reason code:

- ``download_refused``   the host is/resolves to a non-public address (also after a redirect), or not http(s)
- ``download_too_large`` Content-Length or the streamed body exceeds ``max_bytes`` (the rest is never read)
- ``download_http_error`` a final non-2xx status (4xx at once; 429/5xx after the retries)
- ``download_timeout``   connect/read/total timeout after the retries
- ``download_failed``    connection errors, too many redirects, broken transfers after the retries

Whether the body is an image is *not* decided here (content type and extension are not trusted): the stage
hands every body to ``processors.image_validate.check_image``, which sniffs the content.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from loaders.images.netguard import BadUrlError, BlockedAddressError, GuardedResolver, check_url

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}


class DownloadConfig(BaseModel):
    """How URLs (URL lists and recipe archives) are fetched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(32, ge=1, le=1024, description="requests in flight at once")
    per_host: int = Field(0, ge=0, description="requests in flight per host; 0 = no extra limit")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next chunk of a body")
    total_timeout_s: float = Field(120.0, gt=0, description="whole request incl. redirects, per attempt")
    retries: int = Field(3, ge=0, description="extra attempts on 429/5xx/timeouts/connection errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per attempt, with jitter")
    max_backoff_s: float = Field(30.0, ge=0)
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(50 * 2**20, ge=1, description="bodies above this fail with download_too_large")
    allow_private_addresses: bool = Field(
        False, description="allow loopback/private/link-local targets (tests, intranet mirrors)"
    )
    allowed_networks: tuple[str, ...] = Field(
        (), description="CIDRs allowed although not public, e.g. ['10.1.2.0/24'] for an intranet mirror"
    )
    user_agent: str = "taskgalaxy-images/0.1 (+https://github.com/Kwai-YuanQi/TaskGalaxy)"


@dataclass
class Fetched:
    url: str
    data: bytes | None = None
    reason: str | None = None
    detail: str = ""
    final_url: str = ""
    attempts: int = 0


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


class _Permanent(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def fetch_urls(urls: list[str], config: DownloadConfig) -> list[Fetched]:
    """Download ``urls`` concurrently; one result per URL, in the same order. Never raises for a bad URL."""
    if not urls:
        return []
    return asyncio.run(fetch_urls_async(urls, config))


def make_session(config: DownloadConfig) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=config.total_timeout_s, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
    )
    connector = aiohttp.TCPConnector(
        limit=config.concurrency,
        limit_per_host=config.per_host,
        resolver=GuardedResolver(allow_private=config.allow_private_addresses, networks=config.allowed_networks),
    )
    return aiohttp.ClientSession(timeout=timeout, connector=connector, headers={"User-Agent": config.user_agent})


async def fetch_urls_async(urls: list[str], config: DownloadConfig) -> list[Fetched]:
    gate = asyncio.Semaphore(config.concurrency)
    async with make_session(config) as session:
        return list(await asyncio.gather(*(_fetch_one(session, gate, url, config) for url in urls)))


async def _fetch_one(session, gate: asyncio.Semaphore, url: str, config: DownloadConfig) -> Fetched:
    result = Fetched(url=url)
    for attempt in range(config.retries + 1):
        result.attempts = attempt + 1
        try:
            async with gate:
                result.data, result.final_url = await _get(session, url, config)
            result.reason = None
            return result
        except _Permanent as exc:
            result.reason, result.detail = exc.reason, exc.detail
            return result
        except _Retryable as exc:
            result.reason, result.detail = exc.reason, exc.detail
            if attempt < config.retries:
                await asyncio.sleep(_delay(attempt, config, exc.retry_after))
    result.detail = f"{result.detail} (gave up after {result.attempts} attempts)"
    return result


def _delay(attempt: int, config: DownloadConfig, retry_after: float | None) -> float:
    backoff = min(config.max_backoff_s, config.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        backoff = max(backoff, min(retry_after, config.max_backoff_s))
    return backoff


async def _get(session: aiohttp.ClientSession, url: str, config: DownloadConfig) -> tuple[bytes, str]:
    """One attempt: follow redirects by hand so every hop passes the address check."""
    current = url
    for _hop in range(config.max_redirects + 1):
        try:
            await check_url(current, allow_private=config.allow_private_addresses, networks=config.allowed_networks)
        except (BadUrlError, BlockedAddressError) as exc:
            raise _Permanent("download_refused", f"{current}: {exc}") from None
        except OSError as exc:  # DNS failure: the host may come back
            raise _Retryable("download_failed", f"{current}: cannot resolve host ({exc})") from None
        try:
            async with session.get(current, allow_redirects=False) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    current = urljoin(current, response.headers["Location"])
                    continue
                return await _read_body(response, current, config), current
        except (_Retryable, _Permanent):
            raise
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                raise _Permanent("download_refused", f"{current}: {exc.os_error}") from None
            raise _Retryable("download_failed", f"{current}: {exc}") from None
        except asyncio.TimeoutError:
            raise _Retryable("download_timeout", f"{current}: timed out") from None
        except aiohttp.ClientError as exc:
            raise _Retryable("download_failed", f"{current}: {type(exc).__name__}: {exc}") from None
    raise _Permanent("download_failed", f"{url}: more than {config.max_redirects} redirects")


async def _read_body(response: aiohttp.ClientResponse, url: str, config: DownloadConfig) -> bytes:
    status = response.status
    if status in _RETRY_STATUS:
        raise _Retryable("download_http_error", f"{url}: HTTP {status}", _retry_after(response))
    if not 200 <= status < 300:
        raise _Permanent("download_http_error", f"{url}: HTTP {status}")
    declared = response.content_length
    if declared is not None and declared > config.max_bytes:
        raise _Permanent("download_too_large", f"{url}: Content-Length {declared} > download.max_bytes")
    chunks, total = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > config.max_bytes:
            raise _Permanent("download_too_large", f"{url}: body exceeds download.max_bytes={config.max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import time

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
