"""Level-by-level growth with the simulator's responder called in process, then stats and pictures."""

from __future__ import annotations

import random

from processors.llm.request import LLMResult
from processors.taxonomy import simulate
from processors.taxonomy.grow import GrowthPlan, grow, seed_tree
from processors.taxonomy.plots import write_sunburst_html, write_sunburst_png
from processors.taxonomy.stats import format_stats, tree_stats


class FakeEngine:
    """``send`` for ``grow``: answers through the simulator's responder and the request's own ``parse``."""

    def __init__(self, fail_keys: tuple[str, ...] = ()):
        self.calls: list[list] = []
        self.fail_keys = fail_keys

    def __call__(self, requests):
        self.calls.append(requests)
        results = []
        for request in requests:
            if any(part in request.key for part in self.fail_keys):
                results.append(LLMResult(request.key, ok=False, reason="api_error", detail="HTTP 500"))
                continue
            text = simulate.respond(request.messages, random.Random(0))
            results.append(LLMResult(request.key, ok=True, value=request.parse(text), raw_text=text))
        return results


ROWS = [
    ("row-ocr", ["OCR", "OCR~Scene text", "OCR~Scene text~Street sign reading"], ["seed"] * 3),
    ("row-count", ["Object counting"], ["seed"]),
]


def _grow(plan, engine=None):
    tree = seed_tree(ROWS)
    engine = engine or FakeEngine()
    report = grow(tree, plan, engine)
    return tree, report, engine


def test_levels_grow_in_order_with_the_right_kind_of_ask():
    plan = GrowthPlan(levels=3, rounds_per_level=1, children_per_request=3, new_first_level_per_round=2,
                      roots_owner="new")
    tree, report, engine = _grow(plan)
    kinds = [[r.key.split(":")[0] for r in call] for call in engine.calls]
    assert kinds[0] == ["roots"]  # level 1: new first-level categories
    assert sorted(kinds[1]) == ["expand", "expand", "expand", "supplement"]  # level 2: OCR has a child
    assert set(kinds[2]) == {"expand", "supplement"}  # level 3: Scene text has a child
    assert len(engine.calls) == 3
    assert [n.name for n in tree.nodes_at(1)][:2] == ["OCR", "Object counting"]
    new_roots = [n for n in tree.nodes_at(1) if n.owner == "new"]
    assert len(new_roots) == 2 and all(n.origin == "generated" and n.round == 1 for n in new_roots)
    assert max(n.level for n in tree.leaves()) == 3
    assert all(n.owner == "row-ocr" for n in tree.walk() if n.parts[0] == "OCR")
    assert report.asks == sum(len(c) for c in engine.calls)


def test_rounds_stop_when_the_gain_is_small_and_caps_hold():
    plan = GrowthPlan(levels=2, rounds_per_level=5, children_per_request=4, max_children=6, min_round_gain=0.0)
    tree, report, _ = _grow(plan)
    assert all(len(node.children) <= 6 for node in tree.walk())
    # round 1: OCR 1 -> 5, counting 0 -> 4; round 2 fills both to the cap of 6; round 3 finds no room
    assert report.added["level 2"] == [8, 3]
    stingy = GrowthPlan(levels=2, rounds_per_level=5, children_per_request=2, min_round_gain=0.99)
    _, report, _ = _grow(stingy)
    assert report.added["level 2"] == [4, 4]  # 4 new on 1 before: go on; 4 new on 5 is < 0.99: stop


def test_failed_asks_become_rejections_and_growth_goes_on():
    plan = GrowthPlan(levels=2, rounds_per_level=1, children_per_request=3)
    tree, report, _ = _grow(plan, FakeEngine(fail_keys=("expand",)))
    failed = [r for r in report.rejections if r.reason == "api_error"]
    assert [r.owner for r in failed] == ["row-count"] and failed[0].line == "request for Object counting"
    assert len(tree.find(["OCR"]).children) >= 4  # Scene text + 3 supplemented (+ a reworded extra)


def test_replays_are_identical():
    plan = GrowthPlan(levels=3, rounds_per_level=2, children_per_request=3, roots_owner="new")
    first, _, engine1 = _grow(plan)
    second, _, engine2 = _grow(plan)
    assert [n.path for n in first.walk()] == [n.path for n in second.walk()]
    assert [r.messages for c in engine1.calls for r in c] == [r.messages for c in engine2.calls for r in c]


def test_stats_and_pictures(tmp_path):
    leaves = [("A", "B", "C"), ("A", "B", "D"), ("A", "E"), ("F",)]
    stats = tree_stats(leaves, ["seed", "generated", "generated", "imported"])
    assert stats["types_per_level"] == {"1": 2, "2": 2, "3": 2}
    assert stats["leaf_depth_histogram"] == {"1": 1, "2": 1, "3": 2}
    assert stats["branching"]["1"] == {"parents": 1, "mean": 2.0, "median": 2.0, "max": 2}
    assert stats["leaf_origins"] == {"seed": 1, "generated": 2, "imported": 1}
    assert "4 task types" in format_stats(stats)
    write_sunburst_html(tmp_path / "s.html", leaves, "t")
    write_sunburst_png(tmp_path / "s.png", leaves, "t")
    html = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert "sunburst" in html and '"A~B~C"' in html and "https://cdn" not in html[:2000]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plan_takes_every_growth_setting_from_the_config():
    from processors.stages.taxonomy import TaxonomyConfig
    from processors.taxonomy.parse import NameLimits

    config = TaxonomyConfig(levels=4, rounds_per_level=3, min_round_gain=0.1, new_first_level_per_round=5,
                            max_first_level=40, children_per_request=6, max_children=20, max_name_chars=60,
                            max_name_words=9, temperature=0.3, max_tokens=500)
    assert GrowthPlan.from_config(config) == GrowthPlan(
        levels=4, rounds_per_level=3, min_round_gain=0.1, new_first_level_per_round=5, max_first_level=40,
        children_per_request=6, max_children=20, limits=NameLimits(max_chars=60, max_words=9), temperature=0.3,
        max_tokens=500)
