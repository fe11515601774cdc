"""A changed stage config re-runs that stage and the ones after it, never the ones before."""

from __future__ import annotations

import json
from pathlib import Path

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
    from processors.stages.match import MatchStage
    from processors.stages.score import ScoreConfig, ScoreStage

    match = MatchStage()
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


# Every stage fingerprint of the shipped configs, as runs made with them carry it: a change here makes every
# such run recompute from that stage on (the paper run's cost thousands of dollars). Change a pin only with a
# change that must recompute, and say so in its notes.
PINNED = {
    ("demo.yaml", False): {
        "taxonomy": "6fff5c0cf44c65798d9fa49ccc63abdb", "images": "6e63894793648989c05045b443be6401",
        "match": "d70bc800b2ce11714cab238b8ef6e414", "filter": "e77fb1a7098d2e4ae29edd9632fd4965",
        "qa": "fb4a6d69f0de44ac018fbdf3e3dc383a", "score": "41c22c4c5eb8db87ced9992e7ef68a7d",
        "final": "421b5d60cc5913fbdae916172f7bc36c"},
    ("demo.yaml", True): {
        "taxonomy": "be3fb1ad2d746c0827051927c3e21adf", "images": "257696d1197562f1ba5063165fb7015d",
        "match": "b62ad7bcf16cdebbc490af2fae568245", "filter": "85245235e8d910811dd5ee5338044353",
        "qa": "1d61031a4211a2fc509ee2c5f957fa97", "score": "59c68870be612f4fdbd5fcfd04424245",
        "final": "90f31fbaf43e1c1b2de404104d4e8dd4"},
    ("taskgalaxy.yaml", False): {
        "taxonomy": "0a834fa2969193af64b83d197b6cf9b9", "images": "7d11521d9c0956d99878cf26669e3186",
        "match": "a139b8e92fbc4ad9c5f12b7cbfc0d3ab", "filter": "76557334a7b1a65e1d403da03c60d07c",
        "qa": "8010723a332e6d9ddf534894d390d11b", "score": "616945baf9c652e87d69bb38ba58f289",
        "final": "7996f3fc4df6f2fab403139c2dc98e2d"},
    ("taskgalaxy.yaml", True): {
        "taxonomy": "a98a71fe91484418533a571c3946e3ed", "images": "786c98c96641dfd9082255f58f6cce11",
        "match": "c8f9ee6dc9f6711a09448b8a8dfd7a7c", "filter": "0cf74cc344c95172179db07d5cbf119c",
        "qa": "8deec2c4230376a703edb8087f19f5f5", "score": "4ffdcc7367d4647bd7a8b0135ae29a50",
        "final": "7312a7f8b6165988b0fd747890ff4426"},
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _prints(config: Path, run_dir: Path, dry_run: bool) -> dict[str, str]:
    from processors.session import open_run

    runner = open_run(config, run_dir=run_dir, dry_run=dry_run, progress=False)
    return {stage.name: runner.fingerprint_of(stage.name) for stage in runner.stages}


@pytest.mark.parametrize("name,dry_run", list(PINNED))
def test_the_shipped_configs_keep_their_fingerprints(tmp_path, name, dry_run):
    assert _prints(CONFIGS / name, tmp_path / "run", dry_run) == PINNED[name, dry_run]


@pytest.mark.parametrize("name", ["demo.yaml", "taskgalaxy.yaml"])
def test_the_written_config_yaml_loads_back_to_every_fingerprint(tmp_path, name):
    """A run folder's config.yaml, run again, is the same run: a key it spells out that the config left unset
    (an endpoint's image_max_side, which a referee preset fills only when unset) would recompute score."""
    from processors.session import open_run

    runner = open_run(CONFIGS / name, run_dir=tmp_path / "run", progress=False)
    runner._write_run_files()  # what `taskgalaxy run` writes before the first stage
    written = tmp_path / "run" / "config.yaml"
    for dry_run in (False, True):
        assert _prints(written, tmp_path / "again", dry_run) == PINNED[name, dry_run], \
            f"{written} is not the config that ran:\n{written.read_text()}"
