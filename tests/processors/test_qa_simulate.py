"""The simulator's QA responder and the estimate helper."""

from __future__ import annotations

import json
import random
from collections import Counter

from processors.llm.settings import EndpointSettings, LLMSettings
from processors.qa.config import QAConfig
from processors.qa.estimate import estimate_per_image
from processors.qa.parse import parse_reply
from processors.qa.prompt import build_messages, repair_messages
from processors.qa.simulate import SHAPES, SIM_RESPONDER, make_items, prompt_types, render
from processors.qa.validate import validate_items

TYPES = ["OCR~Scene text~Street sign reading", "Counting~Animals", "Spatial reasoning~Relative position"]


def test_the_responder_reads_the_prompt_and_is_deterministic():
    messages = build_messages("/x.jpg", TYPES, per_type=2, language="en")
    assert SIM_RESPONDER.matches(messages)
    assert prompt_types(messages[1]["content"][1]["text"]) == (TYPES, 2)
    assert SIM_RESPONDER.respond(messages, random.Random(5)) == SIM_RESPONDER.respond(messages, random.Random(5))


def test_every_shape_but_no_json_parses_to_the_items():
    items = make_items(TYPES, 1, random.Random(0))
    for shape, _ in SHAPES:
        text = render(items, shape)
        if shape == "no_json":
            assert "{" not in text and "[" not in text
        else:
            assert parse_reply(text) == items, shape


def test_replies_are_mostly_valid_with_some_realistic_defects():
    messages = build_messages("/x.jpg", TYPES, per_type=1, language="en")
    outcome: Counter = Counter()
    for seed in range(200):
        try:
            items = parse_reply(SIM_RESPONDER.respond(messages, random.Random(seed)))
        except ValueError:
            outcome["unparsable"] += 1
            continue
        accepted, rejected = validate_items(items, TYPES, QAConfig())
        outcome["rows"] += len(accepted)
        outcome.update(r.reason for r in rejected)
    assert outcome["rows"] > 0.8 * 200 * len(TYPES)
    for reason in ("unparsable", "label_not_in_types", "empty_answer", "duplicate_question"):
        assert 0 < outcome[reason] < 0.1 * 200 * len(TYPES), (reason, outcome)


def test_the_repair_turn_is_answered_with_clean_json():
    messages = build_messages("/x.jpg", TYPES, per_type=1, language="en")
    for seed in range(20):
        reply = SIM_RESPONDER.respond(repair_messages(messages, "garbage"), random.Random(seed))
        assert [i["task_type"] for i in json.loads(reply)["qa"]] == TYPES


def test_estimate_per_image_scales_with_types_questions_and_price():
    settings = LLMSettings()
    base = estimate_per_image(QAConfig(), settings, types_per_image=3, repair_rate=0)
    assert base.requests == 1 and base.prompt_tokens > 85 and base.completion_tokens > 3 * 100
    more = estimate_per_image(QAConfig(questions_per_type=2), settings, types_per_image=6, repair_rate=0)
    assert more.completion_tokens > 3.5 * base.completion_tokens and more.prompt_tokens > base.prompt_tokens
    repaired = estimate_per_image(QAConfig(), settings, types_per_image=3, repair_rate=0.5)
    assert repaired.requests == 1.5 and repaired.prompt_tokens > 1.5 * base.prompt_tokens
    batch = LLMSettings(endpoints={"gpt4o": EndpointSettings(mode="batch")})
    assert estimate_per_image(QAConfig(), batch, repair_rate=0).cost_usd == base.cost_usd / 2
