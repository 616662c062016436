"""The paper's metrics: localization accuracy, exact match, VSI-Bench MRA.

* Acc@d (d = 0.5 m, 1.0 m): share of situations whose predicted position is
  within d metres (Euclidean, BEV plane) of the truth.
* Acc@a (a = 15, 30 degrees): share whose heading error, wrapped to
  [0, 180], is at most a degrees.
* Exact match (EM): the normalised prediction equals the normalised answer
  (case, surrounding/multiple whitespace and a trailing period ignored).
* MRA (VSI-Bench mean relative accuracy) for numeric answers: the mean over
  thresholds 0.50, 0.55, ..., 0.95 of 1[|pred - true| / |true| < 1 - threshold].
  A prediction that is not a number scores 0.

Localization is scored once per situation (the prediction at ``<Pos>``/``<Ori>``
precedes the question, so it cannot depend on it): the first prediction
seen for a situation id counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from loc3r.errors import Loc3rError

MRA_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
POSITION_THRESHOLDS_M = (0.5, 1.0)
HEADING_THRESHOLDS_DEG = (15.0, 30.0)
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalize_answer(text: Optional[str]) -> str:
    """Lower-case, collapse whitespace, drop one trailing period."""
    s = " ".join(str(text or "").lower().split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def exact_match(prediction: Optional[str], answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def parse_number(text: Optional[str]) -> Optional[float]:
    """The number a prediction states, or None if it is not exactly one number."""
    s = normalize_answer(text)
    if not _NUMBER.match(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def mean_relative_accuracy(prediction: Optional[str], answer: str) -> float:
    """VSI-Bench MRA of one numeric answer; 0 when the prediction is not a number."""
    truth = parse_number(answer)
    if truth is None:
        raise Loc3rError(f"numeric question has a non-numeric answer '{answer}'")
    pred = parse_number(prediction)
    if pred is None:
        return 0.0
    if truth == 0:
        rel = 0.0 if pred == 0 else math.inf
    else:
        rel = abs(pred - truth) / abs(truth)
    return float(np.mean([rel < 1.0 - t for t in MRA_THRESHOLDS]))


def heading_error_deg(pred_deg: float, true_deg: float) -> float:
    """Absolute heading difference wrapped to [0, 180]."""
    d = abs(float(pred_deg) - float(true_deg)) % 360.0
    return 360.0 - d if d > 180.0 else d


def position_error_m(pred: Sequence[float], truth: Sequence[float]) -> float:
    return float(math.hypot(float(pred[0]) - float(truth[0]), float(pred[1]) - float(truth[1])))


def localization_accuracy(pred_positions, true_positions, pred_headings, true_headings) -> dict[str, float]:
    """Acc@0.5m, Acc@1.0m, Acc@15deg, Acc@30deg (percent) and median errors.

    A prediction given as None (position or heading) counts as a miss and
    is left out of the medians.
    """
    n = len(true_positions)
    if n == 0:
        return {}
    pos_err = np.array([math.inf if p is None else position_error_m(p, t)
                        for p, t in zip(pred_positions, true_positions)])
    head_err = np.array([math.inf if p is None else heading_error_deg(p, t)
                         for p, t in zip(pred_headings, true_headings)])
    out = {f"acc@{d:g}m": 100.0 * float(np.mean(pos_err <= d)) for d in POSITION_THRESHOLDS_M}
    out.update({f"acc@{a:g}deg": 100.0 * float(np.mean(head_err <= a)) for a in HEADING_THRESHOLDS_DEG})
    finite_pos, finite_head = pos_err[np.isfinite(pos_err)], head_err[np.isfinite(head_err)]
    out["median_position_error_m"] = float(np.median(finite_pos)) if len(finite_pos) else None
    out["median_heading_error_deg"] = float(np.median(finite_head)) if len(finite_head) else None
    return out


@dataclass(frozen=True)
class EvalReport:
    """Scores of one prediction set against one label set (percentages)."""

    localization: dict[str, float]
    situations: int
    by_type: dict[str, dict[str, float]]  # type -> {"n", "em", ["mra"]}
    summary: dict[str, float] = field(default_factory=dict)  # situated_em, general_em, numeric_mra, ...
    missing: int = 0  # labels without a prediction (scored as wrong)

    def to_dict(self) -> dict:
        return {"localization": self.localization, "situations": self.situations, "by_type": self.by_type,
                "summary": self.summary, "missing_predictions": self.missing}


def score(labels: Sequence[dict], predictions: dict[str, dict]) -> EvalReport:
    """Score ``predictions`` (label id -> {"answer", "position", "heading"}) against ``labels``.

    A missing prediction counts as wrong. Localization uses labels with a
    situation; a situation without a predicted position/heading counts as a miss.
    """
    if not labels:
        raise Loc3rError("no labels to score")
    by_type: dict[str, dict[str, list[float]]] = {}
    groups: dict[str, list[float]] = {}
    numeric_mra: list[float] = []
    loc_pred_pos, loc_true_pos, loc_pred_head, loc_true_head = [], [], [], []
    seen_situations: set[str] = set()
    missing = 0
    for lab in labels:
        pred = predictions.get(lab["id"])
        if pred is None:
            missing += 1
            pred = {}
        answer = pred.get("answer")
        em = float(exact_match(answer, lab["answer"]))
        cell = by_type.setdefault(lab["type"], {"em": []})
        cell["em"].append(em)
        groups.setdefault(lab.get("group", "all"), []).append(em)
        if lab.get("numeric"):
            mra = mean_relative_accuracy(answer, lab["answer"])
            cell.setdefault("mra", []).append(mra)
            numeric_mra.append(mra)
        sid = lab.get("situation_id")
        if lab.get("position") is not None and sid not in seen_situations:
            seen_situations.add(sid)
            pos, head = pred.get("position"), pred.get("heading")
            loc_true_pos.append(lab["position"])
            loc_true_head.append(lab["heading"])
            loc_pred_pos.append(pos[:2] if pos is not None and len(pos) >= 2 else None)
            loc_pred_head.append(head)
    table = {}
    for t, cell in sorted(by_type.items()):
        row = {"n": len(cell["em"]), "em": 100.0 * float(np.mean(cell["em"]))}
        if "mra" in cell:
            row["mra"] = 100.0 * float(np.mean(cell["mra"]))
        table[t] = row
    summary = {f"{g}_em": 100.0 * float(np.mean(v)) for g, v in sorted(groups.items())}
    summary["all_em"] = 100.0 * float(np.mean([e for c in by_type.values() for e in c["em"]]))
    if numeric_mra:
        summary["numeric_mra"] = 100.0 * float(np.mean(numeric_mra))
    loc = localization_accuracy(loc_pred_pos, loc_true_pos, loc_pred_head, loc_true_head)
    return EvalReport(loc, len(loc_true_pos), table, summary, missing)


def format_report(report: EvalReport, title: str = "") -> str:
    """A plain-text table of a report."""
    lines = [title] if title else []
    if report.localization:
        loc = report.localization
        lines.append(f"localization ({report.situations} situations)")
        lines.append("  Acc@0.5m  Acc@1.0m  Acc@15deg  Acc@30deg")
        lines.append(f"  {loc['acc@0.5m']:8.1f}  {loc['acc@1m']:8.1f}  {loc['acc@15deg']:9.1f}  {loc['acc@30deg']:9.1f}")
    lines.append(f"{'question type':<22} {'n':>6} {'EM':>6} {'MRA':>6}")
    for t, row in report.by_type.items():
        mra = f"{row['mra']:6.1f}" if "mra" in row else f"{'-':>6}"
        lines.append(f"{t:<22} {row['n']:>6} {row['em']:6.1f} {mra}")
    for k, v in report.summary.items():
        lines.append(f"{k:<22} {'':>6} {v:6.1f}")
    if report.missing:
        lines.append(f"missing predictions: {report.missing} (scored as wrong)")
    return "\n".join(lines)
