"""What a batch function returns: output rows and failures, both tied to the input row they came from.

A batch function takes a batch of input rows (``dict[str, list]``, the `datasets` batched layout) and returns
``BatchOutput.to_columns()``. Failures travel *in band* as extra columns so the very same function works under
``Dataset.map`` and Ray Data's ``map_batches``; the stage runner splits them off into the failures table.

Two kinds of failure:
- a **row** failure (``item=None``): the input row as a whole did not make it (corrupt image, API error, no
  label left). The accounting invariant: every input row leaves as >= 1 output row *or* exactly one row
  failure, never both, never neither.
- an **item** failure (``item="..."``): one part of a row's output was rejected (one QA of four, one
  invented label) while the row itself went on. Counted by reason, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

SOURCE = "__source_key"
FAILURE_REASON = "__failure_reason"
FAILURE_DETAIL = "__failure_detail"
FAILURE_ITEM = "__failure_item"
INBAND_COLUMNS = (SOURCE, FAILURE_REASON, FAILURE_DETAIL, FAILURE_ITEM)

_REASON = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_DETAIL_CHARS = 2000


class BatchOutput:
    """Collects the rows and failures one batch produces, in columnar form."""

    def __init__(self, columns: Sequence[str]):
        self.columns = tuple(columns)
        self._data: dict[str, list[Any]] = {c: [] for c in (*self.columns, *INBAND_COLUMNS)}

    def add(self, source_key: str, row: dict[str, Any]) -> None:
        """Emit one output row produced from the input row ``source_key``."""
        missing = set(self.columns) - row.keys()
        extra = row.keys() - set(self.columns)
        if missing or extra:
            raise ValueError(
                f"output row from input {source_key!r} does not match the stage's columns: "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for column in self.columns:
            self._data[column].append(row[column])
        self._append_inband(source_key, None, None, None)

    def fail(self, source_key: str, reason: str, detail: str = "", *, item: str | None = None) -> None:
        """Record that input row ``source_key`` (or, with ``item``, one part of its output) did not make it."""
        if not _REASON.match(reason):
            raise ValueError(f"failure reason must be a snake_case code, got {reason!r}")
        for column in self.columns:
            self._data[column].append(None)
        self._append_inband(source_key, reason, str(detail)[:MAX_DETAIL_CHARS], item)

    def extend(self, other: "BatchOutput") -> None:
        if other.columns != self.columns:
            raise ValueError("cannot merge batch outputs with different columns")
        for column, values in other._data.items():
            self._data[column].extend(values)

    def _append_inband(self, source: str, reason: str | None, detail: str | None, item: str | None) -> None:
        self._data[SOURCE].append(str(source))
        self._data[FAILURE_REASON].append(reason)
        self._data[FAILURE_DETAIL].append(detail)
        self._data[FAILURE_ITEM].append(item)

    def __len__(self) -> int:
        return len(self._data[SOURCE])

    def to_columns(self) -> dict[str, list[Any]]:
        return self._data


def fail_all(columns: Sequence[str], keys: Iterable[str], reason: str, detail: str) -> dict[str, list[Any]]:
    """A batch result in which every input row failed for the same reason (e.g. the whole request failed)."""
    out = BatchOutput(columns)
    for key in keys:
        out.fail(key, reason, detail)
    return out.to_columns()
