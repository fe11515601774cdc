"""The qa stage through the runner, from toy ``images``/``filter`` outputs to QA rows, against the simulator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image, ImageDraw
from pydantic import Field

from processors.llm.client import EndpointCall
from builder.config import ConfigError, build_config_model, validate_config
from builder.ids import bytes_id, text_id
from builder.outputs import load_stage_failures, load_stage_output
from builder.runner import Runner, StageError
from builder.stage import Stage, StageConfig
from processors.llm.settings import LLMSettings
from processors.pipeline import default_responders
from processors.qa import simulate
from processors.qa.prompt import PROMPT_VERSION, REPAIR_MARKER
from processors.simulator.core import SimulatorOptions
from processors.simulator.responders import Responder, message_text
from processors.simulator.thread import SimulatorThread
from processors.stages.qa import QAStage
from toy_stages import ToyImages, copy_rows

TYPE_SETS = [
    ["OCR~Scene text~Street sign reading", "Counting~Animals", "Spatial reasoning~Relative position",
     "Colour~Dominant colour"],
    ["Counting~Animals", "Scenes~Weather"],
    ["Objects~Vehicles~Car colour", "OCR~Menus~Prices", "Scenes~Indoor~Room type"],
]
UNKNOWN_IMAGE = "f" * 32


class ToyFilterConfig(StageConfig):
    folder: str = ""
    type_sets: list[list[str]] = Field(default_factory=lambda: [list(t) for t in TYPE_SETS])
    unknown_image: bool = False  # one more row, for an image the images stage does not have


class ToyFilter(Stage):
    """Rows shaped like the filter stage's: each picture with one of ``type_sets``, in turn."""

    name, Config, key = "filter", ToyFilterConfig, "image_id"

    def input_key(self, config):
        return "image_id"

    def source_rows(self, config, ctx):
        files = sorted(Path(config.folder).iterdir())
        rows = [{"image_id": bytes_id(f.read_bytes()), "task_types": config.type_sets[i % len(config.type_sets)]}
                for i, f in enumerate(files)]
        if config.unknown_image:
            rows.append({"image_id": UNKNOWN_IMAGE, "task_types": TYPE_SETS[1]})
        return datasets.Dataset.from_list(rows, features=self.features(config))

    def features(self, config):
        return datasets.Features({"image_id": datasets.Value("string"),
                                  "task_types": datasets.List(datasets.Value("string"))})

    def make_batch_fn(self, config, ctx):
        return copy_rows(("image_id", "task_types"), "image_id")


STAGES = [ToyImages(), ToyFilter(), QAStage()]


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(7):
        image = Image.new("RGB", (64, 48), (30 * i, 200 - 25 * i, 120))
        ImageDraw.Draw(image).ellipse([4 * i, 6, 4 * i + 24, 40], fill=(250, 240, 10))
        image.save(folder / f"pic{i}.png")
    return folder


@pytest.fixture
def simulator():
    """``simulator(respond=None)``: the simulator, answering QA prompts with ``respond`` when given (else with
    the pipeline's responders)."""
    started = []

    def start(respond=None):
        responders = default_responders() if respond is None else [Responder("qa-test", simulate.matches, respond)]
        started.append(SimulatorThread(SimulatorOptions(), responders=responders).start())
        return started[-1]

    yield start
    for sim in started:
        sim.close()


def run(run_dir: Path, sim, pictures: Path, *, qa=None, shard_size=4, unknown_image=False):
    model = build_config_model(STAGES, {"llm": LLMSettings})
    endpoint = {"api_key_env": None, "backoff_initial_s": 0.01, "max_retries": 1, "timeout_s": 10}
    config = validate_config({
        "run": {"name": "t", "shard_size": shard_size},
        "stages": {"images": {"folder": str(pictures)},
                   "filter": {"folder": str(pictures), "unknown_image": unknown_image}, "qa": qa or {}},
        "llm": {"endpoints": {"gpt4o": endpoint}},
    }, model, base_dir=run_dir)
    services = {"llm_base_url": sim.base_url, "llm_api_key": "sk-test"}
    return Runner(STAGES, config, run_dir, dry_run=True, services=services, progress=False).run()


def clean_reply(messages, rng) -> str:
    types, per_type = simulate.prompt_types(message_text(messages))
    return json.dumps({"qa": simulate.make_items(types, per_type, rng)})


def test_filter_to_qa_end_to_end_with_the_simulator(tmp_path, pictures, simulator):
    sim = simulator()
    states = run(tmp_path / "run", sim, pictures, unknown_image=True)
    totals = states["qa"]["totals"]
    output = load_stage_output(tmp_path / "run", "qa")
    failures = load_stage_failures(tmp_path / "run", "qa")
    assert totals["rows_in"] == 8 and totals["rows_out"] == len(output) > 10
    assert totals["failed"].get("image_missing") == 1 and totals["usage"]["prompt_tokens"] > 0
    kept = {row["image_id"]: row["task_types"] for row in load_stage_output(tmp_path / "run", "filter")}
    for row in output:
        assert row["task_type"] in kept[row["image_id"]]
        assert row["qa_id"] == text_id(row["image_id"], row["task_type"], row["question"])
        assert row["model"] == "simulator:gpt-4o-2024-08-06" and row["prompt_version"].startswith("qa-v")
        assert row["answer"].strip() and not row["question"].startswith("Question:")
    assert len(set(output["qa_id"])) == len(output)
    row_failed = Counter(f["key"] for f in failures if f["item"] is None)
    assert set(output["image_id"]) | set(row_failed) == set(kept) and max(row_failed.values()) == 1

    received = sim.stats()["received"]
    again = run(tmp_path / "run", sim, pictures, unknown_image=True)  # finished: nothing is asked again
    assert again["qa"]["totals"] == totals and sim.stats()["received"] == received


