#!/usr/bin/env python
"""Benchmark the LLM engine against the released scripts' pattern, on the simulator in a separate process.

Scenarios (issue 3):
  A  2,000 requests at 200 ms latency: the original pattern (sync openai client, 30 threads, sleep after an
     error, result unchecked) vs the engine -> speedup
  B  6,000 requests against a 3,000 RPM limit enforced per sliding second -> rpm_utilisation, rate_429
  C  2,000 requests with 10% 429 + 5% 5xx -> lost, duplicates (each request answered exactly once?)
  D  zero latency: requests per second the engine itself sustains -> overhead_rps

The last line printed is ``key=value`` pairs. ``--quick`` shrinks every scenario ~5x for a smoke run.
``--serve-sim`` (internal) runs the simulator in this process; the benchmark starts it that way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processors.llm.api import Connection, execute  # noqa: E402
from processors.llm.engine import Tally  # noqa: E402
from processors.llm.request import LLMRequest  # noqa: E402
from processors.llm.settings import EndpointSettings, LLMSettings  # noqa: E402
from processors.pipeline import default_responders  # noqa: E402
from processors.simulator.thread import add_arguments, fetch_stats, main_from_args  # noqa: E402
from processors.llm.transport import Secret  # noqa: E402

logger = logging.getLogger("bench_llm")


class SimProcess:
    """The simulator in a child process (its own core and GIL), started with simulator CLI flags."""

    def __init__(self, *flags: str):
        command = [sys.executable, __file__, "--serve-sim", "--port", "0", *flags]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the simulator did not start")

    def stats(self) -> dict:
        return fetch_stats(self.base_url)

    def reset(self) -> None:
        req = urllib.request.Request(self.base_url.removesuffix("/v1") + "/_sim/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def requests_for(n: int, tag: str) -> list[LLMRequest]:
    return [LLMRequest(key=f"{tag}-{i}", prompt_version="bench-v1", max_tokens=64, parse=json.loads,
                       messages=[{"role": "user", "content": f"Reply in JSON: bench item {tag}-{i}"}])
            for i in range(n)]


def run_engine(base_url: str, requests: list[LLMRequest], **endpoint: object) -> tuple[float, list, Tally]:
    settings = LLMSettings(endpoints={"bench": EndpointSettings(base_url=base_url, api_key_env=None, **endpoint)})
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        results = asyncio.run(execute(requests, settings, "bench", Connection(base_url, Secret("bench-key")),
                                      cache_path=Path(tmp) / "cache.sqlite", state_dir=Path(tmp), tally=tally))
        elapsed = time.perf_counter() - start
    return elapsed, results, tally


def run_original(base_url: str, n: int, tag: str, sleep_after_error: float) -> tuple[float, int]:
    """The released scripts' pattern: a sync client shared by 30 threads, errors swallowed after a sleep."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="bench-key")  # SDK defaults, as the scripts had

    def call(i: int) -> str | None:
        try:
            reply = client.chat.completions.create(
                model="gpt-4o-2024-08-06", max_tokens=64,
                messages=[{"role": "user", "content": f"Reply in JSON: bench item {tag}-{i}"}])
            return reply.choices[0].message.content
        except Exception:  # noqa: BLE001 - reproducing the original's bare except on purpose
            time.sleep(sleep_after_error)
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(call, range(n)))
    return time.perf_counter() - start, sum(a is None for a in answers)


def scenario_a(n: int, sleep_after_error: float) -> dict:
    with SimProcess("--latency-ms", "200") as sim:
        t_orig, lost_orig = run_original(sim.base_url, n, "a-orig", sleep_after_error)
        sim.reset()
        t_eng, results, _ = run_engine(sim.base_url, requests_for(n, "a"), max_concurrency=512)
    out = {"original_rps": n / t_orig, "engine_rps": n / t_eng, "speedup": t_orig / t_eng,
           "engine_failed": sum(not r.ok for r in results), "original_lost": lost_orig}
    print(f"A latency 200 ms, {n} requests: {out}", flush=True)
    return out


def scenario_b(n: int) -> dict:
    with SimProcess("--rpm-limit", "3000", "--latency-ms", "100", "--jitter-ms", "20") as sim:
        t_eng, results, _ = run_engine(sim.base_url, requests_for(n, "b"), rpm=3000, max_concurrency=256,
                                       max_retries=10)
        stats = sim.stats()
    rate = sum(r.ok for r in results) / t_eng
    out = {"achieved_rps": rate, "rpm_utilisation": rate / 50.0,
           "rate_429": stats["outcomes"].get("429_rpm", 0) / stats["received"],
           "accepted_peak_1s": stats["accepted_peak_1s"], "failed": sum(not r.ok for r in results)}
    print(f"B limit 3000 RPM (50 per sliding second), {n} requests: {out}", flush=True)
    return out


def scenario_c(n: int, sleep_after_error: float) -> dict:
    flags = ("--rate-429", "0.10", "--rate-5xx", "0.05", "--latency-ms", "20", "--retry-after-s", "1")
    with SimProcess(*flags) as sim:
        t_orig, lost_orig = run_original(sim.base_url, n, "c-orig", sleep_after_error)
        orig_dups = sim.stats()["duplicates"]
        sim.reset()
        t_eng, results, tally = run_engine(sim.base_url, requests_for(n, "c"), max_concurrency=256, max_retries=10,
                                           backoff_initial_s=0.2)
        stats = sim.stats()
    out = {"lost": sum(not r.ok for r in results), "duplicates": stats["duplicates"], "retries": tally.retries,
           "engine_s": t_eng, "original_lost": lost_orig, "original_duplicates": orig_dups, "original_s": t_orig}
    print(f"C 10% 429 + 5% 5xx, {n} requests: {out}", flush=True)
    return out


def scenario_d(n: int) -> dict:
    with SimProcess() as sim:
        run_engine(sim.base_url, requests_for(200, "warm"), max_concurrency=256)
        t_eng, results, _ = run_engine(sim.base_url, requests_for(n, "d"), max_concurrency=256)
        t_sdk, _, _ = run_engine(sim.base_url, requests_for(n, "d-sdk"), max_concurrency=256, transport="openai")
    out = {"overhead_rps": n / t_eng, "sdk_transport_rps": n / t_sdk, "failed": sum(not r.ok for r in results)}
    print(f"D zero latency, {n} requests: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-sim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="about 5x fewer requests per scenario")
    parser.add_argument("--sleep-after-error", type=float, default=15.0,
                        help="the original pattern's sleep after a failed call (its scripts: 15 s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.serve_sim:
        return main_from_args(args, default_responders())  # as simulate-api (bench_score sends referee prompts)
    logging.basicConfig(level=logging.WARNING)
    scale = 5 if args.quick else 1
    a = scenario_a(2000 // scale, args.sleep_after_error)
    b = scenario_b(6000 // scale)
    c = scenario_c(2000 // scale, args.sleep_after_error)
    d = scenario_d(4000 // scale)
    print(f"speedup={a['speedup']:.2f} rpm_utilisation={b['rpm_utilisation']:.3f} rate_429={b['rate_429']:.4f} "
          f"lost={c['lost']} duplicates={c['duplicates']} overhead_rps={d['overhead_rps']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
