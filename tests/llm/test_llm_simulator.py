"""The simulator itself: responders, determinism, logprobs, counters, CLI options; and the estimates."""

from __future__ import annotations

import argparse
import json
import urllib.request

import pytest

from processors.llm import LLMSettings, estimate_requests, project
from processors.llm import sim_responders
from processors.llm.images import image_tokens
from processors.llm.request import LLMRequest
from processors.llm.sim_responders import Responder
from processors.llm.sim_thread import add_arguments, options_from_args


def _post(sim, body: dict, key: str = "k1") -> dict:
    request = urllib.request.Request(sim.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Key": key})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


ECHO = Responder("echo-test", matches=lambda m: "ECHO-TEST" in sim_responders.message_text(m),
                 respond=lambda m, rng: f"echo {rng.randint(0, 10**6)}")


def test_registered_responder_answers_its_prompt(simulator, monkeypatch):
    monkeypatch.setattr(sim_responders, "RESPONDERS", ["test_llm_simulator:ECHO"])  # how a step registers
    sim = simulator()
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "ECHO-TEST"}]}]}
    first, second = _post(sim, body), _post(sim, body, key="k2")
    assert first["choices"][0]["message"]["content"].startswith("echo ")
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    other = _post(sim, {"model": "m", "messages": [{"role": "user", "content": "plain"}]})
    assert other["choices"][0]["message"]["content"].startswith("Simulated answer")
    stats = sim.stats()
    assert stats["per_key"] == {"k1": 2, "k2": 1} and stats["ok_per_key"]["k1"] == 2 and stats["duplicates"] == 1


def test_responder_entries_must_be_responders():
    with pytest.raises(TypeError):
        sim_responders.resolve(["json:dumps"])


def test_logprobs_for_a_one_token_vote(simulator):
    sim = simulator()
    body = {"model": "m", "max_tokens": 1, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "vote"}]}
    reply = _post(sim, body)
    tops = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert len(tops) == 2 and all(t["logprob"] <= 0 for t in tops)


def test_cli_options_round_trip():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "8123", "--rate-5xx", "0.05", "--rpm-limit", "3000", "--fail-kind", "drop"])
    options = options_from_args(args)
    assert (options.port, options.rate_5xx, options.rpm_limit, options.fail_kind) == (8123, 0.05, 3000, "drop")
    with pytest.raises(SystemExit):
        parser.parse_args(["--fail-kind", "nonsense"])


def test_image_token_counts_follow_gpt4o_rules():
    assert image_tokens(4000, 3000, "low") == 85
    assert image_tokens(1024, 1024, "high") == 765
    assert image_tokens(2048, 4096, "high") == 85 + 170 * 6


def test_projection_and_estimate_use_the_price_table():
    settings = LLMSettings()
    online = project(settings, "gpt4o", requests=1000, prompt_text_chars=400, images_per_request=1,
                     completion_tokens=100)
    assert online.prompt_tokens == 1000 * (8 + 100 + 85)
    assert online.cost_usd == pytest.approx((online.prompt_tokens * 2.5 + 100_000 * 10) / 1e6)
    request = LLMRequest(key="k", prompt_version="v", max_tokens=50, messages=[{"role": "user", "content": "x" * 40}])
    concrete = estimate_requests(settings, "gpt4o", [request])
    assert (concrete.requests, concrete.prompt_tokens, concrete.completion_tokens) == (1, 14, 50)


def test_the_simulator_answers_every_llm_stage_with_the_responder_that_stage_declares():
    from processors.llm.sim_responders import active_responders
    from processors.pipeline import default_stages

    declared = [s.name for s in default_stages() if s.sim_responder]
    assert declared == ["taxonomy", "filter", "qa", "score"]
    assert [r.name for r in active_responders()] == ["taxonomy", "filter", "qa", "referee"]
