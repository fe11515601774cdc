"""How many requests a self-hosted server holds in its queue, read from its Prometheus ``/metrics``.

A saturated vLLM (or SGLang) server never answers 429: it queues, and latency grows. The latency signal
(``processors.llm.limits.LatencySignal``) infers the queue from reply times; where the server publishes its
queue, this reads it directly: vLLM's ``vllm:num_requests_waiting`` gauge (requests admitted but waiting for a
place in the running batch), SGLang's ``sglang:num_queue_reqs``. A server with requests waiting is serving all
it can; more requests only lengthen the wait, so the concurrency window is lowered as for a 429
(``AdaptiveConcurrency``).

Polled on the accounts' event loop every ``interval_s`` (a small GET: the metrics text of a vLLM server is a
few tens of KB). Best effort: a server without the endpoint (404, another product) or one that cannot be reached
turns the watch off after ``MAX_FAILURES`` polls in a row, said once in the log; the latency signal still
works. The text is parsed with ``prometheus_client``'s parser (label escaping, exposition formats).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

QUEUE_GAUGES = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")  # the first one the server shows counts
MAX_FAILURES = 3
MAX_METRICS_BYTES = 4 * 2**20  # a metrics page is tens of KB; never read an unbounded body


def metrics_url(base_url: str) -> str:
    """The server's metrics page for an OpenAI-style base URL: ``http://host:8000/v1`` -> ``http://host:8000/metrics``."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/metrics", "", ""))


def waiting_requests(text: str) -> float | None:
    """The requests waiting in the server's queue (summed over its models and engines), or None when the text
    holds none of ``QUEUE_GAUGES``."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in QUEUE_GAUGES:
            found[family.name] = sum(sample.value for sample in family.samples if sample.name == family.name)
    for name in QUEUE_GAUGES:
        if name in found:
            return found[name]
    return None


class QueueWatch:
    """The queue of one server, polled. ``congested``: requests were waiting at the last two polls (one poll
    can catch a burst the server is about to take into its batch)."""

    def __init__(self, base_url: str, *, interval_s: float = 1.0, timeout_s: float = 5.0):
        self.url = metrics_url(base_url)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.waiting: float | None = None  # the last figure read
        self.congested = False
        self.failures = 0
        self.active = True  # False once the server showed it publishes no queue
        self._previous: float | None = None

    def observe(self, waiting: float | None) -> None:
        """Take one poll's figure (None: the page holds no queue gauge)."""
        self._previous, self.waiting = self.waiting, waiting
        self.congested = bool(waiting) and bool(self._previous)

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with session.get(self.url, timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_METRICS_BYTES + 1)
            if len(body) > MAX_METRICS_BYTES:
                raise ValueError(f"a metrics page over {MAX_METRICS_BYTES} bytes")
            waiting = waiting_requests(body.decode("utf-8", errors="replace"))
            if waiting is None:
                raise ValueError(f"no queue gauge ({', '.join(QUEUE_GAUGES)})")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UnicodeError) as exc:
            self.failures += 1
            self.observe(None)
            if self.failures >= MAX_FAILURES:
                self.active = False
                logger.info("%s: no request queue to read (%s); only reply latency tells when the server "
                            "queues", self.url, exc)
            return
        self.failures = 0
        self.observe(waiting)

    async def run(self) -> None:
        """Poll until cancelled (the run's accounts close), or until the server showed it has no queue gauge;
        the connection used for it is its own, closed on leaving."""
        async with aiohttp.ClientSession() as session:
            while self.active:
                await self.poll_once(session)
                await asyncio.sleep(self.interval_s)
