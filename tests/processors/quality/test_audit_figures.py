"""The human audit's figures against hand-computed numbers: Wilson intervals (plain and over the Kish effective
n), stratum weights, precision/recall/kappa of a referee against the person, the blind check's direction, the
agreement between two people, and the edge cases (nothing labelled, p = 1, a constant rater: null, never NaN);
and the labels file's checks."""

from __future__ import annotations

import json
import math

import pytest

from processors.quality import audit_labels
from processors.quality.agreement import cohen_kappa
from processors.quality.audit_figures import (
    Z95, AuditRow, Checks, audit_figures, binary_table, inter_annotator, kept_accuracy, kish_n_eff,
    referee_figures, stratum_weights, table_kappa, weighted_share, wilson,
)
from processors.quality.audit_labels import AuditError, read_labels


def row(qa_id, stratum="kept|A", kept=True, fits=True, answer_correct=True, needs_image=True, votes=None,
        p_yes=None):
    return AuditRow(qa_id, stratum, kept, fits, answer_correct, needs_image, votes or {}, p_yes or {})


# ------------------------------------------------------------------------------------------- intervals
def test_wilson_of_8_in_10_is_the_textbook_interval():
    # z^2 = 3.8415; centre = (0.8 + 0.19207) / 1.38415 = 0.71674; half = 1.41600 * sqrt(0.016 + 0.0096) = 0.22658
    low, high = wilson(0.8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)


def test_equal_weights_reduce_to_the_plain_wilson_interval_with_its_finite_population_correction():
    values = [True] * 7 + [False] * 3
    figure = weighted_share(values, ["kept|A"] * 10, {"kept|A": 5_000})  # every weight 500, f = 10/5000
    assert figure["n_eff"] == round(10 / (1 - 10 / 5_000), 2) and figure["share"] == 0.7
    assert (figure["low"], figure["high"]) == tuple(round(x, 4) for x in wilson(0.7, 10 / 0.998))
    huge = weighted_share(values, ["kept|A"] * 10, {"kept|A": 10**12})  # f -> 0: the plain Wilson interval
    assert huge["n_eff"] == 10 and (huge["low"], huge["high"]) == tuple(round(x, 4) for x in wilson(0.7, 10))


def test_a_census_is_exact():
    """Every question of the strata labelled (``--sample`` >= the run): the share is counted, not estimated."""
    values = [True] * 7 + [False] * 3
    figure = weighted_share(values, ["kept|A"] * 6 + ["kept|B"] * 4, {"kept|A": 6, "kept|B": 4})
    assert figure["exact"] is True and figure["share"] == figure["low"] == figure["high"] == 0.7
    partial = weighted_share(values, ["kept|A"] * 6 + ["kept|B"] * 4, {"kept|A": 6, "kept|B": 40})
    assert "exact" not in partial and partial["low"] < partial["share"] < partial["high"]
    # kept|A labelled whole adds no uncertainty: only kept|B's term, W_B^2 (1 - f_B) / n_B, is left
    assert partial["n_eff"] == round(1 / ((40 / 46) ** 2 * (1 - 4 / 40) / 4), 2)


def test_a_stratified_share_and_its_interval_by_hand():
    # kept|A: population 90, 4 labelled (T, T, T, F) -> weight 22.5; kept|B: population 10, 2 labelled (T, F) -> 5
    # share = (3 * 22.5 + 5) / 100 = 0.725
    # Kish alone: n_eff = 100^2 / (4 * 22.5^2 + 2 * 5^2) = 10000 / 2075 = 4.8193 = 1 / (0.9^2/4 + 0.1^2/2)
    # with the finite-population correction: 1 / (0.81 * (1 - 4/90) / 4 + 0.01 * (1 - 2/10) / 2)
    #   = 1 / (0.193500 + 0.004000) = 5.06329
    # Wilson at n = 5.06329, z^2 = 3.841459: denominator 1 + 3.841459/5.06329 = 1.758688
    #   centre = (0.725 + 3.841459/10.12658) / 1.758688 = 1.104344 / 1.758688 = 0.627936
    #   half = 1.959964/1.758688 * sqrt(0.725*0.275/5.06329 + 3.841459/(4*5.06329^2))
    #        = 1.114447 * sqrt(0.039377 + 0.037460) = 0.308918  -> low 0.319018, high 0.936855
    values = [True, True, True, False, True, False]
    strata = ["kept|A"] * 4 + ["kept|B"] * 2
    assert stratum_weights(strata, {"kept|A": 90, "kept|B": 10}) == [22.5] * 4 + [5.0] * 2
    assert kish_n_eff([22.5] * 4 + [5.0] * 2) == pytest.approx(10_000 / 2_075) == pytest.approx(1 / (0.81 / 4 + 0.01 / 2))
    figure = weighted_share(values, strata, {"kept|A": 90, "kept|B": 10})
    assert figure == {"share": 0.725, "low": 0.319, "high": 0.9369, "n": 6, "n_eff": 5.06,
                      "population_covered": 100}


