"""Every input row leaves as output or as exactly one failure with a reason; a stage that loses rows stops."""

from __future__ import annotations

from collections import Counter

import datasets
import pyarrow as pa
import pytest

from builder.accounting import AccountingError, split_shard
from builder.outputs import load_stage_failures, load_stage_output
from builder.rows import BatchOutput
from builder.runfolder import find_stage_dir
from toy_run import make_runner


def test_failed_rows_land_in_the_failures_table_with_reasons(tmp_path):
    run = tmp_path / "run"
    states = make_runner(run, {
        "run": {"name": "toy", "shard_size": 7},
        "stages": {"numbers": {"count": 30}, "square": {"fail_every": 5, "double_every": 4}},
    }).run()
    totals = states["square"]["totals"]
    failures = load_stage_failures(run, "square")
    row_failures = failures.filter(lambda r: r["item"] is None)
    assert Counter(row_failures["reason"]) == {"divisible": 6}
    assert sorted(row_failures["key"]) == [f"n{i:05d}" for i in range(0, 30, 5)]
    assert all("divisible by 5" in d for d in row_failures["detail"])
    assert totals["failed"] == {"divisible": 6}
    # in = inputs with output + row failures; items are counted on their own
    assert totals["rows_in"] == 30 == totals["inputs_with_output"] + sum(totals["failed"].values())
    doubled = [i for i in range(30) if i % 4 == 0 and i % 5 != 0]
    assert totals["rows_out"] == 24 + len(doubled) == len(load_stage_output(run, "square"))
    assert totals["item_failures"] == {"single_copy": 24 - len(doubled)}


def _raw(rows: BatchOutput) -> pa.Table:
    features = datasets.Features({"x": datasets.Value("string")})
    for column in rows.to_columns():
        if column != "x":
            features[column] = datasets.Value("string")
    return pa.Table.from_pydict(rows.to_columns(), schema=features.arrow_schema)


def test_a_row_that_vanishes_is_an_error_naming_it():
    out = BatchOutput(["x"])
    out.add("a", {"x": "1"})
    with pytest.raises(AccountingError, match=r"1 input rows left no output and no failure \(e.g. \['b'\]\)"):
        split_shard(_raw(out), "demo", ["a", "b"])


def test_a_row_with_output_and_a_failure_is_an_error():
    out = BatchOutput(["x"])
    out.add("a", {"x": "1"})
    out.fail("a", "api_error", "boom")
    with pytest.raises(AccountingError, match="output \\*and\\* a row failure"):
        split_shard(_raw(out), "demo", ["a"])


def test_item_failures_do_not_count_as_row_failures():
    out = BatchOutput(["x"])
    out.add("a", {"x": "1"})
    out.fail("a", "label_not_in_candidates", "made up", item="Invented~Label")
    out.fail("b", "no_match", "nothing fits")
    split = split_shard(_raw(out), "demo", ["a", "b"])
    assert split.failed == {"no_match": 1} and split.item_failures == {"label_not_in_candidates": 1}
    assert split.output.column_names == ["x"] and split.output.num_rows == 1


def test_a_stage_breaking_the_invariant_writes_no_shard(tmp_path, monkeypatch):
    from toy_stages import Square

    original = Square.make_batch_fn

    def lossy(self, config, ctx):
        fn = original(self, config, ctx)

        def drop_last(batch):
            return fn({k: v[:-1] for k, v in batch.items()})

        return drop_last

    monkeypatch.setattr(Square, "make_batch_fn", lossy)
    run = tmp_path / "run"
    with pytest.raises(Exception, match="accounting invariant"):
        make_runner(run, {"run": {"name": "toy", "shard_size": 4}, "stages": {"numbers": {"count": 8}}}).run()
    assert not list(find_stage_dir(run, "square").glob("shard-*.arrow"))


def test_reason_codes_must_be_snake_case():
    with pytest.raises(ValueError, match="snake_case"):
        BatchOutput(["x"]).fail("a", "Bad Reason")
