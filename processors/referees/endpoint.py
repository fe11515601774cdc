"""The OpenAI-compatible referee backend: a constrained one-digit reply + logprobs against any endpoint.

A vote is a constrained choice: the request asks the server for exactly one of ``"0"``/``"1"``
(``RefereeEndpoint.vote_constraint``: vLLM's ``structured_outputs.choice``, SGLang's ``regex``, OpenAI's
``logit_bias``) with ``max_tokens=1`` and the top logprobs, and reads both digits' probabilities from the first
token: p(yes) = p("1") / (p("0") + p("1")), each digit summed over every token that is that digit after
stripping whitespace (" 1", "1", "▁1"). vLLM reports the logprobs after the constraint (both digits, every other
token at -9999), so both are always known there. Without a constraint a digit can fall outside the top
logprobs: the vote is still the digit that is listed (the other is below every listed token), p(yes) becomes a
bound and the vote's ``detail`` says so; with neither digit listed the row fails with what the server did list.

Several endpoints can share one referee's load: the config lists them (``endpoint: {endpoints: [a, b]}``) and
each *image* goes to one of them, so all questions about an image hit the same server's prefix cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from builder.ids import text_id
from processors.llm.hosts import rejects_unknown_fields
from processors.referees.prompt import PROMPT_VERSION, build_messages
from processors.referees.protocol import RefereeItem, Vote

if TYPE_CHECKING:
    from processors.llm.client import EndpointCall, LLMClient
    from processors.referees.settings import RefereeSettings

logger = logging.getLogger(__name__)

DIGITS = ("0", "1")
# cl100k_base and o200k_base (GPT-4, GPT-4o) encode the bare digits 0-9 as the token ids 15-24.
OPENAI_DIGIT_TOKEN_IDS = {"0": 15, "1": 16}
MASKED_LOGPROB = -9000.0  # vLLM reports tokens a constraint excluded at -9999: not candidates
VOTE_SCAN_TOKENS = 8  # how far into the reply a fenced or quoted vote's digit is looked for


def resolved_constraint(settings: RefereeSettings, base_url: str) -> str:
    """``vote_constraint`` with ``auto`` decided by the server: OpenAI takes logit_bias, others vLLM's form."""
    constraint = settings.endpoint.vote_constraint
    if constraint != "auto":
        return constraint
    return "logit_bias" if rejects_unknown_fields(base_url) else "structured_outputs"


class ConstraintIgnoredError(RuntimeError):
    """The server answered constrained votes with text that is no digit: it ignores the constraint (vLLM
    before 0.12 ignores ``structured_outputs``); every further row would fail the same way."""


IGNORED_AT = 8  # constrained replies that were no digit, in one call, before the stage is stopped


def constraint_body(constraint: str) -> dict[str, Any]:
    """The request fields that restrict the reply to one digit, per server kind."""
    if constraint == "structured_outputs":  # vLLM >= 0.12 (guided_choice was removed there and is ignored)
        return {"structured_outputs": {"choice": list(DIGITS)}}
    if constraint == "regex":  # SGLang's extra request parameter
        return {"regex": "[01]"}
    if constraint == "logit_bias":  # OpenAI: equal bias keeps p1 / (p0 + p1) unchanged
        return {"logit_bias": {str(i): 100 for i in OPENAI_DIGIT_TOKEN_IDS.values()}}
    return {}


# What may wrap a vote's digit: a code fence (with its language), quotes, brackets; and what may follow it (JSON
# debris: closing brackets, quotes, a fence, punctuation). No letter, no other digit: "1 or 0", "10", "yes 1"
# and '{"vote": 1}' are no vote.
_VOTE_WRAP = re.compile(r"\s*(?:```[A-Za-z]*)?[\s\"'\[{(]*")
_VOTE_DEBRIS = re.compile(r"[\s\"'`\[\]{}(),.;:]*")
_FENCED = re.compile(r"\s*```[A-Za-z]*[ \t]*\n?(.*?)\s*```\s*", re.S)


def vote_digit(text: str | None) -> str | None:
    """The "0" or "1" a vote reply gives: the digit alone, or wrapped in a code fence, quotes or brackets and
    followed by JSON debris (``"```json\\n1\\n```"``, ``'"1"'``, ``"[1]"``, ``"1\\n}]"``); None for anything
    else, and for anything holding another digit or a word."""
    text = text or ""
    body = text[_VOTE_WRAP.match(text).end():]
    if body[:1] in DIGITS and _VOTE_DEBRIS.fullmatch(body, 1):
        return body[0]
    return None


