"""Text from a model or a config lands in Markdown (the card), HTML (the sample browser, the sunburst), a CSV a
spreadsheet opens and a PNG: each time it is escaped for where it lands, so it shows as itself."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pytest

from builder.config import ConfigError, build_config_model, validate_config
from processors.publish.card import CardSettings, md_code, md_fence, md_text, render_card
from processors.quality.agreement import agreement_report
from processors.quality.browser import render_browser
from processors.quality.coverage import per_leaf_csv
from processors.quality.report_text import card_section
from processors.taxonomy import plots
from html_elements import parse_page  # noqa: E402

SCRIPT = "</script><script>alert('cat')</script> reading"
IMG = "<img src=x onerror=alert(1)>"
LINK = "[click me](javascript:alert(1))"


def _elements(page: str):
    return parse_page(page)


# -- Markdown (the dataset card) ----------------------------------------------------------------------
def test_the_agreement_table_shows_hostile_category_names_as_text():
    votes = [{"a": 1, "b": 1}, {"a": 0, "b": 1}, {"a": 1, "b": 0}]
    paths = [f"{SCRIPT}~x", f"{LINK}~y", "A | B `code` \\ *bold* _it_~z"]
    table = [line for line in card_section({"agreement": agreement_report(votes, paths, ["a", "b"])}).splitlines()
             if line.startswith("|")]
    rows = "\n".join(table[2:])
    assert "<" not in rows and ">" not in rows  # no raw HTML reaches the Hub's renderer
    assert "&lt;/script&gt;&lt;script&gt;alert('cat')&lt;/script&gt; reading" in rows
    assert "\\[click me\\](javascript:alert(1))" in rows  # no link
    assert "A \\| B \\`code\\` \\\\ \\*bold\\* \\_it\\_" in rows
    columns = table[0].count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == columns for line in table[2:]), table


def test_markdown_helpers():
    assert md_text("Line\nbreak | x") == "Line break \\| x"
    assert md_text("vote_below_threshold") == "vote_below_threshold"  # an identifier stays readable
    assert md_text("a & b <i>") == "a &amp; b &lt;i&gt;"
    assert md_code("a`b|c\nd") == "a'b\\|c d"
    assert md_fence("```\nx") == "````"


def _run_folder(tmp_path, config_text: str):
    (tmp_path / "config.yaml").write_text(config_text, encoding="utf-8")
    return tmp_path


def test_the_card_escapes_the_title_and_fences_the_config(tmp_path):
    run = _run_folder(tmp_path, "run: {name: demo}\ncard: {pretty_name: \"Tasks <b>&</b> [x](y) # 1\"}\n"
                                "notes: |\n  ```\n  # Injected heading\n")
    card = render_card(run, [], [])
    assert "# Tasks &lt;b&gt;&amp;&lt;/b&gt; \\[x\\](y) \\# 1\n" in card
    body = card.split("## Config", 1)[1]
    assert body.count("````yaml") == 1 and "\n````\n" in body  # a ``` in the config does not close the fence


@pytest.mark.parametrize("field, value", [("pretty_name", "My data\n\n# Injected\n[click](javascript:x)"),
                                          ("pretty_name", "Name\r"), ("license_name", "CC\u2028BY"),
                                          ("tags", ["ok", "two\nlines"]), ("pretty_name", "bell\x07")])
def test_card_fields_must_be_one_line_at_config_validation(field, value, tmp_path):
    model = build_config_model([], {"card": CardSettings})
    with pytest.raises(ConfigError, match=f"card.{field}.*must be a single line of text"):
        validate_config({"run": {"name": "x"}, "card": {field: value}}, model, base_dir=tmp_path)
    validate_config({"run": {"name": "x"}, "card": {"pretty_name": "One line: fine (really) & <ok>"}}, model,
                    base_dir=tmp_path)


# -- HTML (the sample browser) ------------------------------------------------------------------------
def _record(i, question, answer="An answer", task_type="Cat~Type"):
    return {"id": f"tg-{i}", "task_type": task_type, "question": question, "answer": answer,
            "votes": {"ref<b>": 1}, "p_yes": {"ref<b>": 0.9}, "thumb": None}


def test_the_browser_page_shows_hostile_text_as_text():
    hostile = [SCRIPT, IMG, "<!-- a comment that never ends", "]]> <![CDATA[", "\u2028\u2029 </ScRiPt >",
               "__DATA__ __NOTE__ __TITLE__", "&lt;entities&gt; &amp;"]
    records = [_record(i, text, answer=text, task_type=f"{text}~{IMG}") for i, text in enumerate(hostile)]
    page = render_browser(records, total=len(records), title=f"{SCRIPT} __DATA__")
    parsed = _elements(page)
    tags = Counter(tag for tag, _ in parsed.tags)
    assert tags["script"] == 2 and tags["img"] == 0 and tags["title"] == 1, tags  # nothing injected
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    data = json.loads(parsed.scripts[0])  # the data island parses back to exactly the records
    assert data == records
    assert "alert" not in parsed.scripts[1]  # the page's own script holds no record text
    shown = "".join(parsed.text)
    assert f"{SCRIPT} __DATA__" in shown and '"id"' not in shown  # the title is text, and only the title


# -- CSV (coverage_per_leaf.csv) ----------------------------------------------------------------------
def test_per_leaf_csv_cells_that_start_like_formulas_are_prefixed():
    leaves = ["=HYPERLINK(\"http://x\",\"y\")~a", "+1~b", "-2~c", "@SUM(A1)~d", "\tTab~e", "\rCR~f", "Plain~g"]
    rows = list(csv.reader(io.StringIO(per_leaf_csv(leaves, {"final": Counter({leaves[0]: 3})}), newline="")))
    cells = [row[0] for row in rows[1:]]
    assert cells[:6] == ["'" + leaf for leaf in leaves[:6]] and cells[6] == "Plain~g"
    assert rows[1][2] == "3"  # the counts are still those of the leaf


# -- the taxonomy's sunburst ----------------------------------------------------------------------------
def test_the_sunburst_html_shows_names_as_text(tmp_path):
    paths = [("OCR", "<a href=\"https://evil.example\">Link</a> reading"), ("OCR", "R&amp;D <b>bold</b>")]
    target = tmp_path / "sunburst.html"
    plots.write_sunburst_html(target, paths, "Task taxonomy <i>x</i>")
    page = target.read_text()
    traces, end = json.JSONDecoder().raw_decode(page, page.index('[{"branchvalues"'))
    layout, _ = json.JSONDecoder().raw_decode(page, page.index("{", end))
    labels = set(traces[0]["labels"])
    # plotly reads <a href>, <b> and &entities; in labels: escaped, they are drawn as the characters they are
    assert "&lt;a href=&quot;https://evil.example&quot;&gt;Link&lt;/a&gt; reading" in labels
    assert "R&amp;amp;D &lt;b&gt;bold&lt;/b&gt;" in labels
    assert layout["title"]["text"] == "Task taxonomy &lt;i&gt;x&lt;/i&gt;"


def _tree(first: int, second: int, third: int) -> list[tuple[str, ...]]:
    return [(f"Category {a}", f"Group {a}-{b}", f"Task {a}-{b}-{c}")
            for a in range(first) for b in range(second) for c in range(third)]


def test_a_large_tree_draws_at_most_the_cap_and_says_so(tmp_path, monkeypatch):
    import matplotlib.projections.polar

    drawn_bars = []
    real_bar = matplotlib.projections.polar.PolarAxes.bar

    def counting_bar(self, x, *args, **kwargs):
        drawn_bars.append(len(x))
        return real_bar(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.projections.polar.PolarAxes, "bar", counting_bar)
    paths = _tree(12, 20, 25)  # 6,000 leaves, 6,252 sectors
    assert plots.write_sunburst_png(tmp_path / "s.png", paths, "t $x$ and $y$", max_sectors=300) <= 300
    assert sum(drawn_bars) <= 300
    drawn = plots.drawn_sectors(plots.build_hierarchy(paths), 300)
    assert len(drawn.pairs) <= 300 and drawn.sectors == 12 + 240 + 6000
    assert drawn.note.startswith(f"{len(drawn.pairs)} of 6,252 sectors drawn (levels 1-2 in full; level 3: only")
    page = tmp_path / "s.html"
    assert plots.write_sunburst_html(page, paths, "t", max_sectors=1000) <= 1000
    assert "6,252 sectors drawn" in page.read_text()
    assert plots.write_sunburst_png(tmp_path / "small.png", _tree(2, 3, 4), "small") == 2 + 6 + 24  # all of it


def test_partial_levels_hold_whole_sibling_groups_in_tree_order():
    paths = _tree(3, 4, 5) + [("Category 9", "Huge", f"Task {i}") for i in range(50)]
    root = plots.build_hierarchy(paths)
    drawn = plots.drawn_sectors(root, 4 + 13 + 60)  # room for the 50 under "Huge" and 2 groups of 5
    parents = Counter(parent.name for parent, node in drawn.pairs if node.depth == 3)
    assert parents == {"Huge": 50, "Group 0-0": 5, "Group 0-1": 5}
    seen = {id(root)}
    for parent, node in drawn.pairs:  # parents come first
        assert id(parent) in seen
        seen.add(id(node))
    few = plots.drawn_sectors(root, 2)  # fewer sectors than first-level categories: the widest of them
    assert [node.name for _, node in few.pairs] == ["Category 0", "Category 9"]


def test_the_card_counts_cached_input_tokens_only_when_there_are_some(tmp_path):
    run = _run_folder(tmp_path, "run: {name: demo}\n")

    def state(cached: int) -> dict:
        usage = {"prompt_tokens": 4000, "completion_tokens": 100, "cached_tokens": cached, "cost_usd": 0.5}
        return {"stage": "qa", "rows_in": 1, "fingerprint": "f" * 16,
                "totals": {"usage": usage, "rows_out": 1, "failed": {}, "item_failures": {}}}

    assert "prompt cache" not in render_card(run, [], [state(0)])
    card = render_card(run, [], [state(1000)])
    assert "Of 4,000 prompt tokens, 1,000 (25.0%) were read from the provider's prompt cache" in card
