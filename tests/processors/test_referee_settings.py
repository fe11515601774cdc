"""Referee settings, presets, prompt, digit reading and batching — no model needed (except the tokenizer)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from processors.referees import (
    PRESETS, PROMPT_VERSION, RefereeItem, RefereeSettings, Vote, build_messages, build_referee,
)
from processors.referees.local import LocalReferee, pack_groups


def test_settings_reject_unknown_keys_and_presets():
    with pytest.raises(ValidationError, match="extra"):
        RefereeSettings(name="a", preset="tiny-random-llava", batchsize=3)
    with pytest.raises(ValidationError, match="unknown referee preset 'nope'"):
        RefereeSettings(name="a", preset="nope")
    with pytest.raises(ValidationError, match="preset or a model_id"):
        RefereeSettings(name="a")


def test_paper_referees_are_endpoint_presets():
    for name in ("glm-4v-9b", "internvl-chat-v1.5", "internvl2-26b"):
        assert PRESETS[name].backend == "endpoint" and PRESETS[name].served_model_name
    assert PRESETS["internvl2-26b"].mm_processor_kwargs["max_dynamic_patch"] >= 1
    assert PRESETS["glm-4v-9b"].model_id == "THUDM/glm-4v-9b"


def test_explicit_settings_override_the_preset_and_enter_the_fingerprint():
    settings = RefereeSettings(name="q", preset="qwen2-vl-2b", max_side=512, see_answer=True)
    assert settings.resolved_preset().max_side == 512
    parts = settings.fingerprint_parts()
    assert parts["prompt_version"] == PROMPT_VERSION and parts["see_answer"] is True
    assert parts["model_id"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert settings.fingerprint_parts() != RefereeSettings(name="q", preset="qwen2-vl-2b").fingerprint_parts()
    bare = RefereeSettings(name="mine", model_id="org/some-vlm")
    assert bare.resolved_preset().backend == "local"


def test_prompt_orders_instruction_image_question_and_hides_the_answer():
    content = build_messages("OCR", "What is written?")[0]["content"]
    assert [part["type"] for part in content] == ["text", "image", "text"]
    assert "What is written?" in content[2]["text"] and "answer" not in content[2]["text"].lower().split("reply")[0]
    with_answer = build_messages("OCR", "What is written?", "STOP")[0]["content"]
    assert "STOP" in with_answer[2]["text"]
    url_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    assert build_messages("OCR", "q", image_part=url_part)[0]["content"][1] is url_part


def test_an_endpoint_referee_needs_the_stage_client_and_gets_it():
    from processors.referees.endpoint import EndpointReferee

    settings = RefereeSettings(name="glm", preset="glm-4v-9b")
    with pytest.raises(ValueError, match="LLMClient"):
        build_referee(settings)
    client = object()  # the score stage's LLMClient; nothing is resolved before the first plan
    referee = build_referee(settings, client)
    assert type(referee) is EndpointReferee and referee.client is client


def test_every_kind_is_in_the_registry_and_says_where_it_runs():
    import pydantic

    from processors.referees.blind import BlindReferee
    from processors.referees.factory import kind_of, llm_endpoints, runs_on_device

    with pytest.raises(pydantic.ValidationError, match="no referee kind; the kinds are local, endpoint"):
        RefereeSettings(name="t", model_id="m", backend="blind")  # blind is a flag, not a backend
    local = RefereeSettings(name="t", preset="tiny-random-llava")
    remote = RefereeSettings(name="iv", preset="internvl2-26b", endpoint={"endpoints": ["a", "b"]})
    blind = RefereeSettings(name="b", preset="internvl2-26b", blind=True, see_answer=True)
    assert [kind_of(s) for s in (local, remote, blind)] == ["local", "endpoint", "blind"]
    assert runs_on_device(local) and not runs_on_device(remote) and not runs_on_device(blind)
    assert llm_endpoints(local) == [] and llm_endpoints(remote) == ["a", "b"] and llm_endpoints(blind) == ["b"]
    assert type(build_referee(blind, object())) is BlindReferee


def test_the_referee_modules_import_each_other_without_a_cycle():
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "processors" / "referees"
    imports = {}  # module -> the referee modules it imports at module level (not under TYPE_CHECKING)
    for path in folder.glob("*.py"):
        body = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ImportFrom)]
        imports[path.stem] = {node.module.rsplit(".", 1)[-1] for node in body
                              if (node.module or "").startswith("processors.referees.")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports.get(start, ()))

    assert [m for m in imports if reaches(m, m, set())] == []


def test_local_referee_is_lazy_and_pickles_without_a_model():
    referee = build_referee(RefereeSettings(name="t", preset="tiny-random-llava"))
    assert isinstance(referee, LocalReferee) and referee._model is None
    clone = pickle.loads(pickle.dumps(referee))
    assert clone._model is None and clone.settings == referee.settings


def test_pack_groups_keeps_images_together():
    items = [RefereeItem(str(i), f"img{i % 3}.png", "t", "q") for i in range(9)]
    batches = list(pack_groups(items, batch_size=4))
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len(b) <= 4 for b in batches)
    for batch in batches:  # groups of 3 never straddle a batch of 4
        assert len({items[i].image_path for i in batch}) == 1
    assert [len(b) for b in pack_groups(items, batch_size=7)] == [6, 3]


def test_digit_reading_sums_all_ids_of_a_digit():
    torch = pytest.importorskip("torch")
    from processors.referees.digits import DigitIds, find_digit_ids, read_votes
    from processors.referees.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    digits = find_digit_ids(tokenizer)
    assert set(tokenizer.convert_ids_to_tokens(list(digits.zero))) == {"0", "Ġ0"}
    logits = torch.full((2, 10), -30.0)
    ids = DigitIds(zero=(1, 2), one=(3,))
    logits[0, [1, 2, 3]] = torch.tensor([0.0, 0.0, 0.5])  # one "1" token beats each "0" token, not their sum
    logits[1, [2, 3]] = torch.tensor([0.0, 2.0])
    votes, p_yes = read_votes(logits, ids)
    assert votes == [0, 1]
    e = torch.exp(torch.tensor(0.5)).item()
    assert p_yes[0] == pytest.approx(e / (e + 2))
    assert p_yes[1] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-2.0)).item()))
