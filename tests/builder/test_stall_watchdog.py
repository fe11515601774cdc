"""The engine's stall watchdog: a shard with no sign of life is named in a warning, then stops the run with a
clear error; rows finished, model batches (``ctx.beat``) and usage counted from any thread are signs of life.

Time here is a clock that moves only when the engine's watchdog reads it (``PollClock``), so what the watchdog
sees depends on the order of events, never on how fast this machine is."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from toy_run import make_runner

from builder.engine import LocalEngine, StageStalledError
from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig
from builder.work import ShardTask, StageWork

FEATURES = datasets.Features({"key": datasets.Value("string")})


class PollClock:
    """Fake seconds that move ``step`` per read by the thread that made the clock (the engine's caller, where
    the watchdog looks), as long as ``budget`` allows (None: always). A shard grants reads with ``allow`` and
    waits until the watchdog has used them: between two grants it cannot see more time pass than granted."""

    def __init__(self, step: float, budget: int | None = None):
        self.now, self.step, self.budget = 0.0, step, budget
        self.watcher = threading.get_ident()
        self.cond = threading.Condition()

    def __call__(self) -> float:
        with self.cond:
            if threading.get_ident() == self.watcher and (self.budget is None or self.budget > 0):
                self.now += self.step
                if self.budget is not None:
                    self.budget -= 1
                self.cond.notify_all()
            return self.now

    def allow(self, reads: int) -> None:
        with self.cond:
            self.budget = reads
            assert self.cond.wait_for(lambda: self.budget == 0, timeout=30), "the watchdog stopped looking"


class ScriptedConfig(StageConfig):
    pass


class Scripted(Stage):
    """A stage whose batch function is ``script(batch, ctx)`` (set per test)."""

    name = "scripted"
    Config = ScriptedConfig
    key = "key"
    batch_size = 1

    def __init__(self, script):
        self.script = script

    def input_key(self, config):
        return "key"

    def features(self, config):
        return FEATURES

    def make_batch_fn(self, config, ctx):
        def fn(batch):
            self.script(batch, ctx)
            out = BatchOutput(["key"])
            for key in batch["key"]:
                out.add(key, {"key": key})
            return out.to_columns()

        return fn


def _shards(tmp_path: Path, script, *, shards: int, rows: int, clock: PollClock, warn_s=30, timeout_s=100):
    """The indices of the shards of ``Scripted(script)`` as the local engine yields them (each must succeed)."""
    settings = SimpleNamespace(run=SimpleNamespace(stall_warn_s=warn_s, stall_timeout_s=timeout_s))
    work = StageWork(stage=Scripted(script), config=ScriptedConfig(), settings=settings, run_dir=tmp_path,
                     stage_dir=tmp_path / "stage", cache_dir=tmp_path / "cache", dry_run=True, services={}, reads={})
    tasks = [ShardTask(index=i, rows=datasets.Dataset.from_dict({"key": [f"s{i}-r{j}" for j in range(rows)]}),
                       fingerprint=f"fp-{i}", tmp_path=tmp_path / f"map-{i}.arrow",
                       journal_path=tmp_path / "stats" / f"live-{i}.jsonl") for i in range(shards)]
    for outcome in LocalEngine(clock=clock, poll_s=0.005).run_shards(work, tasks, features=FEATURES, batch_size=1):
        assert outcome.error is None, outcome.error
        yield outcome.index


def _run(tmp_path: Path, script, **kwargs) -> list[int]:
    return list(_shards(tmp_path, script, **kwargs))


def test_a_silent_shard_is_named_in_a_warning_then_stops_the_stage_with_a_clear_error(tmp_path, caplog):
    released = threading.Event()

    def script(batch, ctx):
        if batch["key"][0].startswith("s1-"):  # shard 1 hangs (until it is told to stop: the test's cleanup)
            stop = ctx.stop_event()
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(0.01)
            released.set()

    clock = PollClock(step=10, budget=0)  # still while shard 0 runs, so it cannot look silent
    finished = []
    caplog.set_level(logging.INFO, logger="builder.engine")
    with pytest.raises(StageStalledError) as stalled:
        for index in _shards(tmp_path, script, shards=3, rows=3, clock=clock):
            finished.append(index)
            clock.budget = None  # from now on every look of the watchdog is 10 s later
    message = str(stalled.value)
    assert finished == [0]  # shard 0 finished and came back before the stop
    assert "stage 'scripted' stopped: shard 1 (3 rows)" in message and "run.stall_timeout_s: 100" in message
    assert "rerun the same command to resume" in message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not at every look
    text = warnings[0].getMessage()
    assert text.startswith("stage scripted: shard 1 (3 rows) showed no sign of life for 30 s")
    assert "stops at 100 s" in text and "py-spy dump --pid" in text and "run.stall_warn_s" in text
    assert released.wait(10)  # the stop reached the stalled shard (a truly stuck one is left behind: a daemon)
    assert StageStalledError.exit_code == 124


def _beat_by_rows(batch, ctx, clock):
    clock.allow(2)  # 20 s pass in this batch; the row it finishes is the sign of life


def _beat_by_model_batches(batch, ctx, clock):
    for _ in range(3):  # e.g. the match stage: one call, several model batches
        ctx.beat()
        clock.allow(2)


def _beat_by_usage_from_another_thread(batch, ctx, clock):
    add = ctx.current_meter().add  # as the LLM engine does: taken on the shard's thread, called on its loop's
    for _ in range(3):
        counted = threading.Thread(target=add, kwargs={"requests": 1})
        counted.start()
        counted.join()
        clock.allow(2)


@pytest.mark.parametrize("beat", [_beat_by_rows, _beat_by_model_batches, _beat_by_usage_from_another_thread])
def test_signs_of_life_reset_the_watchdog(tmp_path, caplog, beat):
    # Each sign of life comes at most 20 s after the last one (warn 30, stop 100) over 180-360 s in all: without
    # the resets this stage would be warned about and stopped.
    clock = PollClock(step=10, budget=0)
    assert _run(tmp_path, lambda batch, ctx: beat(batch, ctx, clock), shards=2, rows=3, clock=clock) == [0, 1]
    assert clock.now >= 120
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_shard_that_moves_again_after_a_warning_is_not_stopped(tmp_path, caplog):
    clock = PollClock(step=10, budget=0)
    caplog.set_level(logging.INFO, logger="builder.engine")

    def script(batch, ctx):
        if batch["key"][0] == "s0-r1":
            clock.allow(5)  # 50 s of silence: a warning, not the stop
        else:
            clock.allow(1)

    assert _run(tmp_path, script, shards=1, rows=3, clock=clock) == [0]
    messages = [r.getMessage() for r in caplog.records if r.name == "builder.engine"]
    assert any("shard 0 (3 rows) showed no sign of life for 30 s" in m for m in messages)
    assert any("shard 0 moves again" in m for m in messages)


@pytest.mark.parametrize("warn_s,timeout_s", [(0, 0), (None, None), (30, 100)])
def test_zero_or_null_turns_the_watchdog_off(tmp_path, caplog, warn_s, timeout_s):
    reads: list[int] = []

    def clock() -> float:  # every look: 1,000 s later than the last
        reads.append(1)
        return 1000.0 * len(reads)

    def script(batch, ctx):
        if not warn_s:
            time.sleep(0.05)  # off: it may look as often as it likes meanwhile (every 5 ms), it never reads the clock
            return
        deadline = time.monotonic() + 10  # the control, on: still running when the watchdog looks
        while len(reads) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)

    def run() -> list[int]:
        return _run(tmp_path, script, shards=1, rows=1, clock=clock, warn_s=warn_s, timeout_s=timeout_s)

    if warn_s:
        with pytest.raises(StageStalledError):
            run()
        return
    assert run() == [0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_ctrl_c_while_a_shard_runs_stops_it_at_its_next_batch(tmp_path):
    import _thread

    seen: list[str] = []

    def script(batch, ctx):
        seen.append(batch["key"][0])
        if len(seen) == 1:
            _thread.interrupt_main()  # Ctrl-C: the caller's thread, which waits on this shard, gets it
            assert ctx.stop_event().wait(10)  # the engine tells the shard; this batch still ends normally

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, script, shards=2, rows=3, clock=PollClock(step=0))
    assert seen == ["s0-r0"]  # not the shard's next batch, nor the next shard


def test_the_runner_keeps_the_finished_shards_of_a_stalled_stage_and_a_rerun_resumes(tmp_path):
    run_dir, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / "calls.log"
    hold.touch()
    config = {"run": {"name": "toy", "shard_size": 4, "stall_warn_s": 30, "stall_timeout_s": 100},
              "stages": {"numbers": {"count": 12}, "square": {"hold_while": str(hold), "hold_from": 8,
                                                              "calls_log": str(log)}}}
    runner = make_runner(run_dir, config)
    # The watchdog's time moves only once shard 2 (rows 8-11) is held: 10 s per look.
    held = PollClock(step=10)
    runner.engine = LocalEngine(clock=lambda: held() if _held(log) else held.now, poll_s=0.005)
    try:
        with pytest.raises(StageStalledError, match="stage 'square' stopped: shard 2 \\(4 rows\\)"):
            runner.run()
    finally:
        hold.unlink()
    for thread in threading.enumerate():  # the stalled shard, let go: it must be gone before the rerun
        if thread.name == "square-shard-2":
            thread.join(30)
    folder = run_dir / "01_square"
    assert sorted(p.name for p in folder.glob("shard-*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]
    state = json.loads((folder / "state.json").read_text())
    assert state["done"] is False
    make_runner(run_dir, config).run()
    assert json.loads((folder / "state.json").read_text())["done"] is True


def _held(log: Path) -> bool:
    return log.exists() and "n00008" in log.read_text().split()


def test_the_command_line_prints_a_stall_as_one_message_and_exits_124(monkeypatch, capsys):
    import taskgalaxy

    def stalled(args):
        raise StageStalledError("stage 'match' stopped: shard 3 (32 rows) showed no sign of life for 1800 s")

    monkeypatch.setattr(taskgalaxy, "_cmd_run", stalled)
    assert taskgalaxy.main(["run", "configs/demo.yaml"]) == 124
    err = capsys.readouterr().err
    assert err.strip() == "error: stage 'match' stopped: shard 3 (32 rows) showed no sign of life for 1800 s"


def test_the_watchdog_settings_change_no_fingerprint(tmp_path):
    from processors.session import open_run

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    changed = tmp_path / "demo.yaml"
    changed.write_text(demo.read_text().replace("  shard_size: 32", "  shard_size: 32\n  stall_warn_s: 5\n"
                                                "  stall_timeout_s: 0", 1))
    assert "stall_warn_s: 5" in changed.read_text()

    def prints(config: Path) -> dict:
        runner = open_run(config, run_dir=tmp_path / "run", dry_run=True, progress=False)
        return {stage.name: runner.fingerprint_of(stage.name) for stage in runner.stages}

    assert prints(changed) == prints(demo)
