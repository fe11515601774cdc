"""Backpressure from self-hosted servers: a saturated vLLM queues requests instead of answering 429, so rising
reply latency lowers the concurrency window (``LatencySignal``), tested against the simulator's queueing model
(``queue_capacity``: at most C requests served at once, the rest wait in a FIFO)."""

from __future__ import annotations

import time

from llm_helpers import json_requests

from processors.llm import limits, run_requests
from processors.llm.limits import AdaptiveConcurrency, LatencySignal
from processors.llm.settings import EndpointSettings

CAPACITY, SERVICE_MS = 8, 50  # the server: 8 at once, 50 ms each = 160 replies per second
# The client's ceiling. The signal keeps the queue near ``factor`` x baseline x throughput: ~50 requests here,
# but a stall of the loaded test machine during the first replies inflates the baseline (CI once saw 0.35 s:
# a queue of 111, where 256 allowed 85). 512 keeps the run without the signal far above either.
CEILING = 512


def _recording(monkeypatch) -> list[AdaptiveConcurrency]:
    """Every concurrency window the run makes, with its highest and lowest limits recorded."""
    made: list[AdaptiveConcurrency] = []

    class Recording(AdaptiveConcurrency):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lowest = self.highest = self.limit
            made.append(self)

        def on_success(self, latency_s=None) -> None:
            super().on_success(latency_s)
            self.highest = max(self.highest, self.limit)

        def _lower(self, now: float) -> None:
            super()._lower(now)
            self.lowest = min(self.lowest, self.limit)

    monkeypatch.setattr(limits, "AdaptiveConcurrency", Recording)
    return made


def _run(simulator, ctx_for, tmp_path, name: str, n: int, backoff: str, endpoint: dict | None = None,
         **sim_options):
    sim = simulator(**sim_options)
    ctx = ctx_for(sim, run_dir=tmp_path / name, max_concurrency=CEILING, timeout_s=60.0, cache=False,
                  latency_backoff=backoff, **{"latency_backoff_floor_s": 0.1, **(endpoint or {})})
    start = time.monotonic()
    results = run_requests(json_requests(n, prefix=name), endpoint="sim", ctx=ctx)
    elapsed = time.monotonic() - start
    assert all(r.ok for r in results)
    return sim.stats(), elapsed


def test_a_queueing_server_lowers_the_window_and_its_queue_stays_short(simulator, ctx_for, tmp_path, monkeypatch):
    made = _recording(monkeypatch)
    n = 800
    plain, plain_s = _run(simulator, ctx_for, tmp_path, "off", n, "off", queue_capacity=CAPACITY,
                          latency_ms=SERVICE_MS)
    assert made[-1].latency is None and made[-1].latency_decreases == 0
    backed, backed_s = _run(simulator, ctx_for, tmp_path, "on", n, "on", queue_capacity=CAPACITY,
                            latency_ms=SERVICE_MS)
    window = made[-1]
    assert window.latency is not None
    # Without the signal all 512 go out at once and 504 of them wait at the server.
    assert plain["queued_peak"] >= 400
    # With it, the window opens by slow start and falls as soon as latency says the server queues.
    assert window.latency_decreases >= 1 and window.lowest <= window.highest / 2
    assert window.lowest <= 4 * CAPACITY and int(window.limit) < 128
    why = f"baseline {window.latency.baseline:.3f} s, window {window.lowest:g}..{window.highest:g}"
    assert backed["queued_peak"] <= plain["queued_peak"] / 3, (backed["queued_peak"], plain["queued_peak"], why)
    # The server is kept busy all the same: every slot was used, throughput near the run without the signal.
    assert backed["serving_peak"] == CAPACITY and plain["serving_peak"] == CAPACITY
    assert backed["ok_per_key"] and max(backed["ok_per_key"].values()) == 1
    assert backed_s <= 1.5 * plain_s + 0.5, (backed_s, plain_s)
    # ...and near the server's capacity (a loose bound: a loaded test machine is slower, never faster).
    assert n / backed_s >= 0.4 * CAPACITY * 1000 / SERVICE_MS, n / backed_s


def test_the_queue_a_server_reports_on_its_metrics_page_lowers_the_window(simulator, ctx_for, tmp_path,
                                                                          monkeypatch):
    """vLLM says how many requests wait (``vllm:num_requests_waiting`` on /metrics; the simulator's queueing
    model says the same): that alone lowers the window. Latency is kept out of it by a factor it never reaches."""
    made = _recording(monkeypatch)
    n, deaf = 800, {"latency_backoff_factor": 1000.0}
    blind, _ = _run(simulator, ctx_for, tmp_path, "blind", n, "on", {**deaf, "latency_backoff_queue_poll_s": 0},
                    queue_capacity=CAPACITY, latency_ms=SERVICE_MS)
    assert made[-1].queue is None and made[-1].latency_decreases == 0
    read, _ = _run(simulator, ctx_for, tmp_path, "read", n, "on", {**deaf, "latency_backoff_queue_poll_s": 0.05},
                   queue_capacity=CAPACITY, latency_ms=SERVICE_MS)
    window = made[-1]
    assert window.queue is not None and window.queue.active and window.queue.url.endswith("/metrics")
    assert window.queue_decreases >= 1 and window.queue_decreases == window.latency_decreases
    assert read["queued_peak"] <= blind["queued_peak"] / 2, (read["queued_peak"], blind["queued_peak"])
    assert read["serving_peak"] == CAPACITY  # the server was still kept busy


