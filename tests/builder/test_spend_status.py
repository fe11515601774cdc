"""`status` counts what stopped attempts paid: after an exception, after a kill (before any rerun), and after
a config change replaced the stage's folder."""

from __future__ import annotations

import pytest
from test_resume import _killed_at_row_10
from toy_run import make_runner

from builder.runner import StageError
from builder.status import format_table, stage_summaries


def _square(run_dir) -> dict:
    return next(s for s in stage_summaries(run_dir) if s["stage"] == "square")


def test_a_stage_stopped_by_an_exception_shows_its_spend_at_once(tmp_path):
    run_dir = tmp_path / "run"
    config = {"run": {"name": "toy", "shard_size": 4},
              "stages": {"numbers": {"count": 24}, "square": {"raise_from": 10}}}
    with pytest.raises(StageError, match="raise_from"):
        make_runner(run_dir, config).run()
    square = _square(run_dir)
    # shards 0 and 1 (8 requests) finished; shard 2 paid for rows 8-9 and 10-11 before it raised
    assert square["requests"] == 12 and square["stopped_usage"] == {"requests": 4}
    assert "includes 4 requests" in format_table(run_dir, stage_summaries(run_dir))


def test_a_killed_stage_shows_its_spend_before_any_rerun(tmp_path):
    run_dir, _, _ = _killed_at_row_10(tmp_path)
    square = _square(run_dir)  # state.json was last written after shard 1; the live record holds rows 8-9
    assert square["requests"] == 8 + 2 and square["stopped_usage"] == {"requests": 2}


def test_spend_under_a_replaced_config_stays_counted(tmp_path):
    run_dir, log, config = _killed_at_row_10(tmp_path)
    config["stages"]["square"].update(offset=1, hold_while=None)  # another config: the stage starts afresh
    make_runner(run_dir, config).run()
    square = _square(run_dir)
    assert square["done"] and square["rows_processed"] == 24
    assert square["requests"] == 24 + 10 and square["stopped_usage"] == {"requests": 10}
    # and a further change keeps both earlier configs' spend
    config["stages"]["square"]["offset"] = 2
    make_runner(run_dir, config).run()
    assert _square(run_dir)["requests"] == 24 + 24 + 10


def test_every_shard_is_on_disk_before_it_gets_its_final_name(tmp_path, monkeypatch):
    from builder import runfolder

    synced, renamed = [], []
    real_fsync, real_replace = runfolder.fsync_file, type(tmp_path).replace
    monkeypatch.setattr(runfolder, "fsync_file", lambda path: (synced.append(path.name), real_fsync(path)))

    def replace(self, target):
        if self.name.startswith(runfolder.TMP_PREFIX) and self.suffix == ".arrow":
            renamed.append((self.name, self.name in synced))
        return real_replace(self, target)

    monkeypatch.setattr(type(tmp_path), "replace", replace)
    make_runner(tmp_path / "run", {"run": {"name": "toy", "shard_size": 8},
                                   "stages": {"numbers": {"count": 16}, "square": {}}}).run()
    shards = [(name, ok) for name, ok in renamed if "shard-" in name]
    assert len(shards) >= 8 and all(ok for _, ok in shards)  # outputs and failure tables of 2 stages x 2 shards


def test_spend_paid_before_a_full_disk_stopped_the_stage_is_counted_exactly(tmp_path, monkeypatch):
    import errno

    from builder.runner import Runner

    run_dir = tmp_path / "run"
    config = {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 24}, "square": {}}}
    real_commit, calls = Runner._commit, []

    def commit(path, table, features):
        if "01_square" in str(path) and path.name == "shard-00002.arrow" and not calls:
            calls.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_commit(path, table, features)

    monkeypatch.setattr(Runner, "_commit", staticmethod(commit))
    with pytest.raises(RuntimeError, match="disk is full"):  # the runner's message names the folder and the cure
        make_runner(run_dir, config).run()
    assert _square(run_dir)["requests"] == 12  # shards 0-1 (8) and the 4 the stopped shard paid for
    make_runner(run_dir, config).run()
    square = _square(run_dir)
    assert square["done"] and square["requests"] == 24 + 4 and square["stopped_usage"] == {"requests": 4}


def _time_shards(folder, spans: list[tuple[float, float]], *, recorded: bool) -> None:
    """Give the finished shards of a stage folder these (start, end) times: in their stats records (as the
    runner writes them), or only as each record's file time (a run folder of a version that did not)."""
    import json
    import os

    for index, (start, end) in enumerate(spans):
        path = folder / "stats" / f"shard-{index:05d}.json"
        record = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("started", "finished")}
        record["seconds"] = end - start
        if recorded:
            record.update(started=start, finished=end)
        path.write_text(json.dumps(record))
        os.utime(path, (end, end))


@pytest.mark.parametrize("recorded", [True, False])
def test_status_seconds_is_wall_time_and_shards_side_by_side_count_once(tmp_path, recorded):
    run_dir = tmp_path / "run"
    config = {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 12}, "square": {}}}
    make_runner(run_dir, config).run()
    # shards 0 and 1 ran side by side (two in flight), shard 2 later, after a pause
    _time_shards(run_dir / "01_square", [(1000.0, 1010.0), (1004.0, 1012.0), (1100.0, 1105.0)], recorded=recorded)
    square = _square(run_dir)
    assert square["shard_seconds"] == 10 + 8 + 5  # each shard's own time, added up
    assert square["seconds"] == 12 + 5  # the time a shard of the stage was running
