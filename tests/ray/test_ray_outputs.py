"""``run.engine: ray`` gives every stage the same output, failures and ``status`` counts as the local engine,
on a two-node cluster; and a worker that cannot read the run folder names the path and its node."""

from __future__ import annotations

import dataclasses

import pytest
from ray_helpers import STAGES, counts, run_pipeline, stage_tables
from same_rows import assert_same_rows

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_run(ray_cluster, local_reference, tmp_path_factory):
    config, _ = local_reference
    run_dir = tmp_path_factory.mktemp("ray-outputs") / "run"
    runner = run_pipeline(config, run_dir, engine="ray")
    assert runner.engine.name == "ray"
    return runner


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_gives_what_the_local_engine_gives(local_reference, ray_run, name):
    _, local_dir = local_reference
    rows, fails = stage_tables(ray_run.run_dir, name)
    want_rows, want_fails = stage_tables(local_dir, name)
    assert rows.num_rows == want_rows.num_rows > 0
    assert_same_rows(rows, want_rows)  # the local referee's p_yes, computed in another process: tests/same_rows.py
    assert (fails is None and want_fails is None) or fails.equals(want_fails)
    assert counts(ray_run.run_dir)[name] == counts(local_dir)[name]


def test_a_worker_that_cannot_read_the_run_folder_names_the_path_and_its_node(ray_run, tmp_path):
    from builder.ray_engine import RayEngine

    work = ray_run.stage_work("final")
    missing = tmp_path / "not-mounted"
    work = dataclasses.replace(work, run_dir=missing)
    stage = work.stage
    task = _one_task(ray_run, "final", tmp_path)
    outcomes = list(RayEngine().run_shards(work, [task], features=stage.features(work.config),
                                           batch_size=stage.batch_size, in_flight=1))
    assert len(outcomes) == 1 and outcomes[0].error is not None
    message = str(outcomes[0].error)
    assert str(missing) in message and "node " in message and "Ray node" in message


def _one_task(runner, name, folder):
    from builder.outputs import load_stage_output
    from builder.work import ShardTask

    inputs = load_stage_output(runner.run_dir, runner._by_name[name].upstream)
    return ShardTask(index=0, rows=inputs.shard(2, 0, contiguous=True), fingerprint="storage-check",
                     tmp_path=folder / "map.arrow", journal_path=folder / "live.jsonl")


def test_duplicates_across_shards_keep_the_first_ref_as_locally(ray_cluster, tmp_path):
    """The images stage's dedup ledger carries state from shard to shard (the first ref of an image wins):
    under Ray its shards run at once on several workers and the runner settles them in input order, so the
    same ref is kept and the same one fails."""
    from PIL import Image
    from ray_helpers import run_pipeline, stage_tables, write_config

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200 - 30 * i)).save(photos / f"p{i}.png")
    (photos / "p5.png").write_bytes((photos / "p0.png").read_bytes())  # shard 2 repeats shard 0's image
    text = f"""
run: {{name: dups, shard_size: 2}}
stages:
  images: {{sources: [{{type: folder, root: {photos}}}]}}
  score: {{referees: [{{name: tiny_llava, preset: tiny-random-llava}}]}}
  final: {{threshold: 1}}
"""
    config = write_config(tmp_path, text)
    for engine in ("local", "ray"):
        run_pipeline(config, tmp_path / engine, engine=engine, only={"images"})
    rows, fails = stage_tables(tmp_path / "ray", "images")
    want_rows, want_fails = stage_tables(tmp_path / "local", "images")
    assert rows.equals(want_rows) and fails.equals(want_fails)
    assert fails.column("reason").to_pylist() == ["duplicate"]
