"""`taskgalaxy status` shows every check the final stage ran, also one that rejected nothing, and none that
did not run (issue 20, item 10b)."""

from __future__ import annotations

from processors.quality.plan import plan_final
from processors.quality.report_text import checks_run, summary_lines
from processors.stages.final import FinalConfig

ROWS = {
    "qa_id": ["q1", "q2"],
    "image_id": ["i1", "i2"],
    "task_type": ["A~x", "B~y"],
    "question": ["What colour is the car?", "How many dogs?"],
    "votes": [{"r1": 1, "r2": 1, "ans": 1}, {"r1": 1, "r2": 1, "ans": 1}],  # the answer referee agrees twice
    "p_yes": [{"r1": 0.9, "r2": 0.8, "ans": 0.9}] * 2,
}


def _status_line(config: FinalConfig) -> str:
    plan = plan_final(config, ROWS, known_images={"i1", "i2"})
    return summary_lines({"final": plan.summary})[0]


def test_a_check_that_ran_and_rejected_nothing_is_shown_with_0():
    line = _status_line(FinalConfig(threshold=2, answer_referees=["ans"]))
    assert line.startswith("kept 2 of 2 scored")
    assert "checks reject {'answer_incorrect': 0}" in line
    assert "answerable_without_image" not in line and "benchmark" not in line  # those did not run


def test_no_check_configured_shows_none():
    assert "checks reject" not in _status_line(FinalConfig(threshold=2))


def test_a_plan_written_before_checks_run_was_recorded_shows_what_rejected_something():
    old = {"rejected_by_check": {"answer_incorrect": 0, "answerable_without_image": 2, "benchmark_image": 0}}
    assert checks_run(old) == {"answerable_without_image": 2}
