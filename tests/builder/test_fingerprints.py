"""A changed stage config re-runs that stage and the ones after it, never the ones before."""

from __future__ import annotations

import json

import pytest

from builder.outputs import StageNotReadyError, load_stage_output
from builder.runfolder import find_stage_dir
from toy_run import make_runner


def _config(log, *, count=12, offset=0, suffix="") -> dict:
    return {
        "run": {"name": "toy", "shard_size": 5},
        "stages": {
            "numbers": {"count": count},
            "square": {"calls_log": str(log), "offset": offset},
            "toyfinal": {"suffix": suffix},
        },
    }


def _fingerprints(run_dir) -> dict:
    return {
        name: json.loads((find_stage_dir(run_dir, name) / "state.json").read_text())["fingerprint"]
        for name in ("numbers", "square", "toyfinal")
    }


def _calls(log) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_changing_the_last_stage_reruns_only_it(tmp_path):
    run, log = tmp_path / "run", tmp_path / "calls.log"
    make_runner(run, _config(log)).run()
    before = _fingerprints(run)
    make_runner(run, _config(log, suffix="!")).run()
    after = _fingerprints(run)
    assert _calls(log) == 12, "square was recomputed although only toyfinal changed"
    assert after["numbers"] == before["numbers"] and after["square"] == before["square"]
    assert after["toyfinal"] != before["toyfinal"]
    assert set(load_stage_output(run, "toyfinal")["label"]) == {f"{i}!" for i in range(12)}


def test_changing_a_middle_stage_reruns_it_and_everything_after(tmp_path):
    run, log = tmp_path / "run", tmp_path / "calls.log"
    make_runner(run, _config(log)).run()
    before = _fingerprints(run)
    make_runner(run, _config(log, offset=1)).run()
    after = _fingerprints(run)
    assert _calls(log) == 24
    assert after["numbers"] == before["numbers"]
    assert after["square"] != before["square"] and after["toyfinal"] != before["toyfinal"]
    assert sorted(load_stage_output(run, "square")["square"]) == sorted(i * i + 1 for i in range(12))


def test_changing_the_first_stage_reruns_everything(tmp_path):
    run, log = tmp_path / "run", tmp_path / "calls.log"
    make_runner(run, _config(log)).run()
    before = _fingerprints(run)
    make_runner(run, _config(log, count=13)).run()
    after = _fingerprints(run)
    assert all(after[name] != before[name] for name in before)
    assert _calls(log) == 12 + 13
    assert len(load_stage_output(run, "toyfinal")) == 13


def test_running_a_later_stage_alone_refuses_a_stale_input(tmp_path):
    run, log = tmp_path / "run", tmp_path / "calls.log"
    make_runner(run, _config(log)).run()
    with pytest.raises(StageNotReadyError, match="square.*another config"):
        make_runner(run, _config(log, offset=5)).run({"toyfinal"})
    make_runner(run, _config(log, offset=5)).run({"square", "toyfinal"})
    assert sorted(load_stage_output(run, "square")["square"]) == sorted(i * i + 5 for i in range(12))


def test_speed_knobs_do_not_change_a_stage_fingerprint():
    from processors.clip.config import ClipMatchConfig
    from processors.stages.match import Match
    from processors.stages.score import ScoreConfig, ScoreStage

    match = Match()
    assert match.fingerprint_config(ClipMatchConfig(batch_size=8, num_workers=0)) == \
        match.fingerprint_config(ClipMatchConfig(batch_size=256, num_workers=8))
    assert match.fingerprint_config(ClipMatchConfig(top_k=5)) != match.fingerprint_config(ClipMatchConfig(top_k=10))
    score = ScoreStage()
    fast = ScoreConfig(referees=[{"name": "a", "preset": "tiny-random-llava", "batch_size": 64}])
    slow = ScoreConfig(referees=[{"name": "a", "preset": "tiny-random-llava", "batch_size": 2}])
    seeing = ScoreConfig(referees=[{"name": "a", "preset": "tiny-random-llava", "see_answer": True}])
    assert score.fingerprint_config(fast) == score.fingerprint_config(slow) != score.fingerprint_config(seeing)


def test_a_later_stage_left_behind_shows_stale_and_will_not_load(tmp_path, capsys):
    from taskgalaxy import main

    run, log = tmp_path / "run", tmp_path / "calls.log"
    make_runner(run, _config(log)).run()
    make_runner(run, _config(log, offset=2)).run({"square"})  # toyfinal now lags behind square
    with pytest.raises(StageNotReadyError, match="computed from an older 'square'"):
        load_stage_output(run, "toyfinal")
    assert main(["status", str(run), "--json"]) == 0
    summaries = {s["stage"]: s for s in json.loads(capsys.readouterr().out)}
    assert summaries["toyfinal"]["stale_inputs"] == ["square"] and summaries["square"]["stale_inputs"] == []


def _state(run_dir, name) -> dict:
    return json.loads((find_stage_dir(run_dir, name) / "state.json").read_text())


def test_a_stage_shard_size_overrides_the_run_one_and_changing_it_reruns_nothing(tmp_path):
    run, log = tmp_path / "run", tmp_path / "calls.log"
    config = _config(log)
    config["stages"]["square"]["shard_size"] = 3
    make_runner(run, config).run()
    assert (_state(run, "numbers")["shard_size"], _state(run, "numbers")["shards_total"]) == (5, 3)
    assert (_state(run, "square")["shard_size"], _state(run, "square")["shards_total"]) == (3, 4)
    before = _fingerprints(run)
    config["stages"]["square"]["shard_size"] = 6  # re-sharding a finished stage: same rows, nothing to redo
    make_runner(run, config).run()
    assert _fingerprints(run) == before and _calls(log) == 12
    assert sorted(load_stage_output(run, "square")["square"]) == sorted(i * i for i in range(12))
