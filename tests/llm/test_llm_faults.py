"""Replies that are no answer of the model (a proxy's stub), and structured output padded by vLLM's grammar."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from llm_helpers import json_requests

from processors.llm import CircuitOpenError, LLMRequest, run_requests
from processors.llm import reply as rp
from processors.llm.errors import AttemptError

FLAG = """--structured-outputs-config '{"disable_any_whitespace": true}'"""
SCHEMA = {"type": "object", "properties": {"labels": {"type": "array", "items": {"type": "string"}}}}


def _greedy(n: int, prefix: str) -> list[LLMRequest]:
    return [dataclasses.replace(r, temperature=0.0) for r in json_requests(n, prefix=prefix)]


def test_two_stubs_in_a_row_at_temperature_zero_are_retried_not_taken_for_the_same_answer_twice(simulator, ctx_for):
    # Two empty 200s (no finish_reason, no text) then the answer: before, the second stub was "the same unusable
    # reply twice at temperature 0" and the request was given up, losing the row.
    sim = simulator(fail_kind="empty", fail_first=2)
    ctx = ctx_for(sim, max_retries=4)
    results = run_requests(_greedy(5, "stub"), endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results), [(r.reason, r.detail) for r in results]
    assert [r.attempts for r in results] == [3] * 5
    assert ctx.usage["requests"] == 5  # the stubs billed nothing: only the answers count as paid


def test_stubs_count_for_the_breaker_like_any_server_fault(simulator, ctx_for):
    sim = simulator(fail_kind="empty", fail_first=100)
    ctx = ctx_for(sim, breaker=3, max_retries=6, max_concurrency=1)
    with pytest.raises(CircuitOpenError, match="malformed reply body"):
        run_requests(_greedy(2, "down"), endpoint="sim", ctx=ctx)


def _reply(text, finish="stop", completion_tokens=0, refusal=None):
    return {"text": text, "finish_reason": finish, "refusal": refusal, "logprobs": None,
            "usage": {"prompt_tokens": 10, "completion_tokens": completion_tokens}}


@pytest.mark.parametrize("reply,fault", [
    (_reply('{"a": 1}', completion_tokens=5), False),
    (_reply('{"a": 1}', finish=None, completion_tokens=5), True),  # garbage with no finish_reason
    (_reply(None), True),  # {"choices": [{"message": {}, "finish_reason": "stop"}]} with no usage
    (_reply(""), True),
    (_reply("  \n"), True),
    (_reply("", completion_tokens=1), False),  # the model wrote nothing and was billed for it: its own reply
    (_reply(None, finish="length", completion_tokens=8), False),  # a reasoning model spent max_tokens thinking
    (_reply(None, refusal="I can't help with that."), False),
    (_reply(None, finish="content_filter"), False),
])
def test_a_reply_is_the_models_only_when_well_formed(reply, fault):
    assert (rp.fault(reply) is not None) == fault


# -- padding -----------------------------------------------------------------------------------------------

LABELS = {"labels": ["OCR", "Counting", "Color", "Spatial", "Scene", "Text"], "note": "two  spaces   inside"}
# What vLLM's default grammar let a tiny model write (docs/benchmarks.md, "vLLM check"): ~25 % whitespace.
VLLM_PADDED = ('{      "labels"\n\r \r      :["OCR","Counting","Color"],'
               '"note":"two  spaces   inside, and a longer note"}')


@pytest.mark.parametrize("indent", [None, 2, 4, "\t"])
def test_compact_and_pretty_printed_json_is_not_padding(indent):
    text = json.dumps(LABELS, indent=indent)
    assert rp.padding(text) == 0
    assert rp.padding(text.replace("\n", "\r\n")) == 0
    assert rp.padding(text + "\n") == 0


def test_vllm_whitespace_runs_are_padding_even_at_a_modest_share():
    share = sum(ch.isspace() for ch in VLLM_PADDED) / len(VLLM_PADDED)
    assert share < 0.3  # below the old 30 % share, which let it be asked again
    assert rp.padding(VLLM_PADDED) >= rp.PADDED_CHARS
    assert rp.padding(json.dumps(LABELS) + "\n" + " \n" * 30) >= rp.PADDED_CHARS  # padding after the closed JSON


def _structured(max_tokens=64) -> LLMRequest:
    return LLMRequest(key="k", prompt_version="v1", json_schema=SCHEMA, parse=json.loads, max_tokens=max_tokens,
                      messages=[{"role": "user", "content": "labels"}])


def test_a_padded_reply_cut_inside_its_json_fails_once_naming_the_server_flag():
    cut = VLLM_PADDED[:60]
    with pytest.raises(AttemptError) as caught:
        rp.interpret(_reply(cut, finish="length", completion_tokens=64), _structured())
    assert caught.value.reason == "truncated" and not caught.value.retryable
    assert FLAG in caught.value.detail


def test_a_pretty_printed_reply_cut_by_max_tokens_is_asked_again_not_blamed_on_padding():
    pretty = json.dumps({"labels": ["A", "B", "C", "D", "E", "F", "G", "H"]}, indent=8)  # ~60 % whitespace
    with pytest.raises(AttemptError) as caught:
        rp.interpret(_reply(pretty[:70], finish="length", completion_tokens=64), _structured())
    assert caught.value.reason == "truncated" and caught.value.retryable
    assert "disable_any_whitespace" not in caught.value.detail


def test_a_padded_reply_whose_json_closed_before_max_tokens_is_used_not_paid_twice():
    whole = VLLM_PADDED + "\n \r\n   " * 20
    value = rp.interpret(_reply(whole, finish="length", completion_tokens=64), _structured())
    assert value == json.loads(VLLM_PADDED)


def test_padded_structured_replies_warn_once_per_server_naming_the_flag(simulator, ctx_for, caplog):
    sim = simulator(flavor="vllm", json_whitespace=True)
    ctx = ctx_for(sim)
    requests = [dataclasses.replace(_structured(max_tokens=4000), key=f"k{i}", parse=lambda t: t,
                                    messages=[{"role": "user", "content": f"labels for {i}"}]) for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="processors.llm.engine"):
        results = run_requests(requests, endpoint="sim", ctx=ctx)
    assert all(r.ok for r in results)  # padded but whole: used
    warnings = [rec.getMessage() for rec in caplog.records if "padded" in rec.getMessage()]
    assert len(warnings) == 1 and FLAG in warnings[0] and sim.base_url in warnings[0]


def test_the_padding_advice_names_vllms_flag_for_other_servers_only():
    from processors.llm.settings import EndpointSettings

    openai = EndpointSettings(base_url="https://api.openai.com/v1")
    local = EndpointSettings(base_url="http://gpu-box:8000/v1", model="Qwen/Qwen2-VL-7B-Instruct")
    assert openai.is_openai_host and not local.is_openai_host
    assert "vLLM" not in rp.padding_advice(openai_host=openai.is_openai_host)
    assert FLAG in rp.padding_advice(openai_host=local.is_openai_host)
