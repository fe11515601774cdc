"""Stage ``score`` (step 5, referees): every configured referee votes 0/1 on each (image, task type, question).

Each referee scores the whole batch (grouped by image inside the backend); votes are joined back to the QA
rows by ``qa_id`` through a dict (a hash join: O(n), unlike the original's nested loop over a non-unique
key). A vote a referee could not give follows ``missing_vote``:

- ``fail``: the QA leaves as a failure ``vote_missing`` naming the referee and its error (the default:
  nothing is decided on partial evidence);
- ``zero``: the missing vote counts as 0;
- ``abstain``: it counts as nothing (the total is the sum of the votes that were cast).

Under ``zero``/``abstain`` the referee's name is listed in the row's ``missing`` column: explicit, never silent.
A vote the *server* could not give (an HTTP error or timeout after the retries) is none of these: the row fails
``vote_unanswered`` under every policy, the stage does not finish, and the next run asks it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig
from processors.llm.request import UNANSWERED
from processors.referees.cascade import cascade_ballots, counting_and_checks, first_round
from processors.referees.factory import llm_endpoints, runs_on_device
from processors.referees.protocol import RefereeItem
from processors.referees.settings import RefereeSettings

if TYPE_CHECKING:
    from processors.llm.client import LLMClient

REFEREE_PROMPT_CHARS = 700  # estimate: instruction + task type + question
VOTE_UNANSWERED = "vote_unanswered"  # a referee's server could not answer: not judged, asked again next run
QA_COLUMNS = ("qa_id", "image_id", "task_type", "question", "answer")
CASCADE_PART = "~cascade"  # settings_parts key (never a referee name: those are identifiers)
PAPER_REFEREES = [
    RefereeSettings(name="glm4v_9b", preset="glm-4v-9b"),
    RefereeSettings(name="internvl_chat_v15", preset="internvl-chat-v1.5"),
    RefereeSettings(name="internvl2_26b", preset="internvl2-26b"),
]


class ScoreConfig(StageConfig):
    referees: list[RefereeSettings] = Field(default_factory=lambda: list(PAPER_REFEREES), min_length=1)
    missing_vote: Literal["fail", "zero", "abstain"] = Field(
        "fail", description="a vote a referee could not give: fail = the row fails vote_missing (also when the "
        "referee is an answer or blind check of the final stage: an outage of an optional check then drops rows "
        "the protocol would keep); abstain = the row goes on without it, named in `missing`; zero = counted as "
        "0 (the final stage's agreement report reads it as missing)")
    cascade: bool = Field(
        False, description="ask the referees in this list's order (cheapest first) and stop asking about a "
        "question once its outcome under final.threshold is decided: the same samples are kept for fewer "
        "referee requests (processors.referees.cascade). A vote not asked is None and named in the row's "
        "not_asked column. The final stage's answer and blind referees are asked about every question")

    @field_validator("referees")
    @classmethod
    def _unique_names(cls, referees: list[RefereeSettings]) -> list[RefereeSettings]:
        names = [r.name for r in referees]
        if len(set(names)) != len(names):
            raise ValueError(f"referee names must be unique, got {names}")
        return referees


class ScoreStage(Stage):
    name = "score"
    description = "referee votes and p(yes) per question"
    Config = ScoreConfig
    key = "qa_id"
    upstream = "qa"
    side_inputs = ("images",)
    batch_size = 256
    # A vote the referee's server did not give (an HTTP error, a timeout) is no vote: the row fails
    # ``vote_unanswered`` whatever ``missing_vote`` says, and the next run asks it again.
    unanswered_reasons = UNANSWERED | {VOTE_UNANSWERED}

    def shards_in_flight(self, config: ScoreConfig) -> int:
        """Two when every referee is an endpoint (the next shard fills the servers' windows at a boundary),
        three under the cascade (a shard waiting on its later rounds leaves the first referees' servers idle);
        one with a local referee, whose model on the GPU takes one batch at a time."""
        if any(runs_on_device(referee) for referee in config.referees):
            return 1
        return 3 if config.cascade else 2

    def resources(self, config: ScoreConfig) -> dict:
        """Local referees: a pool of GPU actors, each holding every local referee's model, in the runtime_env
        the referees name (one per stage: one process holds one environment). Endpoint referees only: an LLM
        pool, each worker calling every replica and leasing the servers' limits from the shared budget."""
        from processors.llm.accounts import WORKER_SHARE
        from processors.stages.llm_stage import llm_pool_resources

        local = [r for r in config.referees if runs_on_device(r)]
        if not local:
            return llm_pool_resources()
        # With endpoint referees too, the GPU workers call servers: on the driver's node (the request cache)
        remote = {"driver_node": True, "limit_share": WORKER_SHARE} if self.llm_endpoints(config) else {}
        envs = [r.ray_runtime_env() for r in local if r.runtime_env is not None]
        if any(env != envs[0] for env in envs):
            raise ValueError("stages.score: local referees name different runtime_env; one Ray worker holds them "
                             "all, so they must share one (or serve each with vLLM as an endpoint referee: "
                             "docs/referees.md)")
        return {"kind": "gpu", "num_cpus": 1, "num_gpus": 0 if all(r.device == "cpu" for r in local) else 1,
                "workers": None, "runtime_env": envs[0] if envs else None,
                "gpu_optional": all(r.device == "auto" for r in local), **remote}

    def input_key(self, config: ScoreConfig) -> str:
        return "qa_id"

    def fingerprint_config(self, config: ScoreConfig) -> dict:
        # Each referee by what changes its votes (RefereeSettings.fingerprint_parts: not batch size or device).
        parts = {"referees": [r.fingerprint_parts() for r in config.referees], "missing_vote": config.missing_vote}
        if config.cascade:  # only when on: the paper config keeps its fingerprint
            parts["cascade"] = True
        return parts

    def llm_endpoints(self, config: ScoreConfig) -> list[str]:
        return [name for r in config.referees for name in llm_endpoints(r)]

    def settings_parts(self, config: ScoreConfig, settings) -> dict:
        from processors.llm.settings import endpoint_parts

        # Each endpoint as the referee calls it: the preset's served name and image size applied.
        parts = {
            r.name: [endpoint_parts(settings, n, key=f"stages.score.referees[{r.name}].endpoint",
                                    overrides=r.endpoint_overrides)
                     for n in llm_endpoints(r)]
            for r in config.referees if not runs_on_device(r)
        }
        if config.cascade:  # which votes are asked depends on the final stage's threshold and checks
            counting, checks = counting_and_checks([r.name for r in config.referees], settings.stages.final)
            parts[CASCADE_PART] = {"threshold": settings.stages.final.threshold, "counting": counting,
                                   "checks": checks}
        return parts

    def features(self, config: ScoreConfig):
        import datasets

        names = [r.name for r in config.referees]
        return datasets.Features(
            {
                **{column: datasets.Value("string") for column in QA_COLUMNS},
                "votes": {name: datasets.Value("int8") for name in names},
                "p_yes": {name: datasets.Value("float32") for name in names},
                "total": datasets.Value("int32"),
                "missing": datasets.List(datasets.Value("string")),
                # Under the cascade only: the referees not asked (their votes could not change the outcome).
                **({"not_asked": datasets.List(datasets.Value("string"))} if config.cascade else {}),
            }
        )

    def estimate(self, config: ScoreConfig, run_config, assumptions):
        from processors.llm.estimate import project

        llm = run_config.llm
        questions = round(assumptions.images * assumptions.filter_pass * assumptions.kept_per_image
                          * run_config.stages.qa.questions_per_type)
        rows = []
        if config.cascade:
            counting, _ = counting_and_checks([r.name for r in config.referees], run_config.stages.final)
            later = counting[first_round(len(counting), run_config.stages.final.threshold):]
            if later:
                assumptions.notes.append(
                    f"referee cascade: the later referees ({', '.join(later)}) are asked only where the earlier "
                    "referees left the outcome open; counted here for every question (an upper bound). "
                    "`estimate --from-run` projects them from a pilot's agreement")
        for referee in config.referees:
            if runs_on_device(referee):
                assumptions.notes.append(f"referee {referee.name} runs locally: GPU time, no API requests")
                continue
            name = llm_endpoints(referee)[0]
            if name in llm.endpoints:
                rows.append((f"score:{referee.name}", project(
                    llm, name, requests=questions, images_per_request=1, prompt_text_chars=REFEREE_PROMPT_CHARS,
                    completion_tokens=1)))
        return rows

    def make_batch_fn(self, config: ScoreConfig, ctx):
        from processors.image_locator import image_locator
        from processors.llm.client import LLMClient
        from processors.referees.factory import build_referee

        image_file = image_locator(ctx)
        client = LLMClient.for_stage(ctx)
        referees = [build_referee(s, client) for s in config.referees]
        columns = list(self.features(config))
        by_name = dict(zip((s.name for s in config.referees), zip(config.referees, referees)))
        final = ctx.settings.stages.final

        def ask(names: list[str], shown: dict[str, list[RefereeItem]], whole: dict[str, list[RefereeItem]]
                ) -> dict[str, dict]:
            chosen = [by_name[name] for name in names]
            return score_all([s for s, _ in chosen], [r for _, r in chosen], shown, client, universe=whole)

        def score(batch: dict[str, list]) -> dict[str, list]:
            items, unavailable = _items(batch, image_file)
            shown = {s.name: items if s.see_answer else [_without_answer(item) for item in items]
                     for s in config.referees}
            if not config.cascade:
                return _join(batch, score_all(config.referees, referees, shown, client), config.missing_vote,
                             columns, unavailable)
            counting, checks = counting_and_checks(list(by_name), final)
            ballots, not_asked = cascade_ballots(counting, checks, shown, ask, threshold=final.threshold,
                                                 policy=config.missing_vote)
            ordered = {name: ballots[name] for name in by_name}
            return _join(batch, ordered, config.missing_vote, columns, unavailable, not_asked)

        return score


def _items(batch: dict[str, list], image_file) -> tuple[list[RefereeItem], dict[str, str]]:
    """The rows to judge, and why the others cannot be (their image is not to be found: they fail alone)."""
    from processors.image_locator import ImageUnavailable

    items, unavailable = [], {}
    for i, qa_id in enumerate(batch["qa_id"]):
        try:
            path = image_file(batch["image_id"][i])
        except ImageUnavailable as exc:
            unavailable[qa_id] = str(exc)
            continue
        items.append(RefereeItem(qa_id=qa_id, image_path=str(path), task_type=batch["task_type"][i],
                                 question=batch["question"][i], answer=batch["answer"][i]))
    return items, unavailable


STOP_WAIT_S = 16.0  # after Ctrl-C/SIGTERM, how long the endpoint calls may take to unwind (> the accounts' UNWIND_S)


def score_all(settings: list[RefereeSettings], referees: list, shown: dict[str, list[RefereeItem]],
              client: "LLMClient", universe: dict[str, list[RefereeItem]] | None = None) -> dict[str, dict]:
    """Every referee at once: the calls of those that run on the event loop (``runs_on_device`` false: all
    their servers) through ``client`` in a helper thread, while those on the device run on this thread (the
    GPU); votes by referee and qa_id.

    A stop on this thread (Ctrl-C, SIGTERM, a local referee failing) cancels the endpoint calls at once:
    nothing more is sent or paid for, and what was answered is cached and journalled."""
    import concurrent.futures
    import contextvars
    import threading

    # ``universe``: the whole batch a subset was taken from (the cascade), so each image keeps its server
    remote = [(s.name, r, r.plan(shown[s.name], universe[s.name]) if universe else r.plan(shown[s.name]))
              for s, r in zip(settings, referees) if not runs_on_device(s)]
    groups = [group for _, _, plan in remote for group, _ in plan]
    ballots: dict[str, dict] = {}
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="referee-endpoints")
    # The helper thread runs in this thread's context: the shard's usage meter and stop event go with it.
    pending = pool.submit(contextvars.copy_context().run, client.send_groups, groups, stop=stop,
                          return_exceptions=True) if groups else None
    try:
        for s, referee in zip(settings, referees):
            if runs_on_device(s):
                ballots[s.name] = {vote.qa_id: vote for vote in referee.score(shown[s.name])}
        results = pending.result() if pending is not None else []
    except BaseException:
        stop.set()
        if pending is not None:  # let the calls unwind (caches closed, spend journalled), but not for long
            concurrent.futures.wait([pending], timeout=STOP_WAIT_S)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    def run(more_groups: list) -> list:  # a server went down: its share to the referee's other servers
        return client.send_groups(more_groups, return_exceptions=True)

    for name, referee, plan in remote:
        mine, results = results[:len(plan)], results[len(plan):]
        ballots[name] = {vote.qa_id: vote for vote in referee.settle(shown[name], plan, mine, run)}
    return {s.name: ballots[s.name] for s in settings}


def _without_answer(item: RefereeItem) -> RefereeItem:
    return RefereeItem(item.qa_id, item.image_path, item.task_type, item.question, None)


def _join(batch: dict[str, list], ballots: dict[str, dict], policy: str, columns: list[str],
          unavailable: dict[str, str] | None = None,
          not_asked: dict[str, list[str]] | None = None) -> dict[str, list]:
    from processors.image_locator import IMAGE_MISSING

    out = BatchOutput(columns)
    for i, qa_id in enumerate(batch["qa_id"]):
        if unavailable and qa_id in unavailable:
            out.fail(qa_id, IMAGE_MISSING, unavailable[qa_id])
            continue
        votes, p_yes, missing, errors, unanswered = {}, {}, [], [], []
        skipped = not_asked.get(qa_id, []) if not_asked is not None else []
        for name, by_qa in ballots.items():
            if name in skipped:  # not asked: the outcome was decided without it (never 0, never missing)
                votes[name], p_yes[name] = None, None
                continue
            vote = by_qa.get(qa_id)
            if vote is None or not vote.ok:
                missing.append(name)
                errors.append(f"{name}: {vote.error if vote else 'no vote returned'}"
                              f"{f' ({vote.detail})' if vote and vote.detail else ''}")
                if vote is not None and vote.error in UNANSWERED:
                    unanswered.append(errors[-1])
                votes[name], p_yes[name] = (0 if policy == "zero" else None), None
            else:
                votes[name], p_yes[name] = vote.vote, vote.p_yes
        if unanswered:  # the server gave no answer: not a vote of 0, not an abstention, but a row to ask again
            out.fail(qa_id, VOTE_UNANSWERED, "; ".join(unanswered))
            continue
        if missing and policy == "fail":
            out.fail(qa_id, "vote_missing", "; ".join(errors))
            continue
        row = {column: batch[column][i] for column in QA_COLUMNS}
        total = sum(v for v in votes.values() if v is not None)
        extra = {"not_asked": skipped} if not_asked is not None else {}
        out.add(qa_id, {**row, "votes": votes, "p_yes": p_yes, "total": total, "missing": missing, **extra})
    return out.to_columns()
