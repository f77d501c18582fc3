"""Table 1 / Table 2 arithmetic against hand-counted confusion matrices."""

import pytest

from worker.evaluation.metrics import (
    Scored,
    at_threshold,
    category_confusion,
    decision_confusion,
    recommend_threshold,
    threshold_sweep,
)


def item(exp: bool, pred: bool, score: float, exp_codes=(), pred_codes=(), task="prompt") -> Scored:
    return Scored(task, exp, frozenset(exp_codes), score, pred, frozenset(pred_codes))


ITEMS = [
    item(True, True, 0.9, ["S9"], ["S9"]),  # TP, S9 TP
    item(True, True, 0.8, ["S1", "S9"], ["S9"]),  # TP; S9 TP, S1 FN
    item(True, False, 0.3, ["S1"]),  # FN; S1 FN
    item(False, True, 0.7, [], ["S1"]),  # FP; S1 FP
    item(False, False, 0.1),  # TN
    item(False, False, 0.2),  # TN
    item(True, True, 0.6, ["S13"], ["S1"]),  # TP; S13 FN, S1 FP
]


def test_decision_confusion_counts_and_rates_match_hand_count():
    c = decision_confusion(ITEMS)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 1, 2)
    assert c.precision == pytest.approx(3 / 4)
    assert c.recall == pytest.approx(3 / 4)
    assert c.f1 == pytest.approx(0.75)
    assert c.fpr == pytest.approx(1 / 3)
    assert c.support == 4


def test_category_confusion_is_one_vs_rest_over_all_items():
    s9 = category_confusion(ITEMS, "S9")
    assert (s9.tp, s9.fp, s9.fn, s9.tn) == (2, 0, 0, 5)
    s1 = category_confusion(ITEMS, "S1")
    assert (s1.tp, s1.fp, s1.fn, s1.tn) == (0, 2, 2, 3)
    assert s1.f1 == 0.0
    s13 = category_confusion(ITEMS, "S13")
    assert (s13.tp, s13.fp, s13.fn) == (0, 0, 1)


def test_codes_of_a_safe_prediction_do_not_count_as_category_predictions():
    items = [item(False, False, 0.2, [], ["S1"])]
    assert category_confusion(items, "S1").fp == 0


def test_threshold_sweep_and_recommendation():
    c = at_threshold(ITEMS, 0.65)  # predicted unsafe: 0.9, 0.8, 0.7
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 2, 2)
    points = threshold_sweep(ITEMS)
    assert [p.threshold for p in points][:3] == [0.1, 0.2, 0.3]
    # The sweep ends at the highest score, not at a made-up "flag nothing" point with precision 0.
    assert points[-1].threshold == 0.9 and points[-1].precision == 1.0 and points[-1].recall == 0.25
    assert all(p.threshold <= 1.0 and p.precision is not None for p in points)
    rec = recommend_threshold(ITEMS, target_fpr=0.0)
    assert rec is not None
    # Highest recall with no false positive: threshold 0.8 flags the two items scored 0.8 and 0.9.
    assert rec.threshold == 0.8 and rec.recall == pytest.approx(0.5) and rec.fpr == 0.0
    rec_loose = recommend_threshold(ITEMS, target_fpr=0.34)
    assert rec_loose.threshold == 0.3 and rec_loose.recall == 1.0


def test_empty_inputs_give_undefined_rates_not_errors_or_zeros():
    c = decision_confusion([])
    assert (c.precision, c.recall, c.f1, c.fpr) == (None, None, None, None)
    assert recommend_threshold([], 0.1) is None


def test_a_category_without_examples_reports_null_not_zero():
    s5 = category_confusion(ITEMS, "S5")  # no item expects or predicts S5
    assert (s5.tp, s5.fp, s5.fn) == (0, 0, 0)
    assert s5.as_dict()["precision"] is None and s5.as_dict()["recall"] is None and s5.as_dict()["f1"] is None
    assert s5.fpr == 0.0  # defined: no negative was flagged
    s1 = category_confusion(ITEMS, "S1")
    assert s1.f1 == 0.0  # defined and truly zero


def test_pr_curve_marks_the_recommended_threshold_apart_from_the_operating_point(tmp_path):
    from worker.evaluation.plots import plot_pr_curve, pr_curve_marks

    points = [
        {"threshold": p.threshold, "precision": p.precision, "recall": p.recall, "f1": p.f1, "fpr": p.fpr}
        for p in threshold_sweep(ITEMS)
    ]
    sweep = {"prompt": points, "all": points}
    rec = recommend_threshold(ITEMS, target_fpr=0.0)
    marks = pr_curve_marks(sweep, 0.5, {"prompt": rec.threshold, "all": rec.threshold})
    kinds = {(m.task, m.kind) for m in marks}
    assert kinds == {
        ("prompt", "operating"),
        ("prompt", "recommended"),
        ("all", "operating"),
        ("all", "recommended"),
    }
    assert {m.threshold for m in marks if m.kind == "recommended"} == {0.8}
    assert {m.threshold for m in marks if m.kind == "operating"} == {0.6}
    png = plot_pr_curve(sweep, 0.5, tmp_path / "pr.png", recommended={"prompt": rec.threshold})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