def test_partial_validity_and_a_label_not_in_the_images_types(tmp_path, pictures, simulator):
    def respond(messages, rng):
        types, _ = simulate.prompt_types(message_text(messages))
        items = simulate.make_items(types, 1, rng)
        items[0]["task_type"] = items[0]["task_type"].replace("~", " ∼ ").lower()  # valid after normalisation
        items[-1]["task_type"] = "Invented skills~Telepathy"
        return "```json\n" + json.dumps(items, indent=2) + "\n```"

    states = run(tmp_path / "run", simulator(respond), pictures)
    totals = states["qa"]["totals"]
    asked = sum(len(TYPE_SETS[i % 3]) for i in range(7))
    assert totals["rows_out"] == asked - 7 and totals["failed"] == {}
    assert totals["item_failures"] == {"label_not_in_types": 7}
    failure = load_stage_failures(tmp_path / "run", "qa")[0]
    assert failure["item"].startswith("Invented skills~Telepathy | ") and "none of the image's" in failure["detail"]
    four_types = [r for r in load_stage_output(tmp_path / "run", "qa") if r["task_type"] == TYPE_SETS[0][0]]
    assert four_types  # the lower-cased, odd-tilde label became the kept spelling


@pytest.mark.parametrize("repair_answers", [True, False])
def test_an_unparsable_reply_gets_exactly_one_repair_request(tmp_path, pictures, simulator, repair_answers):
    def respond(messages, rng):
        if REPAIR_MARKER in str(messages[-1]["content"]) and repair_answers:
            return clean_reply(messages, rng)
        return "I would ask about the sign and the dogs, but I cannot format that."

    sim = simulator(respond)
    states = run(tmp_path / "run", sim, pictures)
    totals = states["qa"]["totals"]
    # Per image: the first turn and its one retry (max_retries=1), then one repair request (and its retry).
    assert sim.stats()["received"] == 7 * 2 + 7 * (1 if repair_answers else 2)
    assert totals["usage"]["repair_requests"] == 7
    if repair_answers:
        assert totals["failed"] == {} and totals["rows_out"] == sum(len(TYPE_SETS[i % 3]) for i in range(7))
        assert set(load_stage_output(tmp_path / "run", "qa")["prompt_version"]) == {f"{PROMPT_VERSION}+qa-repair-v1"}
    else:
        assert totals["failed"] == {"unparsable": 7} and totals["rows_out"] == 0
        assert "after one repair request" in load_stage_failures(tmp_path / "run", "qa")[0]["detail"]


def test_resume_in_the_middle_of_a_shard_pays_no_request_twice(tmp_path, pictures, simulator, monkeypatch):
    sim = simulator(clean_reply)
    real = EndpointCall.send

    def crash_halfway(call, requests):
        real(call, requests[:3])  # three answers reach the request cache, then the process "dies"
        raise RuntimeError("simulated crash in the middle of the shard")

    monkeypatch.setattr(EndpointCall, "send", crash_halfway)
    with pytest.raises(StageError, match="simulated crash"):
        run(tmp_path / "run", sim, pictures, shard_size=100)
    assert sim.stats()["received"] == 3
    monkeypatch.setattr(EndpointCall, "send", real)
    states = run(tmp_path / "run", sim, pictures, shard_size=100)
    stats = sim.stats()
    assert stats["received"] == 7 and stats["duplicates"] == 0 and set(stats["ok_per_key"].values()) == {1}
    usage = states["qa"]["totals"]["usage"]
    assert (usage["cache_hits"], usage["requests"]) == (3, 7)  # 3 paid by the crashed attempt + 4 after
    assert states["qa"]["totals"]["rows_out"] == sum(len(TYPE_SETS[i % 3]) for i in range(7))


def test_config_errors_name_the_key(tmp_path, pictures, simulator):
    sim = simulator(clean_reply)
    with pytest.raises(ConfigError, match="stages.qa.questions_per_typ"):
        run(tmp_path / "run", sim, pictures, qa={"questions_per_typ": 2})
    with pytest.raises(ConfigError, match="min_answer_chars"):
        run(tmp_path / "run", sim, pictures, qa={"min_answer_chars": 50, "max_answer_chars": 10})
    with pytest.raises(ValueError, match="stages.qa.endpoint"):
        run(tmp_path / "run", sim, pictures, qa={"endpoint": "nope"})
    assert sim.stats()["received"] == 0
