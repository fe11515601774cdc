"""``stages.filter.fuse_qa``: one request per image keeps candidates and writes their QA; the filter's output
is written from it (plus ``fused_qa``), the qa stage sends nothing and validates those items as its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from builder.config import build_config_model, validate_config
from builder.fingerprints import stage_fingerprints
from builder.outputs import load_stage_failures, load_stage_output
from builder.runner import Runner
from processors.filter.fused import FUSED_MARKER, parse_fused
from processors.llm.settings import LLMSettings
from processors.pipeline import default_responders
from processors.simulator.responders import Responder, message_text
from processors.simulator.thread import SimulatorThread
from processors.stages.filter import FilterStage
from processors.stages.final import FinalStage
from processors.stages.qa import QAStage
from processors.stages.score import ScoreStage
from toy_stages import CANDIDATES, ToyImages, ToyMatch

REFEREES = [{"name": "ref_a", "preset": "internvl-chat-v1.5", "endpoint": {"endpoint": "gpt4o"}},
            {"name": "ref_b", "preset": "internvl2-26b", "endpoint": {"endpoint": "gpt4o"}}]


def _pictures(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (40, 30), (20 * i, 90, 200)).save(folder / f"pic{i}.png")
    return folder


def _config(tmp_path, pictures, stages, *, fused: bool, **filter_extra):
    stage_configs = {"images": {"folder": str(pictures)}, "filter": {"fuse_qa": fused, **filter_extra},
                     "score": {"referees": REFEREES}, "final": {"threshold": 1}}
    return validate_config({
        "run": {"name": "fused", "shard_size": 50},
        "llm": {"endpoints": {"gpt4o": {"max_retries": 1, "backoff_initial_s": 0.01}}},
        "stages": {k: v for k, v in stage_configs.items() if k in {s.name for s in stages}},
    }, build_config_model(stages, {"llm": LLMSettings}), base_dir=tmp_path)


def _run(stages, config, run_dir, responders):
    with SimulatorThread(responders=responders) as sim:
        states = Runner(stages, config, run_dir, dry_run=True, progress=False,
                        services={"llm_base_url": sim.base_url, "llm_api_key": "sk-test"}).run()
        return states, sim.stats()


def test_a_fused_dry_run_sends_one_request_per_image_and_downstream_stages_accept_it(tmp_path):
    pictures = _pictures(tmp_path / "pictures", 12)
    stages = [ToyImages(), ToyMatch(), FilterStage(), QAStage(), ScoreStage(), FinalStage()]
    config = _config(tmp_path, pictures, stages, fused=True)
    states, stats = _run(stages[:4], config, tmp_path / "run", default_responders())
    assert stats["received"] == 12 and stats["duplicates"] == 0  # one request per image, filter and QA at once
    assert states["filter"]["totals"]["usage"]["requests"] == 12
    assert states["qa"]["totals"]["usage"].get("requests", 0) == 0  # usage counted once, in filter
    filter_rows = load_stage_output(tmp_path / "run", "filter")
    qa_rows = load_stage_output(tmp_path / "run", "qa")
    assert "fused_qa" in filter_rows.column_names and len(qa_rows) > 0
    assert qa_rows.features == QAStage().features(config.stages.qa)
    kept = {row["image_id"]: set(row["task_types"]) for row in filter_rows}
    assert all(row["task_type"] in kept[row["image_id"]] for row in qa_rows)
    assert {row["model"] for row in qa_rows} == {"simulator:gpt-4o-2024-08-06"}
    # every kept image's QA slot ends as a row or a failure with the QA step's usual reasons
    for name in ("filter", "qa"):
        state = states[name]["totals"]
        assert state["rows_in"] == state["inputs_with_output"] + sum(state["failed"].values()), name
    # and the score and final stages read the fused run's QA rows as they read any other
    states, _ = _run(stages, config, tmp_path / "run", default_responders())
    assert states["score"]["totals"]["rows_in"] == len(qa_rows)
    assert states["final"]["totals"]["rows_in"] == len(qa_rows)


FUSED_REPLY = {
    "task_types": ["Counting~Animals", "Art~Style", "Cooking~Recipes"],
    "qa": [
        {"task_type": "Counting~Animals", "question": "How many animals stand near the fence?", "answer": "Three."},
        {"task_type": "Art~Style", "question": "Which painting style does the image imitate?", "answer": "  "},
        {"task_type": "Cooking~Recipes", "question": "Which recipe does the plate show here?", "answer": "Soup."},
    ],
}


def test_a_fused_reply_fails_rows_with_the_usual_reasons(tmp_path):
    pictures = _pictures(tmp_path / "pictures", 2)
    scripted = Responder("scripted-fused", lambda m: FUSED_MARKER in message_text(m),
                         lambda m, rng: json.dumps(FUSED_REPLY))
    stages = [ToyImages(), ToyMatch(), FilterStage(), QAStage()]
    _run(stages, _config(tmp_path, pictures, stages, fused=True), tmp_path / "run", [scripted])
    filter_failures = {(r["reason"], r["item"]) for r in load_stage_failures(tmp_path / "run", "filter")}
    assert filter_failures == {("label_not_in_candidates", "Cooking~Recipes")}
    qa_rows = load_stage_output(tmp_path / "run", "qa")
    assert sorted(qa_rows["task_type"]) == ["Counting~Animals"] * 2
    reasons = sorted(r["reason"] for r in load_stage_failures(tmp_path / "run", "qa"))
    # the empty answer and the item for a type the filter refused: nothing dropped silently
    assert reasons == ["empty_answer", "empty_answer", "label_not_in_types", "label_not_in_types"]


def test_parse_fused_reads_labels_and_items_and_asks_again_without_items():
    assert parse_fused(json.dumps(FUSED_REPLY))["qa"] == FUSED_REPLY["qa"]
    assert parse_fused("None") == {"task_types": [], "qa": []}
    with pytest.raises(ValueError):
        parse_fused("[Counting~Animals]")  # labels but no QA list: retried, then unparsable


def test_fusing_changes_the_filter_and_qa_fingerprints_and_the_default_changes_nothing(tmp_path):
    pictures = _pictures(tmp_path / "pictures", 1)
    stages = [ToyImages(), ToyMatch(), FilterStage(), QAStage()]
    plain = stage_fingerprints(stages, _config(tmp_path, pictures, stages, fused=False), dry_run=True)
    fused = stage_fingerprints(stages, _config(tmp_path, pictures, stages, fused=True), dry_run=True)
    assert plain["match"] == fused["match"]
    assert plain["filter"] != fused["filter"] and plain["qa"] != fused["qa"]
    default = validate_config({"run": {"name": "fused"}, "stages": {"images": {"folder": str(pictures)}}},
                              build_config_model(stages, {"llm": LLMSettings}), base_dir=tmp_path)
    assert stage_fingerprints(stages, default, dry_run=True) == plain
    assert "fuse_qa" not in default.stages.filter.model_dump() and "prompt_layout" not in default.stages.qa.model_dump()


ESTIMATE_CONFIG = """
run: {name: est}
llm: {endpoints: {gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}}}
stages:
  images: {sources: [{type: synthetic, count: 4, seed: 3}]}
  filter: {fuse_qa: %s}
  score: {referees: [{name: ref_a, preset: internvl-chat-v1.5, endpoint: {endpoint: gpt4o}}]}
  final: {threshold: 1}
