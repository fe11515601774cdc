"""The referees of 2026 (processors.referees.presets_modern): every preset resolves, its served name, image size
and request settings reach the endpoint, its `vllm serve` command is the one docs/referees.md shows, and
configs/modern_referees.yaml validates and scores offline under --dry-run (the simulator answers any name)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from builder.outputs import column_values, load_stage_output
from builder.status import stage_summaries
from processors.llm.settings import EndpointSettings
from processors.referees import PRESETS, RefereeItem, RefereeSettings
from processors.referees.endpoint import EndpointReferee
from processors.referees.presets_modern import MODERN_PRESETS, VLLM_SERVE, serve_args, serve_command
from processors.session import load_run_config
from taskgalaxy import main

ROOT = Path(__file__).resolve().parents[2]
MODERN = [spec["name"] for spec in MODERN_PRESETS]
CONFIG = ROOT / "configs" / "modern_referees.yaml"
DOCS = ROOT / "docs" / "referees.md"
PAPER = ("glm-4v-9b", "internvl-chat-v1.5", "internvl2-26b")

# Read from vllm-project/vllm, vllm/model_executor/models/registry.py (_MULTIMODAL_MODELS) and
# docs/models/supported_models.md: the architecture each family's checkpoints name in their config.json.
VLLM_ARCHITECTURES = {
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
    "internvl3": "InternVLChatModel",
    "glm-4.1v": "Glm4vForConditionalGeneration",
}
MOE = {"qwen3-vl-30b-a3b": "Qwen3VLMoeForConditionalGeneration",
       "qwen3-vl-235b-a22b": "Qwen3VLMoeForConditionalGeneration",
       "glm-4.5v": "Glm4vMoeForConditionalGeneration"}


def _family_architecture(name: str) -> str:
    if name in MOE:
        return MOE[name]
    return next(arch for prefix, arch in VLLM_ARCHITECTURES.items() if name.startswith(prefix))


def test_the_families_asked_for_are_all_there():
    for family in ("qwen2.5-vl-", "qwen3-vl-", "internvl3-", "internvl3.5-", "glm-4.1v-", "glm-4.5v"):
        assert any(name.startswith(family) for name in MODERN), family
    assert set(VLLM_SERVE) == set(MODERN) and not set(MODERN) & {"glm-4v-9b", "internvl2-26b", "qwen2-vl-2b"}


@pytest.mark.parametrize("name", MODERN)
def test_every_modern_preset_resolves_as_a_vllm_served_referee(name):
    preset = RefereeSettings(name="r", preset=name).resolved_preset()
    assert preset is PRESETS[name] or preset == PRESETS[name]
    assert preset.backend == "endpoint" and preset.served_model_name == name
    assert preset.max_side and 512 <= preset.max_side <= 1344
    assert preset.model_id.split("/")[0] in {"Qwen", "OpenGVLab", "zai-org"}
    serve = VLLM_SERVE[name]
    assert serve.architecture == _family_architecture(name)
    # only InternVL's architecture is the checkpoint's own code; none needs an architecture override
    assert preset.trust_remote_code == (serve.architecture == "InternVLChatModel")
    assert serve.hf_overrides is None
    assert serve.limit_mm_per_prompt == {"image": 1, "video": 0}
    assert not preset.system_prompt  # every chat template here brings its own default system turn


@pytest.mark.parametrize("name", MODERN)
def test_the_served_name_and_image_size_reach_the_endpoint_unless_it_sets_them(name):
    settings = RefereeSettings(name="r", preset=name, endpoint={"endpoint": "srv"})
    bare = EndpointSettings(base_url="http://gpu1:8011/v1", api_key_env=None)
    preset = PRESETS[name]
    assert settings.endpoint_overrides(bare) == {"model": name, "image_max_side": preset.max_side}
    explicit = EndpointSettings(base_url="http://gpu1:8011/v1", api_key_env=None, model="mine", image_max_side=700)
    assert settings.endpoint_overrides(explicit) == {}
    assert RefereeSettings(name="r", preset=name, max_side=640).endpoint_overrides(explicit) == {"image_max_side": 640}


def _request_body(name: str, **endpoint) -> dict:
    referee = EndpointReferee(RefereeSettings(name="r", preset=name, endpoint=endpoint), client=object())
    item = RefereeItem(qa_id="q1", image_path="/nowhere.png", task_type="OCR", question="What is written?")
    return referee._request(item, "structured_outputs").extra_body


def test_processor_settings_stay_on_the_server_and_the_thinking_switch_goes_with_each_request():
    qwen3 = PRESETS["qwen3-vl-8b"].mm_processor_kwargs
    assert qwen3 == {"size": {"shortest_edge": 256 * 256, "longest_edge": 1024 * 1024}}
    assert PRESETS["qwen2.5-vl-7b"].mm_processor_kwargs == {"min_pixels": 3136, "max_pixels": 1280 * 28 * 28}
    assert PRESETS["internvl3.5-8b"].mm_processor_kwargs == {"max_dynamic_patch": 6}
    body = _request_body("qwen3-vl-8b")
    assert "mm_processor_kwargs" not in body and "chat_template_kwargs" not in body
    assert _request_body("qwen3-vl-8b", request_mm_processor_kwargs=True)["mm_processor_kwargs"] == qwen3
    assert _request_body("glm-4.5v")["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["structured_outputs"] == {"choice": ["0", "1"]}


def test_the_image_size_the_client_sends_is_never_shrunk_again_by_the_server():
    for name in MODERN:
        preset, side = PRESETS[name], PRESETS[name].max_side
        kwargs = preset.mm_processor_kwargs
        if "max_pixels" in kwargs:
            assert side * side <= kwargs["max_pixels"]
        if "size" in kwargs:
            assert side * side <= kwargs["size"]["longest_edge"]


def test_fingerprints_see_the_thinking_switch_and_leave_the_paper_referees_alone():
    glm = RefereeSettings(name="g", preset="glm-4.5v").fingerprint_parts()
    assert glm["chat_template_kwargs"] == {"enable_thinking": False}
    assert RefereeSettings(name="q", preset="qwen3-vl-8b").fingerprint_parts()["mm_processor_kwargs"]["size"]
    for name in PAPER:
        assert "chat_template_kwargs" not in RefereeSettings(name="p", preset=name).fingerprint_parts()


@pytest.mark.parametrize("name", MODERN)
def test_the_serve_command_carries_what_the_preset_needs_and_is_in_the_docs(name):
    preset, args = PRESETS[name], serve_args(name, 8000)
    assert args[:3] == ["vllm", "serve", preset.model_id]
    assert args[args.index("--served-model-name") + 1] == preset.served_model_name
    assert ("--trust-remote-code" in args) == preset.trust_remote_code
    assert "--reasoning-parser" not in args  # the one-token vote would be filed as reasoning
    if preset.mm_processor_kwargs:
        assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == preset.mm_processor_kwargs
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert shlex.split(serve_command(name, 8000)) == args
    assert serve_command(name, 8000) in DOCS.read_text(encoding="utf-8")


def test_the_modern_config_validates_with_three_cascaded_referees_cheapest_first():
    config = load_run_config(CONFIG)
    score = config.stages.score
    assert score.cascade is True
    assert [r.preset for r in score.referees] == ["qwen3-vl-8b", "internvl3.5-8b", "glm-4.5v"]
    assert config.stages.final.threshold == 2
    for referee in score.referees:
        endpoint = config.llm.endpoints[referee.endpoint.endpoint]
        # no model and no image size on the endpoint: the preset's served name and size are sent
        assert referee.endpoint_overrides(endpoint) == {
            "model": referee.preset, "image_max_side": PRESETS[referee.preset].max_side}
    # the dearest (four GPUs) is last, so the cascade asks it only where the first two disagree
    gpus = [VLLM_SERVE[r.preset].tensor_parallel_size for r in score.referees]
    assert gpus == sorted(gpus) and gpus[-1] > 1


def test_the_modern_config_scores_offline_under_dry_run(tmp_path):
    modern = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    config["stages"]["images"]["sources"] = [{"type": "synthetic", "count": 6, "seed": 3}]
    config["stages"]["taxonomy"].update(levels=2, new_first_level_per_round=4)
    config["stages"]["score"] = modern["stages"]["score"]
    config["stages"]["final"] = modern["stages"]["final"]
    config["llm"]["endpoints"].update(
        {name: modern["llm"]["endpoints"][name] for name in ("qwen3vl8b", "internvl35_8b", "glm45v")})
    path = tmp_path / "modern.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--dry-run", "--run-dir", str(run_dir), "--no-progress",
                 "--stages", "taxonomy,images,match,filter,qa,score,final"]) == 0
    score = next(s for s in stage_summaries(run_dir) if s["stage"] == "score")
    questions = score["rows_out"]
    assert questions > 0 and score["done"]
    # the two first referees always vote; the third only where they left the outcome open
    assert 2 * questions <= score["requests"] <= 3 * questions
    votes = column_values(load_stage_output(run_dir, "score"), "votes")
    assert all(v["qwen3_vl_8b"] in (0, 1) and v["internvl35_8b"] in (0, 1) for v in votes)
    not_asked = column_values(load_stage_output(run_dir, "score"), "not_asked")
    assert all(v["glm45v"] is None for v, skipped in zip(votes, not_asked) if skipped == ["glm45v"])
