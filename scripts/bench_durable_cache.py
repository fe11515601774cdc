#!/usr/bin/env python
"""What crash-safe spend costs: the engine at zero latency with the old buffered cache vs a commit per reply.

Issue 13: a reply must be in the request cache (durable against a kill) before it counts as paid, and its
spend journalled with it, keeping the engine's zero-latency throughput within 10% of what it was. Both sides
run the same engine against the same simulator (its own process) in one run, alternating rounds:

- baseline: replies buffered and committed every 64 replies or 0.5 s (the cache before this change), no journal;
- ours: each reply committed when it arrives (``RequestCache.put``) and one line appended to a spend journal
  per billed reply (``StageContext.add_usage``, as the runner keeps it per shard).

Last line: ``baseline_rps=... durable_rps=... ratio=...`` (ratio = durable / baseline; the goal is >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_llm import SimProcess, requests_for  # noqa: E402

from builder.stage import StageContext  # noqa: E402
from processors.llm import api  # noqa: E402
from processors.llm.api import Connection, execute  # noqa: E402
from processors.llm.cache import RequestCache  # noqa: E402
from processors.llm.engine import Tally  # noqa: E402
from processors.llm.settings import EndpointSettings, LLMSettings  # noqa: E402
from processors.llm.transport import Secret  # noqa: E402


class BufferedCache(RequestCache):
    """The cache as it was: a crash lost up to 64 replies or 0.5 s of them."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._pending: list[tuple[str, str, float]] = []
        self._last = time.monotonic()

    def put(self, key: str, reply: dict) -> None:
        self._pending.append((key, json.dumps(reply, ensure_ascii=False), time.time()))
        if len(self._pending) >= 64 or time.monotonic() - self._last > 0.5:
            self._commit()

    def _commit(self) -> None:
        if self._pending:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", self._pending)
            self._pending.clear()
        self._last = time.monotonic()

    def close(self) -> None:
        self._commit()
        super().close()


def one_round(base_url: str, n: int, tag: str, durable: bool) -> float:
    settings = LLMSettings(endpoints={"bench": EndpointSettings(base_url=base_url, api_key_env=None,
                                                                max_concurrency=256)})
    api.RequestCache = RequestCache if durable else BufferedCache  # execute() opens the cache it finds here
    with tempfile.TemporaryDirectory() as tmp:
        tally = Tally()
        if durable:
            ctx = StageContext(run_dir=Path(tmp), stage_dir=Path(tmp), cache_dir=Path(tmp), dry_run=False,
                               settings=None, load_stage=lambda name: None, live_usage_path=Path(tmp) / "live.jsonl")
            tally.on_billed = lambda usage, batch: ctx.add_usage(
                requests=1, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cost_usd=0.0)
        start = time.perf_counter()
        results = asyncio.run(execute(requests_for(n, tag), settings, "bench", Connection(base_url, Secret("k")),
                                      cache_path=Path(tmp) / "cache.sqlite", state_dir=Path(tmp), tally=tally))
        elapsed = time.perf_counter() - start
        if durable:
            ctx.close_journal()
    assert all(r.ok for r in results)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    baseline, durable = [], []
    with SimProcess() as sim:
        one_round(sim.base_url, 500, "warm", True)  # imports, connection pool, SQLite pages
        for index in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
            baseline.append(one_round(sim.base_url, args.requests, f"b{index}", False))
            durable.append(one_round(sim.base_url, args.requests, f"d{index}", True))
            print(f"round {index}: baseline {baseline[-1]:.0f} req/s, durable {durable[-1]:.0f} req/s", flush=True)
    b, d = statistics.median(baseline), statistics.median(durable)
    print(f"baseline_rps={b:.0f} durable_rps={d:.0f} ratio={d / b:.3f}")


if __name__ == "__main__":
    main()
