"""The filter reply parser and label matching over the shapes models really answer in."""

from __future__ import annotations

import pytest

from processors.filter.labels import CandidateIndex, match_labels, normalise_label
from processors.filter.parse import parse_labels

CANDIDATES = ["OCR~Scene text~Street signs", "Charts, tables~Reading values", "Counting~Objects", "Art~Style"]
INDEX = CandidateIndex(CANDIDATES)


@pytest.mark.parametrize(
    "reply, kept, rejected",
    [
        ('{"task_types": ["Counting~Objects", "Art~Style"]}', ["Counting~Objects", "Art~Style"], []),
        ('["Counting~Objects"]', ["Counting~Objects"], []),
        ("[Counting~Objects, Art~Style]", ["Counting~Objects", "Art~Style"], []),  # the paper's form
        ("[“Counting∼Objects”, ‘Art〜Style’]", ["Counting~Objects", "Art~Style"], []),  # curly quotes, odd tildes
        ("[OCR~Scene text~Street signs, Charts, tables~Reading values]",
         ["OCR~Scene text~Street signs", "Charts, tables~Reading values"], []),  # comma inside an unquoted label
        ("```json\n{\"task_types\": [\"counting ~ objects\"]}\n```", ["Counting~Objects"], []),  # fence, case, spaces
        ('["3", "4"]', ["Counting~Objects", "Art~Style"], []),  # numbers from the prompt's list
        ('["Street signs"]', ["OCR~Scene text~Street signs"], []),  # a unique leaf without its parents
        ('["Counting~Objects", "Counting~Objects"]', ["Counting~Objects"], []),  # repeats kept once
        ('["Counting~Objects", "Invented~Label"]', ["Counting~Objects"], ["Invented~Label"]),
        ("None", [], []),
        ("[]", [], []),
        ("None of them.", [], []),
        ('{"task_types": []}', [], []),
        ("- Counting~Objects\n- Art~Style", ["Counting~Objects", "Art~Style"], []),
    ],
)
def test_reply_forms(reply, kept, rejected):
    assert match_labels(parse_labels(reply), INDEX) == (kept, rejected)


@pytest.mark.parametrize("reply", ['{"answer": 3}', '{"task_types": "Counting"}', "x" * 300,
                                   "I cannot help with that.", "Sure! Here you go:\nCounting and art"])
def test_unusable_replies_raise_so_the_engine_retries(reply):
    with pytest.raises(ValueError):
        parse_labels(reply)


def test_normalisation_is_stable():
    assert normalise_label("  “OCR ∼ Scene  Text ”. ") == "ocr~scene text"
    assert normalise_label("ＯＣＲ～Scene text") == "ocr~scene text"  # full-width forms


def test_ambiguous_leaf_is_not_guessed():
    index = CandidateIndex(["A~Counting", "B~Counting"])
    assert match_labels(["Counting"], index) == ([], ["Counting"])


def test_a_broken_json_object_is_asked_again_not_read_as_a_list():
    from processors.filter.parse import parse_labels

    with pytest.raises(ValueError, match="does not decode"):
        parse_labels('{"oops": {"task_types": ["OCR~Scene text", "Counting~ ,,')
    with pytest.raises(ValueError, match="does not decode"):
        parse_labels('{"oops": No ,,')
