"""How much of situated QA could a model answer from its own localization? A ceiling for issue 5's EM target.

Answers every situated question of a split by geometry, from a pose and the
objects' *true* centres and footprints, and scores the answers like `loc3r
eval` (exact match; MRA for distances). The poses come from:

- ``truth``: the situation's true position and heading (checks the rules:
  near 100%, short of it only where the generator's margins exclude a case);
- ``predicted``: the ``<Pos>``/``<Ori>`` readout of a predictions file
  (``OUT/eval_test.predictions.jsonl`` of `loc3r train --test-data`);
- ``position only`` / ``heading only``: the predicted position with the true
  heading, and the other way round (which error costs more).

Beside them: the model's own answers from the same predictions file.

    python docs/experiments/situated_ceiling.py runs/data/test runs/v5/dir/eval_test.predictions.jsonl

Not a test: a research tool (seconds).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

_LEFT_RIGHT = re.compile(r"^Is the ([a-z]+ [a-z]+) on my left or on my right\?$")
_CLOSER = re.compile(r"^Which is closer to me, the ([a-z]+ [a-z]+) or the ([a-z]+ [a-z]+)\?$")
_DIRECTION = re.compile(r"^What is (on my left|on my right|behind me)\?$")
_DISTANCE = re.compile(r"^How far is the ([a-z]+ [a-z]+) from me in metres\?$")
_SECTOR_CENTRE = {"on my left": 90.0, "on my right": -90.0, "behind me": 180.0}


def _wrap(deg: float) -> float:
    return float((deg + 180.0) % 360.0 - 180.0)


def _angle(pos: np.ndarray, heading: float, target: np.ndarray) -> float:
    v = target - pos
    return _wrap(np.degrees(np.arctan2(v[1], v[0])) - heading)


def polygon_distance(point: np.ndarray, corners: np.ndarray) -> float:
    """Distance from ``point`` to a convex polygon (0 inside), e.g. an object's BEV footprint."""
    n = len(corners)
    inside = True
    best = np.inf
    for k in range(n):
        a, b = corners[k], corners[(k + 1) % n]
        e, p = b - a, point - a
        t = float(np.clip(p @ e / max(e @ e, 1e-12), 0.0, 1.0))
        best = min(best, float(np.linalg.norm(p - t * e)))
        if e[0] * p[1] - e[1] * p[0] < 0:
            inside = False
    # The footprints are listed counter-clockwise; accept either winding.
    if not inside:
        signs = [np.sign((corners[(k + 1) % n] - corners[k])[0] * (point - corners[k])[1]
                         - (corners[(k + 1) % n] - corners[k])[1] * (point - corners[k])[0]) for k in range(n)]
        inside = all(s <= 0 for s in signs)
    return 0.0 if inside else best


def answer(question: str, pos: np.ndarray, heading: float, objects: list[dict]) -> str | None:
    """The geometric answer to one situated question from a pose; None for a template it does not know."""
    from loc3r.synthetic.questions import format_number

    by_name = {o["name"]: o for o in objects}
    centre = {o["name"]: np.asarray(o["center"], np.float64) for o in objects}
    if m := _LEFT_RIGHT.match(question):
        return "left" if _angle(pos, heading, centre[m.group(1)]) > 0 else "right"
    if m := _CLOSER.match(question):
        a, b = m.group(1), m.group(2)
        closer = a if np.linalg.norm(centre[a] - pos) < np.linalg.norm(centre[b] - pos) else b
        return by_name[closer]["category"]
    if m := _DIRECTION.match(question):
        want = _SECTOR_CENTRE[m.group(1)]
        far = [o for o in objects if np.linalg.norm(centre[o["name"]] - pos) > 0.05] or objects
        best = min(far, key=lambda o: abs(_wrap(_angle(pos, heading, centre[o["name"]]) - want)))
        return best["category"]
    if m := _DISTANCE.match(question):
        corners = np.asarray(by_name[m.group(1)]["footprint"], np.float64)
        return format_number(polygon_distance(pos, corners))
    return None


def main() -> None:
    from loc3r.synthetic.label_files import read_scene_info
    from loc3r.synthetic.metrics import exact_match, mean_relative_accuracy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `loc3r synth` split")
    ap.add_argument("predictions", type=Path, help="predictions JSON lines (id, position, heading, answer)")
    args = ap.parse_args()
    preds = {p["id"]: p for p in map(json.loads, args.predictions.read_text().splitlines())}
    sources = ("truth", "predicted", "position only", "heading only", "model answers")
    scores: dict[str, dict[str, list[float]]] = {s: {} for s in sources}
    scenes: dict[str, dict] = {}
    for line in (args.data / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        if lab.get("group") != "situated" or lab["id"] not in preds:
            continue
        info = scenes.setdefault(lab["scene_id"], read_scene_info(args.data, lab["scene_id"]))
        pred = preds[lab["id"]]
        true_pos, true_head = np.asarray(lab["position"], np.float64), float(lab["heading"])
        pred_pos, pred_head = np.asarray(pred["position"], np.float64), float(pred["heading"])
        poses = {"truth": (true_pos, true_head), "predicted": (pred_pos, pred_head),
                 "position only": (pred_pos, true_head), "heading only": (true_pos, pred_head)}
        for source in sources:
            if source == "model answers":
                got = pred.get("answer")
            else:
                got = answer(lab["question"], *poses[source], info["objects"])
                if got is None:
                    continue
            em = float(exact_match(got, lab["answer"]))
            mra = float(mean_relative_accuracy(got, lab["answer"])) if lab["numeric"] else em
            scores[source].setdefault(lab["type"], []).append((em, mra))
    types = sorted({t for s in scores.values() for t in s})
    print(f"{'pose source':15s} " + " ".join(f"{t:>20s}" for t in types) + f" {'situated EM':>12s}")
    for source in sources:
        cells = [100 * np.mean([v[1] for v in scores[source][t]]) if scores[source].get(t) else float("nan")
                 for t in types]
        em = [v[0] for t in types for v in scores[source].get(t, [])]
        print(f"{source:15s} " + " ".join(f"{c:20.1f}" for c in cells) + f" {100 * np.mean(em):12.1f}")
    print("(situated_distance: MRA; the other types and 'situated EM' (all types, as `loc3r eval`): "
          "exact match; counts: "
          + ", ".join(f"{t} {len(scores['truth'].get(t, []))}" for t in types) + ")")


if __name__ == "__main__":
    main()
