"""Labels belong to the page they were made on: each draw of the audit sample is kept in the run, labels name
their draw, and the card leaves out figures once the stages they were computed for have changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from processors.quality.audit_labels import AuditError, compute_audit
from processors.quality.audit_sample import AUDIT_DIR, SAMPLE_FILE, write_audit
from processors.quality.audit_text import card_section
from taskgalaxy import main

sys.path.insert(0, str(Path(__file__).parent))  # the run-folder helper lives beside this file
from test_audit_sample import make_run  # noqa: E402


def _page_labels(path: Path, sample_file: Path, audit_id: str, good: bool = True) -> Path:
    """What the page downloads after a person labelled every sampled question ``good`` (or not)."""
    ids = [json.loads(line)["qa_id"] for line in sample_file.read_text().splitlines()]
    path.write_text(json.dumps([{"qa_id": q, "fits": good, "answer_correct": good, "needs_image": True,
                                 "audit_id": audit_id} for q in ids]))
    return path


def test_labels_are_read_against_their_own_draw_after_another_is_drawn(tmp_path):
    run = make_run(tmp_path)
    first = write_audit(run, 6, tmp_path / "page-a", seed=0)
    labels = _page_labels(tmp_path / "a.json", tmp_path / "page-a" / SAMPLE_FILE, first["audit_id"])
    second = write_audit(run, 6, tmp_path / "page-b", seed=7)
    assert second["audit_id"] != first["audit_id"]
    latest = {json.loads(line)["qa_id"] for line in (run / AUDIT_DIR / SAMPLE_FILE).read_text().splitlines()}
    labelled = {row["qa_id"] for row in json.loads(labels.read_text())}
    assert latest != labelled  # the latest draw is another sample: reading against it would drop labels
    figures = compute_audit(run, [labels])
    assert figures["audit_id"] == first["audit_id"] and figures["labelled"] == 6 and not figures["warnings"]
    assert figures["kept_accuracy"]["answer_correct"]["share"] == 1.0
    # labels written by hand (no audit_id) are read against the latest draw, as before
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{k: v for k, v in row.items() if k != "audit_id"}
                                for row in json.loads(labels.read_text())]))
    assert compute_audit(run, [bare])["audit_id"] == second["audit_id"]


def test_labels_of_a_page_the_run_never_drew_are_refused(tmp_path):
    run, other = make_run(tmp_path / "one"), make_run(tmp_path / "two")
    drawn = write_audit(other, 6, tmp_path / "page-other", seed=5)
    write_audit(run, 6, tmp_path / "page-run", seed=0)
    labels = _page_labels(tmp_path / "l.json", tmp_path / "page-other" / SAMPLE_FILE, drawn["audit_id"])
    with pytest.raises(AuditError, match=f"made on audit page {drawn['audit_id']}, which run .* did not draw"):
        compute_audit(run, [labels])


def test_two_people_on_two_pages_are_refused(tmp_path):
    run = make_run(tmp_path)
    a = write_audit(run, 6, tmp_path / "page-a", seed=0)
    b = write_audit(run, 6, tmp_path / "page-b", seed=7)
    first = _page_labels(tmp_path / "a.json", tmp_path / "page-a" / SAMPLE_FILE, a["audit_id"])
    second = _page_labels(tmp_path / "b.json", tmp_path / "page-b" / SAMPLE_FILE, b["audit_id"])
    with pytest.raises(AuditError, match="two different audit pages"):
        compute_audit(run, [first, second])


def test_the_card_leaves_out_figures_of_an_earlier_final_stage(tmp_path, caplog):
    run = make_run(tmp_path)
    page = write_audit(run, 6, tmp_path / "page")
    compute_audit(run, [_page_labels(tmp_path / "l.json", tmp_path / "page" / SAMPLE_FILE, page["audit_id"])])
    current = "\n".join(card_section(run, str))
    assert "Kept samples whose answer is correct: 100" in current
    state_file = next(run.glob("*_final/state.json"))
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "fingerprint": "final-rerun-with-threshold-1"}))
    stale = "\n".join(card_section(run, str))
    assert "## Human audit" in stale and "left out" in stale and "Kept samples" not in stale
    assert any("changed since" in r.getMessage() for r in caplog.records)
    compute_audit(run, [tmp_path / "l.json"])  # the same labels again: the sample is still the earlier stage's
    assert "Kept samples" not in "\n".join(card_section(run, str))
    again = write_audit(run, 6, tmp_path / "page-again")  # a sample of the run as it is, labelled
    compute_audit(run, [_page_labels(tmp_path / "m.json", tmp_path / "page-again" / SAMPLE_FILE, again["audit_id"])])
    assert "Kept samples whose answer is correct" in "\n".join(card_section(run, str))


def test_a_run_folder_that_cannot_take_the_sample_leaves_no_page(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / AUDIT_DIR).write_text("a file where the run's audit folder goes")  # fails as root too, unlike chmod
    assert main(["audit", str(run), "--sample", "4", "--out", str(tmp_path / "page")]) != 0
    assert not (tmp_path / "page" / "index.html").exists()  # no page whose labels nothing could read
    err = capsys.readouterr().err
    assert "could not read the run or write the audit sample and its page" in err
    assert "a file where a folder goes" in err or "is a file, not a folder" in err
    assert "draw the same sample" in err


def test_status_says_where_the_audit_stands(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["status", str(run)]) == 0
    assert "audit:" not in capsys.readouterr().out  # no audit, no line
    page = write_audit(run, 6, tmp_path / "page")
    assert main(["status", str(run)]) == 0
    assert "audit: a sample of 6 drawn" in capsys.readouterr().out
    compute_audit(run, [_page_labels(tmp_path / "l.json", tmp_path / "page" / SAMPLE_FILE, page["audit_id"])])
    assert main(["status", str(run)]) == 0
    assert "audit: kept answers correct 100.0% (95% CI" in capsys.readouterr().out
    state_file = next(run.glob("*_score/state.json"))
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "fingerprint": "rescored"}))
    assert main(["status", str(run)]) == 0
    assert "are for an earlier score or final stage" in capsys.readouterr().out


def test_labels_of_a_sample_drawn_before_the_final_stage_changed_are_shown_with_a_warning_not_carded(tmp_path):
    run = make_run(tmp_path)
    page = write_audit(run, 6, tmp_path / "page")
    labels = _page_labels(tmp_path / "l.json", tmp_path / "page" / SAMPLE_FILE, page["audit_id"])
    state_file = next(run.glob("*_final/state.json"))
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "fingerprint": "final-rerun"}))
    figures = compute_audit(run, [labels])
    assert figures["labelled"] == 6 and any("drawn before the run's score or final stage changed" in w
                                            for w in figures["warnings"])
    card = "\n".join(card_section(run, str))
    assert "left out" in card and "draw and label a new one" in card and "Kept samples" not in card


def test_a_page_that_fails_to_write_leaves_the_latest_draw_whole(tmp_path, monkeypatch):
    """A full disk while the page (every picture) is written: the run's latest sample and manifest stay one
    draw's, so labels of the earlier page still read against the right sample."""
    import errno

    from processors.quality import audit_page

    run = make_run(tmp_path)
    first = write_audit(run, 6, tmp_path / "page-a", seed=0)
    labels = _page_labels(tmp_path / "l.json", tmp_path / "page-a" / SAMPLE_FILE, first["audit_id"])
    bare = tmp_path / "bare.json"  # no audit_id: read against the latest draw
    bare.write_text(json.dumps([{k: v for k, v in r.items() if k != "audit_id"} for r in json.loads(labels.read_text())]))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_page, "write_audit_page", full)
    with pytest.raises(OSError):
        write_audit(run, 6, tmp_path / "page-b", seed=7)
    assert json.loads((run / AUDIT_DIR / "audit.json").read_text())["audit_id"] == first["audit_id"]
    figures = compute_audit(run, [bare])
    assert figures["audit_id"] == first["audit_id"] and figures["labelled"] == 6 and not figures["warnings"]


def test_a_census_reads_as_exact_in_the_table(tmp_path, capsys):
    run = make_run(tmp_path)
    page = write_audit(run, 10_000, tmp_path / "page")  # more than the run has: every scored question
    assert page["whole_population"]
    labels = _page_labels(tmp_path / "l.json", tmp_path / "page" / SAMPLE_FILE, page["audit_id"])
    assert main(["audit", str(run), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "kept samples, answer correct: 100.0% (exact: every question it speaks for was labelled" in out
    assert "(exact: counted)" in out and "95% CI" not in out.split("wrong answers in the run:")[1].splitlines()[0]
