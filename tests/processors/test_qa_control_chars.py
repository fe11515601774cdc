"""Model text loses terminal debris before it becomes a row: NUL, ANSI escape sequences, the other C0 and C1
controls, DEL and lone surrogates are stripped from questions, answers and the failures' item text; newline and
tab stay."""

from __future__ import annotations

import json

from processors.qa.config import QAConfig
from processors.qa.parse import parse_reply
from processors.qa.validate import strip_control, validate_items

TYPES = ["OCR~Scene text~Street sign reading", "Counting~Animals"]


def test_a_reply_with_control_characters_becomes_clean_rows():
    items = [{"task_type": TYPES[0], "question": "What does the \x1b[1;31msign\x1b[0m say?\x00",
              "answer": "It says STOP.\r\nLine two\tand a tab.\x7f\x85\x9b"},
             {"task_type": TYPES[1], "question": "\x1b]0;pwned\x07How many \ud800dogs are there?",
              "answer": "There are \x08\x08three dogs\x1bc."}]
    accepted, rejected = validate_items(parse_reply(json.dumps(items)), TYPES, QAConfig())
    assert not rejected
    assert [(a.question, a.answer) for a in accepted] == [
        ("What does the sign say?", "It says STOP.\nLine two\tand a tab."),
        ("How many dogs are there?", "There are three dogs."),
    ]


def test_rejected_items_carry_no_control_characters_either():
    items = [{"task_type": "Unknown\x1b[2J~type", "question": "Where\x00 is it?", "answer": "Here."}]
    _, rejected = validate_items(items, TYPES, QAConfig())
    assert rejected[0].reason == "label_not_in_types"
    assert rejected[0].item == "Unknown~type | Where is it?"


def test_strip_control_keeps_ordinary_text():
    text = "Größe: 3 × 4 cm — «ok» 中文 😀\n\tindented"
    assert strip_control(text) == text
