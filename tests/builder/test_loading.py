"""A stage folder loads as a `Dataset` three ways: the TaskGalaxy builder, Dataset.from_file, load_dataset."""

from __future__ import annotations

import json

import datasets
import pytest

from builder.runfolder import find_stage_dir
from taskgalaxy import TaskGalaxy, main
from toy_run import make_runner


@pytest.fixture
def toy_run(tmp_path):
    run = tmp_path / "run"
    make_runner(run, {
        "run": {"name": "toy", "shard_size": 4},
        "stages": {"numbers": {"count": 10}, "square": {"fail_every": 3}},
    }).run()
    return run


def test_builder_loads_a_stage_with_its_features(toy_run, tmp_path):
    builder = TaskGalaxy("square", data_dir=str(toy_run), cache_dir=str(tmp_path / "cache"))  # as the README shows
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    assert ds.features["square"] == datasets.Value("int64")
    assert sorted(ds["square"]) == [i * i for i in range(10) if i % 3]


def test_builder_refuses_a_stage_that_has_not_run(toy_run, tmp_path):
    with pytest.raises(RuntimeError, match="stage 'match' has not run"):
        TaskGalaxy(config_name="match", data_dir=str(toy_run), cache_dir=str(tmp_path / "cache"))


def test_plain_datasets_reads_the_shards(toy_run):
    folder = find_stage_dir(toy_run, "square")
    via_load = datasets.load_dataset("arrow", data_files=str(folder / "shard-*.arrow"), split="train")
    via_file = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(p)) for p in sorted(folder.glob("shard-*.arrow"))]
    )
    assert sorted(via_load["sq_id"]) == sorted(via_file["sq_id"]) and len(via_file) == 6
    failures = datasets.load_dataset("arrow", data_files=str(folder / "failures" / "shard-*.arrow"), split="train")
    assert set(failures["reason"]) == {"divisible"}


def test_status_json_reports_every_stage(toy_run, capsys):
    assert main(["status", str(toy_run), "--json"]) == 0
    summaries = {s["stage"]: s for s in json.loads(capsys.readouterr().out)}
    assert list(summaries) == ["numbers", "square", "toyfinal"]
    square = summaries["square"]
    assert square["done"] and square["shards_done"] == square["shards_total"] == 3
    assert (square["rows_in"], square["rows_out"], square["failures_by_reason"]) == (10, 6, {"divisible": 4})
    assert square["requests"] == 10 and len(square["fingerprint"]) == 32


def test_status_table_shows_reasons(toy_run, capsys):
    assert main(["status", str(toy_run)]) == 0
    out = capsys.readouterr().out
    assert "square" in out and "failed: divisible=4" in out
