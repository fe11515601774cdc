"""An OpenAI-compatible HTTP server (aiohttp) for tests, benchmarks and ``--dry-run``, with faults on demand.

Endpoints: ``POST /v1/chat/completions``; ``POST /v1/files``, ``GET /v1/files/{id}[/content]``;
``POST /v1/batches``, ``GET /v1/batches/{id}`` (see ``batches``); ``GET /_sim/stats`` and
``POST /_sim/reset`` for the counters. Start it in-process with ``SimulatorThread`` (``thread``) or from
the command line with ``taskgalaxy simulate-api`` (``thread.add_arguments`` / ``main_from_args``). It answers
with the responders it is built with (``responders``): it imports no stage.

Order of checks per chat request: auth (401) -> RPM window (429 with the time until a slot frees) ->
flex capacity (429 "Resource Unavailable", ``flex``; requests at service_tier flex only) -> latency (times
``flex_latency_factor`` at flex; with ``queue_capacity``, first a wait in a FIFO for one of that many serving
slots, as vLLM's scheduler queues) -> scheduled or random fault -> reply. Headers (and so the API key) are
never logged or counted.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Iterable

from aiohttp import web

from builder.ids import fingerprint
from processors.llm.settings import REASONING_MODEL_PREFIXES
from processors.simulator import batches, flex
from processors.simulator.core import PromptCache, SimStats, SimulatorOptions, Window, completion
from processors.simulator.responders import Responder, checked

logger = logging.getLogger(__name__)

KEY_HEADER = "X-Request-Key"
STATE = web.AppKey("sim_state", object)


class SimState:
    def __init__(self, options: SimulatorOptions, responders: Iterable[Responder]):
        self.options = options
        self.responders = checked(responders)
        self.rng = random.Random(options.seed)
        self.reset()

    def reset(self) -> None:
        self.stats = SimStats()
        self.accepted = Window()
        self.arrivals = Window()
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.prompt_cache = PromptCache(self.options.cache_ttl_s) if self.options.prompt_cache else None
        self.serving = 0  # queue_capacity: requests being served now
        self.queue: collections.deque[asyncio.Future[None]] = collections.deque()  # and those waiting, FIFO


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None, *,
           param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param,
                      "code": code if code is not None else status if param else None}}
    return web.json_response(body, status=status, headers=headers)


def _retry_headers(options: SimulatorOptions, seconds: float) -> dict[str, str]:
    if options.retry_after_format == "date":
        return {"Retry-After": email.utils.formatdate(time.time() + seconds, usegmt=True)}
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(int(seconds * 1000))}


def _pick_fault(state: SimState, key: str) -> str | None:
    options = state.options
    if options.fail_kind and state.stats.per_key[key] <= options.fail_first:
        return options.fail_kind
    roll = state.rng.random()
    for kind, rate in (("429", options.rate_429), ("500", options.rate_5xx), ("timeout", options.rate_timeout),
                       ("drop", options.rate_drop), ("malformed", options.rate_malformed),
                       ("length", options.rate_length), ("bad_body", options.rate_bad_body)):
        if roll < rate:
            return kind
        roll -= rate
    return None


def _authorised(request: web.Request, options: SimulatorOptions) -> bool:
    given = request.headers.get("Authorization", "")
    if options.api_key is None:
        return True
    return given == f"Bearer {options.api_key}"


def _rate_window(state: SimState, now: float) -> float | None:
    """Count the arrival; None if admitted, else seconds until the window has room again."""
    state.stats.arrivals_peak_1s = max(state.stats.arrivals_peak_1s, state.arrivals.count(now) + 1)
    state.arrivals.times.append(now)
    limit = state.options.rpm_limit
    in_window = state.accepted.count(now)
    if limit is not None and in_window >= max(1, limit // 60):
        return max(0.001, state.accepted.times[0] + 1.0 - now)
    state.accepted.times.append(now)
    state.stats.accepted_peak_1s = max(state.stats.accepted_peak_1s, in_window + 1)
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: SimState = request.app[STATE]
    options, stats = state.options, state.stats
    raw = await request.read()
    now = time.monotonic()
    stats.received += 1
    stats.first_at = stats.first_at or time.time()
    stats.last_at = time.time()
    if not _authorised(request, options):
        stats.outcomes["401"] += 1
        if options.flavor == "vllm":  # vLLM's --api-key middleware answers with a bare string
            return web.json_response({"error": "Unauthorized"}, status=401)
        echoed = f" You sent: {request.headers.get('Authorization', '')}" if options.echo_auth else ""
        return _error(401, f"Incorrect API key provided.{echoed}", "invalid_request_error")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        stats.outcomes["400"] += 1
        return _error(400, "'messages' must be a list of message objects", "invalid_request_error")
    refused = _refuse_like_server(body, options)
    if refused is not None:
        stats.outcomes[str(refused.status)] += 1
        return refused
    key = request.headers.get(KEY_HEADER) or fingerprint(body)
    stats.per_key[key] += 1
    wait = _rate_window(state, now)
    if wait is not None:
        stats.outcomes["429_rpm"] += 1
        return _error(429, "Rate limit reached for requests per minute.", "requests", _retry_headers(options, wait))
    flex.count(stats, body, key)
    refused = flex.refusal(options, stats, body, key)
    if refused is not None:
        return refused
    fault = _pick_fault(state, key)
    latency = max(0.0, state.rng.gauss(options.latency_ms, options.jitter_ms)) / 1000 if options.latency_ms else 0
    latency *= flex.latency_factor(options, body)
    if options.queue_capacity > 0:
        await _served(state, latency)
    elif latency:
        await asyncio.sleep(latency)
    return await _answer(request, state, body, key, fault)


async def _served(state: SimState, latency: float) -> None:
    """Wait for one of ``queue_capacity`` serving slots (FIFO), then hold it for ``latency``."""
    stats = state.stats
    if state.serving >= state.options.queue_capacity or state.queue:
        waiter = asyncio.get_running_loop().create_future()
        state.queue.append(waiter)
        stats.queued_peak = max(stats.queued_peak, len(state.queue))
        try:
            await waiter  # the slot is handed over by the request that frees it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                _free(state)
            elif waiter in state.queue:
                state.queue.remove(waiter)
            raise
    else:
        state.serving += 1
    stats.serving_peak = max(stats.serving_peak, state.serving)
    try:
        if latency:
            await asyncio.sleep(latency)
    finally:
        _free(state)


def _free(state: SimState) -> None:
    while state.queue:
        waiter = state.queue.popleft()
        if not waiter.done():
            waiter.set_result(None)  # the slot passes on: ``serving`` stays the same
            return
    state.serving -= 1


def _refuse_like_server(body: dict, options: SimulatorOptions) -> web.Response | None:
    """The request checks a real server makes before any work, with its status codes and words."""
    model = body.get("model")
    if options.served_models and model not in options.served_models:
        return _error(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(options.served_models)}.",
                      "NotFoundError", param="model")
    if options.flavor != "vllm":
        return _refuse_like_openai(body)
    top = body.get("top_logprobs")
    if isinstance(top, int) and top > options.max_logprobs:
        return _error(400, f"Requested sample logprobs of {top}, which is greater than max allowed: "
                      f"{options.max_logprobs} (parameter=logprobs, value={top})", "BadRequestError", param="logprobs")
    if body.get("mm_processor_kwargs") and not options.trust_request_mm_kwargs:
        return _error(400, "Per-request mm_processor_kwargs are disabled by default because they can change "
                      "multimodal preprocessing resource usage. Start the server with --trust-request-mm-kwargs "
                      "only when clients are trusted. (parameter=mm_processor_kwargs)", "BadRequestError",
                      param="mm_processor_kwargs")
    return None


def _refuse_like_openai(body: dict) -> web.Response | None:
    """OpenAI's 400s for a reasoning model (GPT-5 family, o-series) asked with a chat model's parameters."""
    name = str(body.get("model", "")).rsplit("/", 1)[-1].lower()
    if not name.startswith(REASONING_MODEL_PREFIXES):
        return None
    if "max_tokens" in body:
        return _error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                      "'max_completion_tokens' instead.", "invalid_request_error", param="max_tokens",
                      code="unsupported_parameter")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        return _error(400, f"Unsupported value: 'temperature' does not support {temperature} with this model. Only "
                      "the default (1) value is supported.", "invalid_request_error", param="temperature",
                      code="unsupported_value")
    return None


async def _answer(request: web.Request, state: SimState, body: dict, key: str, fault: str | None):
    options, stats = state.options, state.stats
    stats.outcomes[fault or "ok"] += 1
    if fault == "429":
        headers = _retry_headers(options, options.retry_after_s)
        return _error(429, "Rate limit reached (simulated).", "requests", headers)
    if fault == "500":
        status = state.rng.choice((500, 502, 503))
        return _error(status, "The server had an error (simulated).", "server_error")
    if fault == "timeout":
        await asyncio.sleep(options.hang_s)
    if fault == "drop":
        if request.transport is not None:
            request.transport.abort()  # the client sees the connection close with no reply
        return web.Response(status=500)  # never written: aiohttp drops it quietly on a closed transport
    if fault == "bad_body":
        return web.Response(text="<html>502 Bad Gateway</html>", content_type="application/json")
    if fault not in ("malformed", "length", "timeout", "empty"):  # a timed-out client never gets the answer
        stats.ok_per_key[key] += 1
        stats.answered_at[key].append(time.time())
    cached = state.prompt_cache.cached_tokens(body, time.monotonic()) if state.prompt_cache else None
    reply = completion(body, state.responders, options.seed, fault, options, state.rng.getrandbits(32), cached)
    return web.json_response(flex.served(reply, body))


async def stats_handler(request: web.Request) -> web.Response:
    state: SimState = request.app[STATE]
    return web.json_response({"stats": state.stats.as_dict(), "options": state.options.as_dict()})


async def metrics_handler(request: web.Request) -> web.Response:
    """vLLM's scheduler gauges in Prometheus' text format, as a vLLM server's ``/metrics`` shows them: the
    requests in the running batch and those waiting for a place in it (``queue_capacity``; 0 without one)."""
    state: SimState = request.app[STATE]
    labels = 'engine="0",model_name="simulated"'
    lines = []
    for name, help_text, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", state.serving),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(state.queue))):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {float(value)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


async def reset_handler(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def make_app(options: SimulatorOptions, responders: Iterable[Responder] = ()) -> web.Application:
    """The simulator's routes, answering with ``responders`` (none: every reply is ``default_reply``'s)."""
    app = web.Application(client_max_size=512 * 1024 * 1024)
    app[STATE] = SimState(options, responders)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_sim/stats", stats_handler)
    app.router.add_post("/_sim/reset", reset_handler)
    app.router.add_get("/metrics", metrics_handler)
    batches.add_routes(app, STATE)
    return app
