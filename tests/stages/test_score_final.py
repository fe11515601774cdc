"""Referee votes joined by qa_id under each missing-vote policy, and the final selection by threshold."""

from __future__ import annotations

import math

import pytest

from builder.rows import FAILURE_REASON
from processors.referees.endpoint import digit_probabilities
from processors.referees.protocol import Vote
from processors.stages.score import _join

COLUMNS = ["qa_id", "image_id", "task_type", "question", "answer", "votes", "p_yes", "total", "missing"]
BATCH = {
    "qa_id": ["q1", "q2", "q3"],
    "image_id": ["i1", "i1", "i2"],
    "task_type": ["A~B", "A~C", "D~E"],
    "question": ["Q1?", "Q2?", "Q3?"],
    "answer": ["a1", "a2", "a3"],
}


def _ballots(missing_q3: bool, error: str = "unparsable") -> dict:
    first = {q: Vote(q, 1, 0.9) for q in ("q1", "q2", "q3")}
    second = {"q1": Vote("q1", 0, 0.2), "q2": Vote("q2", 1, 0.7)}
    second["q3"] = Vote("q3", None, None, error=error, detail="reply 'x'") if missing_q3 else Vote("q3", 1, 0.6)
    return {"first": first, "second": dict(reversed(list(second.items())))}  # order must not matter: a hash join


def _rows(columns: dict) -> dict:
    return {
        key: {c: columns[c][i] for c in COLUMNS} | {"reason": columns[FAILURE_REASON][i]}
        for i, key in enumerate(columns["__source_key"])
    }


def test_votes_join_by_qa_id_not_by_position():
    rows = _rows(_join(BATCH, _ballots(False), "fail", COLUMNS))
    assert rows["q1"]["votes"] == {"first": 1, "second": 0} and rows["q1"]["total"] == 1
    assert rows["q2"]["p_yes"] == {"first": 0.9, "second": 0.7} and rows["q2"]["total"] == 2
    assert rows["q3"]["total"] == 2 and rows["q3"]["missing"] == []


@pytest.mark.parametrize("policy, total, reason", [("fail", None, "vote_missing"), ("zero", 1, None), ("abstain", 1, None)])
def test_missing_vote_policies_are_explicit(policy, total, reason):
    q3 = _rows(_join(BATCH, _ballots(True), policy, COLUMNS))["q3"]
    assert q3["reason"] == reason
    if reason is None:
        assert q3["total"] == total and q3["missing"] == ["second"]
        assert q3["votes"]["second"] == (0 if policy == "zero" else None)


@pytest.mark.parametrize("policy", ["fail", "zero", "abstain"])
@pytest.mark.parametrize("error", ["api_error", "timeout", "rate_limited", "batch_failed"])
def test_a_vote_the_server_did_not_give_is_never_judged(policy, error):
    # Not a 0 (zero), not an abstention, not a sealed vote_missing: a row the next run asks again.
    from processors.stages.score import VOTE_UNANSWERED, ScoreStage

    q3 = _rows(_join(BATCH, _ballots(True, error), policy, COLUMNS))["q3"]
    assert q3["reason"] == VOTE_UNANSWERED and q3["total"] is None
    assert VOTE_UNANSWERED in ScoreStage.unanswered_reasons and "vote_missing" not in ScoreStage.unanswered_reasons


def test_p_yes_from_logprobs_sums_every_spelling_of_each_digit():
    top = [{"token": " 1", "logprob": math.log(0.5)}, {"token": "1", "logprob": math.log(0.1)},
           {"token": "0", "logprob": math.log(0.2)}, {"token": "maybe", "logprob": math.log(0.2)}]
    p0, p1 = digit_probabilities([{"token": " 1", "logprob": math.log(0.5), "top_logprobs": top}])
    assert p0 == pytest.approx(0.2) and p1 == pytest.approx(0.6)
    assert digit_probabilities([{"token": "x", "logprob": 0.0, "top_logprobs": [{"token": "x", "logprob": 0.0}]}]) is None


def test_a_stop_during_scoring_cancels_the_endpoint_calls_at_once():
    # Ctrl-C / SIGTERM lands while a local referee runs: the endpoint referees' calls on the helper thread
    # must be cancelled, not waited for (they would keep paying).
    import threading
    import time

    from processors.llm import api
    from processors.referees.endpoint import EndpointReferee
    from processors.referees.settings import RefereeSettings
    from processors.stages.score import score_all

    stopped = threading.Event()

    class SlowClient:
        def send_groups(self, groups, *, stop=None, return_exceptions=False):
            assert stop is not None and stop.wait(timeout=20)  # returns as soon as the stop is set
            stopped.set()
            return [[] for _ in groups]

    class Remote(EndpointReferee):
        def __init__(self):
            self.name = "remote"

        def plan(self, items):
            return [(api.RequestGroup([], "x"), "none")]

    class Local:
        name = "local"

        def score(self, items):
            raise KeyboardInterrupt  # the signal, delivered to the main thread mid-scoring

    settings = [RefereeSettings(name="remote", preset="internvl2-26b"), RefereeSettings(name="local", preset="tiny-random-llava")]
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        score_all(settings, [Remote(), Local()], {"remote": [], "local": []}, SlowClient())
    assert stopped.is_set() and time.monotonic() - started < 5


def test_a_row_whose_image_cannot_be_found_fails_alone_as_image_missing():
    from processors.image_locator import ImageUnavailable
    from processors.stages.score import _items

    def image_file(image_id):
        if image_id == "i2":
            raise ImageUnavailable("path '../../etc/passwd' escapes the image root")
        return f"/images/{image_id}.jpg"

    items, unavailable = _items(BATCH, image_file)
    assert [item.qa_id for item in items] == ["q1", "q2"] and set(unavailable) == {"q3"}
    rows = _rows(_join(BATCH, {"first": {q: Vote(q, 1, 0.9) for q in ("q1", "q2")}}, "fail", COLUMNS, unavailable))
    assert rows["q3"]["reason"] == "image_missing" and rows["q1"]["reason"] is None
