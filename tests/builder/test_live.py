"""The kernel's live figures (builder.live, builder.panel, builder.watch) with the toy stages: rows and rate,
time left, spend projected, the endpoint provider read as counters since the stage started, the live file
that ``status --watch`` reads, and the plain lines written when stderr is no terminal."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from toy_stages import TOY_STAGES  # noqa: E402

from builder import live as lv  # noqa: E402
from builder.config import build_config_model, validate_config  # noqa: E402
from builder.runner import Runner  # noqa: E402
from builder.watch import folder_snapshots, run_in_progress, watch  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_time_left_and_projected_spend():
    clock = Clock()
    rows = lv.RowsTracker(total=100, done=20, clock=clock)  # 20 done by an earlier attempt: not this run's rate
    clock.now += 10
    rows.add(30)
    snap = lv.snapshot("qa", rows, {"cost_usd": 5.0, "requests": 50, "retries": 2}, {})
    assert snap["rate"] == 3.0 and snap["eta_s"] == round(50 / 3.0, 1)
    assert snap["projected_usd"] == 10.0  # $5 for half of the rows
    line = lv.plain_line(snap)
    assert line.startswith("qa: 50/100 rows (50%), 3.0 rows/s, 0:17 left, $5.00 spent, ~$10.00 projected")
    clock.now += 2 * lv.RATE_WINDOW_S  # nothing for a while: the recent rate falls, time left is unknown
    rows.add(0)
    assert lv.snapshot("qa", rows, {}, {})["rate"] < 1.0
    assert lv.snapshot("qa", rows, {}, {}, state="done")["rate"] == round(30 / (10 + 2 * lv.RATE_WINDOW_S), 3)


def test_endpoint_counters_count_from_the_stage_start_and_a_broken_provider_shows_nothing():
    figures = {"a": {"in_flight": 0, "limit": 8, "requests": 40, "rate_limited": 3, "retries": 4},
               "b": {"in_flight": 0, "limit": 8, "requests": 7, "rate_limited": 0, "retries": 0}}
    watch_ = lv.EndpointWatch(lambda: json.loads(json.dumps(figures)))
    figures["a"].update(in_flight=5, requests=50, rate_limited=4)
    assert watch_.figures() == {"a": {"in_flight": 5, "limit": 8, "requests": 10, "rate_limited": 1, "retries": 0}}
    assert lv.EndpointWatch(lambda: 1 / 0).figures() == {}


def _runner(run_dir: Path, config: dict, services: dict) -> Runner:
    validated = validate_config(config, build_config_model(TOY_STAGES), base_dir=run_dir.parent)
    return Runner(TOY_STAGES, validated, run_dir, progress=True, services=services, progress_interval=0.05)


def test_a_running_stage_publishes_its_figures_and_ends_with_a_summary(tmp_path, caplog):
    hold = tmp_path / "hold"
    hold.touch()
    counters = {"requests": 0, "rate_limited": 0, "retries": 0}
    provider = lambda: {"llm": {"in_flight": 2, "limit": 4, **counters}}  # noqa: E731
    config = {"run": {"name": "toy", "shard_size": 4},
              "stages": {"numbers": {"count": 12}, "square": {"hold_while": str(hold), "hold_from": 6}}}
    run_dir = tmp_path / "run"
    runner = _runner(run_dir, config, {lv.LIVE_ENDPOINTS: provider})
    caplog.set_level(logging.INFO, logger="builder.panel")
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        live_file = run_dir / "01_square" / lv.LIVE_FILE
        deadline = time.monotonic() + 60
        snap = None
        while not live_file.exists() and time.monotonic() < deadline:  # the stage's panel has started
            time.sleep(0.01)
        counters.update(requests=9, rate_limited=1, retries=1)  # counted since the stage started
        while time.monotonic() < deadline:  # wait on content: the first shard (rows 0-3) is in the figures
            snap = lv.read_live(live_file.parent, max_age_s=60) if live_file.exists() else None
            if snap and snap["rows_done"] >= 4 and snap["endpoints"].get("llm", {}).get("requests"):
                break
            time.sleep(0.02)
        assert snap and snap["stage"] == "square" and snap["rows_total"] == 12 and snap["state"] == "running"
        assert snap["endpoints"]["llm"] == {"in_flight": 2, "limit": 4, "requests": 9, "rate_limited": 1, "retries": 1}
        assert snap["requests"] >= 4  # the toy counts one request a row
        assert run_in_progress(run_dir)
        running = {s["stage"]: s for s in folder_snapshots(run_dir, running=True)}
        assert running["numbers"]["state"] == "done" and running["square"]["state"] == "running"
        assert running["square"]["endpoints"]["llm"]["rate_limited"] == 1
    finally:
        hold.unlink()
        thread.join(60)
    assert not live_file.exists() and not run_in_progress(run_dir)
    lines = [r.getMessage() for r in caplog.records if r.name == "builder.panel"]
    assert any(line.startswith("square: ") and "rows/s" in line for line in lines)
    summary = [line for line in lines if line.startswith("square done: 12/12 rows (100%)")]
    assert len(summary) == 1 and "12 requests" in summary[0] and "llm: 2 in flight (window 4), 9 sent" in summary[0]

    out = io.StringIO()  # not a terminal: plain lines, then the status table; a finished run returns at once
    assert watch(run_dir, interval=0.01, out=out) == 0
    text = out.getvalue()
    assert "numbers done: 12/12 rows" in text and "square done: 12/12 rows" in text and "total cost so far" in text


def test_a_stage_that_stops_says_so(tmp_path, caplog):
    config = {"run": {"name": "toy", "shard_size": 4},
              "stages": {"numbers": {"count": 8}, "square": {"raise_from": 5}}}
    caplog.set_level(logging.INFO, logger="builder.panel")
    runner = _runner(tmp_path / "run", config, {})
    try:
        runner.run()
    except Exception:  # noqa: BLE001 - the stage stops; its panel's last line says so
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "builder.panel"]
    assert any(line.startswith("square stopped: 4/8 rows (50%)") for line in lines), lines
    assert not (tmp_path / "run" / "01_square" / lv.LIVE_FILE).exists()
