"""The garbage collector and a long stage: what earlier stages left alive is not walked again and again.

CPython's collector walks every tracked object on each full collection. A run keeps a lot alive from stage to
stage (the taxonomy's task types, the CLIP model's modules, datasets' tables, per-process caches), and an LLM
stage allocates several objects per request, so full collections come often and each one walks all of that
again. Measured with ``scripts/bench_score.py --client`` (50,000 questions over 10,000 images), the collector
took half of the client's CPU per cached referee request (0.32 ms with it, 0.15 ms without); in the whole
pipeline at 10,000 images (``scripts/bench_scale.py``) freezing cut the score stage's client CPU per request
from 0.97 to 0.85 ms.

``frozen_heap`` collects once, then moves what is alive into the permanent generation while a stage's shards run
(``gc.freeze``), so a collection only walks what the stage itself allocates; afterwards it is thawed, so what the
stage let go of can be collected. The one full collection costs ~0.3 s with torch loaded: only worth it for a
stage with many rows (``FREEZE_MIN_ROWS``), not for the small runs of a test or a demo.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

FREEZE_MIN_ROWS = 5000  # rows a stage runs before freezing pays for its one full collection


@contextlib.contextmanager
def frozen_heap(rows: int) -> Iterator[bool]:
    """Freeze what is alive now while the block runs ``rows`` rows (see the module doc); yields whether it did.
    Nested (a stage run inside another's block) it leaves the freezing to the outer block."""
    if rows < FREEZE_MIN_ROWS or gc.get_freeze_count() or not gc.isenabled():
        yield False
        return
    gc.collect()
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()
