"""Image content parts: content hashes for cache keys, downscaled data URLs for the wire, token counts.

A request's images are read and encoded only when it is actually sent (never for a cache hit), in a worker
thread so the event loop keeps serving other requests while PIL decodes.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from builder.ids import bytes_id

IMAGE_PART_TYPES = ("image_path", "image_bytes", "image_url")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def part_bytes(part: dict[str, Any]) -> bytes:
    if part["type"] == "image_path":  # a FIFO or device in an image's place fails at once, never blocks
        from loaders.images.paths import read_regular_file

        return read_regular_file(part["path"])
    if part["type"] == "image_bytes":
        return bytes(part["data"])
    raise ValueError(f"image part of type {part['type']!r} has no local bytes")


def content_ref(part: dict[str, Any]) -> dict[str, Any]:
    """What stands for an image in the cache key: the hash of its bytes (a remote URL stands for itself)."""
    if part["type"] == "image_url":
        url = part["image_url"]["url"]
        if url.startswith("data:"):
            return {"image_sha": bytes_id(url.encode("ascii", "replace"))}
        return {"image_url": url}
    return {"image_sha": bytes_id(part_bytes(part))}


def _encode(data: bytes, max_side: int, fmt: str) -> tuple[str, tuple[int, int]]:
    from PIL import Image, ImageOps  # lazy: PIL only when an image is actually sent

    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale, much faster
        image = ImageOps.exif_transpose(opened)
        image.thumbnail((max_side, max_side))
        if fmt == "jpeg":
            image = image.convert("RGB")
            mime, save_as, options = "image/jpeg", "JPEG", {"quality": 90}
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            mime, save_as, options = "image/png", "PNG", {}
        out = io.BytesIO()
        image.save(out, save_as, **options)
        size = image.size
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode('ascii')}", size


def to_wire_part(part: dict[str, Any], *, max_side: int, detail: str, fmt: str) -> dict[str, Any]:
    """An ``image_url`` part the API accepts: local images downscaled and inlined as a data URL."""
    if part["type"] == "image_url":
        image_url = dict(part["image_url"])
        image_url.setdefault("detail", detail)
        return {"type": "image_url", "image_url": image_url}
    data = part_bytes(part)
    url = _encoded_url(bytes_id(data), max_side, fmt, data)
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


_ENCODED: "OrderedDict[tuple[str, int, str], str]" = OrderedDict()
_ENCODED_LOCK = threading.Lock()
ENCODED_KEEP = 32  # data URLs kept: the questions of one image are sent close together (score: ~3 per image)


def _encoded_url(digest: str, max_side: int, fmt: str, data: bytes) -> str:
    """``_encode``'s data URL, reused for the next requests about the same image (decode + resize + JPEG
    encode is the client's main CPU cost per request)."""
    key = (digest, max_side, fmt)
    with _ENCODED_LOCK:
        if key in _ENCODED:
            _ENCODED.move_to_end(key)
            return _ENCODED[key]
    url, _ = _encode(data, max_side, fmt)
    with _ENCODED_LOCK:
        _ENCODED[key] = url
        while len(_ENCODED) > ENCODED_KEEP:
            _ENCODED.popitem(last=False)
    return url


def image_size(part: dict[str, Any]) -> tuple[int, int] | None:
    """Pixel size of a local image from its header (cheap), or None when unknown (remote URL, unreadable)."""
    if part["type"] == "image_url":
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(part_bytes(part))) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


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
