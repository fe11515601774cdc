"""Validation of QA items: partial validity, labels, lengths, language, duplicates and quotas."""

from __future__ import annotations

from collections import Counter

import pytest

from processors.qa.config import QAConfig
from processors.qa.validate import TypeIndex, label_key, language_share, validate_items

TYPES = ["OCR~Scene text~Street sign reading", "Counting~Animals", "Spatial reasoning~Relative position",
         "Colour~Dominant colour"]


def qa(task_type: str, question: str = "", answer: str = "A complete answer about the image.") -> dict:
    question = question or f"Looking at the picture, what does {task_type.split('~')[-1].lower()} reveal here?"
    return {"task_type": task_type, "question": question, "answer": answer}


def reasons(rejected) -> Counter:
    return Counter(r.reason for r in rejected)


def test_three_of_four_valid_gives_three_rows_and_one_failure():
    items = [qa(TYPES[0]), qa(TYPES[1]), qa(TYPES[2]), qa(TYPES[3], answer="")]
    accepted, rejected = validate_items(items, TYPES, QAConfig())
    assert [a.task_type for a in accepted] == TYPES[:3]
    assert reasons(rejected) == {"empty_answer": 1}
    assert rejected[0].item.startswith("Colour~Dominant colour | ")


def test_a_label_not_among_the_images_types_is_rejected_and_named():
    items = [qa(TYPES[0]), qa("Medical imaging~X-ray reading"), qa(TYPES[2]), qa(TYPES[3])]
    accepted, rejected = validate_items(items, TYPES, QAConfig())
    assert len(accepted) == 3 and reasons(rejected) == {"label_not_in_types": 1}
    assert "'Medical imaging~X-ray reading' is none of the image's 4 task types" in rejected[0].detail


@pytest.mark.parametrize("written", [
    "ocr~scene text~street sign reading",
    "  OCR ∼ Scene text 〜 Street sign reading ",
    "OCR～Scene  text～Street sign reading",
    '"OCR~Scene text~Street sign reading".',
    "Street sign reading",  # a bare leaf, unique among the image's types
])
def test_labels_match_after_normalisation_and_rows_carry_the_kept_spelling(written):
    accepted, rejected = validate_items([qa(written)], TYPES[:1], QAConfig())
    assert rejected == [] and accepted[0].task_type == TYPES[0]


def test_an_ambiguous_leaf_matches_nothing():
    index = TypeIndex(["Counting~Animals", "Detection~Animals"])
    assert index.lookup("animals") is None and index.lookup("detection ~ animals") == "Detection~Animals"
    assert label_key(" A ∼ b ") == "a~b"


def test_malformed_missing_and_debris():
    items = ["just text", {"task_type": TYPES[0], "question": "What is written on the sign?"},
             {"type": TYPES[1], "q": "Question: How many dogs can you count?", "a": "Answer: 3"}]
    accepted, rejected = validate_items(items, TYPES[:2], QAConfig())
    assert reasons(rejected) == {"malformed_item": 1, "missing_field": 1}
    assert (accepted[0].question, accepted[0].answer) == ("How many dogs can you count?", "3")


def test_length_bounds():
    config = QAConfig(min_question_chars=20, max_answer_chars=30)
    items = [qa(TYPES[0], question="Sign text?"), qa(TYPES[1], answer="x" * 31), qa(TYPES[2], question="   ")]
    accepted, rejected = validate_items(items, TYPES[:3], config)
    assert accepted == [] and reasons(rejected) == {"question_length": 1, "answer_length": 1, "empty_question": 1}


def test_language_heuristic():
    chinese = qa(TYPES[0], question="图片中的路牌上写的是什么字？请仔细看。", answer="路牌上写着长安街。")
    accepted, rejected = validate_items([chinese, qa(TYPES[1])], TYPES[:2], QAConfig())
    assert [a.task_type for a in accepted] == [TYPES[1]] and reasons(rejected) == {"wrong_language": 1}
    accepted, _ = validate_items([chinese], TYPES[:1], QAConfig(language="zh"))
    assert len(accepted) == 1
    accepted, _ = validate_items([chinese], TYPES[:1], QAConfig(language="any"))
    assert len(accepted) == 1
    assert language_share("The sign says Zürich Hauptbahnhof.", "en") > 0.9
    assert language_share("3", "en") is None  # too little text to judge


def test_duplicates_over_quota_and_shortfall():
    same = "What is the most striking detail in this image?"
    items = [qa(TYPES[0], question=same), qa(TYPES[1], question=same.upper()),  # duplicate under another type
             qa(TYPES[0], question="Which words on the sign are largest?")]  # a second one for a quota of 1
    accepted, rejected = validate_items(items, TYPES, QAConfig())
    assert [a.task_type for a in accepted] == [TYPES[0]]
    # 4 slots asked, 3 items given: one missing_question, charged to the first type with no row.
    assert reasons(rejected) == {"duplicate_question": 1, "over_quota": 1, "missing_question": 1}
    assert [r.item for r in rejected if r.reason == "missing_question"] == [TYPES[1]]


def test_several_questions_per_type():
    items = [qa(TYPES[0], question=f"Question number {i} about the sign?") for i in range(3)]
    accepted, rejected = validate_items(items, TYPES[:2], QAConfig(questions_per_type=2))
    assert len(accepted) == 2
    assert reasons(rejected) == {"over_quota": 1, "missing_question": 1}


def test_config_bounds_are_checked():
    with pytest.raises(ValueError, match="min_question_chars"):
        QAConfig(min_question_chars=50, max_question_chars=10)
