"""One CLIP matcher per process, shared by whatever needs one (the match stage, decontamination): the model,
its text bank and its decode workers survive across shards, and a new config replaces the old matcher so
that two large models are never held at once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from builder.ids import canonical_json
from processors.clip.config import ClipMatchConfig

if TYPE_CHECKING:
    from processors.clip.matcher import ClipMatcher

_MATCHERS: dict[str, "ClipMatcher"] = {}
_LOCK = threading.Lock()


def get_matcher(config: ClipMatchConfig, cache_dir: Path) -> "ClipMatcher":
    """One matcher per (config, cache folder) per process: the model and text bank survive across shards."""
    from processors.clip.matcher import ClipMatcher

    key = canonical_json([config.model_dump(mode="json", exclude={"shard_size"}), str(cache_dir)])
    with _LOCK:
        if key not in _MATCHERS:
            _MATCHERS.clear()  # a new config replaces the old one: never hold two large models
            _MATCHERS[key] = ClipMatcher(config, cache_dir)
        return _MATCHERS[key]


def release_matchers() -> None:
    """Stop the decode workers and drop the models of every cached matcher (frees the GPU for the next stage)."""
    from processors.clip.models import clear_model_cache

    with _LOCK:
        for matcher in _MATCHERS.values():
            matcher.close()
        _MATCHERS.clear()
    clear_model_cache()
