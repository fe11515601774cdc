"""Split a shard's raw batch-function output into output rows and failures, and check the invariant.

The invariant (design.md §4): every input row leaves the stage either as one or more output rows or as
exactly one row failure with a reason code, never both and never neither. A violation is a bug in the
stage, so it stops the run with the offending keys named rather than writing a shard that lies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from builder.rows import FAILURE_DETAIL, FAILURE_ITEM, FAILURE_REASON, INBAND_COLUMNS, SOURCE

FAILURE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("item", pa.string()),
    ]
)
FAILURE_FEATURES = datasets.Features({name: datasets.Value("string") for name in FAILURE_SCHEMA.names})


class AccountingError(RuntimeError):
    """A stage emitted rows that break the accounting invariant: a bug in that stage."""


@dataclass
class ShardSplit:
    output: pa.Table
    failures: pa.Table
    rows_in: int
    rows_out: int
    inputs_with_output: int
    failed: Counter = field(default_factory=Counter)  # row failures by reason
    item_failures: Counter = field(default_factory=Counter)  # item failures by reason


def split_shard(raw: pa.Table, stage: str, input_keys: Iterable[str]) -> ShardSplit:
    """Separate output rows from failures and verify every input key is accounted for exactly once."""
    is_failure = pc.is_valid(raw[FAILURE_REASON])
    output = raw.filter(pc.invert(is_failure))
    failure_rows = raw.filter(is_failure)
    failures = pa.table(
        {
            "key": failure_rows[SOURCE].cast(pa.string()),
            "stage": pa.array([stage] * failure_rows.num_rows, pa.string()),
            "reason": failure_rows[FAILURE_REASON].cast(pa.string()),
            "detail": failure_rows[FAILURE_DETAIL].cast(pa.string()),
            "item": failure_rows[FAILURE_ITEM].cast(pa.string()),
        },
        schema=FAILURE_SCHEMA,
    )
    keys = list(input_keys)
    produced = set(output[SOURCE].to_pylist())
    is_row_failure = pc.is_null(failures["item"])
    row_failed = Counter(failures.filter(is_row_failure)["key"].to_pylist())
    _check_invariant(stage, keys, produced, row_failed, set(failures["key"].to_pylist()))
    return ShardSplit(
        output=output.drop_columns(list(INBAND_COLUMNS)),
        failures=failures,
        rows_in=len(keys),
        rows_out=output.num_rows,
        inputs_with_output=len(produced),
        failed=Counter(failures.filter(is_row_failure)["reason"].to_pylist()),
        item_failures=Counter(failures.filter(pc.invert(is_row_failure))["reason"].to_pylist()),
    )


def _check_invariant(stage: str, keys: list[str], produced: set, row_failed: Counter, failed_any: set) -> None:
    key_set = set(keys)
    if len(key_set) != len(keys):
        dupes = [k for k, n in Counter(keys).items() if n > 1][:5]
        raise AccountingError(f"stage {stage!r}: input keys are not unique (e.g. {dupes})")
    problems = []
    unknown = (produced | failed_any) - key_set
    if unknown:
        problems.append(f"{len(unknown)} output/failure rows name inputs that do not exist (e.g. {_few(unknown)})")
    lost = key_set - produced - set(row_failed)
    if lost:
        problems.append(f"{len(lost)} input rows left no output and no failure (e.g. {_few(lost)})")
    both = produced & set(row_failed)
    if both:
        problems.append(f"{len(both)} input rows have output *and* a row failure (e.g. {_few(both)})")
    twice = {k for k, n in row_failed.items() if n > 1}
    if twice:
        problems.append(f"{len(twice)} input rows failed more than once (e.g. {_few(twice)})")
    if problems:
        raise AccountingError(
            f"stage {stage!r} broke the accounting invariant: " + "; ".join(problems)
            + ". This is a bug in the stage's batch function; the shard was not written."
        )


def _few(keys: set, n: int = 3) -> list[str]:
    return sorted(map(str, keys))[:n]
