"""Demo-candidate selection and the results table, on hand-made records."""

from __future__ import annotations

import json

import pytest

from loc3r.errors import Loc3rError
from loc3r.synthetic.train_demo import candidates, localization_ok
from loc3r.synthetic.train_report import results_table


def label(i, type_="situated_direction", situation="I am here.", answer="chair"):
    return {"id": f"s-q{i}", "scene_id": "s", "type": type_, "situation": situation, "question": "q?",
            "answer": answer, "position": [1.0, 2.0], "heading": 170.0}


def test_localization_ok_wraps_heading():
    lab = label(0)
    assert localization_ok({"position": [1.5, 2.5], "heading": -170.0}, lab)  # 0.71 m, 20 deg across +-180
    assert not localization_ok({"position": [2.0, 2.5], "heading": 170.0}, lab)  # 1.12 m
    assert not localization_ok({"position": [1.0, 2.0], "heading": 135.0}, lab)  # 35 deg
    assert not localization_ok({"position": None, "heading": 170.0}, lab)


def test_candidates_need_answer_and_localization_and_rank_by_margin():
    labels = [label(0, "situated_distance", answer="1.5"), label(1), label(2), label(3, situation=None),
              label(4, "situated_left_right", answer="left")]
    preds = {
        "s-q0": {"answer": "1.5", "position": [1.0, 2.0], "heading": 170.0},
        "s-q1": {"answer": "chair", "position": [1.6, 2.0], "heading": 170.0},
        "s-q2": {"answer": "Chair.", "position": [1.2, 2.0], "heading": 165.0},
        "s-q3": {"answer": "chair", "position": [1.0, 2.0], "heading": 170.0},
        "s-q4": {"answer": "right", "position": [1.0, 2.0], "heading": 170.0},
    }
    # worst of (error / 1 m, heading error / 30 deg): q0 0.0, q2 0.2, q1 0.6
    assert [c["id"] for c in candidates(labels, preds)] == ["s-q0", "s-q2", "s-q1"]


def test_results_table(tmp_path):
    loc = {"acc@0.5m": 10.0, "acc@1m": 30.0, "acc@15deg": 20.0, "acc@30deg": 40.0}
    res = {"scenes": 2, "model": {"localization": loc, "summary": {"situated_em": 50.0, "general_em": 25.0}},
           "baseline": {"localization": loc, "summary": {"situated_em": 12.5, "numeric_mra": 5.25}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval_test.json").write_text(json.dumps(res))
    table = results_table([tmp_path / "run"]).splitlines()
    assert table[2] == "| run (2 scenes) | 10.0 | 30.0 | 20.0 | 40.0 | 50.0 | 25.0 | - |"
    assert table[3].endswith("| 10.0 | 30.0 | 20.0 | 40.0 | 12.5 | - | 5.2 |")
    with pytest.raises(Loc3rError, match="no test results"):
        results_table([tmp_path])
