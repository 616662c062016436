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
_NAME = re.compile(r"the ([a-z]+ [a-z]+)")
_SECTOR_CENTRE = {"on my left": 90.0, "on my right": -90.0, "behind me": 180.0}


def polygon_distance(point: np.ndarray, corners: np.ndarray) -> float:
    """Distance from ``point`` to a convex polygon (0 inside, either winding), e.g. an object's BEV footprint."""
    edges = np.roll(corners, -1, axis=0) - corners
    rel = point - corners
    t = np.clip((rel * edges).sum(1) / np.maximum((edges * edges).sum(1), 1e-12), 0.0, 1.0)
    cross = edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0]
    if (cross >= 0).all() or (cross <= 0).all():
        return 0.0
    return float(np.linalg.norm(rel - t[:, None] * edges, axis=1).min())


def answer(question: str, pos: np.ndarray, heading: float, objects: dict[str, dict]) -> str | None:
    """The geometric answer to one situated question from a pose (the generator's angle rule); ``objects``:
    name -> scene object with its centre as an array. None for a template it does not know."""
    from loc3r.synthetic.questions import _angle_to, format_number
    from loc3r.synthetic.ground_truth import wrap_degrees

    if m := _LEFT_RIGHT.match(question):
        return "left" if _angle_to(pos, heading, objects[m.group(1)]["centre"]) > 0 else "right"
    if m := _CLOSER.match(question):
        a, b = (objects[m.group(k)] for k in (1, 2))
        return min((a, b), key=lambda o: np.linalg.norm(o["centre"] - pos))["category"]
    if m := _DIRECTION.match(question):
        want = _SECTOR_CENTRE[m.group(1)]
        far = [o for o in objects.values() if np.linalg.norm(o["centre"] - pos) > 0.05] or list(objects.values())
        return min(far, key=lambda o: abs(wrap_degrees(_angle_to(pos, heading, o["centre"]) - want)))["category"]
    if m := _DISTANCE.match(question):
        return format_number(polygon_distance(pos, np.asarray(objects[m.group(1)]["footprint"], np.float64)))
    return None


def speaker_frame(point: np.ndarray, pos: np.ndarray, heading_deg: float) -> np.ndarray:
    """``point`` in the speaker's frame: x ahead, y to the left (what `--grounding-answer` asks the model for)."""
    d, h = point - pos, np.radians(heading_deg)
    return np.array([np.cos(h) * d[0] + np.sin(h) * d[1], -np.sin(h) * d[0] + np.cos(h) * d[1]])


def main() -> None:
    from loc3r.synthetic.label_files import read_scene_info
    from loc3r.synthetic.metrics import exact_match, mean_relative_accuracy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `loc3r synth` split")
    ap.add_argument("predictions", type=Path, help="predictions JSON lines (id, position, heading, answer)")
    args = ap.parse_args()
    preds = {p["id"]: p for p in map(json.loads, args.predictions.read_text().splitlines())}
    sources = ("truth", "predicted", "position only", "heading only", "model answers")
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {s: {} for s in sources}
    scenes: dict[str, dict[str, dict]] = {}
    ego_err, ego_len = [], []  # first named object in the speaker's frame: predicted-pose error, length
    for line in (args.data / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        if lab.get("group") != "situated" or lab["id"] not in preds:
            continue
        if lab["scene_id"] not in scenes:
            info = read_scene_info(args.data, lab["scene_id"])
            scenes[lab["scene_id"]] = {o["name"]: {**o, "centre": np.asarray(o["center"], np.float64)}
                                       for o in info["objects"]}
        objects = scenes[lab["scene_id"]]
        pred = preds[lab["id"]]
        true_pos, true_head = np.asarray(lab["position"], np.float64), float(lab["heading"])
        pred_pos, pred_head = np.asarray(pred["position"], np.float64), float(pred["heading"])
        poses = {"truth": (true_pos, true_head), "predicted": (pred_pos, pred_head),
                 "position only": (pred_pos, true_head), "heading only": (true_pos, pred_head)}
        for source in sources:
            if source == "model answers":
                got = pred.get("answer")
            else:
                got = answer(lab["question"], *poses[source], objects)
                if got is None:
                    continue
            em = float(exact_match(got, lab["answer"]))
            mra = float(mean_relative_accuracy(got, lab["answer"])) if lab["numeric"] else em
            scores[source].setdefault(lab["type"], []).append((em, mra))
        named = [n for n in _NAME.findall(lab["question"]) if n in objects]
        if named:
            truth = speaker_frame(objects[named[0]]["centre"], true_pos, true_head)
            ego_err.append(np.linalg.norm(speaker_frame(objects[named[0]]["centre"], pred_pos, pred_head) - truth))
            ego_len.append(np.linalg.norm(truth))
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
    print(f"first named object in the speaker's frame ({len(ego_err)} questions): mean error from the predicted "
          f"pose {np.mean(ego_err):.2f} m; predicting zero {np.mean(ego_len):.2f} m")


if __name__ == "__main__":
    main()
