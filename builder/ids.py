"""Content-derived identities: the same content always gets the same id, on any machine, in any order."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

ID_HEX_CHARS = 32  # 128 bits: no collision in any realistic dataset, short enough to read in a log line


def bytes_id(data: bytes) -> str:
    """Id of raw bytes (``image_id``)."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX_CHARS]


def text_id(*parts: str) -> str:
    """Id of one or more strings, NFC-normalised and joined unambiguously (``task_id``, ``qa_id``)."""
    joined = "\x1f".join(unicodedata.normalize("NFC", p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data, equal text, equal hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(*parts: Any) -> str:
    """Hash of anything JSON-able; used for stage fingerprints and cache keys."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:ID_HEX_CHARS]
