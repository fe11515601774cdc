"""The referee cascade keeps exactly the full vote's samples, asks no vote that could not change the outcome,
and records the votes it did not ask as not asked (planted vote tables: every pattern, thresholds 1..n for
n = 2..5, each missing_vote policy)."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest

from builder.rows import FAILURE_REASON
from processors.referees.cascade import cascade_ballots, counting_and_checks, decided, first_round
from processors.referees.protocol import RefereeItem, Vote
from processors.stages.score import _join

BASE = ["qa_id", "image_id", "task_type", "question", "answer", "votes", "p_yes", "total", "missing"]
ERROR = "e"  # a planted vote the referee failed to give (unparsable)


def _table(n: int, values: tuple) -> dict[str, tuple]:
    """One question per pattern of votes over ``n`` referees."""
    return {f"q{i}": pattern for i, pattern in enumerate(itertools.product(values, repeat=n))}


def _vote(qa_id: str, value) -> Vote:
    if value == ERROR:
        return Vote(qa_id, None, None, error="unparsable", detail="reply 'x'")
    return Vote(qa_id, value, 0.9 if value else 0.1)


def _batch(table: dict) -> dict[str, list]:
    ids = list(table)
    return {"qa_id": ids, "image_id": ["img"] * len(ids), "task_type": ["A~B"] * len(ids),
            "question": ["Q?"] * len(ids), "answer": ["a"] * len(ids)}


def _kept(columns: dict, threshold: int) -> set[str]:
    return {key for i, key in enumerate(columns["__source_key"])
            if columns[FAILURE_REASON][i] is None and columns["total"][i] >= threshold}


def _run_cascade(table: dict, names: list[str], threshold: int, policy: str):
    asked = Counter()
    items = [RefereeItem(qa_id, "img.png", "A~B", "Q?") for qa_id in table]

    def ask(chosen: list[str], shown: dict[str, list[RefereeItem]], whole) -> dict[str, dict[str, Vote]]:
        out = {}
        for name in chosen:
            column = names.index(name)
            for item in shown[name]:
                asked[(name, item.qa_id)] += 1
            out[name] = {item.qa_id: _vote(item.qa_id, table[item.qa_id][column]) for item in shown[name]}
        return out

    ballots, not_asked = cascade_ballots(names, [], {name: items for name in names}, ask, threshold=threshold,
                                         policy=policy)
    columns = _join(_batch(table), ballots, policy, [*BASE, "not_asked"], not_asked=not_asked)
    return columns, asked, not_asked


def _full(table: dict, names: list[str], policy: str) -> dict:
    ballots = {name: {q: _vote(q, votes[i]) for q, votes in table.items()} for i, name in enumerate(names)}
    return _join(_batch(table), ballots, policy, BASE)


CASES = [(n, t) for n in range(2, 6) for t in range(1, n + 1)]


@pytest.mark.parametrize("policy", ["fail", "zero", "abstain"])
@pytest.mark.parametrize("n, threshold", CASES)
def test_the_cascade_keeps_exactly_the_full_votes_samples(n, threshold, policy):
    names = [f"r{i}" for i in range(n)]
    table = _table(n, (0, 1))
    columns, asked, not_asked = _run_cascade(table, names, threshold, policy)
    assert _kept(columns, threshold) == _kept(_full(table, names, policy), threshold)
    assert max(asked.values()) == 1  # no referee asked twice about one question
    assert len(asked) < n * len(table) or threshold in (n,)  # something was saved (except when all must vote)
    for i, qa_id in enumerate(columns["__source_key"]):
        votes, skipped = columns["votes"][i], columns["not_asked"][i]
        assert skipped == not_asked[qa_id] and columns["missing"][i] == []
        assert all(votes[name] is None and columns["p_yes"][i][name] is None for name in skipped)
        assert all(votes[name] == table[qa_id][names.index(name)] for name in names if name not in skipped)
        # the referees asked are a prefix of the config's order
        assert skipped == names[len(names) - len(skipped):]


@pytest.mark.parametrize("policy", ["zero", "abstain"])
@pytest.mark.parametrize("n, threshold", [(2, 1), (3, 2), (4, 2), (4, 3), (5, 3)])
def test_failed_votes_count_as_no_yes_and_keep_the_same_samples(n, threshold, policy):
    names = [f"r{i}" for i in range(n)]
    table = _table(n, (0, 1, ERROR))
    columns, asked, _ = _run_cascade(table, names, threshold, policy)
    assert _kept(columns, threshold) == _kept(_full(table, names, policy), threshold)
    assert max(asked.values()) == 1


@pytest.mark.parametrize("n, threshold", [(2, 1), (3, 2), (4, 3), (5, 3)])
def test_under_fail_only_a_vote_that_was_asked_can_fail_a_row(n, threshold):
    # The full vote fails a row when any referee could not vote; the cascade never asked some of them, so
    # it keeps a row the full vote fails exactly when the failed votes were all among those not asked.
    names = [f"r{i}" for i in range(n)]
    table = _table(n, (0, 1, ERROR))
    columns, asked, not_asked = _run_cascade(table, names, threshold, "fail")
    cascade, full = _kept(columns, threshold), _kept(_full(table, names, "fail"), threshold)
    assert full <= cascade
    for qa_id in cascade - full:
        failed = {names[i] for i, value in enumerate(table[qa_id]) if value == ERROR}
        assert failed and failed <= set(not_asked[qa_id])


def test_rule_and_first_round():
    assert first_round(3, 2) == 2 and first_round(3, 1) == 1 and first_round(3, 3) == 1
    assert first_round(5, 3) == 3 and first_round(3, 0) == 0 and first_round(3, 4) == 0
    yes, no = Vote("q", 1, 0.9), Vote("q", 0, 0.1)
    assert decided([yes, yes], 1, 2, "fail") and decided([no, no], 1, 2, "fail")
    assert not decided([yes, no], 1, 2, "fail")
    unanswered = Vote("q", None, None, error="timeout")
    assert decided([unanswered], 2, 2, "abstain")  # the row fails vote_unanswered this run whatever follows


def test_threshold_zero_asks_no_counting_referee_and_keeps_everything():
    names = ["r0", "r1", "r2"]
    table = _table(3, (0, 1))
    columns, asked, _ = _run_cascade(table, names, 0, "fail")
    assert not asked and _kept(columns, 0) == set(table)


def test_answer_and_blind_referees_are_asked_about_every_question():
    final = SimpleNamespace(answer_referees=["judge"], blind_referees=["blind"], threshold=2)
    counting, checks = counting_and_checks(["a", "judge", "b", "blind", "c"], final)
    assert counting == ["a", "b", "c"] and checks == ["judge", "blind"]
    items = [RefereeItem(f"q{i}", "img.png", "A~B", "Q?") for i in range(4)]
    asked = Counter()

    def ask(chosen, shown, whole):
        for name in chosen:
            asked.update({name: len(shown[name])})
        return {name: {item.qa_id: Vote(item.qa_id, 1, 0.9) for item in shown[name]} for name in chosen}

    ballots, not_asked = cascade_ballots(counting, checks, {n: items for n in [*counting, *checks]}, ask,
                                         threshold=2, policy="fail")
    assert asked == {"a": 4, "b": 4, "judge": 4, "blind": 4}  # c is never needed: a and b said yes
    assert all(names == ["c"] for names in not_asked.values())


def test_a_vote_asked_but_not_returned_is_missing_not_not_asked():
    items = [RefereeItem(f"q{i}", "img.png", "A~B", "Q?") for i in range(3)]

    def ask(chosen, shown, whole):  # r1 loses q1's vote: asked, no ballot
        return {name: {item.qa_id: Vote(item.qa_id, 1 if name == "r0" else 0, 0.5) for item in shown[name]
                       if not (name == "r1" and item.qa_id == "q1")} for name in chosen}

    ballots, not_asked = cascade_ballots(["r0", "r1", "r2"], [], {n: items for n in ("r0", "r1", "r2")}, ask,
                                         threshold=2, policy="fail")
    assert "r1" not in not_asked["q1"] and "q1" not in ballots["r1"]
    columns = _join(_batch({i.qa_id: None for i in items}), ballots, "fail", [*BASE, "not_asked"],
                    not_asked=not_asked)
    reasons = dict(zip(columns["__source_key"], columns[FAILURE_REASON]))
    assert reasons["q1"] == "vote_missing"  # under fail, a lost vote fails the row; never silently skipped


def test_a_later_round_sends_each_image_to_the_server_it_has_for_the_whole_batch():
    # A resume may ask a later referee about another subset of a batch (an earlier vote that failed is now
    # answered): each question must still go to the same replica, whose cached answer then costs nothing.
    from processors.llm.api import RequestGroup
    from processors.llm.settings import LLMSettings
    from processors.referees.endpoint import EndpointReferee
    from processors.referees.settings import RefereeSettings

    servers = ["a", "b", "c"]
    settings = LLMSettings(endpoints={name: {"base_url": f"http://{name}:8000/v1", "api_key_env": None}
                                      for name in servers})

    class Client:  # what plan() reads of an LLMClient
        def __init__(self):
            self.settings = settings

        def endpoint(self, name, overrides=None):
            return SimpleNamespace(endpoint=settings.endpoint(name),
                                   group=lambda requests: RequestGroup(requests, name, overrides))

    referee = EndpointReferee(RefereeSettings(name="v2", preset="internvl2-26b", endpoint={"endpoints": servers}),
                              Client())
    items = [RefereeItem(f"q{i}", f"img{i % 11}.png", "A~B", "Q?") for i in range(60)]

    def server_of(plan) -> dict[str, str]:
        return {request.key: group.endpoint for group, _ in plan for request in group.requests}

    whole = server_of(referee.plan(items))
    for subset in (items[::3], items[1::4], items[:7]):
        kept = server_of(referee.plan(subset, items))
        assert kept == {item.qa_id: whole[item.qa_id] for item in subset}
    alone = server_of(referee.plan(items[::3]))  # without the whole batch the spread may differ
    assert set(alone) == {item.qa_id for item in items[::3]}
