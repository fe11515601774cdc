"""The referee cascade (``stages.score.cascade: true``): a question's remaining referees are not asked once its
outcome under ``final.threshold`` is decided.

The counting referees (those of the paper's protocol: not the final stage's answer or blind checks) are asked
in the config's order - put the cheapest first. A question is decided when its yes votes reach the threshold
(kept whatever the others say) or when even a yes from every referee left could not reach it (dropped). Given
the same votes, the kept set is exactly the full vote's: ``final`` sums the votes that were cast, and a vote
that was not asked could not have changed the outcome.

The first ``min(threshold, n - threshold + 1)`` referees are needed for every question (no outcome is decided
with fewer votes), so they are asked at once; after that each further referee is asked about the questions
still open. The rounds run per batch of the score stage, and with the cascade on the stage keeps one more
shard in flight than without it, so a server waiting for its round is fed by the next batch: there is no
stage-wide barrier.

A vote not asked is recorded as not asked: ``None`` in ``votes`` and ``p_yes`` and the referee's name in the
row's ``not_asked`` list - never 0, never ``missing``. A vote a referee failed to give decides the question
where the policy does: under ``fail`` the row fails anyway, and an unanswered vote (the server gave no
answer) fails it for this run (the next run asks again); under ``zero``/``abstain`` it counts 0 yes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from processors.llm.request import UNANSWERED
from processors.referees.protocol import RefereeItem, Vote


def first_round(referees: int, threshold: int) -> int:
    """How many referees every question needs before its outcome can be decided (0: decided without any)."""
    if threshold <= 0 or threshold > referees:
        return 0
    return min(threshold, referees - threshold + 1)


def decided(votes: Sequence[Vote], left: int, threshold: int, policy: str) -> bool:
    """Whether the votes cast so far decide the question, with ``left`` counting referees not yet asked."""
    failed = [vote for vote in votes if not vote.ok]
    if any(vote.error in UNANSWERED for vote in failed):  # fails vote_unanswered this run, whatever comes next
        return True
    if failed and policy == "fail":  # fails vote_missing, whatever comes next
        return True
    yes = sum(vote.vote for vote in votes if vote.ok)
    return yes >= threshold or yes + left < threshold


def outcome_decided(yes: int, left: int, threshold: int) -> bool:
    """The rule on yes counts alone (estimates replay it on a pilot's vote table)."""
    return yes >= threshold or yes + left < threshold


def cascade_ballots(counting: Sequence[str], checks: Sequence[str], shown: dict[str, list[RefereeItem]],
                    ask: Callable[[list[str], dict[str, list[RefereeItem]], dict[str, list[RefereeItem]]],
                  dict[str, dict[str, Vote]]], *,
                    threshold: int, policy: str) -> tuple[dict[str, dict[str, Vote]], dict[str, list[str]]]:
    """The ballots of every referee by qa_id, and per qa_id the counting referees not asked.

    ``ask(names, subset, shown)`` asks referees ``names`` about their items in ``subset`` (taken from the
    whole batch, ``shown``) at once and returns their ballots (``score_all``). ``checks`` (answer and blind
    referees) are asked about every question in the first round, beside the first counting referees. A
    referee that was asked about a question and returned no vote is *missing* there, not "not asked"."""
    open_ids = [item.qa_id for item in shown[counting[0]]] if counting else []
    ballots: dict[str, dict[str, Vote]] = {name: {} for name in [*counting, *checks]}
    asked_about: dict[str, set[str]] = {name: set() for name in counting}
    asked, take = 0, first_round(len(counting), threshold)
    if not take:
        open_ids = []  # every outcome is decided before any vote
    names = [*counting[:take], *checks]
    while names:
        wanted = set(open_ids)
        subset = {name: shown[name] if name in checks else [i for i in shown[name] if i.qa_id in wanted]
                  for name in names}
        for name in names:
            if name in asked_about:
                asked_about[name].update(item.qa_id for item in subset[name])
        for name, votes in ask(names, subset, shown).items():
            ballots[name].update(votes)
        asked += take
        left = len(counting) - asked
        open_ids = [qa_id for qa_id in open_ids
                    if not decided(_cast(ballots, counting[:asked], qa_id), left, threshold, policy)]
        take = 1
        names = counting[asked:asked + 1] if open_ids and left else []
    every = [item.qa_id for item in shown[counting[0]]] if counting else []
    not_asked = {qa_id: [name for name in counting if qa_id not in asked_about[name]] for qa_id in every}
    return ballots, not_asked


def _cast(ballots: dict[str, dict[str, Vote]], names: Sequence[str], qa_id: str) -> list[Vote]:
    missing = Vote(qa_id, None, None, error="vote_missing", detail="no vote returned")
    return [ballots[name].get(qa_id, missing) for name in names]


def counting_and_checks(referee_names: Sequence[str], final_config: Any) -> tuple[list[str], list[str]]:
    """The referees the cascade orders (config order) and the final stage's checks, asked about every question."""
    special = set(getattr(final_config, "answer_referees", ())) | set(getattr(final_config, "blind_referees", ()))
    return ([name for name in referee_names if name not in special],
            [name for name in referee_names if name in special])
