"""Rows a server could not answer are no verdict (issue 20): the stage does not finish, the later stages do not
run, the command exits 75, and the same command run again after the server is fixed asks exactly those rows
again - their shards' other rows come back unchanged and the spend of every attempt stays counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.outputs import load_stage_output, stage_totals
from builder.runfolder import find_stage_dir, read_json
from builder.runner import EXIT_UNANSWERED, UnansweredError
from toy_run import make_runner


def _config(tmp_path: Path, refused: list[int]) -> dict:
    refused_file = tmp_path / "refused.json"
    refused_file.write_text(json.dumps(refused))
    square = {"fail_every": 5, "calls_log": str(tmp_path / "calls.log"), "refused_file": str(refused_file)}
    return {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 16}, "square": square}}


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().split() if log.exists() else []


def test_refused_rows_leave_the_stage_unfinished_and_the_rerun_after_the_fix_judges_them(tmp_path):
    run_dir = tmp_path / "run"
    config = _config(tmp_path, refused=[1, 2, 9])  # shards 0 and 2 (of 4 rows each) hold refused rows
    with pytest.raises(UnansweredError) as caught:
        make_runner(run_dir, config).run()
    error = caught.value
    assert error.exit_code == EXIT_UNANSWERED == 75 and error.counts == {"api_error": 3}
    message = str(error)
    assert "3 of 16 rows" in message and "HTTP 404" in message and "rerun the same command" in message
    folder = find_stage_dir(run_dir, "square")
    state = read_json(folder / "state.json")
    assert state["done"] is False and state["unanswered"] == {"api_error": 3}
    assert state["shards_done"] == 4  # every shard ran and was committed: answers and spend are kept
    assert find_stage_dir(run_dir, "toyfinal") is None or not (find_stage_dir(run_dir, "toyfinal") / "state.json").exists()
    from builder.status import format_table, stage_summaries

    summary = {s["stage"]: s for s in stage_summaries(run_dir)}["square"]
    assert summary["unanswered"] == {"api_error": 3} and not summary["done"]
    assert "unanswered: 3 rows" in format_table(run_dir, [summary])
    spent_first = stage_totals(folder, 4)["usage"]["requests"]
    assert spent_first == 16

    # The same command again, the server still broken: the same rows, asked again, the same answer.
    (tmp_path / "calls.log").unlink()
    with pytest.raises(UnansweredError):
        make_runner(run_dir, config).run()
    assert sorted(_calls(tmp_path)) == [f"n{i:05d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]  # shards 0 and 2 only

    # The server is fixed: the rerun judges the refused rows and the run finishes.
    (tmp_path / "refused.json").write_text("[]")
    (tmp_path / "calls.log").unlink()
    make_runner(run_dir, config).run()
    assert sorted(_calls(tmp_path)) == [f"n{i:05d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    state = read_json(folder / "state.json")
    assert state["done"] is True and "api_error" not in state["totals"]["failed"]
    assert state["totals"]["failed"] == {"divisible": 4}  # 0, 5, 10, 15: a verdict, kept as it was
    # Every attempt's spend counted: 16 + 8 + 8 requests (the toy counts a request per row it computes).
    assert state["totals"]["usage"]["requests"] == 32
    squares = {r["num_id"]: r["square"] for r in load_stage_output(run_dir, "square").to_list()}
    assert squares["n00001"] == 1 and squares["n00009"] == 81 and len(squares) == 12
    assert len(load_stage_output(run_dir, "toyfinal")) == 12  # the later stage ran once the stage was whole


def test_accept_unanswered_seals_them_as_failures(tmp_path):
    run_dir = tmp_path / "run"
    config = _config(tmp_path, refused=[6])
    with pytest.raises(UnansweredError):
        make_runner(run_dir, config).run()
    (tmp_path / "calls.log").unlink()
    runner = make_runner(run_dir, config)
    runner.accept_unanswered = True
    runner.run()
    assert _calls(tmp_path) == []  # nothing recomputed: the failure is kept as it is
    state = read_json(find_stage_dir(run_dir, "square") / "state.json")
    assert state["done"] is True and state["totals"]["failed"]["api_error"] == 1
    assert len(load_stage_output(run_dir, "toyfinal")) == 11


def test_a_stage_without_unanswered_failures_is_unchanged(tmp_path):
    run_dir = tmp_path / "run"
    make_runner(run_dir, _config(tmp_path, refused=[])).run()
    state = read_json(find_stage_dir(run_dir, "square") / "state.json")
    assert state["done"] is True and "unanswered" not in state


def test_a_stage_error_ending_in_a_period_reads_as_one_sentence(tmp_path):
    from builder.runner import StageError

    config = _config(tmp_path, refused=[])
    config["stages"]["square"]["raise_rows"] = [5]
    with pytest.raises(StageError) as caught:
        make_runner(tmp_path / "run", config).run()
    message = str(caught.value)
    assert "stop the stage. Finished shards are kept" in message and ".." not in message


def test_a_damaged_shard_of_a_sealed_stage_does_not_reopen_its_unanswered_rows(tmp_path):
    from builder.runfolder import shard_name

    run_dir = tmp_path / "run"
    config = _config(tmp_path, refused=[1])
    runner = make_runner(run_dir, config)
    runner.accept_unanswered = True
    runner.run()  # sealed: row 1 kept as api_error
    folder = find_stage_dir(run_dir, "square")
    (folder / shard_name(2)).write_bytes(b"damaged")  # a shard without unanswered rows
    (tmp_path / "calls.log").unlink()
    make_runner(run_dir, config).run()  # without the flag: only the damaged shard is recomputed
    assert sorted(_calls(tmp_path)) == [f"n{i:05d}" for i in (8, 9, 10, 11)]
    state = read_json(folder / "state.json")
    assert state["done"] is True and state["totals"]["failed"]["api_error"] == 1


def test_a_kill_between_keeping_a_discarded_shards_spend_and_removing_it_counts_that_spend_once(tmp_path):
    import hashlib
    import json as jsonlib

    run_dir = tmp_path / "run"
    make_runner(run_dir, _config(tmp_path, refused=[])).run()
    folder = find_stage_dir(run_dir, "square")
    before = stage_totals(folder, 4)["usage"]["requests"]
    stats = (folder / "stats" / "shard-00001.json").read_bytes()
    usage = jsonlib.loads(stats)["usage"]
    digest = hashlib.sha256(stats).hexdigest()[:16]
    # discard_shard wrote its record, then the process died before the shard was removed
    (folder / "stats" / f"interrupted-00001-discarded-{digest}.jsonl").write_text(jsonlib.dumps(usage) + "\n")
    assert stage_totals(folder, 4)["usage"]["requests"] == before
