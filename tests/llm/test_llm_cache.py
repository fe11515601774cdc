"""The request cache: a new engine or a new process over the same cache pays for nothing again."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from llm_helpers import KEY_ENV, TEST_KEY, json_requests, make_ctx, fast_settings
from PIL import Image

from processors.llm import EndpointSettings, LLMRequest, run_requests
from processors.llm.api import CACHE_FILE, DRY_RUN_CACHE_FILE
from processors.llm.prepare import prepare

HELPERS = Path(__file__).with_name("llm_helpers.py")


def test_second_engine_over_same_cache_sends_nothing(simulator, ctx_for):
    sim = simulator()
    first = run_requests(json_requests(30), endpoint="sim", ctx=ctx_for(sim))
    assert sim.stats()["received"] == 30
    ctx = ctx_for(sim)
    again = run_requests(json_requests(30), endpoint="sim", ctx=ctx)
    assert sim.stats()["received"] == 30
    assert [r.value for r in again] == [r.value for r in first]
    assert all(r.from_cache for r in again)
    assert ctx.usage["cache_hits"] == 30 and ctx.usage["requests"] == 0 and ctx.usage["cost_usd"] == 0


def test_new_process_with_same_cache_makes_zero_requests(simulator, tmp_path, api_key):
    sim = simulator()
    run_dir = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", KEY_ENV: TEST_KEY, "HF_HUB_OFFLINE": "1"}
    for round_ in range(2):
        out = subprocess.run([sys.executable, str(HELPERS), str(run_dir), sim.base_url, "12"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["ok"] == 12
        assert sim.stats()["received"] == 12  # the second process answered everything from the cache
    assert summary["usage"]["cache_hits"] == 12


def test_new_prompt_version_is_a_new_request(simulator, ctx_for):
    sim = simulator()
    run_requests(json_requests(3, version="v1"), endpoint="sim", ctx=ctx_for(sim))
    run_requests(json_requests(3, version="v2"), endpoint="sim", ctx=ctx_for(sim))
    assert sim.stats()["received"] == 6


def test_failures_are_not_cached(simulator, ctx_for):
    sim = simulator(fail_kind="500", fail_first=100)
    results = run_requests(json_requests(2), endpoint="sim", ctx=ctx_for(sim, max_retries=1))
    assert [r.reason for r in results] == ["api_error", "api_error"]
    sim_ok = simulator()
    results = run_requests(json_requests(2), endpoint="sim", ctx=ctx_for(sim_ok))
    assert all(r.ok and not r.from_cache for r in results)


def test_dry_run_answers_live_in_their_own_cache(simulator, tmp_path):
    sim = simulator()
    settings = fast_settings("https://api.invalid/v1")
    ctx = make_ctx(tmp_path / "run", settings, dry_run=True,
                   services={"llm_base_url": sim.base_url, "llm_api_key": "sim"})
    assert all(r.ok for r in run_requests(json_requests(3), endpoint="sim", ctx=ctx))
    assert (tmp_path / "run" / "cache" / DRY_RUN_CACHE_FILE).exists()
    assert not (tmp_path / "run" / "cache" / CACHE_FILE).exists()


def _png(color: str, size=(640, 480)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def test_image_cache_key_is_its_content_hash(tmp_path):
    endpoint = EndpointSettings(image_max_side=256)
    data = _png("red")
    path = tmp_path / "a.png"
    path.write_bytes(data)

    def request(part) -> LLMRequest:
        return LLMRequest(key="k", prompt_version="v1",
                          messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}])

    by_path = prepare(request({"type": "image_path", "path": str(path)}), endpoint)
    by_bytes = prepare(request({"type": "image_bytes", "data": data}), endpoint)
    other = prepare(request({"type": "image_bytes", "data": _png("blue")}), endpoint)
    smaller = prepare(request({"type": "image_path", "path": str(path)}), EndpointSettings(image_max_side=128))
    assert by_path.cache_key == by_bytes.cache_key
    assert len({by_path.cache_key, other.cache_key, smaller.cache_key}) == 3
    part = by_path.body_sync()["messages"][0]["content"][1]
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert part["image_url"]["detail"] == "low"
    import base64

    sent = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert max(sent.size) == 256 and sent.size == (256, 192)


def test_a_missing_or_broken_image_fails_its_request_only(simulator, ctx_for, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")

    def with_image(key: str, path: Path) -> LLMRequest:
        return LLMRequest(key=key, prompt_version="v1", messages=[{"role": "user", "content": [
            {"type": "image_path", "path": str(path)}, {"type": "text", "text": "Describe it."}]}])

    sim = simulator()
    requests = [with_image("gone", tmp_path / "gone.png"), with_image("ok", good),
                with_image("broken", tmp_path / "broken.png")]
    results = run_requests(requests, endpoint="sim", ctx=ctx_for(sim))
    assert [(r.key, r.ok, r.reason) for r in results] == [
        ("gone", False, "image_missing"), ("ok", True, None), ("broken", False, "image_unreadable")]
    assert sim.stats()["received"] == 1


def test_answers_received_before_a_sigkill_are_never_paid_again_and_all_are_counted(simulator, tmp_path, api_key):
    # The simulator runs here and outlives the killed client; its ok_per_key counts every answer it sent.
    import os
    import signal
    import time

    from builder.outputs import read_journal

    sim = simulator(latency_ms=3)
    run_dir = tmp_path / "run"
    concurrency = 4
    args = [sys.executable, str(HELPERS), str(run_dir), sim.base_url, "300", json.dumps({"max_concurrency": concurrency})]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sim.stats()["received"] < 80 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    journal = run_dir / "live.jsonl"
    killed_paid = read_journal(journal).get("requests", 0)
    journal.replace(run_dir / "killed.jsonl")
    answered_before_resume = sum(sim.stats()["ok_per_key"].values())
    resumed = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    stats = sim.stats()
    assert resumed["ok"] == 300
    # At most the requests in flight at the kill were paid twice (before: up to 64 buffered answers)
    assert stats["duplicates"] <= concurrency
    # ... and what was paid shows: the killed attempt's journal plus the resumed run, to the request, except
    # the answers the server sent while the kill landed: never received (paid twice), or received and cached
    # in the microseconds before they were journalled (at most one commit batch: the requests in flight)
    unrecorded = sum(stats["ok_per_key"].values()) - (killed_paid + resumed["usage"]["requests"])
    assert stats["duplicates"] <= unrecorded <= stats["duplicates"] + concurrency
    assert answered_before_resume - killed_paid <= concurrency  # answered but unrecorded: only those in flight


def test_a_fifo_in_place_of_an_image_fails_its_request_at_once(simulator, ctx_for, tmp_path):
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    request = LLMRequest(key="f", prompt_version="v1", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_path", "path": str(fifo)}]}])
    [result] = run_requests([request], endpoint="sim", ctx=ctx_for(simulator()))
    assert result.reason == "image_unreadable" and "FIFO" in result.detail.upper()
