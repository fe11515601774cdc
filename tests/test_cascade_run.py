"""The referee cascade through the command line, on the simulator: the same samples as the full vote for fewer
referee requests, and a cascaded score stage stopped mid-way (by a spend cap) and resumed pays no vote twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from builder.outputs import column_values, load_stage_output
from builder.status import stage_summaries
from taskgalaxy import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
REFEREES = [
    {"name": "cheap", "preset": "internvl-chat-v1.5", "endpoint": {"endpoint": "referee_a"}},
    {"name": "middle", "preset": "glm-4v-9b", "endpoint": {"endpoint": "referee_b"}},
    {"name": "dear", "preset": "internvl2-26b", "endpoint": {"endpoint": "referee_b"}},
]


def _config(tmp_path: Path, name: str, *, cascade: bool, **llm) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    config["stages"]["images"]["sources"] = [{"type": "synthetic", "count": 24, "seed": 5}]
    config["stages"]["taxonomy"].update(levels=2, new_first_level_per_round=4)
    config["stages"]["score"] = {"referees": REFEREES, "cascade": cascade}
    # Referee servers priced like a paid API, so a stage cap can stop the score stage mid-way.
    config["llm"]["prices"] = {model: {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
                               for model in ("internvl-chat-v1.5", "glm-4v-9b", "internvl2-26b", "gpt-4o-2024-08-06")}
    config["llm"].update(llm)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, run_dir: Path, stages: str) -> int:
    return main(["run", str(config), "--dry-run", "--run-dir", str(run_dir), "--stages", stages, "--no-progress"])


def _stage(run_dir: Path, name: str) -> dict:
    return next(s for s in stage_summaries(run_dir) if s["stage"] == name)


def _column(run_dir: Path, stage: str, name: str) -> list:
    return column_values(load_stage_output(run_dir, stage), name)


def _kept(run_dir: Path) -> set[str]:
    return set(_column(run_dir, "final", "qa_id"))


@pytest.fixture(scope="module")
def up_to_qa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cascade")
    assert _run(_config(root, "full", cascade=False), root / "base", "taxonomy,images,match,filter,qa") == 0
    return root


def _copy(root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(root / "base", target)
    return target


def test_the_cascade_keeps_the_same_samples_for_fewer_referee_requests(up_to_qa):
    full, cascade = _copy(up_to_qa, "full"), _copy(up_to_qa, "cascaded")
    assert _run(_config(up_to_qa, "full", cascade=False), full, "score,final") == 0
    assert _run(_config(up_to_qa, "cascade", cascade=True), cascade, "score,final") == 0
    assert _kept(full) and _kept(cascade) == _kept(full)
    questions = _stage(full, "score")["rows_out"]
    asked_full, asked_cascade = _stage(full, "score")["requests"], _stage(cascade, "score")["requests"]
    assert asked_full == 3 * questions
    # the first two referees are always asked; the third only where they disagree
    assert 2 * questions <= asked_cascade < asked_full
    not_asked = _column(cascade, "score", "not_asked")
    votes = _column(cascade, "score", "votes")
    assert all(v["dear"] is None for v, skipped in zip(votes, not_asked) if skipped == ["dear"])
    assert sum(1 for skipped in not_asked if not skipped) == asked_cascade - 2 * questions
    # the quality report says the kappas are over the questions each pair was asked
    stats = json.loads(next(cascade.glob("*_final/stats.json")).read_text())
    assert "cascade" in stats["agreement"]["note"] and stats["agreement"]["overall"]["pair_rows"]["cheap|middle"] == questions


def test_a_cascaded_score_stopped_mid_way_and_resumed_asks_no_referee_twice(up_to_qa, capsys):
    clean, stopped = _copy(up_to_qa, "clean"), _copy(up_to_qa, "stopped")
    assert _run(_config(up_to_qa, "cascade", cascade=True), clean, "score,final") == 0
    paid = _stage(clean, "score")
    cap = round(paid["cost_usd"] / 3, 6)
    capped = _config(up_to_qa, "capped", cascade=True, stage_max_cost_usd={"score": cap})
    assert _run(capped, stopped, "score,final") == 3
    assert "llm.stage_max_cost_usd.score" in capsys.readouterr().err
    first = _stage(stopped, "score")
    assert not first["done"] and 0 < first["requests"] < paid["requests"]
    assert _run(_config(up_to_qa, "cascade", cascade=True), stopped, "score,final") == 0
    resumed = _stage(stopped, "score")
    # every vote paid once over both runs: as many requests as the uninterrupted cascade
    assert resumed["done"] and resumed["requests"] == paid["requests"]
    assert resumed["cost_usd"] == pytest.approx(paid["cost_usd"], rel=1e-6, abs=1e-9)
    assert _kept(stopped) == _kept(clean)
