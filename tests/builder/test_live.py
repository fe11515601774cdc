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


# -- review fixes: a real terminal only, the flock as the run's sign of life, stdout left alone, no late
# -- live.json, live.json with --no-progress ----------------------------------------------------------------
def _panel(folder: Path, mode: str = "auto", provider=None):
    from builder.panel import StagePanel

    folder.mkdir(parents=True, exist_ok=True)
    return StagePanel("qa", folder, shards_total=1, rows_total=10, rows_done=0, usage={}, endpoints=provider,
                      mode=mode, interval=0.01)


def test_force_color_on_a_log_file_gives_plain_lines_and_no_escape_sequences(tmp_path, monkeypatch, caplog):
    from rich.console import Console

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    log = tmp_path / "stderr.log"
    with open(log, "w") as stream:
        assert Console(file=stream).is_terminal  # rich's view: the premise of the bug
        monkeypatch.setattr(sys, "stderr", stream)
        handler = logging.StreamHandler(stream)
        logging.getLogger().addHandler(handler)
        caplog.set_level(logging.INFO, logger="builder.panel")
        try:
            panel = _panel(tmp_path / "stage")
            assert panel.mode == "plain" and panel.console is None
            with panel:
                panel.rows(4)
                time.sleep(0.6)
                panel.rows(6)
        finally:
            logging.getLogger().removeHandler(handler)
    text = log.read_text()
    assert "\x1b" not in text and "qa: " in text and "qa done: 10/10 rows (100%)" in text
    assert not lv.real_terminal(io.StringIO()) and not lv.real_terminal(open(log))


def test_a_real_terminal_is_a_tty_and_not_dumb(monkeypatch):
    import os

    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as stream:
            monkeypatch.setenv("TERM", "xterm")
            assert lv.real_terminal(stream)
            monkeypatch.setenv("TERM", "dumb")
            assert not lv.real_terminal(stream)
    finally:
        os.close(master)
        os.close(slave)


def test_stdout_redirected_during_a_stage_is_not_swallowed_by_the_panel(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    master, slave = os.openpty()
    screen: list[bytes] = []

    def drain() -> None:  # the terminal's reader: the panel never blocks on a full pty buffer
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out = tmp_path / "stdout.txt"
    try:
        with open(slave, "w", closefd=False) as terminal, open(out, "w") as stdout:
            monkeypatch.setattr(sys, "stderr", terminal)
            monkeypatch.setattr(sys, "stdout", stdout)
            panel = _panel(tmp_path / "stage")
            assert panel.mode == "live"
            with panel:
                print("printed by the stage")
                panel.rows(10)
            stdout.flush()
    finally:
        os.close(slave)
        reader.join(5)
        os.close(master)
    assert out.read_text() == "printed by the stage\n"
    assert b"printed by the stage" not in b"".join(screen) and b"rows/s" in b"".join(screen)


def test_the_ticker_never_writes_the_live_file_after_the_stage_ended(tmp_path, monkeypatch):
    from builder import panel as panel_module

    monkeypatch.setattr(panel_module, "JOIN_S", 0.05)
    entered, release = threading.Event(), threading.Event()

    def provider():
        if threading.current_thread().name == "qa-panel":  # the ticker: stuck in a slow read
            entered.set()
            release.wait(30)
        return {}

    for mode in ("plain", "off"):
        entered.clear(), release.clear()
        folder = tmp_path / mode
        panel = _panel(folder, mode, provider)
        with panel:
            assert entered.wait(30)
        assert not (folder / lv.LIVE_FILE).exists()
        release.set()
        panel._ticker.join(30)
        assert not panel._ticker.is_alive() and not (folder / lv.LIVE_FILE).exists()


def test_no_progress_still_writes_the_live_file_for_watch(tmp_path, caplog):
    hold = tmp_path / "hold"
    hold.touch()
    config = {"run": {"name": "toy", "shard_size": 4},
              "stages": {"numbers": {"count": 12}, "square": {"hold_while": str(hold), "hold_from": 6}}}
    run_dir = tmp_path / "run"
    runner = _runner(run_dir, config, {lv.LIVE_ENDPOINTS: lambda: {"llm": {"in_flight": 1, "limit": 4}}})
    runner.progress = False
    caplog.set_level(logging.INFO, logger="builder.panel")
    thread = threading.Thread(target=runner.run)
    thread.start()
    live_file = run_dir / "01_square" / lv.LIVE_FILE
    try:
        deadline = time.monotonic() + 60
        snap = None
        while time.monotonic() < deadline:
            snap = lv.read_live(live_file.parent, max_age_s=60) if live_file.exists() else None
            if snap and snap["rows_done"] >= 4:
                break
            time.sleep(0.02)
        assert snap and snap["stage"] == "square" and snap["state"] == "running" and snap["rows_total"] == 12
        assert snap["endpoints"]["llm"]["in_flight"] == 1
        running = {s["stage"]: s for s in folder_snapshots(run_dir, running=True)}
        assert running["square"]["state"] == "running" and "rate" in running["square"]
    finally:
        hold.unlink()
        thread.join(60)
    assert not live_file.exists()
    assert not [r for r in caplog.records if r.name == "builder.panel"]  # nothing printed: --no-progress


def test_watch_believes_the_flock_not_the_pid_in_the_lock_file(tmp_path):
    import subprocess

    from builder import runfolder as rf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rf.LOCK_FILE).write_text("pid 1 since 2024-01-01 00:00:00")  # a live pid, no flock: a killed run
    assert not run_in_progress(run_dir)
    started = time.monotonic()
    out = io.StringIO()
    assert watch(run_dir, interval=0.05, out=out) == 0 and time.monotonic() - started < 10

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run_dir / rf.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_in_progress(run_dir)
    finally:
        holder.kill()
        holder.wait(30)
    assert not run_in_progress(run_dir)


def test_a_watchers_probe_never_makes_a_starting_run_report_busy(tmp_path):
    import fcntl
    import os

    from builder import runfolder as rf
    from builder.runlock import RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        assert run_in_progress(run_dir)
    # A probe's shared lock held at the very moment the run takes its lock: the run waits it out.
    fd = os.open(run_dir / rf.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    releaser = threading.Timer(0.3, lambda: os.close(fd))
    releaser.start()
    with RunLock(run_dir):
        pass
    releaser.join()
    # A watcher probing as fast as it can while runs start and end.
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            run_in_progress(run_dir)

    watcher = threading.Thread(target=probe)
    watcher.start()
    try:
        for _ in range(50):
            with RunLock(run_dir):
                pass
    finally:
        stop.set()
        watcher.join(10)