"""


def test_estimate_counts_one_fused_request_per_image_and_no_qa_requests(tmp_path, capsys):
    from taskgalaxy import main

    rows = {}
    for fused in ("false", "true"):
        config = tmp_path / f"{fused}.yaml"
        config.write_text(ESTIMATE_CONFIG % fused)
        capsys.readouterr()
        assert main(["estimate", str(config), "--images", "1000"]) == 0
        rows[fused] = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["true"]["filter"][1] == "1,000" and rows["true"]["qa"][1:] == ["0", "0", "0", "0.00"]
    assert rows["false"]["qa"][1] != "0"
    completion = lambda r, stage: int(r[stage][3].replace(",", ""))  # noqa: E731
    assert completion(rows["true"], "filter") > completion(rows["false"], "filter")  # the QA is written there


def test_a_cache_friendly_dry_run_answers_filter_and_qa_as_before(tmp_path):
    pictures = _pictures(tmp_path / "pictures", 6)
    stages = [ToyImages(), ToyMatch(), FilterStage(), QAStage()]
    config = _config(tmp_path, pictures, stages, fused=False, prompt_layout="cache_friendly")
    config = config.model_copy(update={"stages": config.stages.model_copy(update={
        "qa": config.stages.qa.model_copy(update={"prompt_layout": "cache_friendly"})})})
    states, stats = _run(stages, config, tmp_path / "run", default_responders())
    assert states["filter"]["totals"]["usage"]["requests"] == 6 and states["qa"]["totals"]["usage"]["requests"] > 0
    qa_rows = load_stage_output(tmp_path / "run", "qa")
    assert len(qa_rows) > 0 and set(qa_rows["prompt_version"]) <= {"qa-v1+cache-friendly-v1",
                                                                   "qa-v1+cache-friendly-v1+qa-repair-v1"}


def test_fusing_with_another_qa_endpoint_is_a_config_error():
    from types import SimpleNamespace

    from builder.config import ConfigError
    from processors.pipeline import check_consistency
    from processors.qa.config import QAConfig
    from processors.stages.filter import FilterConfig

    def config(qa_endpoint):
        return SimpleNamespace(stages=SimpleNamespace(filter=FilterConfig(fuse_qa=True),
                                                      qa=QAConfig(endpoint=qa_endpoint)))

    check_consistency(config("gpt4o"))
    with pytest.raises(ConfigError, match="fuse_qa"):
        check_consistency(config("other"))
