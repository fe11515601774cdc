"""What a Ray worker does before its first shard (``run.engine: ray``; ``builder.ray_tasks.WORKER_CHECKS``).

- ``check_image_roots``: the supported layout is one filesystem every node mounts at the same path (NFS,
  Lustre, EFS) holding the run folder and every image root (``NN_images/image_roots.json``: the image store,
  each folder source). A worker on a node without them would otherwise fail row by row (``image_missing``)
  and quietly drop good images; this fails its first shard instead, naming the root and the node.

(The run's request cache needs nothing here: opening a new file from several workers at once retries SQLite's
WAL-switch race in ``processors.llm.cache``.)
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def check_image_roots(work) -> None:
    """Every image root the images stage recorded must be readable on this node. None recorded yet (the
    taxonomy stage): nothing to check. A root inside the run folder (the image store) that does not exist yet
    is the images stage about to fill it; the run folder itself was checked."""
    from builder.ray_tasks import check_readable
    from loaders.images.paths import load_roots, roots_file

    run_dir = Path(work.run_dir)
    if roots_file(run_dir) is None:
        return
    for root in load_roots(run_dir).values():
        if not root.exists() and root.resolve().is_relative_to(run_dir.resolve()):
            continue
        check_readable(Path(root))