def unfenced(text: str) -> str:
    """``text`` without a Markdown code fence around it (a free answer sent as a code block)."""
    match = _FENCED.fullmatch(text)
    return match.group(1) if match else text.strip()


def one_digit(text: str) -> str:
    """A constrained reply is one digit (perhaps fenced or followed by JSON debris: ``vote_digit``); anything
    else is a broken reply, asked again (the engine retries)."""
    if vote_digit(text) is None:
        raise ValueError(f"the vote was constrained to 0 or 1 but the reply is {text[:40]!r}")
    return text


@dataclass(frozen=True)
class DigitReading:
    """What the first token's logprobs say about the digits: each digit's probability where listed, and the
    smallest listed probability (a bound on any digit that is not listed)."""

    p0: float | None
    p1: float | None
    floor: float
    listed: int
    top: tuple[tuple[str, float], ...]


def read_digits(logprobs: list[dict[str, Any]] | None) -> DigitReading | None:
    """The digits' probabilities from the first generated token's top logprobs; None without logprobs."""
    if not logprobs:
        return None
    first = logprobs[_vote_position(logprobs)]
    candidates = first.get("top_logprobs") or [first]
    mass: dict[str, float | None] = {digit: None for digit in DIGITS}
    listed = []
    for candidate in candidates:
        logprob = float(candidate.get("logprob", -math.inf))
        if logprob <= MASKED_LOGPROB:
            continue
        token = str(candidate.get("token", ""))
        listed.append((token, logprob))
        digit = token.strip().lstrip("▁Ġ")
        if digit in mass:
            mass[digit] = (mass[digit] or 0.0) + math.exp(logprob)
    floor = min((math.exp(lp) for _, lp in listed), default=0.0)
    return DigitReading(mass["0"], mass["1"], floor, len(listed), tuple(listed[:5]))


def _vote_position(logprobs: list[dict[str, Any]]) -> int:
    """The generated token that holds the vote: the first, or the first digit after tokens that only wrap it
    (a code fence, quotes, brackets: ``vote_digit``'s wrapping) when the first is no digit."""
    prefix = ""
    for index, entry in enumerate(logprobs[:VOTE_SCAN_TOKENS]):
        token = str(entry.get("token", ""))
        if token.strip().lstrip("▁Ġ") in DIGITS:
            return index if _VOTE_WRAP.fullmatch(prefix) else 0
        prefix += token
    return 0


def digit_probabilities(logprobs: list[dict[str, Any]] | None) -> tuple[float, float] | None:
    """(p0, p1) when both digits are among the top logprobs, else None."""
    reading = read_digits(logprobs)
    if reading is None or reading.p0 is None or reading.p1 is None:
        return None
    return reading.p0, reading.p1


