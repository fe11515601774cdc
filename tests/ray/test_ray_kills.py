"""Kills under ``run.engine: ray``: a worker process killed mid-stage (Ray restarts it and re-runs its shards;
the stage completes, nothing lost, nothing committed twice) and a driver killed mid-run (the rerun keeps
every committed shard and computes only the rest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from ray_helpers import CONFIG, copy_until, counts, stage_tables, write_config

pytestmark = pytest.mark.timeout(600)
ONE_PER_SHARD = CONFIG.replace("filter: {shard_size: 2}", "filter: {shard_size: 1}")  # 8 filter shards


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def shard_files(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*.arrow")}


def test_a_worker_killed_mid_stage_loses_and_duplicates_nothing(ray_cluster, local_reference, tmp_path):
    from processors.pipeline import DRY_RUN_API_KEY, default_responders
    from processors.simulator.core import SimulatorOptions
    from processors.simulator.thread import SimulatorThread
    from processors.session import open_run

    _, local_dir = local_reference
    config = write_config(tmp_path, ONE_PER_SHARD)
    run_dir = copy_until(local_dir, tmp_path / "run", "match")
    errors: list[BaseException] = []
    # Slow answers, so the worker dies with its shards' requests on the wire.
    with SimulatorThread(SimulatorOptions(latency_ms=2000), responders=default_responders()) as sim:
        services = {"llm_base_url": sim.base_url, "llm_api_key": DRY_RUN_API_KEY}
        runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False, engine="ray")

        def run() -> None:
            try:
                runner.run({"filter"})
            except BaseException as exc:  # noqa: BLE001 - the assertion below shows it
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        folder = run_dir / "03_filter"
        # every shard of the last wave is on the wire (one request each): the victim holds some of them
        wait_for(lambda: sim.stats()["received"] >= 8 and runner.engine.worker_pids, "the last wave's requests")
        committed_at_kill = len(shard_files(folder))
        os.kill(runner.engine.worker_pids[0], signal.SIGKILL)
        thread.join(300)
        stats = sim.stats()
    assert not errors, errors
    assert committed_at_kill < 8  # it died mid-stage
    rows, fails = stage_tables(run_dir, "filter")
    want_rows, want_fails = stage_tables(local_dir, "filter")
    assert rows.equals(want_rows) and fails.equals(want_fails)  # nothing lost
    assert len(shard_files(folder)) == 8 and not list(folder.glob(".tmp*"))  # one copy of each shard
    got, want = counts(run_dir)["filter"], counts(local_dir)["filter"]
    assert (got["rows_in"], got["rows_out"], got["failures_by_reason"]) == \
        (want["rows_in"], want["rows_out"], want["failures_by_reason"])
    # The dead worker's shards were run again: their requests were sent a second time...
    assert stats["received"] > 8
    # ...and answered twice at most: the requests of the two shards it held, answered but never received.
    assert stats["duplicates"] <= 2
    assert got["requests"] >= want["requests"]  # what the dead attempt paid is still counted


def test_a_killed_driver_resumes_from_its_committed_shards(ray_cluster, local_reference, tmp_path):
    from ray_helpers import run_pipeline
    from same_rows import assert_same_rows

    _, local_dir = local_reference
    config = write_config(tmp_path, ONE_PER_SHARD)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "taskgalaxy", "run", str(config), "--dry-run", "--run-dir", str(run_dir),
               "--engine", "ray", "--ray-address", ray_cluster.address, "--no-progress"]
    driver = subprocess.Popen(command, cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_for(lambda: shard_files(run_dir / "03_filter") or driver.poll() is not None, "a filter shard", 240)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    assert driver.returncode == -signal.SIGKILL  # killed, not finished
    kept = {stage: shard_files(next(run_dir.glob(f"*_{stage}"))) for stage in ("images", "match", "filter")}
    assert kept["filter"]

    run_pipeline(config, run_dir, engine="ray")
    for stage, files in kept.items():
        now = shard_files(next(run_dir.glob(f"*_{stage}")))
        assert {name: now[name] for name in files} == files, stage  # not recomputed, not rewritten
    rows, _ = stage_tables(run_dir, "final")
    want, _ = stage_tables(local_dir, "final")
    assert_same_rows(rows, want)  # the local referee's p_yes, computed in another process: tests/same_rows.py
    assert all(c["done"] for c in counts(run_dir).values())
