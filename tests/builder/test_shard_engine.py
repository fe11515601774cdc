"""The engine seam: shards run concurrently and commit in the order they finish; a stop with several shards in
flight keeps every finished one and counts what the others paid; a SIGKILL then resumes to the clean output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from test_resume import TOY_RUN, _calls, _wait_for
from toy_run import make_runner

from builder.outputs import load_stage_output
from builder.runner import Runner, StageError
from builder.status import stage_summaries


def _config(**square) -> dict:
    return {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 24}, "square": square}}


def _rows(run_dir: Path) -> list[dict]:
    return sorted(load_stage_output(run_dir, "square").to_list(), key=lambda row: row["sq_id"])


def _square(run_dir: Path) -> dict:
    return next(s for s in stage_summaries(run_dir) if s["stage"] == "square")


def test_shards_in_flight_commit_as_they_finish_and_account_like_one_after_the_other(tmp_path, monkeypatch):
    committed: list[int] = []
    real = Runner._commit_shard

    def spy(self, stage, folder, task, outcome, *args):
        if stage.name == "square":
            committed.append(task.index)
        return real(self, stage, folder, task, outcome, *args)

    monkeypatch.setattr(Runner, "_commit_shard", spy)
    # shard 0 (rows 0-3) is slow; shard 1 finishes first and is committed first
    make_runner(tmp_path / "a", _config(fail_every=5, double_every=3, sleep_s=0.1, sleep_below=4, in_flight=2)).run()
    assert committed[0] != 0 and committed.index(0) > 0 and sorted(committed) == list(range(6))
    make_runner(tmp_path / "b", _config(fail_every=5, double_every=3)).run()  # one shard after the other

    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    a, b = _square(tmp_path / "a"), _square(tmp_path / "b")
    for key in ("rows_in", "rows_processed", "rows_out", "failures_by_reason", "requests", "done"):
        assert a[key] == b[key], key
    assert a["rows_processed"] == 24 and a["requests"] == 24


def test_a_shard_that_fails_lets_the_one_in_flight_finish_and_commits_it(tmp_path):
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"
    # shard 2 (rows 8-11, its first batch slow: shards 0-1 are done by then) raises on its second batch while
    # shard 3 (rows 12-15, slow) is still running
    config = _config(raise_rows=[10], slow_rows=[8, 9, 12, 13, 14, 15], sleep_s=0.15, in_flight=2, calls_log=str(log))
    with pytest.raises(StageError, match="shard 2"):
        make_runner(run_dir, config).run()
    folder = run_dir / "01_square"
    assert [p.name for p in sorted(folder.glob("shard-*.arrow"))] == [f"shard-0000{i}.arrow" for i in (0, 1, 3)]
    square = _square(run_dir)
    # every row that ran was paid (one request each) and shows: the finished shards' and the stopped one's
    assert square["requests"] == len(_calls(log)) == 16
    assert square["stopped_usage"] == {"requests": 4}  # shard 2 paid both its batches (the second then raised)
    for index in (0, 1, 3):  # each shard's usage is its own rows', not a neighbour's
        stats = json.loads((folder / "stats" / f"shard-0000{index}.json").read_text())
        assert stats["usage"]["requests"] == stats["rows_in"] == 4
    make_runner(run_dir, {**config, "stages": {**config["stages"], "square": {"in_flight": 2}}}).run()
    assert len(_rows(run_dir)) == 24


def test_sigkill_with_two_shards_in_flight_then_resume(tmp_path):
    run_dir, log, hold = tmp_path / "run", tmp_path / "calls.log", tmp_path / "hold"
    hold.touch()
    # shards 2 and 3 run together; each pays its first batch (rows 8-9, 12-13), then holds (rows 10, 14)
    config = _config(calls_log=str(log), hold_while=str(hold), hold_rows=[10, 14], in_flight=2, fail_every=7)
    proc = subprocess.Popen([sys.executable, str(TOY_RUN), str(run_dir), json.dumps(config)])
    try:
        finished = [run_dir / "01_square" / f"shard-0000{i}.arrow" for i in (0, 1)]
        _wait_for(lambda: {"n00010", "n00014"} <= set(_calls(log)) and all(p.exists() for p in finished), 60,
                  "shards 0-1 to be committed and shards 2-3 to reach their held rows")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    hold.unlink()

    square = _square(run_dir)  # before any rerun: the two shards' journals are counted
    assert square["rows_processed"] == 8 and square["requests"] == 8 + 4
    assert square["stopped_usage"] == {"requests": 4}

    calls_before = len(_calls(log))
    make_runner(run_dir, config).run()
    recomputed = _calls(log)[calls_before:]
    assert sorted(recomputed) == [f"n{i:05d}" for i in range(8, 24)]  # finished shards 0-1 are not run again
    clean = tmp_path / "clean"
    make_runner(clean, {**config, "stages": {**config["stages"], "square": {"fail_every": 7}}}).run()
    assert _rows(run_dir) == _rows(clean)
    after = _square(run_dir)
    assert after["done"] and after["requests"] == 24 + 4 and after["stopped_usage"] == {"requests": 4}
    failures = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p))
                                              for p in sorted((run_dir / "01_square" / "failures").glob("shard-*"))])
    assert sorted(failures["key"]) == ["n00000", "n00007", "n00014", "n00021"]


def test_the_engine_tells_a_prefetching_batch_function_which_shard_comes_next(tmp_path):
    # A GPU stage (match) decodes the next shard's first images while the current one computes.
    from toy_stages import Numbers, Square

    from builder.config import build_config_model, validate_config

    events: list[tuple[str, int]] = []

    class PrefetchingSquare(Square):
        def make_batch_fn(self, config, ctx):
            inner = super().make_batch_fn(config, ctx)

            def fn(batch):
                events.append(("run", batch["value"][0]))
                return inner(batch)

            fn.prefetch = lambda rows: events.append(("prefetch", rows["value"][0]))
            return fn

    stages = [Numbers(), PrefetchingSquare()]
    config = validate_config(_config(), build_config_model(stages), base_dir=tmp_path)
    Runner(stages, config, tmp_path / "run", progress=False).run()
    expected = []
    for shard in range(6):  # shards of 4 rows, batches of 2: the hint for shard n+1 comes before shard n runs
        expected += ([("prefetch", 4 * shard + 4)] if shard < 5 else []) + [("run", 4 * shard), ("run", 4 * shard + 2)]
    assert events == expected