def test_a_slow_server_that_does_not_queue_is_not_throttled(simulator, ctx_for, tmp_path, monkeypatch):
    """OpenAI-like: constant (if slow, jittery) latency whatever the load; the window opens to its maximum."""
    made = _recording(monkeypatch)
    sim = simulator(latency_ms=300, jitter_ms=30)
    ctx = ctx_for(sim, run_dir=tmp_path / "slow", max_concurrency=64, timeout_s=60.0, cache=False,
                  latency_backoff="on", latency_backoff_floor_s=0.1)
    results = run_requests(json_requests(400, prefix="slow"), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)
    window = made[-1]
    assert window.latency is not None and window.latency.baseline is not None
    assert window.latency_decreases == 0 and window.lowest == AdaptiveConcurrency.SLOW_START
    assert int(window.limit) == 64
    assert sim.stats()["arrivals_peak_1s"] > 64  # it was used: more than one window's worth per second


def test_latency_signal_needs_both_the_factor_and_the_floor():
    fast = LatencySignal(factor=2.0, floor_s=0.25)
    for latency in [0.005] * 16 + [0.05] * 16:  # 10x its baseline, but 50 ms: a fast server's jitter
        fast.add(latency)
    assert not fast.congested
    slow = LatencySignal(factor=2.0, floor_s=0.25)
    for latency in [2.0] * 16 + [3.5] * 16:  # 1.75x: a slower reply, not a queue
        slow.add(latency)
    assert not slow.congested
    queued = LatencySignal(factor=2.0, floor_s=0.25)
    for latency in [0.2] * 16 + [1.0] * 16:
        queued.add(latency)
    assert queued.congested
    for latency in [0.2] * 16:  # the queue drained
        queued.add(latency)
    assert not queued.congested


def test_latency_decreases_once_per_window_of_replies_and_recover_additively():
    window = AdaptiveConcurrency(maximum=256, minimum=4, decrease=0.5, latency=LatencySignal(2.0, 0.1))
    assert window.limit == AdaptiveConcurrency.SLOW_START
    for _ in range(16):
        window.on_success(0.1)
    assert window.limit == AdaptiveConcurrency.SLOW_START + 16  # slow start: one slot per reply
    limits_seen = []
    for _ in range(64):
        window.on_success(1.0)
        limits_seen.append(window.limit)
    # Congested from the 16th slow reply on: lowered at most once per window's worth of replies.
    # Slow start goes on until a block of 16 replies shows the queue; from then on no growth, and each decrease
    # comes a window's worth of replies (at the limit before it) after the last.
    drops = [i for i in range(1, 64) if limits_seen[i] < limits_seen[i - 1]]
    assert limits_seen[14] == AdaptiveConcurrency.SLOW_START + 16 + 15 and drops[0] >= 15
    assert all(b - a >= int(limits_seen[a]) for a, b in zip(drops, drops[1:]))
    assert all(limits_seen[i] <= limits_seen[i - 1] for i in range(15, 64))
    assert window.limit == 4.0 and window.latency_decreases == len(drops) >= 3  # none counted at the minimum
    for _ in range(16 * 10):
        window.on_success(0.1)
    assert 5 < window.limit < 20  # additive (about one slot per window), no longer slow start


def test_default_keeps_openai_as_before_and_no_fingerprint_change():
    openai = EndpointSettings()  # the paper config's GPT-4o endpoint
    assert not openai.uses_latency_backoff
    assert not EndpointSettings(api_key_env=None).uses_latency_backoff  # api.openai.com, whatever the key
    assert not EndpointSettings(base_url="https://gw.example.com/v1").uses_latency_backoff  # a keyed gateway
    plain = EndpointSettings(base_url="http://localhost:8001/v1", api_key_env=None)
    assert not plain.uses_latency_backoff  # off by default, self-hosted servers included (the paper's referees)
    vllm = plain.model_copy(update={"latency_backoff": "auto"})
    assert vllm.uses_latency_backoff
    assert not vllm.model_copy(update={"mode": "batch"}).uses_latency_backoff
    assert not EndpointSettings(latency_backoff="auto").uses_latency_backoff  # auto: never OpenAI's API
    assert not EndpointSettings(base_url="http://x/v1", api_key_env=None, mode="batch",
                                latency_backoff="on").uses_latency_backoff
    assert EndpointSettings(latency_backoff="on").uses_latency_backoff
    assert limits.Admission(openai).concurrency.latency is None
    assert limits.Admission(openai).concurrency.limit == 256  # no slow start either
    tuned = vllm.model_copy(update={"latency_backoff": "off", "latency_backoff_factor": 3.0,
                                    "latency_backoff_floor_s": 1.0})
    assert tuned.output_parts() == vllm.output_parts()
    assert not any(key.startswith("latency") for key in openai.output_parts())
