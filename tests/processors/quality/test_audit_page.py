"""The audit's labelling page (issue 25, items 1 and 3): it holds nothing of the referees' verdicts, shows hostile
text as text, needs no network, and — in a real headless Chromium driven by real key events (Playwright sends
them through the DevTools protocol's ``Input.dispatchKeyEvent``) — labels every sampled question, downloads
exactly the labels typed, and restores them after a reload."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from processors.quality.audit_page import render_audit_page
from processors.quality.audit_sample import SAMPLE_FILE, population, write_audit
from taskgalaxy import main

sys.path.insert(0, str(Path(__file__).parent))  # the run-folder helper lives beside this file
from test_audit_sample import CHECK, REFEREES, make_run  # noqa: E402

from browser_helpers import chromium_browser, skip_reason  # noqa: E402
from html_elements import parse_page  # noqa: E402

HOSTILE = [("</script><script>alert('q')</script> What is written on the sign?", "<!-- a comment that never ends"),
           ("Is <b>this</b> bold &amp; <img src=x onerror=alert(1)>?", "Line\u2028separator\u2029 </ScRiPt >"),
           ("__DATA__ __TITLE__ ]]> <![CDATA[ {\"qa_id\": 1}", "`${alert(2)}` \\u003c"),
           ("How many apples are there?", "Three apples.")]
CATEGORIES = {"OCR": 4, "Counting": 3, "Charts": 2}


def _hostile_run(root: Path) -> Path:
    count = sum(CATEGORIES.values())
    texts = {i: (f"{HOSTILE[i % 4][0]} #{i}", f"{HOSTILE[i % 4][1]} #{i}") for i in range(count)}
    return make_run(root, texts=texts, categories=CATEGORIES)


def _parsed(page: str):
    return parse_page(page)


def test_the_page_holds_no_vote_no_verdict_no_stratum(tmp_path):
    run = _hostile_run(tmp_path)
    manifest = write_audit(run, 6, tmp_path / "page")
    page = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    for secret in (*REFEREES, CHECK, "vote_below_threshold", "stratum", "dropped", "votes", '"kept"'):
        assert secret not in page, secret
    data = json.loads(_parsed(page).scripts[0])
    assert data["audit_id"] == manifest["audit_id"]
    assert [set(item) for item in data["items"]] == [{"qa_id", "task_type", "question", "answer", "image"}] * 6
    sample = [json.loads(line) for line in (tmp_path / "page" / SAMPLE_FILE).read_text().splitlines()]
    assert [item["qa_id"] for item in data["items"]] == [r["qa_id"] for r in sample]  # the person's order
    assert all(item["image"].startswith("data:image/jpeg;base64,") for item in data["items"])
    assert "http://" not in page and "https://" not in page and "url(" not in page  # nothing to fetch


def test_hostile_text_cannot_leave_the_data_island():
    items = [{"qa_id": f"q{i}", "task_type": f"{q}~{a}", "question": q, "answer": a, "image": None}
             for i, (q, a) in enumerate(HOSTILE)]
    page = render_audit_page(items, "abc123", title="</title><script>alert(3)</script>")
    parsed = _parsed(page)
    tags = Counter(tag for tag, _ in parsed.tags)
    assert tags["script"] == 2 and tags["img"] == 1 and tags["b"] == 0 and tags["title"] == 1, tags
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    island = parsed.scripts[0]
    assert not set("<>&\u2028\u2029") & set(island)
    assert json.loads(island) == {"audit_id": "abc123", "items": items}
    assert "alert" not in parsed.scripts[1] and "innerHTML" not in parsed.scripts[1]


# -- the real browser --------------------------------------------------------------------------------------------
# What the person types for the i-th question of the page, and what labels.json must then say. None: no key.
PLAN = [("1", "q", "a"), ("2", "w", "s"), ("1", "e", "d"), ("1", None, "s"), ("2", "q", None), ("1", "w", "a"),
        (None, "q", "a")]  # the last one never gets "fits": it is not labelled and not downloaded
ANSWER = {"q": True, "w": False, "e": None, None: None}
NEEDS = {"a": True, "s": False, "d": None, None: None}


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_a_person_labels_the_sample_with_the_keyboard_in_chromium(tmp_path, capsys):
    run = _hostile_run(tmp_path)
    other = write_audit(_hostile_run(tmp_path / "second"), len(PLAN), tmp_path / "other", seed=1)
    manifest = write_audit(run, len(PLAN), tmp_path / "page")
    assert other["audit_id"] != manifest["audit_id"]
    texts = {r["qa_id"]: r for r in population(run)}
    with chromium_browser() as browser:
        context = browser.new_context(accept_downloads=True)
        fetched, problems = [], []
        context.route(re.compile(r"^(?!(file|data|blob):)"), lambda route: (fetched.append(route.request.url),
                                                                              route.abort()))
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.goto((tmp_path / "page" / "index.html").as_uri())
        assert page.text_content("#progress") == f"0 of {len(PLAN)} labelled"

        expected, seen = [], []
        for i, (fits, answer, needs) in enumerate(PLAN):
            qa_id = page.text_content("#qa-id")
            seen.append(qa_id)
            # hostile text shows as itself: read back through the DOM's text, nothing parsed as markup
            assert page.text_content("#question") == "Q: " + texts[qa_id]["question"]
            assert page.text_content("#answer") == "A: " + texts[qa_id]["answer"]
            if i == 1:  # a change of mind: the second key wins
                page.keyboard.press("1")
            for key in (fits, answer, needs):
                if key is not None:
                    page.keyboard.press(key)
            if fits is not None:
                expected.append({"qa_id": qa_id, "fits": fits == "1", "answer_correct": ANSWER[answer],
                                 "needs_image": NEEDS[needs], "audit_id": manifest["audit_id"]})
            if i == 2:  # back and forth, with the other keys for it
                page.keyboard.press("k")
                assert page.text_content("#qa-id") == seen[1]
                page.keyboard.press("ArrowRight")
            page.keyboard.press("j" if i % 2 else "ArrowRight")
        assert seen == [json.loads(line)["qa_id"]
                        for line in (tmp_path / "page" / SAMPLE_FILE).read_text().splitlines()]
        assert page.text_content("#progress") == f"{len(PLAN) - 1} of {len(PLAN)} labelled"
        assert page.locator("img[src=x], b").count() == 0

        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == "labels.json"
        labels_file = tmp_path / "labels.json"
        download.value.save_as(labels_file)
        assert json.loads(labels_file.read_text(encoding="utf-8")) == expected

        page.reload()  # the browser's storage brings the labels and the place back
        assert page.text_content("#progress") == f"{len(PLAN) - 1} of {len(PLAN)} labelled"
        assert page.text_content("#qa-id") == seen[-1]
        page.keyboard.press("u")  # next unlabelled: the last one, the only one left
        assert page.text_content("#qa-id") == seen[-1]
        for _ in PLAN:
            page.keyboard.press("ArrowLeft")
        assert page.text_content("#qa-id") == seen[0]
        pressed = page.eval_on_selector_all(".choices button[aria-pressed=true]",
                                            "els => els.map(e => e.dataset.field + '=' + e.dataset.value)")
        assert pressed == ["fits=true", "answer_correct=true", "needs_image=true"]

        page.goto((tmp_path / "other" / "index.html").as_uri())  # another audit: its own, empty storage
        assert page.text_content("#progress") == f"0 of {len(PLAN)} labelled"
        assert not fetched, f"the page asked the network for {fetched}"
        assert not problems, problems

    # The loop's last step: the command line reads what the browser downloaded and computes the figures.
    assert main(["audit", str(run), "--labels", str(labels_file), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    kept = {r["qa_id"] for r in population(run) if r["kept"]}
    assert figures["labelled"] == len(expected)
    assert figures["labelled_kept"] == sum(label["qa_id"] in kept for label in expected)
    accuracy = figures["kept_accuracy"]["answer_correct"]
    assert 0 <= accuracy["low"] <= accuracy["share"] <= accuracy["high"] <= 1
    assert (run / "audit" / "figures.json").is_file()
