"""OpenAI's reasoning models (GPT-5 family, o-series) take ``max_completion_tokens`` and only the default
temperature: the engine sends them so, and the simulator answers a chat model's parameters with OpenAI's 400s."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from processors.llm.prepare import request_params
from processors.llm.request import LLMRequest
from processors.llm.settings import EndpointSettings


def _request(**kw) -> LLMRequest:
    return LLMRequest(key="k", messages=[{"role": "user", "content": "hi"}], prompt_version="1", **kw)


@pytest.mark.parametrize("model", ["gpt-5", "gpt-5-mini", "o3", "o4-mini", "openai/gpt-5-nano"])
def test_reasoning_models_get_max_completion_tokens_and_no_temperature(model):
    params = request_params(_request(max_tokens=300, temperature=0.7), EndpointSettings(model=model))
    assert params["max_completion_tokens"] == 300 and "max_tokens" not in params and "temperature" not in params
    effort = request_params(_request(), EndpointSettings(model=model, reasoning_effort="minimal"))
    assert effort["reasoning_effort"] == "minimal"


def test_chat_models_are_sent_as_before():
    params = request_params(_request(max_tokens=300, temperature=0.7), EndpointSettings(model="gpt-4o-2024-08-06"))
    assert params == {"max_tokens": 300, "temperature": 0.7}
    forced = request_params(_request(max_tokens=5), EndpointSettings(model="my-proxy-alias", reasoning="on"))
    assert forced == {"max_completion_tokens": 5}
    # reasoning_effort is in the fingerprint only when set
    assert "reasoning_effort" not in EndpointSettings().output_parts()
    assert EndpointSettings(model="gpt-5", reasoning_effort="low").output_parts()["reasoning_effort"] == "low"


def _post(base_url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_simulator_refuses_a_chat_models_parameters_like_openai(simulator):
    sim = simulator()
    messages = [{"role": "user", "content": "hi"}]
    status, body = _post(sim.base_url, {"model": "gpt-5", "messages": messages, "max_tokens": 10})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert body["error"]["code"] == "unsupported_parameter" and "max_completion_tokens" in body["error"]["message"]
    status, body = _post(sim.base_url, {"model": "o3", "messages": messages, "max_completion_tokens": 10,
                                        "temperature": 0.7})
    assert status == 400 and body["error"]["code"] == "unsupported_value"
    status, _ = _post(sim.base_url, {"model": "gpt-5", "messages": messages, "max_completion_tokens": 10})
    assert status == 200
    status, _ = _post(sim.base_url, {"model": "gpt-4o", "messages": messages, "max_tokens": 10, "temperature": 0.7})
    assert status == 200
