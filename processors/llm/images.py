"""Image content parts: content hashes for cache keys, downscaled data URLs for the wire, token counts.

A request's images are read and encoded only when it is actually sent (never for a cache hit), in a worker
thread so the event loop keeps serving other requests while PIL decodes.

Image work is done once per image file per process, not once per request (a referee sends each image with
every question about it, and every referee sends it again): what the cache key and the token estimate need of
a file (the hash of its bytes, its pixel size) is kept in a bounded LRU keyed by the file's identity
(``st_dev``, ``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns`` of the regular file the path names), so
a file changed on disk is read again; the wire encoding (resize + base64) is kept in a byte-bounded LRU keyed
by (content hash, longest side, format). Each look-up still ``stat``s the path and refuses anything but a
regular file; a miss reads it through ``read_regular_file``'s checks.
"""

from __future__ import annotations

import base64
import io
import math
import os
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
    if part["type"] == "image_path":
        return {"image_sha": file_info(part["path"]).digest}
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
    if part["type"] == "image_path":
        cached = _cached_url(file_info(part["path"]).digest, max_side, fmt)
        if cached is not None:
            return {"type": "image_url", "image_url": {"url": cached, "detail": detail}}
        data = file_info(part["path"], want_bytes=True).data  # a miss: the bytes it encodes, hashed as read
    else:
        data = part_bytes(part)
    url = _encoded_url(bytes_id(data), max_side, fmt, data)
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


# ------------------------------------------------------------------------- per-process image caches
@dataclass(frozen=True)
class FileInfo:
    """What a request needs of one image file: the hash of its bytes (the cache key's ``image_sha``) and its
    pixel size from the header (None when PIL cannot tell). ``data`` only on the read that filled the entry."""

    digest: str
    size: tuple[int, int] | None
    data: bytes | None = None


FILE_INFO_KEEP = 8192  # image files remembered per process (a few hundred bytes each)
_FILE_INFO: "OrderedDict[tuple[int, ...], FileInfo]" = OrderedDict()
_FILE_INFO_LOCK = threading.Lock()


def _identity(info) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _header_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def file_info(path: str, *, want_bytes: bool = False) -> FileInfo:
    """The ``FileInfo`` of the regular file at ``path``, read and hashed once per file identity (see the
    module doc). Raises as ``read_regular_file`` does: ``FileNotFoundError`` for a missing file,
    ``NotRegularFileError`` for a FIFO, device or folder (never opened). ``want_bytes`` reads the file (the
    entry is refreshed from what was read) and returns its bytes in ``data``."""
    from loaders.images.paths import open_regular_file, require_regular_file

    if not want_bytes:
        key = _identity(require_regular_file(path))
        with _FILE_INFO_LOCK:
            found = _FILE_INFO.get(key)
            if found is not None:
                _FILE_INFO.move_to_end(key)
                return found
    fd, opened = open_regular_file(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    key = _identity(opened)  # of the file as opened: a path swapped since the stat above is not mixed up
    info = FileInfo(bytes_id(data), _header_size(data))
    if len(data) == opened.st_size:  # a file that grew or shrank while being read is not remembered
        with _FILE_INFO_LOCK:
            _FILE_INFO[key] = info
            _FILE_INFO.move_to_end(key)
            while len(_FILE_INFO) > FILE_INFO_KEEP:
                _FILE_INFO.popitem(last=False)
    return FileInfo(info.digest, info.size, data) if want_bytes else info


ENCODED_MAX_BYTES = 256 * 1024 * 1024  # data URLs kept, in characters (encoding is the dearest part)
ENCODED_KEEP = 65536  # and at most this many of them
_ENCODED: "OrderedDict[tuple[str, int, str], str]" = OrderedDict()
_ENCODED_LOCK = threading.Lock()
_encoded_bytes = 0


def _cached_url(digest: str, max_side: int, fmt: str) -> str | None:
    key = (digest, max_side, fmt)
    with _ENCODED_LOCK:
        url = _ENCODED.get(key)
        if url is not None:
            _ENCODED.move_to_end(key)
        return url


def _encoded_url(digest: str, max_side: int, fmt: str, data: bytes) -> str:
    """``_encode``'s data URL, reused for the next requests about the same image (decode + resize + JPEG
    encode is the client's main CPU cost per request), within ``ENCODED_MAX_BYTES``."""
    global _encoded_bytes
    key = (digest, max_side, fmt)
    cached = _cached_url(digest, max_side, fmt)
    if cached is not None:
        return cached
    url, _ = _encode(data, max_side, fmt)
    if len(url) > ENCODED_MAX_BYTES:
        return url
    with _ENCODED_LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = url
            _encoded_bytes += len(url)
        _ENCODED.move_to_end(key)
        while _encoded_bytes > ENCODED_MAX_BYTES or len(_ENCODED) > ENCODED_KEEP:
            _, dropped = _ENCODED.popitem(last=False)
            _encoded_bytes -= len(dropped)
    return url


def clear_caches() -> None:
    """Forget every remembered image (tests; a long-lived process that wants its memory back)."""
    global _encoded_bytes
    with _FILE_INFO_LOCK:
        _FILE_INFO.clear()
    with _ENCODED_LOCK:
        _ENCODED.clear()
        _encoded_bytes = 0


def image_size(part: dict[str, Any]) -> tuple[int, int] | None:
    """Pixel size of a local image from its header (cheap), or None when unknown (remote URL, unreadable)."""
    if part["type"] == "image_url":
        return None
    if part["type"] == "image_path":
        try:
            return file_info(part["path"]).size
        except (OSError, ValueError):
            return None
    try:
        return _header_size(part_bytes(part))
    except (OSError, ValueError):
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
