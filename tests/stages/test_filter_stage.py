"""The filter stage through the runner against the simulator: kept labels, invented ones, None, bad replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from builder.config import build_config_model, validate_config
from builder.outputs import load_stage_failures, load_stage_output
from builder.runner import Runner
from processors.filter.prompt import MARKER
from processors.llm.settings import LLMSettings
from processors.simulator.responders import Responder, message_text
from processors.simulator.thread import SimulatorThread
from processors.stages.filter import FilterStage
from toy_stages import CANDIDATES, ToyImages, ToyMatch

# What the scripted model answers, by image colour index: kept subsets, an invented label, none, garbage.
REPLIES = [
    json.dumps({"task_types": ["Counting~Animals", "Art~Style"]}),
    "[OCR~Scene text~Street signs, Charts, tables~Reading values]",
    json.dumps({"task_types": ["Counting~Animals", "Cooking~Recipes"]}),
    "None",
    "I cannot help with that.",
]


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(len(REPLIES)):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(folder / f"pic{i}.png")
    return folder


def test_filter_keeps_real_candidates_and_accounts_for_the_rest(tmp_path, pictures):
    # Each image gets the next scripted reply the first time it is seen, and the same one when asked again.
    order = iter(range(len(REPLIES)))
    replies_by_image: dict[str, str] = {}

    def respond(messages, rng):
        image = json.dumps(messages[1]["content"][0], sort_keys=True)  # the image part identifies the image
        if image not in replies_by_image:
            replies_by_image[image] = REPLIES[next(order)]
        return replies_by_image[image]

    scripted = Responder("scripted-filter", lambda m: MARKER in message_text(m), respond)
    stages = [ToyImages(), ToyMatch(), FilterStage()]
    config = validate_config({
        "run": {"name": "f", "shard_size": 10},
        "llm": {"endpoints": {"gpt4o": {"max_retries": 1, "backoff_initial_s": 0.01}}},
        "stages": {"images": {"folder": str(pictures)}, "filter": {"use_json_schema": False}},
    }, build_config_model(stages, {"llm": LLMSettings}), base_dir=tmp_path)
    with SimulatorThread(responders=[scripted]) as sim:
        state = Runner(stages, config, tmp_path / "run", dry_run=True, progress=False,
                       services={"llm_base_url": sim.base_url, "llm_api_key": "sk-test"}).run()["filter"]
        received = sim.stats()["received"]
    kept = load_stage_output(tmp_path / "run", "filter")
    failures = load_stage_failures(tmp_path / "run", "filter")
    by_image = {row["image_id"]: row["task_types"] for row in kept}
    assert sorted(map(tuple, by_image.values())) == sorted([
        ("Counting~Animals", "Art~Style"),
        ("OCR~Scene text~Street signs", "Charts, tables~Reading values"),  # comma inside an unquoted label
        ("Counting~Animals",),
    ])
    reasons = {(r["reason"], r["item"]) for r in failures}
    assert ("label_not_in_candidates", "Cooking~Recipes") in reasons
    assert ("no_match", None) in reasons and ("unparsable", None) in reasons
    unparsable = [r for r in failures if r["reason"] == "unparsable"][0]
    assert "I cannot help with that." in unparsable["detail"]  # the raw reply is kept for inspection
    assert state["totals"]["failed"] == {"no_match": 1, "unparsable": 1}
    assert received == len(REPLIES) + 1  # one retry for the unparsable reply, nothing else paid twice