def test_all_true_gives_a_valid_interval_up_to_one():
    figure = weighted_share([True] * 5, ["kept|A"] * 5, {"kept|A": 50})
    assert figure["share"] == 1.0 and figure["high"] == 1.0
    n = 5 / (1 - 5 / 50)  # the finite-population correction
    assert figure["low"] == round(n / (n + Z95 ** 2), 4)  # Wilson's lower bound at p = 1: n / (n + z^2)


def test_nothing_labelled_is_null_with_a_reason():
    figure = weighted_share([], [], {"kept|A": 50})
    assert figure["share"] is None and figure["n"] == 0 and "no labelled" in figure["reason"]
    accuracy = kept_accuracy([row("d1", "dropped|A", kept=False)], {"dropped|A": 10}, kept_population=40)
    assert accuracy["labelled_kept"] == 0
    assert accuracy["projected_wrong_answers"]["estimate"] is None
    assert accuracy["projected_wrong_answers"]["kept_population"] == 40


# ------------------------------------------------------------------------------------------- accuracy
def test_kept_accuracy_projects_the_wrong_answers_and_leaves_unknown_answers_out():
    rows = [row(f"k{i}", answer_correct=i < 8) for i in range(10)]  # 8 of 10 right
    rows += [row("k-unknown", answer_correct=None), row("d", "dropped|A", kept=False, answer_correct=False)]
    accuracy = kept_accuracy(rows, {"kept|A": 1_000, "dropped|A": 500}, kept_population=1_000)
    assert accuracy["answer_correct"]["share"] == 0.8 and accuracy["answer_correct"]["n"] == 10
    assert accuracy["answer_unknown"] == 1 and accuracy["labelled_kept"] == 11
    low, high = wilson(0.8, 10 / (1 - 10 / 1_000))
    assert accuracy["projected_wrong_answers"] == {
        "estimate": 200, "low": round((1 - round(high, 4)) * 1_000), "high": round((1 - round(low, 4)) * 1_000),
        "kept_population": 1_000}
    assert accuracy["fits"]["n"] == 11  # a row with an unknown answer still says whether it fits


def test_good_is_false_as_soon_as_one_label_is_false():
    assert row("a", fits=False, answer_correct=None).good is False
    assert row("a", fits=None, answer_correct=False).good is False
    assert row("a", fits=True, answer_correct=None).good is None
    assert row("a", fits=True, answer_correct=True).good is True


# ------------------------------------------------------------------------------------------- referees
def test_a_weighted_referee_table_by_hand():
    # A (population 90, 3 rows: weight 30): (yes, good) (yes, bad) (no, bad); B (population 10, 2 rows: weight
    # 5): (yes, good) (no, good). tp = 35, fp = 30, fn = 5, tn = 30 of 100.
    # precision 35/65, recall 35/40, agreement 0.65; kappa: p_e = 0.65*0.4 + 0.35*0.6 = 0.47 -> 0.18/0.53
    # unweighted: tp 2, fp 1, fn 1, tn 1: p_o 0.6, p_e 0.52 -> 0.08/0.48
    said = [True, True, False, True, False]
    truth = [True, False, False, True, True]
    strata = ["A", "A", "A", "B", "B"]
    table = binary_table(said, truth, strata, {"A": 90, "B": 10})
    assert table["counts"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1} and table["n"] == 5
    assert table["precision"] == round(35 / 65, 4) and table["recall"] == 0.875
    assert table["agreement"] == 0.65 and table["kappa"] == round(0.18 / 0.53, 4)
    assert table["kappa_unweighted"] == round(0.08 / 0.48, 4)
    assert "reasons" not in table


def test_the_table_kappa_with_unit_weights_is_cohens():
    said = [1, 1, 0, 1, 0, 0, 1, 0]
    truth = [1, 0, 0, 1, 1, 0, 1, 0]
    cells = [sum(s == a and t == b for s, t in zip(said, truth)) for a, b in ((1, 1), (1, 0), (0, 1), (0, 0))]
    assert table_kappa(*cells) == pytest.approx(cohen_kappa(said, truth))


