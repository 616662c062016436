"""Blind baselines for the README: room centre, prior heading, answer prior.

* **Room centre**: the predicted position is the centre of the room's floor
  (in the BEV frame of the clip: this uses the room's true extent, so it is
  a generous baseline).
* **Prior heading**: the most common heading of the training situations
  (the centre of the most populated 10-degree bin), 0 without training data.
* **Answer prior**: the most common training answer of each question type
  (ties broken alphabetically).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from loc3r.synthetic.label_files import PathLike, read_scene_info


def prior_heading(train_labels: Sequence[dict], bins: int = 36) -> float:
    """Centre of the most common heading bin among training situations (degrees)."""
    headings = {lab["situation_id"]: lab["heading"] for lab in train_labels if lab.get("heading") is not None}
    if not headings:
        return 0.0
    width = 360.0 / bins
    idx = np.floor((np.asarray(list(headings.values())) + 180.0) / width).astype(int) % bins
    best = int(np.argmax(np.bincount(idx, minlength=bins)))
    centre = -180.0 + (best + 0.5) * width
    return float(centre)


def answer_prior(train_labels: Sequence[dict]) -> dict[str, str]:
    """Most common answer per question type."""
    by_type: dict[str, Counter] = {}
    for lab in train_labels:
        by_type.setdefault(lab["type"], Counter())[lab["answer"]] += 1
    return {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in by_type.items()}


def baseline_predictions(labels: Sequence[dict], data_dir: PathLike,
                         train_labels: Optional[Sequence[dict]] = None) -> dict[str, dict]:
    """Predictions of the blind baselines for every label (id -> prediction)."""
    train = list(train_labels or [])
    heading = prior_heading(train)
    answers = answer_prior(train)
    centres: dict[str, list[float]] = {}
    out = {}
    for lab in labels:
        sid = lab["scene_id"]
        if sid not in centres:
            centres[sid] = read_scene_info(Path(data_dir), sid)["room"]["center"]
        out[lab["id"]] = {"id": lab["id"], "answer": answers.get(lab["type"]), "position": centres[sid],
                          "heading": heading}
    return out
