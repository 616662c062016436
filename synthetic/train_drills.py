"""Stage 2 for a from-scratch LLM: a frame curriculum with situation drills.

The paper fine-tunes a pretrained video LLM; loc3r-tiny's LLM starts from
random weights and must first learn to find a named object among the video's
tokens. With the whole 16-frame clip (272 tokens) from the first step that
lookup did not emerge in the CPU budget (README, "Demo model"). In a clean
retrieval proxy (the same LLM, a query word and N object tokens) a lookup
among 8 tokens is learned in about 200 steps, while among 248 tokens it had
not started after 500. So stage 2 can start short and grow:

- **Frame curriculum.** A step sees only the clip's first ``f`` frames (the
  runtime's view after ``f`` frames), with ``f`` drawn from
  ``[ceil(m/2), m]`` where ``m`` grows linearly from 1 to all frames over the
  first ``frame_curriculum`` share of the budget.
- **Situation drills.** Extra situation-only blocks ("I am sitting on the
  pink plant, facing the white chair." + <Pos><Ori>, no answer) whose truth
  is the named object's centre and the heading towards (or, "with ... behind
  me", away from) the other: localization targets about objects the first
  ``f`` frames show, so a short window still has something to localize.
  Drills train L_pos and L_ori only; the split's questions (and L_CE) join
  once ``f`` reaches ``questions_min_frames``.

Objects, centres (BEV metres) and per-frame visibility are read from the
``loc3r synth`` directory's per-scene files (``scenes/<id>.json`` and the
``instance`` maps of ``scenes/<id>.npz``), a few seconds for 3,000 scenes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from loc3r.errors import Loc3rError

DRILL_QUESTION = "where am i?"


@dataclass(frozen=True)
class SceneObjects:
    names: tuple[str, ...]
    centres: np.ndarray  # (O, 2) BEV metres
    pixels: np.ndarray  # (F, O) pixels of each object in each frame's instance map


def read_scene_files(data_dir: Path, scene_id: str, purpose: str) -> tuple[list[dict], np.ndarray]:
    """A ``loc3r synth`` scene's object list and ``instance`` maps (F, H, W) uint8 (0 = no object,
    i + 1 = object i); ``purpose`` names what needs them in the error for missing files."""
    data_dir = Path(data_dir)
    info_path, npz_path = data_dir / "scenes" / f"{scene_id}.json", data_dir / "scenes" / f"{scene_id}.npz"
    if not info_path.is_file() or not npz_path.is_file():
        raise Loc3rError(f"{purpose} need {info_path} and {npz_path} (written by `loc3r synth`)")
    with np.load(npz_path) as z:
        instance = z["instance"]
    return json.loads(info_path.read_text())["objects"], instance


def read_scene_objects(data_dir: Path, scene_id: str) -> SceneObjects:
    objects, instance = read_scene_files(data_dir, scene_id, "situation drills")
    n = len(objects)
    inst = instance.astype(np.int64)  # (F, H, W), 0 = no object, i + 1 = object i
    pixels = np.stack([np.bincount(f.ravel(), minlength=n + 1)[1:n + 1] for f in inst]) if n else \
        np.zeros((len(inst), 0), np.int64)
    return SceneObjects(tuple(o["name"] for o in objects),
                        np.asarray([o["center"] for o in objects], np.float64).reshape(n, 2), pixels)


def curriculum_frames(frac: float, share: float, total: int, rng: np.random.Generator) -> int:
    """Frames a step sees at budget fraction ``frac``: ``total`` when ``share`` is 0, else a draw from
    [ceil(m/2), m] with m growing linearly from 1 to ``total`` over the first ``share`` of the budget."""
    if share <= 0:
        return total
    m = min(total, max(1, 1 + int((total - 1) * min(frac / share, 1.0) + 0.5)))
    return int(rng.integers(math.ceil(m / 2), m + 1))


@dataclass(frozen=True)
class Drill:
    scene: int  # row of the split
    situation: str
    position: tuple[float, float]
    heading_deg: float


class DrillSource:
    """Situation drills for the scenes of one split (rows in the split's scene order)."""

    def __init__(self, data_dir: Path, scene_ids: Sequence[str], min_pixels: Optional[int] = None):
        from loc3r.synthetic.questions import QuestionOptions

        self.min_pixels = QuestionOptions().min_visible_pixels if min_pixels is None else min_pixels
        self.scenes = [read_scene_objects(data_dir, sid) for sid in scene_ids]

    def drills(self, scenes: Sequence[int], frames: int, per_scene: int, rng: np.random.Generator) -> list[Drill]:
        """``per_scene`` drills for each scene about objects shown in its first ``frames`` frames."""
        out = []
        for s in scenes:
            obj = self.scenes[int(s)]
            shown = np.flatnonzero(obj.pixels[:frames].sum(0) >= self.min_pixels)
            clip = np.flatnonzero(obj.pixels.sum(0) >= self.min_pixels)
            if len(shown) == 0 or len(clip) < 2:
                continue
            for _ in range(per_scene):
                a = int(rng.choice(shown))
                pool = [int(i) for i in (shown if len(shown) >= 2 else clip) if i != a]
                b = int(rng.choice(pool))
                v = obj.centres[b] - obj.centres[a]
                heading = math.degrees(math.atan2(v[1], v[0]))
                if rng.random() < 0.5:
                    text = f"I am sitting on the {obj.names[a]}, facing the {obj.names[b]}."
                else:
                    text = f"I am sitting on the {obj.names[a]} with the {obj.names[b]} behind me."
                    heading = (heading + 360.0) % 360.0 - 180.0
                out.append(Drill(int(s), text, (float(obj.centres[a][0]), float(obj.centres[a][1])), heading))
        return out


def step_split(split, scenes: Sequence[int], drills: list[Drill], tok, with_questions: bool, pad_id: int) -> dict:
    """The question arrays :func:`loc3r.synthetic.train_stage2.pack_questions` reads, for one step:
    the split's questions of ``scenes`` (when ``with_questions``) and the drills (no answer tokens)."""
    from loc3r.synthetic.train_data import encode_question

    ids, lens, starts, rows, has, pos, head = [], [], [], [], [], [], []
    if with_questions:
        for s in scenes:
            for q in np.flatnonzero(split["q_scene"] == s):
                n = int(split["q_len"][q])
                ids.append(split["q_ids"][q, :n].astype(np.int64))
                lens.append(n)
                starts.append(int(split["q_answer_start"][q]))
                rows.append(int(s))
                has.append(bool(split["q_has_situation"][q]))
                pos.append(split["q_position"][q])
                head.append(float(split["q_heading"][q]))
    for d in drills:
        enc = encode_question(tok, DRILL_QUESTION, d.situation, None)
        ids.append(enc.ids.astype(np.int64))
        lens.append(len(enc.ids))
        starts.append(len(enc.ids))  # no answer: no L_CE term
        rows.append(d.scene)
        has.append(True)
        pos.append(d.position)
        head.append(d.heading_deg)
    if not ids:
        raise Loc3rError("this step has neither questions nor drills: use more drills or fewer questions_min_frames")
    arr = np.full((len(ids), max(lens)), pad_id, np.int64)
    for i, x in enumerate(ids):
        arr[i, :len(x)] = x
    return {"q_scene": np.asarray(rows, np.int64), "q_ids": arr, "q_len": np.asarray(lens, np.int64),
            "q_answer_start": np.asarray(starts, np.int64), "q_has_situation": np.asarray(has, bool),
            "q_position": np.asarray(pos, np.float32).reshape(-1, 2), "q_heading": np.asarray(head, np.float32)}
