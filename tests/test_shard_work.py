"""Every stage's work travels: pickled with cloudpickle and run in a spawned subprocess (no fork, nothing
inherited), one shard gives the same rows, failures and usage as the same shard run in this process.

This is the seam the Ray engine uses: a worker gets ``(StageWork, ShardTask)``, builds the batch function
once, and sends back the outcome (rows by file, usage by value)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import shutil
from pathlib import Path

import cloudpickle
import datasets
import pytest

from builder.outputs import load_stage_output
from builder.work import ShardTask, execute_shard, run_pickled
from processors.llm.accounts import SERVICE, run_accounts
from processors.session import dry_run_services, open_run
from same_rows import assert_same_rows

CONFIG = """
run: {name: travel, shard_size: 6}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}
    referee_a: {base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}
stages:
  taxonomy: {levels: 2, rounds_per_level: 1, children_per_request: 3, new_first_level_per_round: 1, plots: false}
  images:
    sources: [{type: synthetic, count: 8, seed: 5}]
  match: {model: tg-tiny-clip, pretrained: null, top_k: 4}
  score:
    referees:
      - {name: tiny_llava, preset: tiny-random-llava, batch_size: 8}
      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}
  final: {threshold: 1}
"""
STAGES = ["taxonomy", "images", "match", "filter", "qa", "score", "final"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("travel")
    (root / "travel.yaml").write_text(CONFIG)
    with dry_run_services(True) as services:
        runner = open_run(root / "travel.yaml", run_dir=root / "run", dry_run=True, services=services,
                          progress=False)
        runner.run()
        # the subprocess must get nothing that only this process has: spawn, not fork; and it computes with
        # another thread count than this one (a Ray worker's is its own), so the model's floats differ in their
        # last bits as they do between real workers, every time rather than under load only
        import torch

        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads, initargs=(1,)) as pool, \
                run_accounts() as run_services:
            yield root, runner, pool, run_services[SERVICE]


def _first_shard(runner, name: str, folder: Path) -> ShardTask:
    stage = runner._by_name[name]
    if stage.upstream:
        inputs = load_stage_output(runner.run_dir, stage.upstream)
    else:
        inputs = datasets.Dataset.from_file(str(runner.stage_dir(name) / "input.arrow"))
    shards = -(-len(inputs) // runner.config.run.shard_size)
    folder.mkdir(parents=True)
    return ShardTask(index=0, rows=inputs.shard(shards, 0, contiguous=True), fingerprint=f"travel-{name}",
                     tmp_path=folder / "map.arrow", journal_path=folder / "live.jsonl")


@pytest.mark.parametrize("name", STAGES)
def test_a_stage_shard_runs_the_same_in_a_spawned_process(finished, name):
    root, runner, pool, accounts = finished
    results = {}
    for where in ("here", "there"):
        # each side starts from an empty request cache and stage folder, so each pays the same requests
        base = root / f"{name}-{where}"
        work = runner.stage_work(name)
        # as in a run: the run's LLM accounts among the services (pickled, they become the worker's own)
        work = dataclasses.replace(work, cache_dir=base / "cache", stage_dir=base / "stage",
                                   services={**work.services, SERVICE: accounts})
        if name == "taxonomy":  # its batch function reads the seed report its listing wrote
            shutil.copytree(runner.stage_dir(name), work.stage_dir, ignore=shutil.ignore_patterns("shard-*"))
        task = _first_shard(runner, name, base / "task")
        stage = runner._by_name[name]
        features, batch = stage.features(work.config), stage.batch_size
        if where == "here":
            with torch_threads(3):
                outcome = execute_shard(work.build(), task, features=features, batch_size=batch)
        else:
            payload = cloudpickle.dumps((work, task, features, batch))
            outcome = cloudpickle.loads(pool.submit(run_pickled, payload).result(timeout=240))
        assert outcome.error is None, outcome.error
        results[where] = outcome
    here, there = results["here"], results["there"]
    assert there.table().num_rows == here.table().num_rows > 0
    # the same rows; a model's floats (p_yes, CLIP scores) within the noise of another thread count
    assert_same_rows(there.table(), here.table())
    # the same counts, the same money (replies may be billed in another order: float sums to the last bit)
    assert there.usage.keys() == here.usage.keys() and there.usage == pytest.approx(here.usage, rel=1e-12)
    assert read_lines(there) == pytest.approx(read_lines(here), rel=1e-12)  # the journal, where the work ran


@contextlib.contextmanager
def torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_lines(outcome) -> float:
    from builder.outputs import read_journal

    journal = outcome.table_path.parent / "live.jsonl" if outcome.table_path else None
    return read_journal(journal) if journal and journal.exists() else {}
