"""One reading of a base URL's host for every decision that rests on it (``processors/llm/hosts.py``)."""

from __future__ import annotations

import pytest

from processors.llm.breaker import CircuitBreaker
from processors.llm.hosts import is_openai_host, rejects_unknown_fields, url_host
from processors.llm.settings import EndpointSettings
from processors.referees import RefereeSettings
from processors.referees.endpoint import resolved_constraint


@pytest.mark.parametrize("url, host", [
    ("https://api.openai.com/v1", "api.openai.com"),
    ("HTTPS://API.OpenAI.com:443/v1/", "api.openai.com"),
    ("https://user:pw@api.openai.com/v1", "api.openai.com"),
    ("api.openai.com/v1", "api.openai.com"),  # no scheme
    ("http://localhost:8001/v1", "localhost"),
    ("http://[::1]:8000/v1", "::1"),
    ("gpu1:8000/v1", "gpu1"),
    ("https://api.openai.com.evil.example/v1", "api.openai.com.evil.example"),
    ("http://[::1/v1", ""),  # malformed: no host rather than an exception
    ("", ""),
])
def test_the_host_of_a_base_url(url, host):
    assert url_host(url) == host


@pytest.mark.parametrize("url, openai, strict", [
    ("https://api.openai.com/v1", True, True),
    ("https://api.openai.com:443/v1", True, True),
    ("https://my-resource.openai.azure.com/openai/v1", False, True),
    ("https://api.openai.com.evil.example/v1", False, False),  # a look-alike is another server
    ("https://gw.example.com/openai/v1", False, False),
    ("http://localhost:8001/v1", False, False),
])
def test_every_decision_reads_the_host_the_same_way(url, openai, strict):
    assert is_openai_host(url) is openai
    assert EndpointSettings(base_url=url).is_openai_host is openai
    breaker = CircuitBreaker(1, endpoint="e", base_url=url, model="m", key_env="OPENAI_API_KEY")
    breaker.failure("timeout", "no reply in 120 s")
    assert ("Batch API" in breaker.open_message) is openai  # advice only OpenAI's API can take
    assert rejects_unknown_fields(url) is strict
    referee = RefereeSettings(name="r", preset="glm-4v-9b", endpoint={"endpoint": "e"})
    assert resolved_constraint(referee, url) == ("logit_bias" if strict else "structured_outputs")