class EndpointReferee:
    """A referee that asks an OpenAI-compatible server (see the module docstring), through ``client``: the
    score stage's ``LLMClient``, which resolves each of its servers once."""

    def __init__(self, settings: RefereeSettings, client: "LLMClient"):
        self.settings = settings
        self.name = settings.name
        self.client = client
        self.preset = settings.resolved_preset()
        # Servers of this referee taken out for the rest of the run (their breaker opened), with why: their
        # share goes to the others. Shared by the shards in flight (one batch function), like the breakers.
        self._down: dict[str, BaseException] = {}
        self._down_lock = threading.Lock()

    def live_endpoints(self) -> list[str]:
        """The servers still serving this referee; the breaker's error when none is left."""
        names = self.settings.endpoint_names()
        live = [name for name in names if name not in self._down]
        if not live:
            raise self._down[names[-1]]
        return live

    def take_out(self, endpoint: str, error: BaseException) -> None:
        """A server whose breaker opened serves no more of this referee's questions in this run."""
        with self._down_lock:
            if endpoint in self._down:
                return
            self._down[endpoint] = error
            left = [name for name in self.settings.endpoint_names() if name not in self._down]
        if left:
            logger.warning("referee %s: server llm.endpoints.%s is taken out for the rest of this run (%s); its "
                           "questions go to %s", self.name, endpoint, error, ", ".join(left))

    def _request(self, item: RefereeItem, constraint: str):
        from processors.llm.request import LLMRequest

        messages = build_messages(item.task_type, item.question, item.answer,
                                  image_part={"type": "image_path", "path": item.image_path})
        if self.preset.system_prompt:
            messages.insert(0, {"role": "system", "content": self.preset.system_prompt})
        extra = constraint_body(constraint)
        if self.settings.endpoint.request_mm_processor_kwargs and self.preset.mm_processor_kwargs:
            extra["mm_processor_kwargs"] = dict(self.preset.mm_processor_kwargs)
        if self.preset.chat_template_kwargs:  # e.g. GLM-4.5V's thinking off: the first token is the answer
            extra["chat_template_kwargs"] = dict(self.preset.chat_template_kwargs)
        checked = {"parse": one_digit} if constraint != "none" else {}  # unconstrained: any text, read logprobs
        return LLMRequest(key=item.qa_id, messages=messages, prompt_version=PROMPT_VERSION, max_tokens=1,
                          temperature=0.0, logprobs=True, top_logprobs=self.settings.endpoint.top_logprobs,
                          accept_truncated=True, extra_body=extra, **checked)

    def plan(self, items: Sequence[RefereeItem], universe: Sequence[RefereeItem] | None = None
             ) -> list[tuple[Any, str]]:
        """The calls that score ``items``: one ``RequestGroup`` per endpoint serving this referee (each image
        to one of them, so its questions share that server's prefix cache), with the constraint used.

        ``universe``: the items ``items`` were taken from (the referee cascade asks a later referee about a
        subset of a batch): the images are spread over the servers as for the whole batch, so a question goes
        to the same server whichever subset a run asks (the request cache's key names the server)."""
        plan = []
        wanted = {item.qa_id for item in items}
        spread = spread_by_image(universe if universe is not None else items, self.live_endpoints())
        for name, share in spread.items():
            share = [item for item in share if item.qa_id in wanted]
            if share:
                call = self.call(name)
                constraint = resolved_constraint(self.settings, call.endpoint.base_url)
                plan.append((call.group([self._request(item, constraint) for item in share]), constraint))
        return plan

    def call(self, name: str) -> "EndpointCall":
        """Endpoint ``name`` as this referee calls it: the preset's served name and image size applied."""
        return self.client.endpoint(name, self.settings.endpoint_overrides(self.client.settings.endpoint(name)))

    def votes(self, items: Sequence[RefereeItem], plan: list[tuple[Any, str]], results: list[list]) -> list[Vote]:
        """The votes of ``items``, in order, from the results of ``plan``'s calls."""
        asked = self.settings.endpoint.top_logprobs
        votes: dict[str, Vote] = {}
        for (group, constraint), group_results in zip(plan, results):
            if constraint != "none":
                self._check_constraint_applied(group.endpoint, constraint, group_results)
            votes.update((result.key, _vote(result, asked, constraint)) for result in group_results)
        return [votes[item.qa_id] for item in items]

    def _check_constraint_applied(self, endpoint: str, constraint: str, results: list) -> None:
        ignored = [r for r in results if r.reason == "unparsable" and (r.raw_text or "").strip() not in DIGITS]
        if len(ignored) >= min(IGNORED_AT, max(1, len(results) // 2)):
            raise ConstraintIgnoredError(
                f"referee {self.name!r}: the server of llm.endpoints.{endpoint} answered {len(ignored)} of "
                f"{len(results)} votes with text that is no digit (e.g. {ignored[0].raw_text!r:.40}) although "
                f"the vote was constrained ({constraint}): it ignores that constraint. Set the referee's "
                "endpoint.vote_constraint to one the server applies (vLLM >= 0.12: structured_outputs, SGLang: "
                "regex, OpenAI: logit_bias) or to none (the vote is then read from the logprobs alone)")

    def settle(self, items: Sequence[RefereeItem], plan: list[tuple[Any, str]], outcomes: list,
               run: Callable[[list], list]) -> list[Vote]:
        """The votes of ``items`` from the outcomes of ``plan``'s calls (results, or the error of a call).

        A server whose breaker opened is taken out (``take_out``) and its share goes to the others: first what
        it had answered before is read from the request cache (not paid again), then the rest is planned over
        the servers left and sent with ``run`` (groups -> outcomes); until every question has an answer or no
        server is left (its breaker's error is raised then, as with one server)."""
        from processors.llm.errors import CircuitOpenError

        by_id = {item.qa_id: item for item in items}
        settled_plan, settled = [], []
        while True:
            errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, CircuitOpenError)]
            if errors:
                raise errors[0]
            dead = [(group, constraint, error) for (group, constraint), error in zip(plan, outcomes)
                    if isinstance(error, CircuitOpenError)]
            for (group, constraint), outcome in zip(plan, outcomes):
                if not isinstance(outcome, BaseException):
                    settled_plan.append((group, constraint))
                    settled.append(outcome)
            if not dead:
                return self.votes(items, settled_plan, settled)
            for group, _, error in dead:
                self.take_out(group.endpoint, error)
            salvage = [(dataclasses.replace(group, cache_only=True), constraint) for group, constraint, _ in dead]
            answered: set[str] = set()
            for (group, constraint), results in zip(salvage, run([group for group, _ in salvage])):
                if isinstance(results, BaseException):
                    raise results
                kept = [result for result in results if result.ok]
                answered.update(result.key for result in kept)
                settled_plan.append((group, constraint))
                settled.append(kept)
            left = [by_id[request.key] for group, _, _ in dead for request in group.requests
                    if request.key not in answered]
            if not left:
                return self.votes(items, settled_plan, settled)
            plan = self.plan(left)  # over the servers still up; raises the breaker's error when none is
            outcomes = run([group for group, _ in plan])

    def score(self, items: Sequence[RefereeItem]) -> list[Vote]:
        """Score ``items``, every endpoint of this referee at once (``ScoreStage`` runs all referees at once)."""
        def run(groups: list) -> list:
            return self.client.send_groups(groups, return_exceptions=True)

        plan = self.plan(items)
        return self.settle(items, plan, run([group for group, _ in plan]), run)


