"""The QA reply parser: every shape a model writes JSON in, and the replies that hold none."""

from __future__ import annotations

import json

import pytest

from processors.qa.parse import parse_reply

ITEMS = [
    {"task_type": "OCR~Scene text~Street sign reading", "question": "What street does the sign name?",
     "answer": "The sign reads Elm Street."},
    {"task_type": "Counting~Animals", "question": "How many dogs are on the lawn?", "answer": "Three."},
]


@pytest.mark.parametrize("text", [
    json.dumps({"qa": ITEMS}),  # the json_schema shape
    json.dumps(ITEMS, indent=2),  # a bare array
    "Sure! Here you go:\n```json\n" + json.dumps(ITEMS, indent=2) + "\n```\nHope this helps.",  # fenced + prose
    "```JSON\n" + json.dumps({"qa": ITEMS}) + "```",  # fence tag in capitals, no newline before the closing fence
    "```\n" + json.dumps(ITEMS[0]) + "\n```\n\n```\n" + json.dumps(ITEMS[1]) + "\n```",  # one fence per item
    "\n".join(json.dumps(item) for item in ITEMS),  # line-delimited JSON
    "\n\n".join(json.dumps(item, indent=2) for item in ITEMS),  # pretty-printed objects in a row
    json.dumps({"questions": ITEMS}),  # another wrapper key
    json.dumps({"result": {"items": ITEMS}, "note": "done"}),  # wrapped one level deeper
    "Here is the JSON: " + json.dumps(ITEMS) + " -- end",  # embedded in prose without fences
    json.dumps(ITEMS).replace("}]", "},]"),  # a trailing comma
    "\ufeff" + json.dumps({"qa": ITEMS}),  # a byte-order mark
])
def test_every_shape_gives_the_same_items(text):
    assert parse_reply(text) == ITEMS


def test_a_single_qa_object_is_one_item():
    assert parse_reply(json.dumps(ITEMS[0])) == [ITEMS[0]]


@pytest.mark.parametrize("text", ["[]", '{"qa": []}', "```json\n[]\n```"])
def test_an_empty_list_is_an_answer_not_a_parse_error(text):
    assert parse_reply(text) == []


def test_items_that_are_not_objects_are_passed_on_for_validation():
    assert parse_reply(json.dumps([ITEMS[0], "stray text", 7])) == [ITEMS[0], "stray text", 7]


def test_a_cut_off_or_broken_document_is_asked_again_not_mined_for_pieces():
    # Which objects survive depends on where it broke; a retry (or the repair turn) gives the whole answer.
    for text in (json.dumps({"qa": ITEMS})[:-30], '{"oops": ' + json.dumps({"qa": ITEMS}) + " ,,"):
        with pytest.raises(ValueError, match="starts as JSON but does not decode|no JSON array"):
            parse_reply(text)


@pytest.mark.parametrize("text", [
    "",
    "   \n",
    "I cannot see the image clearly, sorry.",
    "1. OCR~Scene text - Q: What does the sign say? A: Elm Street.",
    json.dumps(["OCR~Scene text", "Counting~Animals"]),  # an array, but of labels
    json.dumps({"error": "no image"}),
    "{\"qa\": [ oops ,,",
])
def test_replies_without_qa_json_raise_value_error(text):
    with pytest.raises(ValueError):
        parse_reply(text)
