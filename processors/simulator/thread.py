"""Running the simulator: in a background thread of this process, or in the foreground for the CLI.

    with SimulatorThread(SimulatorOptions(latency_ms=5), responders=[ECHO]) as sim:
        sim.base_url      # "http://127.0.0.1:<port>/v1"
        sim.stats()       # GET /_sim/stats, as a dict

``taskgalaxy simulate-api`` calls ``add_arguments(parser)`` to declare the options and
``main_from_args(args, responders)`` to serve until interrupted. The responders come from the caller
(the product's: ``processors.pipeline.default_responders()``); none given, every reply is the generic default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import threading
import urllib.request
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from processors.simulator.core import FAULT_KINDS, SimulatorOptions
from processors.simulator.responders import Responder, checked
from processors.simulator.server import make_app

logger = logging.getLogger(__name__)


async def _start(options: SimulatorOptions, responders: Iterable[Responder]) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_app(options, responders), access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class SimulatorThread:
    """The simulator on its own event loop in a daemon thread; stops on ``close()`` / leaving the ``with``."""

    def __init__(self, options: SimulatorOptions | None = None, *, responders: Iterable[Responder] = ()):
        self.options = options or SimulatorOptions()
        self.responders = checked(responders)
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-simulator", daemon=True)

    def start(self) -> "SimulatorThread":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_start(self.options, self.responders), self._loop)
        self._runner, self.port = future.result(timeout=30)
        logger.info("simulator listening on %s", self.base_url)
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return fetch_stats(self.base_url)

    def reset(self) -> None:
        request = urllib.request.Request(self.base_url.removesuffix("/v1") + "/_sim/reset", method="POST", data=b"")
        urllib.request.urlopen(request, timeout=10).read()

    def close(self) -> None:
        """Stop serving (a test may stop a server mid-way, then the fixture again at its end: a no-op)."""
        if self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "SimulatorThread":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def fetch_stats(base_url: str) -> dict[str, Any]:
    """The simulator's counters (``stats``) and options, over HTTP."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_sim/stats", timeout=10) as response:
        return json.loads(response.read())["stats"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``simulate-api``'s options: one flag per ``SimulatorOptions`` field (``--rate-5xx 0.05``...)."""
    for spec in dataclasses.fields(SimulatorOptions):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default
        kind = {"int": int, "float": float, "str": str, "bool": _flag, "tuple[str,": _names}[
            str(spec.type).split(" ")[0]]  # "int | None" -> int
        extra: dict[str, Any] = {"choices": FAULT_KINDS} if spec.name == "fail_kind" else {}
        if spec.name == "api_key":
            help_text = "require this key (read it from an env var in scripts; never echoed)"
        else:
            help_text = f"default {default!r}"
        parser.add_argument(flag, dest=f"sim_{spec.name}", type=kind, default=default, help=help_text,
                            **extra)


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    values = {spec.name: getattr(args, f"sim_{spec.name}") for spec in dataclasses.fields(SimulatorOptions)}
    return SimulatorOptions(**values)


def main_from_args(args: argparse.Namespace, responders: Iterable[Responder] = ()) -> int:
    """Serve in the foreground until Ctrl-C. Prints the base URL on the first line of stdout."""
    options = options_from_args(args)
    return serve(options, responders)


def serve(options: SimulatorOptions, responders: Iterable[Responder] = ()) -> int:
    responders = checked(responders)

    async def forever() -> None:
        runner, port = await _start(options, responders)
        print(f"http://{options.host}:{port}/v1", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        logger.info("simulator stopped")
    return 0
