"""Metrics against hand-computed cases."""

import json

import pytest

from loc3r.errors import Loc3rError
from loc3r.synthetic.baselines import answer_prior, prior_heading
from loc3r.synthetic.metrics import (
    MRA_THRESHOLDS, exact_match, format_report, heading_error_deg, localization_accuracy, mean_relative_accuracy,
    normalize_answer, parse_number, score,
)


def test_thresholds_are_vsi_bench():
    assert MRA_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@pytest.mark.parametrize("pred,truth,want", [
    ("10", "10", 1.0),  # rel 0: every threshold
    ("12", "10", 0.6),  # rel 0.2 < 1 - t for t = 0.50 .. 0.75: 6 of 10
    ("3", "4", 0.5),  # rel 0.25 < 1 - t for t = 0.50 .. 0.70: 5 of 10
    ("1.0", "2.0", 0.0),  # rel 0.5 is not < 0.5
    ("2.1", "2.0", 0.9),  # rel 0.05: all but t = 0.95
    ("8.1", "9.0", 0.8),  # rel 0.1: t = 0.50 .. 0.85
    ("two", "2", 0.0),  # not a number
    (None, "2", 0.0),
    ("2.0.", "2.0", 1.0),  # trailing period ignored
])
def test_mra_hand_cases(pred, truth, want):
    assert mean_relative_accuracy(pred, truth) == pytest.approx(want)


def test_mra_needs_numeric_truth():
    with pytest.raises(Loc3rError, match="numeric question has a non-numeric answer 'chair'"):
        mean_relative_accuracy("1", "chair")


def test_exact_match_normalisation():
    assert normalize_answer("  The   Chair. ") == "the chair"
    assert exact_match("Chair.", "chair") and exact_match(" LEFT ", "left")
    assert not exact_match("chairs", "chair") and not exact_match(None, "chair")
    assert parse_number("1e3") == 1000.0 and parse_number("1.5 m") is None and parse_number("nan") is None


def test_heading_error_wraps():
    assert heading_error_deg(-175, 170) == pytest.approx(15)
    assert heading_error_deg(90, -90) == pytest.approx(180)
    assert heading_error_deg(359, 0) == pytest.approx(1)


def test_localization_hand_case():
    truth = [(0.0, 0.0)] * 4
    preds = [(0.4, 0.0), (0.0, 0.5), (0.0, -0.7), (1.2, 0.0)]
    heads_true = [170.0, 0.0, 10.0, -90.0]
    heads_pred = [-175.0, 29.9, 50.0, 90.0]
    acc = localization_accuracy(preds, truth, heads_pred, heads_true)
    assert acc["acc@0.5m"] == pytest.approx(50.0)  # 0.4 and exactly 0.5
    assert acc["acc@1m"] == pytest.approx(75.0)
    assert acc["acc@15deg"] == pytest.approx(25.0)  # errors 15, 29.9, 40, 180
    assert acc["acc@30deg"] == pytest.approx(50.0)
    assert acc["median_position_error_m"] == pytest.approx(0.6)


def _labels():
    base = {"scene_id": "s", "video": "v.mp4"}
    return [
        {**base, "id": "a", "type": "situated_left_right", "group": "situated", "numeric": False,
         "situation_id": "s-s0", "position": [1.0, 0.0], "heading": 90.0, "answer": "left"},
        {**base, "id": "b", "type": "situated_distance", "group": "situated", "numeric": True,
         "situation_id": "s-s0", "position": [1.0, 0.0], "heading": 90.0, "answer": "2.0"},
        {**base, "id": "c", "type": "situated_left_right", "group": "situated", "numeric": False,
         "situation_id": "s-s1", "position": [0.0, 3.0], "heading": -90.0, "answer": "right"},
        {**base, "id": "d", "type": "object_count", "group": "general", "numeric": True,
         "situation_id": None, "position": None, "heading": None, "answer": "4"},
    ]


def test_score_hand_case():
    preds = {
        "a": {"answer": "Left.", "position": [1.3, 0.4], "heading": 100.0},  # 0.5 m, 10 deg off
        "b": {"answer": "1.5", "position": [9.0, 9.0], "heading": 0.0},  # same situation: ignored for localization
        "c": {"answer": "left", "position": [0.0, 4.5], "heading": -130.0},  # 1.5 m, 40 deg off
        # "d" is missing: wrong
    }
    r = score(_labels(), preds)
    assert r.situations == 2 and r.missing == 1
    assert r.localization["acc@0.5m"] == pytest.approx(50.0)
    assert r.localization["acc@1m"] == pytest.approx(50.0)
    assert r.localization["acc@15deg"] == pytest.approx(50.0)
    assert r.localization["acc@30deg"] == pytest.approx(50.0)
    assert r.by_type["situated_left_right"] == {"n": 2, "em": 50.0}
    assert r.by_type["situated_distance"]["em"] == 0.0
    assert r.by_type["situated_distance"]["mra"] == pytest.approx(50.0)  # rel 0.25 -> 5 of 10
    assert r.by_type["object_count"] == {"n": 1, "em": 0.0, "mra": 0.0}
    assert r.summary["situated_em"] == pytest.approx(100 / 3)
    assert r.summary["general_em"] == 0.0 and r.summary["all_em"] == pytest.approx(25.0)
    assert r.summary["numeric_mra"] == pytest.approx(25.0)
    json.dumps(r.to_dict(), allow_nan=False)  # valid JSON
    table = format_report(r)
    assert "Acc@0.5m" in table and "situated_left_right" in table and "missing predictions: 1" in table


def test_missing_localization_is_a_miss():
    r = score(_labels(), {"a": {"answer": "left"}, "c": {"answer": "right", "position": [0.0, 3.0], "heading": -90}})
    assert r.localization["acc@1m"] == pytest.approx(50.0) and r.localization["acc@30deg"] == pytest.approx(50.0)
    json.dumps(r.to_dict(), allow_nan=False)


def test_perfect_predictions_score_100():
    labels = _labels()
    preds = {lab["id"]: {"answer": lab["answer"], "position": lab["position"], "heading": lab["heading"]}
             for lab in labels}
    r = score(labels, preds)
    assert all(v == 100.0 for k, v in r.localization.items() if k.startswith("acc"))
    assert r.summary["all_em"] == 100.0 and r.summary["numeric_mra"] == 100.0


def test_score_rejects_empty():
    with pytest.raises(Loc3rError, match="no labels to score"):
        score([], {})


def test_priors():
    train = _labels() + [{"id": "e", "type": "situated_left_right", "answer": "right", "situation_id": "x",
                          "heading": 95.0}]
    assert answer_prior(train) == {"situated_left_right": "right", "situated_distance": "2.0", "object_count": "4"}
    # Situations s-s0 (90) and x (95) share the bin [90, 100); s-s1 (-90) is alone.
    assert prior_heading(train) == pytest.approx(95.0)
    assert prior_heading([]) == 0.0