def test_a_constant_rater_gives_null_kappa_with_a_reason_not_nan():
    table = binary_table([True, True, True], [True, False, True], ["A"] * 3, {"A": 30})
    assert table["kappa"] is None and table["kappa_unweighted"] is None
    assert "same answer" in table["reasons"]["kappa"]
    assert table["precision"] == round(2 / 3, 4) and table["recall"] == 1.0
    never = binary_table([False, False], [True, False], ["A"] * 2, {"A": 30})
    assert never["precision"] is None and "said yes to no" in never["reasons"]["precision"]
    json.dumps([table, never], allow_nan=False)


def test_referees_vote_and_checks_with_missing_votes_left_out_and_counted():
    checks = Checks(counting=["r1", "r2"], answer_referees=["ans"], blind_referees=["blind"],
                    blind_f1_threshold=0.5)
    rows = [
        # blind p_yes 0.9 >= 0.5: answered without the image -> says "does not need the image"
        row("a", votes={"r1": 1, "r2": None, "ans": 1, "blind": 1}, p_yes={"blind": 0.9}, needs_image=False),
        row("b", votes={"r1": 1, "r2": 1, "ans": 0, "blind": 0}, p_yes={"blind": 0.1}, answer_correct=False),
        row("c", "dropped|A", kept=False, fits=False, votes={"r1": 0, "r2": 0, "ans": 1, "blind": 1},
            p_yes={"blind": 0.2}, needs_image=True),
        row("d", "dropped|A", kept=False, votes={"r1": 0, "r2": 1, "ans": 1, "blind": None}),
    ]
    figures = referee_figures(rows, {"kept|A": 20, "dropped|A": 20}, checks)
    r1, r2 = figures["referees"]["r1"]["good"], figures["referees"]["r2"]["good"]
    assert r1["n"] == 4 and r1["counts"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert r2["n"] == 3 and r2["left_out"]["no_vote"] == 1  # the cascade did not ask r2 about "a"
    assert figures["vote"]["good"]["counts"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert figures["referees"]["r1"]["fits"]["counts"] == {"tp": 2, "fp": 0, "fn": 1, "tn": 1}
    answer = figures["answer_check"]["ans"]
    assert answer["counts"] == {"tp": 3, "fp": 0, "fn": 0, "tn": 1} and answer["agreement"] == 1.0
    blind = figures["blind_check"]["blind"]  # a: said "not needed", person: not needed; b: needed/needed (p 0.1);
    assert blind["n"] == 3 and blind["left_out"]["no_vote"] == 1  # c: blind p 0.2 -> needed; person: needed
    assert blind["counts"] == {"tp": 2, "fp": 0, "fn": 0, "tn": 1} and blind["agreement"] == 1.0


def test_audit_figures_is_json_without_nan_even_when_empty():
    figures = audit_figures([], {"kept|A": 5}, Checks(counting=["r1"]), kept_population=5)
    text = json.dumps(figures, allow_nan=False)
    assert "NaN" not in text and figures["labelled"] == 0
    assert figures["referees"]["r1"]["good"]["precision"] is None


def test_two_people_agree_by_label_over_the_common_samples():
    first = {"a": {"fits": True, "answer_correct": True, "needs_image": True},
             "b": {"fits": False, "answer_correct": False, "needs_image": True},
             "c": {"fits": True, "answer_correct": None, "needs_image": True},
             "only-first": {"fits": True, "answer_correct": True, "needs_image": True}}
    second = {"a": {"fits": True, "answer_correct": False, "needs_image": True},
              "b": {"fits": False, "answer_correct": False, "needs_image": True},
              "c": {"fits": False, "answer_correct": True, "needs_image": True}}
    inter = inter_annotator(first, second)
    assert inter["common"] == 3
    # fits: (T,T) (F,F) (T,F): p_o 2/3, p_e = 2/3*1/3 + 1/3*2/3 = 4/9 -> (2/3 - 4/9) / (5/9) = 0.4
    assert inter["fits"]["n"] == 3 and inter["fits"]["kappa"] == 0.4
    assert inter["answer_correct"]["n"] == 2 and inter["answer_correct"]["agreement"] == 0.5
    assert inter["needs_image"]["kappa"] is None and "same answer" in inter["needs_image"]["reason"]
    assert not math.isnan(inter["fits"]["agreement"])


# ------------------------------------------------------------------------------------------- labels file
def write(tmp_path, value, name="labels.json"):
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_labels_are_read_by_qa_id_and_unlabelled_rows_left_out(tmp_path):
    path = write(tmp_path, [{"qa_id": "a", "fits": True, "answer_correct": None, "needs_image": False, "note": "x"},
                            {"qa_id": "b", "fits": None, "answer_correct": None, "needs_image": None}])
    labels, data, held, page = read_labels(path)
    assert labels == {"a": {"fits": True, "answer_correct": None, "needs_image": False}}
    assert held == 2 and data == path.read_bytes() and page is None  # not written by an audit page
    wrapped = write(tmp_path, {"labels": [{"qa_id": "a", "fits": False}]}, "wrapped.json")
    assert read_labels(wrapped)[0] == {"a": {"fits": False, "answer_correct": None, "needs_image": None}}


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"qa_id": "a"}', "not a list"),
    ('["a"]', "row 0 is a JSON str"),
    ('[{"fits": true}]', "row 0 has no qa_id"),
    ('[{"qa_id": "", "fits": true}]', "has no qa_id"),
    ('[{"qa_id": "a", "fits": "yes"}]', 'fits must be true, false or null, not "yes"'),
    ('[{"qa_id": "a", "fits": true, "answer_correct": 1}]', "answer_correct must be true, false or null"),
    ('[{"qa_id": "a", "fits": true}, {"qa_id": "a", "fits": false}]', "labelled twice (rows 0 and 1)"),
    (b"\xff\xfe[", "is not JSON"),
    ('[{"qa_id": "a", "fits": true, "audit_id": "../x"}]', 'audit_id "../x" is not an audit page'),
    ('[{"qa_id": "a", "fits": true, "audit_id": "p1"}, {"qa_id": "b", "fits": true, "audit_id": "p2"}]',
     "mixes labels of 2 audit pages (p1, p2)"),
])
def test_bad_labels_files_are_refused_with_the_row_named(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labels(path)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_labels_file_saved_by_notepad_or_powershell_is_read(tmp_path, encoding):
    """A person who opens labels.json in an editor and saves it may add a BOM or write UTF-16."""
    path = tmp_path / "labels.json"
    path.write_bytes(json.dumps([{"qa_id": "é", "fits": True, "audit_id": "p1"}]).encode(encoding))
    labels, _, held, page = read_labels(path)
    assert labels == {"é": {"fits": True, "answer_correct": None, "needs_image": None}} and page == "p1"


def test_a_missing_a_folder_or_a_huge_labels_file_is_refused(tmp_path, monkeypatch):
    with pytest.raises(AuditError, match="no labels file at"):
        read_labels(tmp_path / "nope.json")
    with pytest.raises(AuditError, match="is a folder"):
        read_labels(tmp_path)
    monkeypatch.setattr(audit_labels, "MAX_LABELS_BYTES", 10)
    with pytest.raises(AuditError, match="over the"):
        read_labels(write(tmp_path, [{"qa_id": "abcdefgh", "fits": True}]))


# -- review (issue 25 follow-up): an independent hand computation over kept and dropped strata ----------------
def test_three_strata_kept_and_dropped_by_hand_through_audit_figures():
    # Every row fits, so "good" = answer_correct. Referee r votes 1/0 as `said` below.
    #   kept/A    population 100, 2 labelled: (said 1, correct T) (1, F)            weight 100/2 = 50
    #   kept/B    population  50, 4 labelled: (1, T) (0, T) (1, T) (0, F)           weight  50/4 = 12.5
    #   dropped/C population  30, 3 labelled: (0, F) (1, F) (0, T)                 weight  30/3 = 10
    # Kept accuracy (A and B only): yes weight = 50 + 3 * 12.5 = 87.5 of 150 -> share 7/12 = 0.58333
    #   Kish alone: n_eff = 150^2 / (2 * 50^2 + 4 * 12.5^2) = 22500 / (5000 + 625) = 4.0
    #   with the finite-population correction: W_A = 2/3, f_A = 2/100; W_B = 1/3, f_B = 4/50
    #     n_eff = 1 / ((4/9) * 0.98 / 2 + (1/9) * 0.92 / 4) = 1 / (0.217778 + 0.025556) = 1 / 0.243333 = 4.109589
    #   Wilson, z^2 = 3.841459, n = 4.109589: denominator 1 + 3.841459/4.109589 = 1.934755
    #   centre = (0.583333 + 3.841459/8.219178) / 1.934755 = 1.050711 / 1.934755 = 0.543072
    #   half = 1.959964/1.934755 * sqrt(0.583333*0.416667/4.109589 + 3.841459/(4*4.109589^2))
    #        = 1.013030 * sqrt(0.059144 + 0.056864) = 0.345037  -> low 0.198035, high 0.888109
    #   wrong answers among 150 kept: (1 - 7/12) * 150 = 62.5;
    #   bounds (1 - 0.888109) * 150 = 16.8 and (1 - 0.198035) * 150 = 120.3
    # Referee r against good, over all 9 rows: tp = 50 (A) + 2 * 12.5 (B) = 75; fp = 50 (A) + 10 (C) = 60;
    #   fn = 12.5 (B) + 10 (C) = 22.5; tn = 12.5 (B) + 10 (C) = 22.5; total 180
    #   precision 75/135 = 0.5556, recall 75/97.5 = 0.7692, agreement 97.5/180 = 0.5417
    #   p_said = 135/180 = 0.75, p_truth = 97.5/180 = 0.541667, p_e = 0.75*0.541667 + 0.25*0.458333 = 0.520833
    #   kappa = (0.541667 - 0.520833) / (1 - 0.520833) = (1/48) / (23/48) = 1/23 = 0.0435
    #   unweighted: tp 3, fp 2, fn 2, tn 2 of 9: p_o 5/9, p_e 25/81 + 16/81 = 41/81 -> (4/81) / (40/81) = 0.1
    plan = [("kept/A", True, 1, True), ("kept/A", True, 1, False),
            ("kept/B", True, 1, True), ("kept/B", True, 0, True), ("kept/B", True, 1, True), ("kept/B", True, 0, False),
            ("dropped/C", False, 0, False), ("dropped/C", False, 1, False), ("dropped/C", False, 0, True)]
    rows = [row(f"q{i}", stratum, kept, True, correct, True, {"r": said})
            for i, (stratum, kept, said, correct) in enumerate(plan)]
    populations = {"kept/A": 100, "kept/B": 50, "dropped/C": 30}
    figures = audit_figures(rows, populations, Checks(counting=["r"]), kept_population=150)
    accuracy = figures["kept_accuracy"]["answer_correct"]
    assert accuracy["share"] == round(7 / 12, 4) and accuracy["n_eff"] == 4.11 and accuracy["n"] == 6
    assert accuracy["low"] == pytest.approx(0.198035, abs=1e-4)
    assert accuracy["high"] == pytest.approx(0.888109, abs=1e-4)
    wrong = figures["kept_accuracy"]["projected_wrong_answers"]
    assert abs(wrong["estimate"] - 62.5) <= 1 and abs(wrong["low"] - 16.8) <= 1 and abs(wrong["high"] - 120.3) <= 1
    good = figures["referees"]["r"]["good"]
    assert good["counts"] == {"tp": 3, "fp": 2, "fn": 2, "tn": 2}
    assert good["precision"] == round(5 / 9, 4) and good["recall"] == round(75 / 97.5, 4)
    assert good["agreement"] == round(97.5 / 180, 4) and good["kappa"] == round(1 / 23, 4)
    assert good["kappa_unweighted"] == 0.1


# -- review: labels files that are not files, or not labels ------------------------------------------------------
def _alarm(seconds):
    """Fail (instead of hanging the suite) when a read blocks: a FIFO without a writer waits forever."""
    import signal

    def fail(*_):
        raise TimeoutError("read_labels blocked")
    signal.alarm(0)
    return signal.signal(signal.SIGALRM, fail), signal.alarm(seconds)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dev_urandom"])
def test_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path, kind):
    import os
    import signal

    path = tmp_path / "labels.json"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        device = "/dev/zero" if kind == "dev_zero" else "/dev/urandom"
        if not os.path.exists(device):
            pytest.skip(f"no {device}")
        path.symlink_to(device)  # st_size 0: a size check alone lets it through, and it never ends
    previous, _ = _alarm(5)
    try:
        with pytest.raises(AuditError, match="not a regular file"):
            read_labels(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_json_nested_too_deep_is_refused_as_labels(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text("[" * 200_000 + "]" * 200_000)  # a RecursionError in json, not a JSONDecodeError
    with pytest.raises(AuditError, match="nested too deep"):
        read_labels(path)

