"""The config.yaml a run writes is the config that ran: the demo, run again from its run folder's copy,
recomputes nothing (issue 20, item 7: the copy spelled out every default, and an endpoint's image_max_side
written out was no longer "unset", so the referee presets' image sizes stopped applying and score and final
were computed again)."""

from __future__ import annotations

import logging
from pathlib import Path

from taskgalaxy import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every state.json and shard of the run folder: when it was written, and what it holds."""
    files = [*run_dir.glob("*/state.json"), *run_dir.glob("*/shard-*.arrow")]
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_the_demo_run_again_from_its_written_config_recomputes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the run folder is runs/<run.name>-dry-run, in the current folder
    assert main(["run", str(DEMO), "--dry-run", "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "demo-dry-run"
    before = _files(run_dir)
    assert len([name for name in before if name.endswith("state.json")]) == 7
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="builder.runner"):
        assert main(["run", "runs/demo-dry-run/config.yaml", "--dry-run", "--no-progress"]) == 0
    done = [r.getMessage() for r in caplog.records if "already done under this config" in r.getMessage()]
    assert len(done) == 7, [r.getMessage() for r in caplog.records if r.name == "builder.runner"]
    assert _files(run_dir) == before, "a stage was written again"
