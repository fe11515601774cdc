"""The simulator itself: responders, determinism, logprobs, counters, CLI options; and the estimates."""

from __future__ import annotations

import argparse
import json
import urllib.request
from types import SimpleNamespace

import pytest

from processors.llm import LLMSettings, estimate_requests, project
from processors.llm.image_tokens import image_tokens
from processors.llm.request import LLMRequest
from processors.simulator.core import SimulatorOptions
from processors.simulator.responders import Responder, message_text
from processors.simulator.thread import SimulatorThread, add_arguments, options_from_args


def _post(sim, body: dict, key: str = "k1") -> dict:
    request = urllib.request.Request(sim.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Key": key})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


ECHO = Responder("echo-test", matches=lambda m: "ECHO-TEST" in message_text(m),
                 respond=lambda m, rng: f"echo {rng.randint(0, 10**6)}")


def test_a_responder_handed_to_the_simulator_answers_its_prompt(simulator):
    sim = simulator(responders=[ECHO])  # how a caller (the pipeline, a test) hands the simulator its answers
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "ECHO-TEST"}]}]}
    first, second = _post(sim, body), _post(sim, body, key="k2")
    assert first["choices"][0]["message"]["content"].startswith("echo ")
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    other = _post(sim, {"model": "m", "messages": [{"role": "user", "content": "plain"}]})
    assert other["choices"][0]["message"]["content"].startswith("Simulated answer")
    stats = sim.stats()
    assert stats["per_key"] == {"k1": 2, "k2": 1} and stats["ok_per_key"]["k1"] == 2 and stats["duplicates"] == 1


def test_responder_entries_must_be_responders():
    with pytest.raises(TypeError, match="not a Responder"):
        SimulatorThread(SimulatorOptions(), responders=["processors.filter.simulate:SIM_RESPONDER"])


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


def test_the_pipeline_hands_the_simulator_one_responder_per_llm_stage_in_pipeline_order():
    from processors.pipeline import default_responders

    assert [r.name for r in default_responders()] == ["taxonomy", "filter", "qa", "referee"]


def test_a_dry_run_answers_with_the_responders_it_is_given(simulator):
    """A pipeline with an extra LLM stage runs dry with its responder added to the pipeline's."""
    from processors.pipeline import default_responders
    from processors.session import dry_run_services

    plain = {"model": "m", "messages": [{"role": "user", "content": "ECHO-TEST"}]}
    for responders, echoed in ((None, False), ([*default_responders(), ECHO], True)):
        with dry_run_services(True, responders=responders) as services:
            reply = _post(SimpleNamespace(base_url=services["llm_base_url"]), plain)
        assert reply["choices"][0]["message"]["content"].startswith("echo ") is echoed
