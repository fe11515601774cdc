"""The report's tables and counts: Markdown cells escaped, Arrow counting, the Hub's size categories."""

from __future__ import annotations

import datasets
import pytest

from processors.publish.card import size_category
from processors.quality.agreement import agreement_report
from processors.quality.report import _first_scores, _flat, value_counts
from processors.quality.report_text import card_section


def test_category_names_with_pipes_and_newlines_do_not_break_the_card_table():
    votes = [{"a": 1, "b": 1}, {"a": 0, "b": 1}]
    stats = {"agreement": agreement_report(votes, ["Charts | Tables~x", "Line\nbreak~y"], ["a", "b"])}
    table = [line for line in card_section(stats).splitlines() if line.startswith("|")]
    columns = table[0].count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == columns for line in table[2:]), table
    assert any("Charts \\| Tables" in line for line in table)
    assert any("| Line break |" in line for line in table)


@pytest.mark.parametrize("rows, label", [(999, "n<1K"), (5 * 10**7, "10M<n<100M"), (2 * 10**8, "100M<n<1B"),
                                         (3 * 10**9, "1B<n<10B"), (4 * 10**10, "10B<n<100B"),
                                         (5 * 10**11, "100B<n<1T"), (2 * 10**12, "n>1T")])
def test_size_categories_are_the_hubs(rows, label):
    assert size_category(rows) == label


def test_counts_and_scores_come_from_arrow():
    match = datasets.Dataset.from_dict({"candidates": [
        [{"task_type": "A~x", "score": 0.5}, {"task_type": "B~y", "score": 0.25}],
        [], [{"task_type": "A~x", "score": 0.75}]]})
    assert value_counts(_flat(match, "candidates", "task_type")) == {"A~x": 2, "B~y": 1}
    assert list(_first_scores(match)) == [0.5, 0.75]
    assert list(_flat(match, "candidates", "score").to_numpy(zero_copy_only=False)) == [0.5, 0.25, 0.75]
