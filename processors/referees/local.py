"""The local transformers referee: batched 0/1 scoring of (image, task type, question) with an HF VLM.

Items are sorted by image and packed into batches of whole image groups, so each image is opened once and
(with ``reuse=prefix``) its vision features and instruction+image prefix are computed once per batch. Each
batch is one prefix pass + one suffix pass (or one plain pass), reading the next-token logits of every
token id that decodes to "0" or "1". The model loads on first use, so the object pickles cheaply to workers.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

from PIL import Image

from processors.imageio import ImageTooLargeError, open_rgb
from processors.referees.digits import DigitIds, find_digit_ids, read_votes
from processors.referees.prompt import build_messages
from processors.referees.protocol import RefereeItem, Vote
from processors.referees.settings import RefereeSettings

logger = logging.getLogger(__name__)

# What a broken image raises from open_rgb: recorded as a failure value, never swallowed.
IMAGE_ERRORS = (OSError, ValueError, ImageTooLargeError, Image.DecompressionBombError, SyntaxError)


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` = bfloat16 on a GPU, float32 on the CPU (CPU bf16 matmuls are slow and lossy)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_model_and_processor(settings: RefereeSettings) -> tuple[Any, Any]:
    """``(model, processor)`` on the configured device and dtype, in eval mode."""
    preset = settings.resolved_preset()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if preset.model_id == "tiny-random-llava":
        from processors.referees.tiny import build_tiny_llava

        model, processor = build_tiny_llava(seed=settings.seed)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(preset.model_id, trust_remote_code=preset.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            preset.model_id, dtype=dtype, trust_remote_code=preset.trust_remote_code
        )
    logger.info("referee %s: %s on %s (%s)", settings.name, preset.model_id, device, dtype)
    return model.to(device=device, dtype=dtype).eval(), processor


def pack_groups(items: Sequence[RefereeItem], batch_size: int) -> Iterator[list[int]]:
    """Item indices in batches of at most ``batch_size``, whole image groups kept together when they fit."""
    order = sorted(range(len(items)), key=lambda i: items[i].image_path)
    groups: list[list[int]] = []
    for i in order:
        if groups and items[groups[-1][0]].image_path == items[i].image_path:
            groups[-1].append(i)
        else:
            groups.append([i])
    batch: list[int] = []
    for group in groups:
        while group:
            if batch and len(batch) + len(group) > batch_size:
                yield batch
                batch = []
            take, group = group[: batch_size - len(batch)], group[batch_size - len(batch):]
            batch.extend(take)
    if batch:
        yield batch


class LocalReferee:
    """A ``Referee`` running a transformers VLM in this process (see the module docstring)."""

    def __init__(self, settings: RefereeSettings, model: Any = None, processor: Any = None) -> None:
        self.settings = settings
        self.name = settings.name
        self._model = model
        self._processor = processor
        self._digits: DigitIds | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_processor": None, "_digits": None}

    def _ensure_loaded(self) -> None:
        if self._model is None or self._processor is None:
            self._model, self._processor = load_model_and_processor(self.settings)
        if self._digits is None:
            self._digits = find_digit_ids(self._processor.tokenizer)

    @property
    def model(self) -> Any:
        self._ensure_loaded()
        return self._model

    @property
    def processor(self) -> Any:
        self._ensure_loaded()
        return self._processor

    @property
    def digits(self) -> DigitIds:
        self._ensure_loaded()
        assert self._digits is not None
        return self._digits

    def prompt(self, item: RefereeItem) -> str:
        """The chat-templated prompt text of one item (image left as the processor's placeholder)."""
        answer = item.answer if self.settings.see_answer else None
        messages = build_messages(item.task_type, item.question, answer)
        preset = self.settings.resolved_preset()
        if preset.system_prompt:
            messages = [{"role": "system", "content": [{"type": "text", "text": preset.system_prompt}]}, *messages]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def score(self, items: Sequence[RefereeItem]) -> list[Vote]:
        """One ``Vote`` per item in the given order; unreadable images give ``error="image_corrupt"``."""
        self._ensure_loaded()
        votes: list[Vote | None] = [None] * len(items)
        for batch in pack_groups(items, self.settings.batch_size):
            for index, vote in zip(batch, self._score_batch([items[i] for i in batch])):
                votes[index] = vote
        missing = [items[i].qa_id for i, v in enumerate(votes) if v is None]
        if missing:  # pack_groups covers every index; this guards the invariant, never filters
            raise RuntimeError(f"referee {self.name}: no vote produced for {missing[:5]}")
        return [v for v in votes if v is not None]

    def _open_images(self, items: Sequence[RefereeItem]) -> tuple[list[Any], list[int | None], dict[str, str]]:
        """Unique images in first-seen order, each row's index into them (None if broken), and errors."""
        images: list[Any] = []
        index_of: dict[str, int] = {}
        errors: dict[str, str] = {}
        rows: list[int | None] = []
        for item in items:
            path = item.image_path
            if path not in index_of and path not in errors:
                try:
                    images.append(open_rgb(path, max_side=self.settings.resolved_preset().max_side))
                    index_of[path] = len(images) - 1
                except IMAGE_ERRORS as exc:
                    errors[path] = f"{type(exc).__name__}: {exc}"
                    logger.warning("referee %s: cannot open %s: %s", self.name, path, errors[path])
            rows.append(index_of.get(path))
        return images, rows, errors

    def _score_batch(self, items: Sequence[RefereeItem]) -> list[Vote]:
        images, rows, errors = self._open_images(items)
        good = [i for i, g in enumerate(rows) if g is not None]
        out: list[Vote] = [
            Vote(qa_id=it.qa_id, vote=None, p_yes=None, error="image_corrupt", detail=errors.get(it.image_path))
            for it in items
        ]
        if good:
            logits = self.next_token_logits([items[i] for i in good], images, [rows[i] for i in good])
            for i, vote, p_yes in zip(good, *read_votes(logits, self.digits)):
                out[i] = Vote(qa_id=items[i].qa_id, vote=vote, p_yes=p_yes)
        return out

    def next_token_logits(self, items: Sequence[RefereeItem], images: Sequence[Any], rows: Sequence[int]) -> Any:
        """(len(items), vocab) logits of the answer's first token; ``images[rows[r]]`` is item r's image."""
        from processors.referees.forward import PrefixNotShared, encode_grouped, plain_logits, shared_prefix_logits

        texts = [self.prompt(item) for item in items]
        if self.settings.reuse != "none":
            grouped = encode_grouped(self.processor, texts, images, rows)
            try:
                if grouped.pixel_values is None:
                    raise PrefixNotShared("image inputs are not one pixel tensor per image")
                image_token_id = getattr(self.model.config, "image_token_id", None)
                pad_id = self.processor.tokenizer.pad_token_id or 0
                return shared_prefix_logits(self.model, grouped, pad_id, image_token_id)
            except PrefixNotShared as exc:
                if self.settings.reuse == "prefix":
                    raise ValueError(f"referee {self.name}: reuse=prefix impossible ({exc}); use auto or none") from exc
                logger.debug("referee %s: plain path (%s)", self.name, exc)
        return plain_logits(self.model, self.processor, texts, [images[g] for g in rows])
