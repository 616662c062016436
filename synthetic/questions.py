"""Situations and questions with answers, from SQA3D / VSI-Bench style templates.

Geometry is computed in the room frame and positions/headings are converted
to the first-camera BEV frame at the end (directions and distances do not
depend on the frame). Only objects that the clip actually shows are named.

Answer format (one for all types): a single lowercase word (``chair``,
``left``) or a number: counts as integers (``3``), metres and square metres
rounded to one decimal (``2.4``). Distances between objects are between
their floor-plan centres; "how far is X from me" is to X's nearest
footprint point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from loc3r.synthetic.ground_truth import BevFrame, wrap_degrees
from loc3r.synthetic.scene import Scene, SceneObject
from loc3r.synthetic.trajectory import free_space

PLURALS = {"chair": "chairs", "table": "tables", "bed": "beds", "sofa": "sofas", "lamp": "lamps", "box": "boxes",
           "plant": "plants", "cabinet": "cabinets"}

# type -> (group, numeric?)
QUESTION_TYPES: dict[str, tuple[str, bool]] = {
    "situated_direction": ("situated", False),  # what is on my left / right / behind me
    "situated_left_right": ("situated", False),  # is the X on my left or right
    "situated_closer": ("situated", False),  # which is closer to me: X or Y
    "situated_distance": ("situated", True),  # how far is X from me
    "object_count": ("general", True),
    "relative_direction": ("general", False),
    "absolute_distance": ("general", True),
    "relative_distance": ("general", False),
    "object_size": ("general", True),
    "room_size": ("general", True),
}
NUMERIC_TYPES = frozenset(t for t, (_, numeric) in QUESTION_TYPES.items() if numeric)

# Every phrase the templates can produce, for the tokenizer's vocabulary.
TEMPLATE_TEXTS = (
    "I am standing next to the {a}, facing the {b}.",
    "I am sitting on the {a}, facing the {b}.",
    "I am standing between the {a} and the {b}, facing the {c}.",
    "I am standing next to the {a} with the {b} behind me.",
    "What is on my left?", "What is on my right?", "What is behind me?",
    "Is the {a} on my left or on my right?",
    "Which is closer to me, the {a} or the {b}?",
    "How far is the {a} from me in metres?",
    "How many {plural} are in the room?",
    "If I am standing by the {a} and facing the {b}, is the {c} to my left, right, or back?",
    "What is the distance between the {a} and the {b} in metres?",
    "Which is closest to the {a}: the {b}, the {c}, or the {d}?",
    "How tall is the {a} in metres?",
    "How long is the longest side of the {a} in metres?",
    "What is the area of the room in square metres?",
    "left right back",
)


@dataclass(frozen=True)
class QuestionOptions:
    situations: int = 3
    situated_per_situation: int = 3
    general: int = 6
    # An object counts as seen when the clip shows it in at least this many pixels (all frames together).
    min_visible_pixels: int = 24


@dataclass(frozen=True)
class Situation:
    text: str
    position: tuple[float, float]  # BEV metres
    heading_deg: float  # BEV degrees


@dataclass(frozen=True)
class Question:
    type: str
    question: str
    answer: str
    situation_index: Optional[int]  # None for general questions

    @property
    def group(self) -> str:
        return QUESTION_TYPES[self.type][0]


def format_number(value: float) -> str:
    """Metres / square metres: one decimal."""
    return f"{round(float(value) + 1e-9, 1):.1f}"


def _angle_to(pos: np.ndarray, heading: float, target: np.ndarray) -> float:
    """Angle of ``target`` seen from ``pos`` relative to ``heading``: + is left, degrees in (-180, 180]."""
    v = target - pos
    return float(wrap_degrees(np.degrees(np.arctan2(v[1], v[0])) - heading))


def _heading_to(pos: np.ndarray, target: np.ndarray) -> float:
    v = target - pos
    return float(np.degrees(np.arctan2(v[1], v[0])))


def _footprint_distance(pos: np.ndarray, obj: SceneObject) -> float:
    x0, y0, x1, y1 = obj.footprint
    dx = max(x0 - pos[0], 0.0, pos[0] - x1)
    dy = max(y0 - pos[1], 0.0, pos[1] - y1)
    return float(np.hypot(dx, dy))


def _centre(obj: SceneObject) -> np.ndarray:
    return np.asarray(obj.center, dtype=np.float64)


class _Builder:
    """Draws situations and questions for one scene (room frame internally)."""

    def __init__(self, scene: Scene, bev: BevFrame, seen: list[int], rng: np.random.Generator):
        self.scene, self.bev, self.rng = scene, bev, rng
        self.objects = scene.objects
        self.seen = seen  # indices of objects the clip shows
        free, centres = free_space(scene, clearance=0.2, grid=0.1)
        self.free_xy = centres[free]  # (M, 2)
        self._dist: Optional[np.ndarray] = None

    def pick(self, pool: list[int], k: int) -> list[int]:
        return [int(i) for i in self.rng.choice(pool, size=k, replace=False)] if len(pool) >= k else []

    # --- situations ---------------------------------------------------------

    def situation(self) -> Optional[tuple[str, np.ndarray, float, list[int]]]:
        """(text, room-frame position, room-frame heading, objects named)."""
        kind = self.rng.choice(["next_to", "next_to", "sitting", "between", "behind"])
        if kind == "next_to" or kind == "behind":
            got = self._pick_next_to()
            if got is None:
                return None
            a, pos = got
            others = [i for i in self.seen if i != a]
            if not others:
                return None
            b = int(self.rng.choice(others))
            if kind == "behind":
                heading = _heading_to(pos, _centre(self.objects[b])) + 180.0
                text = f"I am standing next to the {self.objects[a].name} with the {self.objects[b].name} behind me."
            else:
                heading = _heading_to(pos, _centre(self.objects[b]))
                text = f"I am standing next to the {self.objects[a].name}, facing the {self.objects[b].name}."
            return text, pos, heading, [a, b]
        if kind == "sitting":
            seats = [i for i in self.seen if self.objects[i].category in ("chair", "sofa", "bed")]
            if not seats:
                return None
            a = int(self.rng.choice(seats))
            pos = _centre(self.objects[a])
            facing = self.objects[a].facing_deg
            ahead = [i for i in self.seen if i != a
                     and abs(_angle_to(pos, facing, _centre(self.objects[i]))) < 50]
            if not ahead:
                return None
            b = int(self.rng.choice(ahead))
            return (f"I am sitting on the {self.objects[a].name}, facing the {self.objects[b].name}.",
                    pos, _heading_to(pos, _centre(self.objects[b])), [a, b])
        # between
        trio = self.pick(self.seen, 3)
        if not trio:
            return None
        a, b, c = trio
        pos = (_centre(self.objects[a]) + _centre(self.objects[b])) / 2
        gap = np.linalg.norm(_centre(self.objects[a]) - _centre(self.objects[b]))
        if gap > 4.0 or not self._is_free(pos):
            return None
        # a and b must be the two nearest objects, so "between" describes the spot.
        d = sorted((_footprint_distance(pos, o), i) for i, o in enumerate(self.objects))
        if {d[0][1], d[1][1]} != {a, b}:
            return None
        text = f"I am standing between the {self.objects[a].name} and the {self.objects[b].name}, " \
               f"facing the {self.objects[c].name}."
        return text, pos, _heading_to(pos, _centre(self.objects[c])), [a, b, c]

    def _free_dist(self) -> np.ndarray:
        """Footprint distance from every free cell to every object, (M, O)."""
        if self._dist is None:
            xy = self.free_xy[:, None, :]  # (M, 1, 2)
            fp = np.array([o.footprint for o in self.objects])  # (O, 4)
            dx = np.maximum.reduce([fp[None, :, 0] - xy[..., 0], np.zeros((len(self.free_xy), len(fp))),
                                    xy[..., 0] - fp[None, :, 2]])
            dy = np.maximum.reduce([fp[None, :, 1] - xy[..., 1], np.zeros((len(self.free_xy), len(fp))),
                                    xy[..., 1] - fp[None, :, 3]])
            self._dist = np.hypot(dx, dy)
        return self._dist

    def _is_free(self, pos: np.ndarray) -> bool:
        return bool(len(self.free_xy)) and float(np.min(np.linalg.norm(self.free_xy - pos, axis=1))) < 0.08

    def _pick_next_to(self) -> Optional[tuple[int, np.ndarray]]:
        """A free spot 0.3-0.9 m from a seen object that is clearly the nearest one."""
        if not self.seen or not len(self.free_xy):
            return None
        dist = self._free_dist()  # (M, O)
        for _ in range(12):
            a = int(self.rng.choice(self.seen))
            near_a = (dist[:, a] >= 0.3) & (dist[:, a] <= 0.9)
            others = np.delete(dist, a, axis=1)
            if others.shape[1]:
                near_a &= others.min(axis=1) > dist[:, a] + 0.4
            idx = np.flatnonzero(near_a)
            if len(idx):
                return a, self.free_xy[int(self.rng.choice(idx))]
        return None

    # --- situated questions ------------------------------------------------

    def situated(self, pos: np.ndarray, heading: float) -> list[tuple[str, str, str]]:
        """Candidate (type, question, answer) triples for one situation."""
        out = []
        angles = {i: _angle_to(pos, heading, _centre(o)) for i, o in enumerate(self.objects)
                  if np.linalg.norm(_centre(o) - pos) > 0.05}
        sectors = {"left": (45.0, 135.0), "right": (-135.0, -45.0)}
        for word, (lo, hi) in sectors.items():
            inside = [i for i, a in angles.items() if lo + 10 <= a <= hi - 10]
            border = [i for i, a in angles.items() if lo - 10 < a < lo + 10 or hi - 10 < a < hi + 10]
            if len(inside) == 1 and not border and inside[0] in self.seen:
                out.append(("situated_direction", f"What is on my {word}?", self.objects[inside[0]].category))
        behind = [i for i, a in angles.items() if abs(a) >= 145]
        border = [i for i, a in angles.items() if 125 < abs(a) < 145]
        if len(behind) == 1 and not border and behind[0] in self.seen:
            out.append(("situated_direction", "What is behind me?", self.objects[behind[0]].category))
        for i, a in angles.items():
            if i in self.seen and 25 <= abs(a) <= 155:
                out.append(("situated_left_right", f"Is the {self.objects[i].name} on my left or on my right?",
                            "left" if a > 0 else "right"))
        pairs = [(i, j) for i in self.seen for j in self.seen if i < j
                 and self.objects[i].category != self.objects[j].category]
        for i, j in pairs:
            di, dj = (np.linalg.norm(_centre(self.objects[k]) - pos) for k in (i, j))
            if abs(di - dj) >= 0.5:
                first, second = (i, j) if self.rng.random() < 0.5 else (j, i)
                out.append(("situated_closer",
                            f"Which is closer to me, the {self.objects[first].name} or the {self.objects[second].name}?",
                            self.objects[i if di < dj else j].category))
        for i in self.seen:
            d = _footprint_distance(pos, self.objects[i])
            if d >= 0.3:
                out.append(("situated_distance", f"How far is the {self.objects[i].name} from me in metres?",
                            format_number(d)))
        return out

    # --- general questions -------------------------------------------------

    def general(self) -> list[tuple[str, str, str]]:
        out = []
        objs, seen = self.objects, self.seen
        for cat in sorted({o.category for o in objs}):
            members = [i for i, o in enumerate(objs) if o.category == cat]
            if all(i in seen for i in members):
                out.append(("object_count", f"How many {PLURALS[cat]} are in the room?", str(len(members))))
        for a, b, c in self._triples(seen, 60):
            pos, head = _centre(objs[a]), _heading_to(_centre(objs[a]), _centre(objs[b]))
            ang = _angle_to(pos, head, _centre(objs[c]))
            word = "left" if 35 <= ang <= 145 else "right" if -145 <= ang <= -35 else "back" if abs(ang) >= 155 else None
            if word:
                out.append(("relative_direction", f"If I am standing by the {objs[a].name} and facing the "
                            f"{objs[b].name}, is the {objs[c].name} to my left, right, or back?", word))
        for a, b in self._pairs(seen, 20):
            d = np.linalg.norm(_centre(objs[a]) - _centre(objs[b]))
            out.append(("absolute_distance", f"What is the distance between the {objs[a].name} and the "
                        f"{objs[b].name} in metres?", format_number(d)))
        for _ in range(30):
            four = self.pick(seen, 4)
            if not four:
                break
            a, rest = four[0], four[1:]
            if len({objs[i].category for i in rest}) < 3:
                continue
            dists = sorted((np.linalg.norm(_centre(objs[i]) - _centre(objs[a])), i) for i in rest)
            if dists[1][0] - dists[0][0] >= 0.4:
                out.append(("relative_distance", f"Which is closest to the {objs[a].name}: the {objs[rest[0]].name}, "
                            f"the {objs[rest[1]].name}, or the {objs[rest[2]].name}?", objs[dists[0][1]].category))
        for i in seen:
            out.append(("object_size", f"How tall is the {objs[i].name} in metres?", format_number(objs[i].size[2])))
            out.append(("object_size", f"How long is the longest side of the {objs[i].name} in metres?",
                        format_number(max(objs[i].size))))
        out.append(("room_size", "What is the area of the room in square metres?", format_number(self.scene.room.area)))
        return out

    def _pairs(self, pool, n):
        pairs = [(i, j) for i in pool for j in pool if i < j]
        self.rng.shuffle(pairs)
        return pairs[:n]

    def _triples(self, pool, n):
        out = []
        for _ in range(n):
            t = self.pick(pool, 3)
            if t:
                out.append(tuple(t))
        return out


def _sample_balanced(rng, candidates: list[tuple[str, str, str]], k: int) -> list[tuple[str, str, str]]:
    """Up to k distinct questions, spreading picks across types."""
    by_type: dict[str, list] = {}
    for c in candidates:
        if c[1] not in {x[1] for x in by_type.get(c[0], [])}:
            by_type.setdefault(c[0], []).append(c)
    types = sorted(by_type)
    rng.shuffle(types)
    picked = []
    while len(picked) < k and any(by_type.values()):
        for t in types:
            if by_type[t] and len(picked) < k:
                picked.append(by_type[t].pop(int(rng.integers(len(by_type[t])))))
    return picked


def visible_objects(instance: np.ndarray, num_objects: int, min_pixels: int) -> list[int]:
    """Indices of objects shown in at least ``min_pixels`` pixels of the instance maps (F, H, W)."""
    counts = np.bincount(instance.ravel().astype(np.int64), minlength=num_objects + 1)[1:num_objects + 1]
    return [i for i in range(num_objects) if counts[i] >= min_pixels]


def make_questions(scene: Scene, bev: BevFrame, instance: np.ndarray, rng: np.random.Generator,
                   options: QuestionOptions = QuestionOptions()) -> tuple[list[Situation], list[Question]]:
    """Situations (in the BEV frame) and questions for one rendered scene."""
    seen = visible_objects(instance, len(scene.objects), options.min_visible_pixels)
    builder = _Builder(scene, bev, seen, rng)
    situations: list[Situation] = []
    questions: list[Question] = []
    texts = set()
    for _ in range(options.situations * 8):
        if len(situations) >= options.situations or len(seen) < 2:
            break
        got = builder.situation()
        if got is None or got[0] in texts:
            continue
        text, pos, heading, _ = got
        picked = _sample_balanced(rng, builder.situated(pos, heading), options.situated_per_situation)
        if not picked:
            continue
        texts.add(text)
        bev_pos = bev.points(pos)
        situations.append(Situation(text, (round(float(bev_pos[0]), 4), round(float(bev_pos[1]), 4)),
                                    round(float(bev.heading(heading)), 3)))
        questions += [Question(t, q, a, len(situations) - 1) for t, q, a in picked]
    questions += [Question(t, q, a, None) for t, q, a in _sample_balanced(rng, builder.general(), options.general)]
    return situations, questions
