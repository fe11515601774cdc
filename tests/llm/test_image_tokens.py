"""Image tokens per model family, worked from the examples of OpenAI's "Images and vision" guide
("Calculating costs"): tile models (GPT-4o/4.1, GPT-5, o1/o3, gpt-4o-mini) and patch models (gpt-4.1-mini/nano,
o4-mini), and the same rule reaching the estimates through the endpoint's model."""

from __future__ import annotations

import pytest

from processors.llm.estimate import message_tokens, project
from processors.llm.image_tokens import image_token_rule, image_tokens, patch_count
from processors.llm.settings import LLMSettings


def test_gpt4o_family_is_85_plus_170_per_tile_and_unchanged_without_a_model():
    for model in (None, "gpt-4o-2024-08-06", "gpt-4.1-2025-04-14", "openai/gpt-4o"):
        assert image_tokens(1024, 1024, "high", model=model) == 765  # 768x768: 4 tiles
        assert image_tokens(2048, 4096, "high", model=model) == 1105  # 768x1536: 6 tiles
        assert image_tokens(4096, 8192, "low", model=model) == 85
    assert image_tokens(1024, 1024, "high") == 765  # the old call, model left out


def test_gpt5_family_is_70_plus_140_per_tile():
    assert image_tokens(1024, 1024, "high", model="gpt-5-2025-08-07") == 70 + 140 * 4
    assert image_tokens(2048, 4096, "auto", model="gpt-5-chat-latest") == 70 + 140 * 6
    assert image_tokens(4096, 8192, "low", model="gpt-5") == 70


def test_gpt4o_mini_and_o_series_tiles():
    assert image_tokens(1024, 1024, "high", model="gpt-4o-mini-2024-07-18") == 2833 + 5667 * 4
    assert image_tokens(512, 512, "low", model="gpt-4o-mini") == 2833
    assert image_tokens(1024, 1024, "high", model="o3-2025-04-16") == 75 + 150 * 4
    assert image_tokens(1024, 1024, "low", model="o1") == 75


def test_patch_models_count_32px_patches_capped_at_1536_times_the_multiplier():
    assert patch_count(1024, 1024) == 1024  # the guide's first example: 32 x 32 patches
    assert patch_count(1800, 2400) == 1452  # the guide's second: shrunk to 1056 x 1408 -> 33 x 44 patches
    assert patch_count(4000, 4000) <= 1536
    assert image_tokens(1024, 1024, "high", model="gpt-4.1-mini-2025-04-14") == 1659  # ceil(1024 * 1.62)
    assert image_tokens(1800, 2400, "high", model="gpt-4.1-nano") == 3572  # ceil(1452 * 2.46)
    assert image_tokens(1024, 1024, "low", model="o4-mini") == 1762  # ceil(1024 * 1.72): detail changes nothing


def test_family_lookup_takes_the_longest_prefix_and_unknown_models_fall_back_to_gpt4o():
    assert image_token_rule("gpt-4.1-mini").multiplier == 1.62
    assert image_token_rule("gpt-4o-mini").base == 2833
    assert image_token_rule("internvl2-26b") == image_token_rule("gpt-4o-2024-08-06")
    assert image_token_rule("gpt-4ox") == image_token_rule(None)  # a prefix only counts up to a dash


def test_the_endpoint_model_reaches_message_tokens_and_project():
    base = LLMSettings()
    gpt5 = base.model_copy(update={"endpoints": {"gpt5": base.endpoint("gpt4o").model_copy(
        update={"model": "gpt-5", "image_detail": "high", "image_max_side": 1024})}})
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]
    # an image of unknown size counts as a square of image_max_side: 1024 x 1024 -> 4 tiles
    assert message_tokens(messages, gpt5.endpoint("gpt5"), read_images=False) == 4 + 70 + 140 * 4
    assert project(gpt5, "gpt5", requests=10, prompt_text_chars=0, images_per_request=1,
                   completion_tokens=0).prompt_tokens == 10 * (8 + 630)
    # the default model keeps the numbers it had
    default = project(base, "gpt4o", requests=1000, prompt_text_chars=400, images_per_request=1, completion_tokens=100)
    assert default.prompt_tokens == 1000 * (8 + 100 + 85)
    assert default.cost_usd == pytest.approx((default.prompt_tokens * 2.5 + 100_000 * 10) / 1e6)