def spread_by_image(items: Sequence[RefereeItem], names: Sequence[str]) -> dict[str, list[RefereeItem]]:
    """Each image's questions to one server (they share its prefix cache), the servers evenly loaded: images
    with the most questions first, each to the server with the fewest questions so far (ties: the image's hash
    picks). A hash alone split 506 questions 309/197 over two servers, so the pair took as long as its busier
    half. The split depends on the batch's items alone - not on ``max_concurrency`` or any other speed knob -
    so a resume asks each question of the same server, whose answer the request cache holds (its key names
    the server)."""
    by_image: dict[str, list[RefereeItem]] = {}
    for item in items:
        by_image.setdefault(item.image_path, []).append(item)
    names = list(names)
    load = dict.fromkeys(names, 0)
    spread: dict[str, list[RefereeItem]] = {name: [] for name in names}
    for path in sorted(by_image, key=lambda path: (-len(by_image[path]), text_id(path))):
        preferred = int(text_id(path), 16) % len(names)
        name = min(names, key=lambda n: (load[n], (names.index(n) - preferred) % len(names)))
        spread[name].extend(by_image[path])
        load[name] += len(by_image[path])
    return spread


def _vote(result, asked: int, constraint: str) -> Vote:
    if not result.ok:
        return Vote(result.key, None, None, error=result.reason or "api_error", detail=result.detail)
    reading = read_digits(result.logprobs)
    text = (result.raw_text or "").strip()
    if reading is None:  # a server that returns no logprobs: the reply text is the vote
        digit = vote_digit(text)
        if digit is not None:
            return Vote(result.key, int(digit), float(digit),
                        detail="the server returned no logprobs: p_yes is the reply digit itself")
        return Vote(result.key, None, None, error="unparsable",
                    detail=f"referee reply {text[:40]!r} is not 0 or 1 and the server returned no logprobs")
    p0, p1 = reading.p0, reading.p1
    if p0 is not None and p1 is not None and p0 + p1 > 0:
        return Vote(result.key, int(p1 > p0), p1 / (p0 + p1))
    if p0 is None and p1 is None:
        listed = ", ".join(f"{token!r} {logprob:.2f}" for token, logprob in reading.top) or "nothing"
        return Vote(result.key, None, None, error="unparsable", detail=(
            f"neither '0' nor '1' is among the {reading.listed} top logprobs of the first token (asked for "
            f"{asked}; listed: {listed}); reply {text[:40]!r}. The vote constraint ({constraint}) was not "
            "applied by the server: set the referee's endpoint.vote_constraint to what it supports"))
    # One digit listed: the other is below every listed token, so the vote is the listed digit and p_yes
    # is bounded by the smallest listed probability.
    known, missing = ("1", "0") if p1 is not None else ("0", "1")
    p_known = p1 if p1 is not None else p0
    bound = min(reading.floor, p_known)
    p_yes = p_known / (p_known + bound) if known == "1" else bound / (p_known + bound)
    side = "lower" if known == "1" else "upper"
    return Vote(result.key, int(known), p_yes, detail=(
        f"p({missing}) is not among the {reading.listed} top logprobs (below {bound:.3g}): p_yes "
        f"{p_yes:.3f} is a {side} bound"))
