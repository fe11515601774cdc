"""Reading the "0"/"1" answer out of next-token logits.

A tokenizer usually has several ids that decode to the same digit ("0", " 0", "▁0", ...); which one a model
prefers depends on the template, so we read all of them and sum each digit's probability mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DigitIds:
    """Token ids that decode (after stripping whitespace) to "0" and to "1"."""

    zero: tuple[int, ...]
    one: tuple[int, ...]


def find_digit_ids(tokenizer: Any) -> DigitIds:
    """Scan the whole vocabulary once (a second or two for 150k tokens); special tokens are skipped."""
    special = set(tokenizer.all_special_ids)
    ids = sorted(set(tokenizer.get_vocab().values()) - special)
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    zero = tuple(i for i, text in zip(ids, texts) if text.strip() == "0")
    one = tuple(i for i, text in zip(ids, texts) if text.strip() == "1")
    if not zero or not one:
        raise ValueError(f"tokenizer has no token decoding to '0' ({len(zero)}) or '1' ({len(one)})")
    return DigitIds(zero=zero, one=one)


def read_votes(logits: Any, digits: DigitIds) -> tuple[list[int], list[float]]:
    """``logits``: (rows, vocab) next-token logits → (votes, p_yes), computed in float32.

    p_yes = p1 / (p0 + p1) = sigmoid(logsumexp(logits[one]) - logsumexp(logits[zero])), which needs no
    softmax over the vocabulary; vote = 1 when p1 > p0 (the endpoint backend decides the same way).
    """
    import torch

    logits = logits.float()
    zero = logits[:, list(digits.zero)]
    one = logits[:, list(digits.one)]
    margin = torch.logsumexp(one, dim=-1) - torch.logsumexp(zero, dim=-1)
    p_yes = torch.sigmoid(margin)
    votes = (margin > 0).long()
    return votes.tolist(), p_yes.tolist()
