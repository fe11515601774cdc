"""Top-k task types per image by cosine similarity: a matmul over chunks of the text bank, on the device.

Both sides must already be L2-normalised per vector, so the dot product *is* the cosine. Chunking the bank
bounds the [images x tasks] score matrix (19k task types x a 256-image batch is small, but a million-label
bank is not); each chunk's top-k is merged into the running top-k, which gives exactly the global top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def topk_cosine(
    images: "torch.Tensor", texts: "torch.Tensor", k: int, chunk_size: int = 65536
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scores and indices [n_images, min(k, n_tasks)], best first, computed in float32 on ``images.device``.

    ``texts`` is the [n_tasks, dim] bank (ideally already on the device: it is reused for every batch).
    """
    import torch

    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"shape mismatch: images {tuple(images.shape)}, texts {tuple(texts.shape)}")
    if texts.shape[0] == 0 or k < 1:
        raise ValueError(f"need k >= 1 and at least one task type (k={k}, tasks={texts.shape[0]})")
    k = min(k, texts.shape[0])
    images = images.float()
    best_scores = best_index = None
    for start in range(0, texts.shape[0], chunk_size):
        chunk = texts[start : start + chunk_size].to(images.device, torch.float32, non_blocking=True)
        scores, index = (images @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        index += start
        if best_scores is not None:
            scores = torch.cat([best_scores, scores], dim=1)
            index = torch.cat([best_index, index], dim=1)
            scores, pick = scores.topk(min(k, scores.shape[1]), dim=1)
            index = index.gather(1, pick)
        best_scores, best_index = scores, index
    return best_scores, best_index
