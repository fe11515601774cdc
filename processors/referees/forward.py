"""The two ways the local referee turns a batch of prompts into next-token logits.

``plain_logits``: the processor encodes every (prompt, image) row and one left-padded forward pass reads the
last position — works for any HF-native VLM, but an image asked about three times is encoded three times.

``shared_prefix_logits``: rows are grouped by image. The prompt is ordered instruction → image → question, so
the rows of one image share a token prefix that contains every image token. That prefix (vision tower
included) runs once per image; its KV cache is then copied to each of the image's rows and only the short
question suffixes run, in one more batched pass. Mathematically the same logits as ``plain_logits`` (the
tests check it against ``generate``); it needs a processor whose image inputs are one ``pixel_values``
tensor per image and a model with 1-D positions (Llava-style), which ``encode_grouped`` reports.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Grouped:
    """Rows tokenised with their image placeholders expanded; pixels once per unique image."""

    input_ids: list[list[int]]
    row_image: list[int]
    pixel_values: Any | None  # (n_images, ...) or None when the processor's image inputs are not per-image


def plain_logits(model: Any, processor: Any, texts: Sequence[str], images: Sequence[Any]) -> Any:
    """(rows, vocab) logits of the token after each prompt; one image per row, re-encoded per row."""
    import torch

    inputs = processor(
        text=list(texts), images=list(images), padding=True, padding_side="left", return_tensors="pt"
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(**inputs, position_ids=position_ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


def _uses_generic_pipeline(processor: Any) -> bool:
    from transformers import ProcessorMixin

    return type(processor).__call__ is ProcessorMixin.__call__


def encode_grouped(processor: Any, texts: Sequence[str], images: Sequence[Any], row_image: Sequence[int]) -> Grouped:
    """Tokenise ``texts`` (one placeholder each) exactly as ``processor(text, images)`` would, preprocessing
    each of the unique ``images`` once; ``row_image[r]`` is the index in ``images`` of row ``r``'s image.

    This replays transformers 5's generic processor pipeline (image processor → placeholder expansion →
    tokenizer); processors that override ``__call__`` get ``pixel_values=None`` and so the plain path.
    """
    if not _uses_generic_pipeline(processor):
        return Grouped(input_ids=[], row_image=list(row_image), pixel_values=None)
    merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)
    image_kwargs = {**merged["images_kwargs"], "return_tensors": "pt"}
    processed, replacements = processor._process_images(list(images), **image_kwargs)
    row_texts, _ = processor.get_text_with_replacements(list(texts), [replacements[g] for g in row_image])
    text_kwargs = {
        k: v for k, v in merged["text_kwargs"].items()
        if k not in ("padding", "padding_side", "return_tensors", "return_mm_token_type_ids",
                     "return_text_replacement_offsets")
    }
    input_ids = processor.tokenizer(row_texts, **text_kwargs)["input_ids"]
    pixel_values = processed.get("pixel_values")
    per_image = set(processed.keys()) == {"pixel_values"} and len(pixel_values) == len(images)
    return Grouped(input_ids=input_ids, row_image=list(row_image), pixel_values=pixel_values if per_image else None)


class PrefixNotShared(ValueError):
    """The rows of an image share no prefix that holds all the image tokens (the prompt puts text first?)."""


def _prefix_lengths(grouped: Grouped, image_token_id: int | None) -> list[int]:
    """Per image: how many leading tokens its rows share and the prefix pass computes once.

    Preferably the shortest, over images, of the longest prefix an image's rows have in common (leaving
    each row at least one suffix token): one length for all, so the prefix batch has no padding to pay for
    (an image asked only once would otherwise pad every other prefix to its full prompt). If that would cut
    some image's tokens, each image keeps its own length. ``PrefixNotShared`` if neither covers the image.
    """
    n_images = max(grouped.row_image) + 1
    first: list[list[int] | None] = [None] * n_images
    lengths = [0] * n_images
    for ids, g in zip(grouped.input_ids, grouped.row_image):
        ref = first[g]
        if ref is None:
            first[g], lengths[g] = ids, len(ids) - 1
            continue
        n, limit = 0, min(lengths[g], len(ids) - 1)
        while n < limit and ids[n] == ref[n]:
            n += 1
        lengths[g] = n
    last_image = [max((i for i, t in enumerate(ids) if t == image_token_id), default=-1) for ids in grouped.input_ids]
    if image_token_id is None or min(last_image) < 0:
        raise PrefixNotShared("no image token in a prompt")
    uniform = [min(lengths)] * n_images
    for candidate in (uniform, lengths):  # the unpadded choice first, per-image lengths if it cuts an image
        if all(last < candidate[g] for last, g in zip(last_image, grouped.row_image)):
            return candidate
    raise PrefixNotShared("shared prefix does not cover the image tokens")


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def _cache_keyword(model: Any) -> str:
    """transformers ≥5.2x calls the KV cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefix_logits(model: Any, grouped: Grouped, pad_id: int, image_token_id: int) -> Any:
    """(rows, vocab) next-token logits via one prefix pass per unique image and one suffix pass per row.

    Both passes are left-padded; the suffix's padding sits between prefix and suffix, masked out, and
    positions continue from each row's real prefix length, so every row sees exactly its own token sequence.
    """
    import torch

    lengths = _prefix_lengths(grouped, image_token_id)
    first_row = {g: r for r, g in reversed(list(enumerate(grouped.row_image)))}
    prefixes = [grouped.input_ids[first_row[g]][: lengths[g]] for g in range(len(lengths))]
    prefix_ids, prefix_mask = _pad_left(prefixes, pad_id)
    device = model.device
    cache_kw = _cache_keyword(model)
    with torch.inference_mode():
        out = model(
            input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device),
            pixel_values=grouped.pixel_values.to(device, model.dtype), use_cache=True, logits_to_keep=1,
        )
        cache = getattr(out, cache_kw, None) or out.past_key_values
        rows = torch.tensor(grouped.row_image, dtype=torch.long, device=device)
        cache.reorder_cache(rows)
        suffixes = [ids[lengths[g]:] for ids, g in zip(grouped.input_ids, grouped.row_image)]
        suffix_ids, suffix_mask = _pad_left(suffixes, pad_id)
        real_prefix = prefix_mask.sum(-1)[rows.cpu()]
        positions = real_prefix[:, None] + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([prefix_mask[rows.cpu()], suffix_mask], dim=-1)
        out = model(
            input_ids=suffix_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            use_cache=True, logits_to_keep=1, **{cache_kw: cache},
        )
    return out.logits[:, -1, :]
