"""Crash-safe resume: SIGKILL in the middle of a stage, rerun, nothing finished is recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets

from builder.outputs import load_stage_output, read_journal
from builder.runfolder import find_stage_dir
from toy_run import make_runner

TOY_RUN = Path(__file__).parent.parent / "toy_run.py"


def _config(calls_log: Path, hold: Path | None = None) -> dict:
    square = {"fail_every": 5, "double_every": 3, "calls_log": str(calls_log)}
    if hold is not None:  # rows from 10 on wait while `hold` exists: the kill lands in shard 2, every time
        square.update(hold_while=str(hold), hold_from=10)
    return {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 24}, "square": square}}


def _calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _rows(run_dir: Path, stage: str) -> list[dict]:
    return sorted(load_stage_output(run_dir, stage).to_list(), key=lambda r: json.dumps(r, sort_keys=True))


def _killed_at_row_10(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Run the toy pipeline in a subprocess and SIGKILL it while `square` is on row 10 (its third shard):
    rows 0-9 ran, row 10 logged its call and waits on the hold file. Returns (run_dir, calls log, config)."""
    run_dir, log, hold = tmp_path / "run", tmp_path / "calls.log", tmp_path / "hold"
    hold.touch()
    config = _config(log, hold)
    proc = subprocess.Popen([sys.executable, str(TOY_RUN), str(run_dir), json.dumps(config)])
    try:
        _wait_for(lambda: len(_calls(log)) >= 11, 60, "the square stage to reach row 10")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    hold.unlink()
    return run_dir, log, config


def test_sigkill_mid_stage_then_resume_recomputes_nothing_finished(tmp_path):
    run_dir, log, config = _killed_at_row_10(tmp_path)

    square_dir = find_stage_dir(run_dir, "square")
    finished = sorted(square_dir.glob("shard-*.arrow"))
    assert [p.name for p in finished] == ["shard-00000.arrow", "shard-00001.arrow"]
    for shard in finished:  # whatever has its final name is whole: it reads, with the rows its stats promise
        stats = json.loads((square_dir / "stats" / shard.name.replace(".arrow", ".json")).read_text())
        assert len(datasets.Dataset.from_file(str(shard))) == stats["rows_out"]
    done_keys = {k for s in finished for k in datasets.Dataset.from_file(str(s))["num_id"]}
    done_keys |= {
        k for s in (square_dir / "failures").glob("shard-*.arrow")
        if (square_dir / s.name).exists()
        for k in datasets.Dataset.from_file(str(s))["key"]
    }
    calls_before = len(_calls(log))

    make_runner(run_dir, config).run()  # same config: a changed one would (rightly) recompute everything
    recomputed = _calls(log)[calls_before:]
    assert not set(recomputed) & done_keys, "rows of finished shards were computed again"
    assert len(recomputed) == 24 - len(done_keys)
    assert not list(square_dir.glob(".tmp-*")), "half-written files of the killed run were left behind"

    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    make_runner(reference_dir, _config(reference_log)).run()  # other log: other fingerprint, same rows
    for stage in ("numbers", "square", "toyfinal"):
        assert _rows(run_dir, stage) == _rows(reference_dir, stage)


def test_usage_of_a_shard_killed_mid_way_is_counted_after_the_resume(tmp_path):
    # The toy square stage reports usage `requests` per batch of 2 rows. Killed on row 10: shards 0 and 1
    # committed (8 rows), shard 2 had finished its batch of rows 8-9 and recorded it as live usage.
    run_dir, _, config = _killed_at_row_10(tmp_path)
    stats = find_stage_dir(run_dir, "square") / "stats"
    assert read_journal(stats / "live-00002.jsonl") == {"requests": 2}
    state = make_runner(run_dir, config).run()["square"]
    assert state["totals"]["usage"]["requests"] == 24 + 2  # every row once, plus the killed attempt's 2
    assert not list(stats.glob("live-*"))
    assert [read_journal(p) for p in stats.glob("interrupted-00002-*-killed-*.jsonl")] == [{"requests": 2}]
    again = make_runner(run_dir, config).run()["square"]  # counted once, not again on every rerun
    assert again["totals"]["usage"]["requests"] == 26


def test_rerun_of_a_finished_run_does_nothing(tmp_path):
    log = tmp_path / "calls.log"
    make_runner(tmp_path / "run", _config(log)).run()
    first = len(_calls(log))
    make_runner(tmp_path / "run", _config(log)).run()
    assert first == 24 and len(_calls(log)) == first


def test_a_resume_with_another_shard_size_keeps_the_original_boundaries(tmp_path):
    run_dir, _, config = _killed_at_row_10(tmp_path)
    resized = {**config, "run": {**config["run"], "shard_size": 7}}  # 4 -> 7 between the crash and the resume
    make_runner(run_dir, resized).run()
    reference_dir = tmp_path / "reference"
    make_runner(reference_dir, _config(tmp_path / "reference.log")).run()
    for stage in ("square", "toyfinal"):
        assert _rows(run_dir, stage) == _rows(reference_dir, stage)
    assert json.loads((find_stage_dir(run_dir, "square") / "state.json").read_text())["shard_size"] == 4


def test_a_dry_run_never_overwrites_a_paid_run_folder(tmp_path):
    import pytest

    from builder.config import ConfigError

    log = tmp_path / "calls.log"
    make_runner(tmp_path / "run", _config(log)).run()
    dry = make_runner(tmp_path / "run", _config(log))
    dry.dry_run = True
    with pytest.raises(ConfigError, match="holds a paid run"):
        dry.run()
    assert len(_calls(log)) == 24
