"""Prompt tokens of an image as providers bill them: the tile rule of GPT-4o and its family, the patch rule of
gpt-4.1-mini and its family (OpenAI's "Images and vision" guide, "Calculating costs"), and the size an image has
after the client downscales it. Pure arithmetic: no file is read here (``processors.llm.images`` gives sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class TileRule:
    """Tile-based image tokens: ``base`` at ``low``; ``base + per_tile`` per 512-px tile at ``high``/``auto``."""

    base: int
    per_tile: int


@dataclass(frozen=True)
class PatchRule:
    """Patch-based image tokens: 32-px patches (at most ``PATCH_CAP``), times the model's ``multiplier``."""

    multiplier: float


GPT4O_TILES = TileRule(85, 170)
PATCH_SIDE, PATCH_CAP = 32, 1536
# OpenAI's "Images and vision" guide, "Calculating costs". Longest prefix wins: "gpt-4.1-mini" before "gpt-4.1",
# "gpt-4o-mini" before "gpt-4o". A model not listed (a self-hosted vLLM) is counted with GPT-4o's rule, as
# before this table existed.
IMAGE_TOKEN_RULES: dict[str, TileRule | PatchRule] = {
    "gpt-4o-mini": TileRule(2833, 5667),
    "gpt-4o": GPT4O_TILES, "gpt-4.1": GPT4O_TILES, "gpt-4.5": GPT4O_TILES, "gpt-4-turbo": GPT4O_TILES,
    "o1": TileRule(75, 150), "o3": TileRule(75, 150), "computer-use-preview": TileRule(65, 129),
    "gpt-5": TileRule(70, 140), "gpt-5-chat-latest": TileRule(70, 140),
    "gpt-4.1-mini": PatchRule(1.62), "gpt-4.1-nano": PatchRule(2.46), "o4-mini": PatchRule(1.72),
    "gpt-5-mini": PatchRule(1.62), "gpt-5-nano": PatchRule(2.46),
}


def image_token_rule(model: str | None) -> TileRule | PatchRule:
    """The rule for ``model`` (a provider prefix such as ``openai/`` ignored): its family's longest prefix."""
    name = (model or "").rsplit("/", 1)[-1].lower()
    for prefix in sorted(IMAGE_TOKEN_RULES, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "-"):
            return IMAGE_TOKEN_RULES[prefix]
    return GPT4O_TILES


def image_tokens(width: int, height: int, detail: str, *, model: str | None = None) -> int:
    """Prompt tokens of one image of ``width`` x ``height`` pixels sent at ``detail`` to ``model``.

    Tile models (GPT-4o, GPT-4.1, GPT-5, o1/o3, gpt-4o-mini): ``base`` at ``low``; at ``high``/``auto`` ``base``
    plus ``per_tile`` per 512-px tile after the API fits the image in 2048x2048 and scales its short side down
    to 768. Patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano): see ``patch_count``; ``detail`` does
    not change their count. ``model=None`` (or unknown) is GPT-4o's rule."""
    rule = image_token_rule(model)
    if isinstance(rule, PatchRule):
        return math.ceil(patch_count(width, height) * rule.multiplier)  # billed whole: round up, never under
    if detail == "low":
        return rule.base
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return rule.base + rule.per_tile * math.ceil(width / 512) * math.ceil(height / 512)


def patch_count(width: int, height: int) -> int:
    """32-px patches covering the image; over ``PATCH_CAP``, the image is first shrunk (aspect kept) so a
    whole number of patches spans its width (or height) and the count fits the cap, as OpenAI's guide does."""
    patches = math.ceil(width / PATCH_SIDE) * math.ceil(height / PATCH_SIDE)
    if patches <= PATCH_CAP:
        return patches
    shrink = math.sqrt(PATCH_SIDE * PATCH_SIDE * PATCH_CAP / (width * height))
    across, down = width * shrink / PATCH_SIDE, height * shrink / PATCH_SIDE
    shrink *= min(math.floor(across) / across, math.floor(down) / down)
    return min(PATCH_CAP, math.ceil(width * shrink / PATCH_SIDE) * math.ceil(height * shrink / PATCH_SIDE))
