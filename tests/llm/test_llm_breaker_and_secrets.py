"""The circuit breaker stops a dead endpoint with a clear message; the API key never leaks anywhere."""

from __future__ import annotations

import logging

import pytest
from llm_helpers import KEY_ENV, TEST_KEY, json_requests, make_ctx, fast_settings

from processors.llm import CircuitOpenError, MissingApiKeyError, run_requests
from processors.llm.api import Connection
from processors.llm.transport import Secret


def test_breaker_trips_with_a_clear_message_when_everything_fails(simulator, ctx_for):
    sim = simulator(rate_5xx=1.0)
    ctx = ctx_for(sim, breaker=10, max_retries=50)
    with pytest.raises(CircuitOpenError) as caught:
        run_requests(json_requests(20), endpoint="sim", ctx=ctx)
    message = str(caught.value)
    assert "LLM endpoint 'sim'" in message and sim.base_url in message
    assert "failed 10 attempts in a row" in message and "HTTP 50" in message
    assert "rerun" in message and "reachable" in message  # a 5xx streak: the server, not the key
    assert "The server said: HTTP 50" in message and "(simulated)" in message  # its own words
    received = sim.stats()["received"]
    assert received < 60  # stopped, did not spin through 20 x 51 attempts


def test_missing_key_env_var_is_named(simulator, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    sim = simulator()
    ctx = make_ctx(tmp_path / "run", fast_settings(sim.base_url))
    with pytest.raises(MissingApiKeyError, match=KEY_ENV):
        run_requests(json_requests(1), endpoint="sim", ctx=ctx)
    assert sim.stats()["received"] == 0


def _files_containing(folder, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_appears_in_no_file_log_message_or_repr(simulator, ctx_for, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sim = simulator(api_key=TEST_KEY, rate_5xx=0.2, rate_malformed=0.2, seed=3)
    ctx = ctx_for(sim, max_retries=6)
    results = run_requests(json_requests(30), endpoint="sim", ctx=ctx)
    assert sum(r.ok for r in results) >= 25
    batch_ctx = ctx_for(sim, mode="batch")
    assert all(r.ok for r in run_requests(json_requests(5, prefix="b"), endpoint="sim", ctx=batch_ctx))
    # a wrong key: every request gets 401 (and the server echoes nothing of ours), the breaker opens
    wrong = simulator(api_key="sk-some-other-key")
    with pytest.raises(CircuitOpenError) as caught:
        run_requests(json_requests(30, prefix="w"), endpoint="sim", ctx=ctx_for(wrong, breaker=5))
    assert "HTTP 401" in str(caught.value)
    texts = [str(caught.value), caplog.text, repr(Secret(TEST_KEY)), repr(Connection("u", Secret(TEST_KEY))),
             repr(ctx.usage), repr(results)]
    assert not [t for t in texts if TEST_KEY in t]
    assert _files_containing(tmp_path, TEST_KEY.encode()) == []
    assert any(tmp_path.rglob("*.sqlite"))  # the grep did look at the cache


@pytest.mark.parametrize("transport", ["aiohttp", "openai"])
def test_a_key_echoed_by_a_hostile_server_is_masked_everywhere(simulator, ctx_for, caplog, capfd, transport):
    import gc

    caplog.set_level(logging.DEBUG)
    hostile = simulator(api_key="sk-the-server-wants-another-key", echo_auth=True)
    with pytest.raises(CircuitOpenError) as caught:
        run_requests(json_requests(12), endpoint="sim", ctx=ctx_for(hostile, breaker=4, transport=transport))
    gc.collect()  # any unretrieved task exception would be logged now, with its message
    captured = capfd.readouterr()
    texts = [str(caught.value), caplog.text, captured.out, captured.err]
    assert "HTTP 401" in str(caught.value) and "You sent: ***" in str(caught.value)
    assert not [t for t in texts if TEST_KEY in t or TEST_KEY[:12] in t]


@pytest.mark.parametrize("base_url,batch", [("https://api.openai.com/v1", True), ("http://localhost:8001/v1", False)])
def test_a_streak_of_timeouts_names_the_endpoints_timeout_s(base_url, batch):
    from processors.llm.breaker import CircuitBreaker

    breaker = CircuitBreaker(3, endpoint="glm4v", base_url=base_url, model="glm-4v-9b", key_env=None)
    for _ in range(3):
        breaker.failure("timeout", "no reply within 120 s")
    message = breaker.open_message
    assert "failed 3 attempts in a row (timeout x3)" in message and "no reply within 120 s" in message
    assert "raise `timeout_s` in llm.endpoints.glm4v" in message and "max_concurrency" in message
    assert ("mode: batch" in message) == batch  # the Batch API is OpenAI's
    assert "reachable" not in message  # the server answered the connection; it was slow
