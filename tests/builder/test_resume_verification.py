"""A resume trusts a finished shard only once it verifies: readable as Arrow, with the row counts its stats
recorded. A damaged one (truncated, miscounted, without stats) is named and recomputed, alone; a damaged
``state.json`` is rebuilt from the shard stats. What a discarded shard had paid stays counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from builder import runfolder as rf
from builder.outputs import read_spend_record, stage_totals
from builder.recovery import check_frozen_input
from builder.runner import StageError
from taskgalaxy import main
from toy_llava_run import finished_llava_run
from toy_run import make_runner


def _config(calls_log: Path) -> dict:
    return {"run": {"name": "toy", "shard_size": 4},
            "stages": {"numbers": {"count": 12}, "square": {"fail_every": 5, "calls_log": str(calls_log)}}}


def _finished(tmp_path: Path) -> tuple[Path, Path, dict]:
    run_dir, log = tmp_path / "run", tmp_path / "calls.log"
    config = _config(log)
    make_runner(run_dir, config).run()
    log.write_text("")  # from here on it holds what a rerun computes
    return run_dir, log, config


def _rows(run_dir: Path, stage: str) -> list:
    from builder.outputs import load_stage_output

    return sorted(load_stage_output(run_dir, stage).to_list(), key=lambda r: json.dumps(r, sort_keys=True))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SHARD_1_KEYS = ["n00004", "n00005", "n00006", "n00007"]


def test_a_truncated_shard_of_a_finished_stage_is_recomputed_and_named(tmp_path, caplog):
    run_dir, log, config = _finished(tmp_path)
    reference = _rows(run_dir, "square")
    shard = run_dir / "01_square" / "shard-00001.arrow"
    _truncate(shard)  # a power loss on a disk that lied about fsync
    with caplog.at_level(logging.WARNING, logger="builder.runner"):
        make_runner(run_dir, config).run()
    assert log.read_text().split() == SHARD_1_KEYS, "only the damaged shard is recomputed"
    assert _rows(run_dir, "square") == reference
    assert any(str(shard) in r.getMessage() and "recomputing it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["rows_out", "no_stats", "stats_garbage", "failures_truncated"])
def test_a_shard_that_does_not_match_its_stats_is_recomputed(tmp_path, damage):
    run_dir, log, config = _finished(tmp_path)
    folder = run_dir / "01_square"
    stats = folder / "stats" / "shard-00001.json"
    if damage == "rows_out":
        record = json.loads(stats.read_text())
        stats.write_text(json.dumps({**record, "rows_out": record["rows_out"] + 1}))
    elif damage == "no_stats":
        stats.unlink()
    elif damage == "stats_garbage":
        stats.write_text("{\"shard\": 1, \"rows_")
    else:
        _truncate(folder / "failures" / "shard-00001.arrow")
    state = make_runner(run_dir, config).run()["square"]
    assert log.read_text().split() == SHARD_1_KEYS
    assert state["done"] and state["totals"]["rows_in"] == 12


def test_what_a_discarded_shard_paid_stays_counted(tmp_path):
    run_dir, _, config = _finished(tmp_path)
    folder = run_dir / "01_square"
    assert stage_totals(folder, 3)["usage"] == {"requests": 12}  # the toy stage "pays" one request a row
    _truncate(folder / "shard-00001.arrow")
    state = make_runner(run_dir, config).run()["square"]
    assert state["totals"]["usage"] == {"requests": 12 + 4}  # shard 1 was paid twice, and shows it
    records = sorted((folder / "stats").glob("interrupted-00001-discarded-*"))
    assert [read_spend_record(p) for p in records] == [{"requests": 4}]
    again = make_runner(run_dir, config).run()["square"]
    assert again["totals"]["usage"] == {"requests": 16}  # counted once, not on every rerun


def test_a_damaged_shard_of_a_stage_a_later_one_reads_is_named_not_an_arrow_error(tmp_path):
    run_dir, log, config = _finished(tmp_path)
    _truncate(run_dir / "00_numbers" / "shard-00002.arrow")
    changed = {**config, "stages": {**config["stages"], "square": {**config["stages"]["square"], "offset": 1}}}
    with pytest.raises(rf.RunFolderError) as caught:
        make_runner(run_dir, changed).run({"square"})  # numbers is not rerun: its damage must be named
    message = str(caught.value)
    assert message.startswith(f"stage 'numbers': shard 2 in {run_dir} is damaged: {run_dir / '00_numbers'}")
    assert "Rerun `taskgalaxy run`" in message and caught.value.exit_code == rf.EXIT_DATA
    assert log.read_text() == ""
    make_runner(run_dir, changed).run()  # the whole pipeline: numbers heals itself, then square runs
    assert len(log.read_text().split()) == 12


def test_a_corrupt_state_json_is_rebuilt_from_the_shard_stats(tmp_path, caplog):
    run_dir, log, config = _finished(tmp_path)
    reference = _rows(run_dir, "square")
    state = run_dir / "01_square" / rf.STATE_FILE
    state.write_text('{"stage": "square", "fingerprint": "ab')
    with caplog.at_level(logging.WARNING, logger="builder.runner"):
        states = make_runner(run_dir, config).run()
    assert log.read_text() == "", "no finished shard is recomputed"
    assert states["square"]["done"] and json.loads(state.read_text())["shards_done"] == 3
    assert _rows(run_dir, "square") == reference
    assert any(str(state) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", ["[]", "{}", "null", '{"stage": "square", "fingerprint": 7}'])
def test_a_state_json_that_parses_but_is_no_state_is_rebuilt_like_a_corrupt_one(tmp_path, caplog, text):
    run_dir, log, config = _finished(tmp_path)
    reference = _rows(run_dir, "square")
    state = run_dir / "01_square" / rf.STATE_FILE
    state.write_text(text)
    with caplog.at_level(logging.WARNING, logger="builder.runner"):
        states = make_runner(run_dir, config).run()
    assert log.read_text() == "", "no finished shard is recomputed"
    assert states["square"]["done"] and json.loads(state.read_text())["shards_done"] == 3
    assert _rows(run_dir, "square") == reference
    assert any(f"{state} is damaged: it " in r.getMessage() for r in caplog.records)  # named, with the reason


@pytest.mark.parametrize("text", ["[]", "{}"])
def test_status_of_a_state_json_that_is_no_state_names_the_file_and_the_fix(tmp_path, capsys, text):
    run_dir, _, _ = _finished(tmp_path)
    state = run_dir / "01_square" / rf.STATE_FILE
    state.write_text(text)
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == rf.EXIT_DATA
    err = capsys.readouterr().err
    assert err.startswith(f"error: stage 'square': {state} is damaged: it ")
    assert "Rerun `taskgalaxy run` with the same config: it rebuilds this file" in err
    assert "Traceback" not in err and "TypeError" not in err and "KeyError" not in err and err.count("\n") == 1


def test_a_corrupt_state_json_whose_shards_cannot_be_matched_stops_rather_than_lose_paid_work(tmp_path, capsys):
    run_dir, log, config = _finished(tmp_path)
    folder = run_dir / "01_square"
    for stats in (folder / "stats").glob("shard-*.json"):  # stats of an older version: no fingerprint
        record = json.loads(stats.read_text())
        stats.write_text(json.dumps({k: v for k, v in record.items() if k != "fingerprint"}))
    (folder / rf.STATE_FILE).write_text("\x00\x00\x00")
    with pytest.raises(rf.RunFolderError) as caught:
        make_runner(run_dir, config).run()
    message = str(caught.value)
    assert f"stage 'square': {folder / rf.STATE_FILE} is damaged and cannot be rebuilt" in message
    assert "paid 12 requests" in message and "Nothing was recomputed" in message and f"move {folder} aside" in message
    assert sorted(p.name for p in folder.glob("shard-*.arrow")) == [f"shard-0000{i}.arrow" for i in range(3)]
    assert log.read_text() == ""


def test_a_corrupt_state_json_of_an_unpaid_stage_is_recomputed(tmp_path):
    run_dir, log, config = _finished(tmp_path)
    folder = run_dir / "00_numbers"  # no usage: recomputing it loses nothing
    for stats in (folder / "stats").glob("shard-*.json"):
        record = json.loads(stats.read_text())
        stats.write_text(json.dumps({k: v for k, v in record.items() if k != "fingerprint"}))
    (folder / rf.STATE_FILE).write_text("not json")
    make_runner(run_dir, config).run()
    assert json.loads((folder / rf.STATE_FILE).read_text())["done"]
    assert log.read_text() == "", "numbers came out the same, so square was not recomputed"


def test_export_of_a_run_with_a_truncated_final_shard_names_it(tmp_path, capsys):
    run_dir = finished_llava_run(tmp_path)
    _truncate(run_dir / "01_final" / "shard-00001.arrow")
    out = tmp_path / "export" / "data.json"
    assert main(["export", str(run_dir), "--llava", str(out)]) == rf.EXIT_DATA
    err = capsys.readouterr().err
    assert f"error: stage 'final': shard 1 in {run_dir} is damaged: {run_dir / '01_final' / 'shard-00001.arrow'}" in err
    assert "does not read as Arrow" in err and "ArrowInvalid" in err
    assert not out.parent.exists()


def test_a_damaged_input_listing_is_listed_again_only_while_no_shard_was_cut_from_it(tmp_path):
    from builder.runner import Runner

    run_dir, _, _ = _finished(tmp_path)
    folder = run_dir / "00_numbers"
    _truncate(folder / "input.arrow")
    with pytest.raises(rf.RunFolderError, match=r"frozen input listing .* is damaged .* 3 finished shards"):
        check_frozen_input("numbers", folder, folder / "input.arrow")
    for shard in folder.glob("shard-*.arrow"):
        shard.unlink()
    check_frozen_input("numbers", folder, folder / "input.arrow")  # nothing depends on it yet
    assert not (folder / "input.arrow").exists()


def test_a_stage_error_is_still_a_stage_error(tmp_path):
    """Only disk and folder problems become RunFolderError; a stage's own exception keeps its message."""
    config = _config(tmp_path / "calls.log")
    config["stages"]["square"]["raise_from"] = 6
    with pytest.raises(StageError, match="stopped on shard 1"):
        make_runner(tmp_path / "run", config).run()


def test_status_shows_a_damaged_shard_instead_of_done(tmp_path):
    from builder.status import format_table, stage_summaries

    run_dir, _, _ = _finished(tmp_path)
    _truncate(run_dir / "01_square" / "shard-00001.arrow")
    square = next(s for s in stage_summaries(run_dir) if s["stage"] == "square")
    assert len(square["damaged_shards"]) == 1 and square["damaged_shards"][0].startswith("shard 1:")
    table = format_table(run_dir, stage_summaries(run_dir))
    assert "damaged: shard 1" in table and "a rerun recomputes it" in table
