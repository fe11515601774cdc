"""One shard through ``processors.qa.generate.run_batch`` with a fake engine: rows, failures and the repair."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from builder.ids import text_id
from builder.rows import FAILURE_ITEM, FAILURE_REASON
from processors.llm.request import LLMResult
from processors.qa.config import QAConfig
from processors.qa.generate import ImageUnavailable, run_batch
from processors.qa.prompt import MARKER, PROMPT_VERSION, REPAIR_MARKER, json_schema
from processors.qa.validate import label_key

TYPES = ["OCR~Scene text~Street sign reading", "Counting~Animals"]


class FakeEngine:
    """Answers like ``run_requests`` would: ``replies[image_id]`` for the first turn, ``repairs`` for repairs."""

    def __init__(self, replies: dict[str, str], repairs: dict[str, str] | None = None):
        self.replies, self.repairs, self.calls = replies, repairs or {}, []

    def __call__(self, requests):
        self.calls.append([r.key for r in requests])
        results = []
        for request in requests:
            is_repair = REPAIR_MARKER in str(request.messages[-1]["content"])
            text = (self.repairs if is_repair else self.replies)[request.key]
            try:
                results.append(LLMResult(request.key, ok=True, value=request.parse(text), raw_text=text))
            except ValueError as exc:
                results.append(LLMResult(request.key, ok=False, reason="unparsable", detail=str(exc), raw_text=text))
        return results


def items_for(types, *, answer="It shows three dogs and one sign."):
    return [{"task_type": t, "question": f"What does the image show for {t.split('~')[-1]}?", "answer": answer}
            for t in types]


def run(batch, engine, config=QAConfig(), usage=None):
    usage = usage if usage is not None else Counter()

    def image_file(image_id):
        if image_id == "gone":
            raise ImageUnavailable("image gone is not in the images stage output")
        return Path(f"/images/{image_id}.jpg")

    return run_batch(batch, config, image_file=image_file, model="gpt-4o-test", send=engine,
                     add_usage=lambda **c: usage.update(c)).to_columns()


def failures(columns) -> list[tuple[str, str | None]]:
    return [(r, i) for r, i in zip(columns[FAILURE_REASON], columns[FAILURE_ITEM]) if r is not None]


def test_rows_item_failures_and_row_failures():
    batch = {"image_id": ["a", "b", "c", "gone", "empty"], "task_types": [TYPES, TYPES, TYPES, TYPES, []]}
    bad_label = items_for(TYPES)
    bad_label[1]["task_type"] = "Counting~Invented"
    engine = FakeEngine({
        "a": json.dumps({"qa": items_for(TYPES)}),
        "b": "```json\n" + json.dumps(bad_label) + "\n```",
        "c": json.dumps({"qa": items_for(TYPES, answer="")}),
    })
    columns = run(batch, engine)
    assert engine.calls == [["a", "b", "c"]]  # no request for rows that failed before the engine
    rows = [i for i, r in enumerate(columns[FAILURE_REASON]) if r is None]
    assert [columns["image_id"][i] for i in rows] == ["a", "a", "b"]
    for i in rows:
        assert columns["qa_id"][i] == text_id(columns["image_id"][i], columns["task_type"][i], columns["question"][i])
        assert (columns["model"][i], columns["prompt_version"][i]) == ("gpt-4o-test", PROMPT_VERSION)
    assert sorted(failures(columns), key=str) == sorted([
        ("label_not_in_types", "Counting~Invented | What does the image show for Animals?"),
        ("empty_answer", f"{TYPES[0]} | What does the image show for Street sign reading?"),
        ("empty_answer", f"{TYPES[1]} | What does the image show for Animals?"),
        ("no_valid_qa", None), ("image_missing", None), ("no_task_types", None),
    ], key=str)


def test_an_unparsable_reply_gets_one_repair_request():
    batch = {"image_id": ["a", "b"], "task_types": [TYPES, TYPES]}
    engine = FakeEngine({"a": "I see a street.", "b": "Nothing to say."},
                        repairs={"a": json.dumps({"qa": items_for(TYPES)}), "b": "Still no JSON."})
    usage = Counter()
    columns = run(batch, engine, usage=usage)
    assert engine.calls == [["a", "b"], ["a", "b"]]
    assert usage == {"repair_requests": 2, "repaired": 1}
    assert set(columns["prompt_version"]) - {None} == {f"{PROMPT_VERSION}+qa-repair-v1"}
    assert failures(columns) == [("unparsable", None)]
    detail = next(d for d in columns["__failure_detail"] if d)
    assert "after one repair request" in detail and "Nothing to say." in detail and "Still no JSON." in detail


def test_repair_can_be_switched_off():
    engine = FakeEngine({"a": "no json"})
    columns = run({"image_id": ["a"], "task_types": [TYPES]}, engine, QAConfig(repair=False))
    assert engine.calls == [["a"]] and failures(columns) == [("unparsable", None)]


def test_the_request_lists_the_types_and_asks_for_n_each():
    engine = FakeEngine({"a": json.dumps(items_for(TYPES))})
    seen = []
    run({"image_id": ["a"], "task_types": [TYPES + [TYPES[0]]]},
        lambda requests: seen.extend(requests) or engine(requests), QAConfig(questions_per_type=2))
    request = seen[0]
    text = request.messages[1]["content"][1]["text"]
    assert request.messages[1]["content"][0] == {"type": "image_path", "path": "/images/a.jpg"}
    assert f"{MARKER}\n- {TYPES[0]}\n- {TYPES[1]}\n\n" in text and "per task type: 2" in text
    assert request.json_schema["properties"]["qa"]["items"]["properties"]["task_type"]["enum"] == TYPES
    assert label_key(TYPES[0]) == "ocr~scene text~street sign reading"


def test_an_empty_reply_list_fails_the_row_and_counts_every_missing_question():
    columns = run({"image_id": ["a"], "task_types": [TYPES]}, FakeEngine({"a": '{"qa": []}'}))
    assert sorted(failures(columns), key=str) == sorted(
        [("missing_question", TYPES[0]), ("missing_question", TYPES[1]), ("no_valid_qa", None)], key=str)


def test_the_schema_asks_for_exactly_the_questions_wanted():
    # Under a grammar a weak open model otherwise closes the list empty (seen on vLLM: every reply {"qa": []}).
    qa = json_schema(["A~B", "C~D"], count=4)["properties"]["qa"]
    assert (qa["minItems"], qa["maxItems"]) == (4, 4)
    assert "minItems" not in json_schema(["A~B"])["properties"]["qa"]
