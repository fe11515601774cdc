"""Batch API mode against the simulator: split, submit, poll, collect, retry failures, resume after a kill."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from llm_helpers import KEY_ENV, TEST_KEY, json_requests

from processors.llm import run_requests
from processors.llm.batch import STATE_FOLDER, split_jsonl

HELPERS = Path(__file__).with_name("llm_helpers.py")


def test_batch_round_trip_splits_files_and_maps_back_by_key(simulator, ctx_for, caplog):
    caplog.set_level(logging.INFO, logger="processors.llm.batch")
    sim = simulator(batch_duration_s=0.4)
    ctx = ctx_for(sim, mode="batch", batch_max_requests=4)
    requests = json_requests(10)
    results = run_requests(requests, endpoint="sim", ctx=ctx)
    assert [r.key for r in results] == [r.key for r in requests] and all(r.ok for r in results)
    stats = sim.stats()
    assert stats["batches_created"] == 3 and stats["files_uploaded"] == 3 and stats["received"] == 0
    assert sorted(stats["batch_items"].values()) == [1] * 10
    for state in ("validating", "in_progress", "finalizing", "completed"):
        assert f": {state}" in caplog.text
    online = (ctx.usage["prompt_tokens"] * 2.5 + ctx.usage["completion_tokens"] * 10) / 1e6
    assert abs(ctx.usage["cost_usd"] - online / 2) < 1e-12  # the Batch API's half price
    again = ctx_for(sim, mode="batch")
    assert all(r.from_cache for r in run_requests(requests, endpoint="sim", ctx=again))
    assert sim.stats()["batches_created"] == 3


def test_failed_batch_items_are_retried_online_or_recorded(simulator, ctx_for, tmp_path):
    sim = simulator(batch_duration_s=0.2, batch_fail_rate=0.5, seed=1)
    results = run_requests(json_requests(12), endpoint="sim", ctx=ctx_for(sim, mode="batch"))
    stats = sim.stats()
    assert all(r.ok for r in results)
    assert 0 < stats["received"] < 12  # the failed items went online, the rest did not
    sim2 = simulator(batch_duration_s=0.2, batch_fail_rate=0.5, seed=1)
    ctx = ctx_for(sim2, mode="batch", batch_retry_failed_online=False, run_dir=tmp_path / "run2")
    results = run_requests(json_requests(12, prefix="x"), endpoint="sim", ctx=ctx)
    failed = [r for r in results if not r.ok]
    assert failed and {r.reason for r in failed} == {"batch_failed"} and sim2.stats()["received"] == 0
    # Not answered is no verdict: the same call again submits a new batch of exactly what the cache lacks.
    again = run_requests(json_requests(12, prefix="x"), endpoint="sim", ctx=ctx)
    assert sim2.stats()["batches_created"] == 2
    assert {r.key for r in again if r.ok} >= {r.key for r in results if r.ok}
    assert sum(r.ok for r in again) > sum(r.ok for r in results)


def test_restart_between_submit_and_collect_resumes_the_batch(simulator, tmp_path, api_key, ctx_for):
    sim = simulator(batch_duration_s=4.0)
    run_dir = tmp_path / "run"
    overrides = json.dumps({"mode": "batch"})
    env = {"PATH": "/usr/bin:/bin", KEY_ENV: TEST_KEY, "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen([sys.executable, str(HELPERS), str(run_dir), sim.base_url, "8", overrides], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until the worker recorded its submitted batch
            states = list(run_dir.glob(f"*/{STATE_FOLDER}/*.json"))
            if states and all(p["batch_id"] for p in json.loads(states[0].read_text())["parts"] or [{}]):
                break
            assert worker.poll() is None, worker.stderr.read().decode()
            time.sleep(0.05)
        else:
            raise AssertionError("the worker never submitted its batch")
    finally:
        worker.kill()
        worker.wait(timeout=10)
    assert sim.stats()["batches_created"] == 1
    ctx = ctx_for(sim, mode="batch", run_dir=run_dir)
    results = run_requests(json_requests(8), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)
    stats = sim.stats()
    assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1 and stats["received"] == 0


def test_split_jsonl_respects_count_and_byte_limits():
    lines = [(json.dumps({"i": i, "pad": "x" * 90}) + "\n").encode() for i in range(10)]
    by_count = split_jsonl(lines, max_requests=3, max_bytes=10**6)
    assert [f.count(b"\n") for f in by_count] == [3, 3, 3, 1]
    by_bytes = split_jsonl(lines, max_requests=100, max_bytes=len(lines[0]) * 4 + 1)
    assert [f.count(b"\n") for f in by_bytes] == [4, 4, 2]
    assert b"".join(by_bytes) == b"".join(lines)


def test_an_unusable_batch_item_is_counted_once_however_often_the_batch_is_read(simulator, ctx_for):
    # A resume reads the same batch output again; what it paid for unusable items was counted the first time.
    from processors.llm import LLMRequest

    def never(text: str):
        raise ValueError("not what was asked")

    requests = [LLMRequest(key=f"n{i}", prompt_version="v1", parse=never,
                           messages=[{"role": "user", "content": f"Reply in JSON about {i}."}]) for i in range(4)]
    sim = simulator(batch_duration_s=0.2)
    first = ctx_for(sim, mode="batch", batch_retry_failed_online=False)
    # The model's reply, unusable: a verdict (not "unanswered"), so the same call reads the same batch again.
    assert [r.reason for r in run_requests(requests, endpoint="sim", ctx=first)] == ["unparsable"] * 4
    assert first.usage["requests"] == 4
    again = ctx_for(sim, mode="batch", batch_retry_failed_online=False)  # the same call: the batch is resumed
    assert [r.reason for r in run_requests(requests, endpoint="sim", ctx=again)] == ["unparsable"] * 4
    assert again.usage["requests"] == 0 and sim.stats()["batches_created"] == 1
