"""The filter step with the engine injected: rows, item failures and row failures, no stage needed."""

from __future__ import annotations

from pathlib import Path

from builder.rows import FAILURE_REASON
from processors.filter.keep import run_batch
from processors.filter.parse import parse_labels
from processors.image_locator import ImageUnavailable
from processors.llm.request import LLMResult
from processors.stages.filter import FilterConfig

CANDIDATES = [{"task_type": t, "task_id": t, "score": 0.3} for t in ("OCR~Scene text", "Counting~Animals")]


def test_an_image_that_cannot_be_found_fails_its_row_not_the_batch():
    sent = []

    def image_file(image_id: str) -> Path:
        if image_id == "escaped":
            raise ImageUnavailable("path '../../etc/passwd' escapes the image root")
        return Path(f"/images/{image_id}.jpg")

    def send(requests):
        sent.append([r.key for r in requests])
        replies = {"a": '{"task_types": ["OCR~Scene text", "Made~Up"]}', "b": "None"}
        return [LLMResult(key=r.key, ok=True, value=parse_labels(replies[r.key])) for r in requests]

    batch = {"image_id": ["a", "escaped", "b", "bare"], "candidates": [CANDIDATES, CANDIDATES, CANDIDATES, []]}
    columns = run_batch(batch, FilterConfig(), image_file=image_file, send=send).to_columns()
    assert sent == [["a", "b"]]  # nothing sent for rows that failed before the engine
    outcome = {}
    for i, key in enumerate(columns["__source_key"]):
        outcome.setdefault(key, []).append(columns[FAILURE_REASON][i])
    assert outcome == {"a": ["label_not_in_candidates", None], "escaped": ["image_missing"], "b": ["no_match"],
                       "bare": ["no_candidates"]}
