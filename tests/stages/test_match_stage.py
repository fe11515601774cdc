"""The match stage end to end through the runner: outputs, failures, resume and the text cache."""

from __future__ import annotations

import multiprocessing

from pathlib import Path

import datasets
import pytest
from toy_stages import ToyImages, copy_rows

from PIL import Image, ImageDraw
from pydantic import Field

import processors.clip.shared as shared_matchers
import processors.clip.text as text_module
from builder.config import build_config_model, validate_config
from builder.ids import text_id
from builder.outputs import load_stage_failures, load_stage_output
from builder.runner import Runner
from builder.stage import Stage, StageConfig
from processors.stages.match import MatchStage

TASK_PATHS = ["Objects", "Objects~Animals", "Objects~Animals~Counting dogs", "Objects~Vehicles~Car colour",
              "OCR~Street signs", "OCR~Menus~Prices", "Scenes~Weather", "Scenes~Indoor~Room type"]


class ToyTaxonomyConfig(StageConfig):
    paths: list[str] = Field(default_factory=lambda: list(TASK_PATHS))


class ToyTaxonomy(Stage):
    """Rows shaped like the real taxonomy stage's (design.md §3), listed from the config."""

    name, Config, key = "taxonomy", ToyTaxonomyConfig, "task_id"
    COLUMNS = ("task_id", "path", "level", "parent", "name", "origin", "round")

    def input_key(self, config):
        return "task_id"

    def source_rows(self, config, ctx):
        rows = [{"task_id": text_id(p), "path": p, "level": p.count("~") + 1, "parent": p.rpartition("~")[0],
                 "name": p.rpartition("~")[2], "origin": "seed", "round": 0} for p in config.paths]
        return datasets.Dataset.from_list(rows, features=self.features(config))

    def features(self, config):
        v = datasets.Value
        return datasets.Features({"task_id": v("string"), "path": v("string"), "level": v("int32"),
                                  "parent": v("string"), "name": v("string"), "origin": v("string"),
                                  "round": v("int32")})

    def make_batch_fn(self, config, ctx):
        return copy_rows(self.COLUMNS, "task_id")


STAGES = [ToyTaxonomy(), ToyImages(), MatchStage()]



@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder whose images/ holds 9 pictures and one corrupt file."""
    folder = tmp_path / "run" / "images"
    folder.mkdir(parents=True)
    for i in range(9):
        image = Image.new("RGB", (80, 60), (25 * i, 255 - 20 * i, 90))
        ImageDraw.Draw(image).rectangle([5 * i, 5, 5 * i + 20, 40], fill=(255, 255, 0))
        image.save(folder / f"pic{i}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path / "run"


def run(run_dir: Path, **match) -> tuple[Runner, dict]:
    model = build_config_model(STAGES)
    match = {"model": "tg-tiny-clip", "pretrained": None, "device": "cpu", "num_workers": 2, "batch_size": 4,
             "top_k": 3, **match}
    config = validate_config({"run": {"name": "t", "shard_size": 4},
                              "stages": {"images": {"folder": str(run_dir / "images")}, "match": match}},
                             model, base_dir=run_dir)
    runner = Runner(STAGES, config, run_dir, progress=False)
    return runner, runner.run()


def test_match_stage_end_to_end_resume_and_cache(run_dir, monkeypatch):
    calls: list[int] = []
    real = text_module.encode_texts
    monkeypatch.setattr(text_module, "encode_texts", lambda *a: calls.append(len(a[1])) or real(*a))

    before = {p.pid for p in multiprocessing.active_children()}
    _, states = run(run_dir)
    totals = states["match"]["totals"]
    assert (totals["rows_in"], totals["rows_out"], totals["failed"]) == (10, 9, {"image_corrupt": 1})
    # the stage let go of its decode workers and model when it ended (the next stage may need the GPU)
    assert {p.pid for p in multiprocessing.active_children()} <= before and not shared_matchers._MATCHERS
    assert states["match"]["shards_total"] == 3 and calls == [6]  # six leaves, embedded once for 3 shards
    output = load_stage_output(run_dir, "match")
    leaves = {text_id(p): p for p in TASK_PATHS if not any(q.startswith(p + "~") for q in TASK_PATHS)}
    for row in output:
        scores = [c["score"] for c in row["candidates"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(leaves[c["task_id"]] == c["task_type"] for c in row["candidates"])
    failure = load_stage_failures(run_dir, "match")[0]
    assert failure["reason"] == "image_corrupt" and failure["stage"] == "match"

    _, again = run(run_dir)  # same config: nothing recomputed
    assert again["match"]["totals"] == totals and calls == [6]
    _, changed = run(run_dir, top_k=5)  # new fingerprint: the stage re-runs, the text cache is reused
    assert changed["match"]["totals"]["rows_out"] == 9 and calls == [6]
    assert all(len(c) == 5 for c in load_stage_output(run_dir, "match")["candidates"])


def test_config_rejects_unknown_keys_and_bad_values(run_dir):
    from builder.config import ConfigError

    with pytest.raises(ConfigError, match="stages.match.topk"):
        run(run_dir, topk=3)
    with pytest.raises(ConfigError, match="stages.match.device"):
        run(run_dir, device="gpu")


def test_unknown_model_fails_with_the_key_named(run_dir):
    from builder.runner import StageError

    with pytest.raises(StageError, match="stages.match.model"):
        run(run_dir, model="no-such-clip")


def test_a_top_k_above_the_number_of_task_types_is_clamped_with_a_warning(run_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="processors.stages.match"):
        run(run_dir, top_k=50)
    assert "top_k 50 is more than the 6 task types" in caplog.text
    assert all(len(c) == 6 for c in load_stage_output(run_dir, "match")["candidates"])


def test_the_batch_function_beats_per_model_batch_and_a_stopped_shard_stops_at_the_next_one(run_dir):
    """Signs of life for the engine's stall watchdog: the whole shard is one batch-function call, so it beats per
    model batch; and it is where a stopped shard (Ctrl-C, the watchdog) stops, not at the end of the shard."""
    import threading

    from builder.engine import ShardStopped
    from builder.stage import Heartbeat, ShardScope, UsageMeter, heartbeat_scope, shard_scope

    class Counting(Heartbeat):
        beats = 0

        def beat(self) -> None:
            self.beats += 1
            super().beat()

    runner, _ = run(run_dir, batch_size=2)
    work = runner.stage_work("match")
    fn = work.build()
    rows = load_stage_output(run_dir, "images")[:]  # 10 rows: 9 pictures and the corrupt file
    heartbeat, stop = Counting(), threading.Event()
    try:
        with heartbeat_scope(heartbeat), shard_scope(ShardScope(UsageMeter(), stop)):
            fn(rows)
            assert heartbeat.beats == 5 + 1  # 5 model batches of 2 images, then the usage counted
            stop.set()
            with pytest.raises(ShardStopped):
                fn(rows)
    finally:
        work.stage.close(work.config)
