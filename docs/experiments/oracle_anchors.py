"""How well could a model localize if it found every named object exactly? An oracle for issue 5's targets.

Answers every situation of a split from the named objects' *true* centres:
the position is the anchor's centre ("next to the A", "sitting on the A",
"... with the B behind me") or the midpoint of the two anchors ("between
the A and the B"); the heading points from there to the object named last
(turned by 180 deg for "behind me"). Prints the paper's localization
accuracies, overall and by situation kind.

    python docs/experiments/oracle_anchors.py runs/data/test

Not a test: a research tool (seconds).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def main() -> None:
    from loc3r.synthetic.label_files import read_scene_info
    from loc3r.synthetic.metrics import heading_error_deg

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `loc3r synth` split")
    args = ap.parse_args()
    situations: dict[str, dict] = {}
    for line in (args.data / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        if lab.get("situation_id"):
            situations.setdefault(lab["situation_id"], lab)
    scenes: dict[str, dict] = {}
    errors: dict[str, list[tuple[float, float]]] = {}
    for lab in situations.values():
        info = scenes.setdefault(lab["scene_id"], read_scene_info(args.data, lab["scene_id"]))
        centres = {o["name"]: np.asarray(o["center"], np.float64) for o in info["objects"]}
        text = lab["situation"]
        names = [n for n in re.findall(r"the ([a-z]+ [a-z]+)", text) if n in centres]
        if text.startswith("I am standing between"):
            kind, position = "between", (centres[names[0]] + centres[names[1]]) / 2
        else:
            kind = "behind" if "behind me" in text else "sitting" if "sitting" in text else "next to"
            position = centres[names[0]]
        d = centres[names[-1]] - position
        heading = np.degrees(np.arctan2(d[1], d[0])) + (180.0 if kind == "behind" else 0.0)
        pos_err = float(np.linalg.norm(position - np.asarray(lab["position"])))
        head_err = heading_error_deg(heading, lab["heading"])
        errors.setdefault(kind, []).append((pos_err, head_err))
    every = np.asarray([e for v in errors.values() for e in v])

    def row(label: str, e: np.ndarray) -> str:
        acc = [100 * (e[:, 0] < 0.5).mean(), 100 * (e[:, 0] < 1.0).mean(), 100 * (e[:, 1] < 15).mean(),
               100 * (e[:, 1] < 30).mean()]
        return f"{label:10s} {len(e):5d} " + " ".join(f"{a:9.1f}" for a in acc)

    print(f"{'situations':10s} {'n':>5s} {'Acc@0.5m':>9s} {'Acc@1.0m':>9s} {'Acc@15deg':>9s} {'Acc@30deg':>9s}")
    print(row("all", every))
    for kind, e in sorted(errors.items()):
        print(row(kind, np.asarray(e)))


if __name__ == "__main__":
    main()
