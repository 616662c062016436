"""Situations and answers, re-derived independently in the BEV frame from the written scene JSON."""

import math
import re

import numpy as np
import pytest

from loc3r.synthetic.dataset import SynthOptions, generate_scene, label_record
from loc3r.synthetic.ground_truth import scene_in_bev
from loc3r.synthetic.questions import NUMERIC_TYPES, PLURALS, QUESTION_TYPES, format_number, visible_objects
from loc3r.synthetic.scene import CATEGORIES, OBJECT_COLOURS

OPTIONS = SynthOptions(frames=8, write_video=False)
NAME = re.compile(rf"the (({'|'.join(OBJECT_COLOURS)}) ({'|'.join(CATEGORIES)}))\b")


@pytest.fixture(scope="module")
def samples():
    return [generate_scene("train", 3, i, OPTIONS) for i in range(4)]


def _names(text, objects):
    found = [m[0] for m in NAME.findall(text)]
    assert all(n in objects for n in found)
    return [objects[n] for n in found]


def _angle(pos, heading, target):
    a = math.degrees(math.atan2(target[1] - pos[1], target[0] - pos[0])) - heading
    return (a + 180.0) % 360.0 - 180.0


def _to_polygon(p, poly):
    """Distance from p to a convex polygon (0 inside)."""
    poly = np.asarray(poly)
    def cross(u, v):
        return u[0] * v[1] - u[1] * v[0]

    inside = all(cross(poly[(i + 1) % 4] - poly[i], p - poly[i]) >= -1e-9 for i in range(4))
    if inside:
        return 0.0
    best = math.inf
    for i in range(4):
        a, b = poly[i], poly[(i + 1) % 4]
        t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
        best = min(best, float(np.linalg.norm(p - (a + t * (b - a)))))
    return best


def test_answers_follow_from_bev_geometry(samples):
    checked = set()
    for sample in samples:
        info = scene_in_bev(sample.scene, sample.poses.bev)
        objects = {o["name"]: o for o in info["objects"]}
        for k, q in enumerate(sample.questions):
            rec = label_record(sample, k, q, "v.mp4", OPTIONS)
            assert rec["type"] in QUESTION_TYPES and rec["numeric"] == (rec["type"] in NUMERIC_TYPES)
            ans = rec["answer"]
            assert ans == ans.lower().strip() and " " not in ans
            named = _names(rec["question"], objects)
            if rec["situation"] is not None:
                pos, head = np.array(rec["position"]), rec["heading"]
                assert -180.0 < head <= 180.0
            t = rec["type"]
            if t == "situated_left_right":
                a = _angle(pos, head, named[0]["center"])
                assert ans == ("left" if a > 0 else "right") and 20 < abs(a) < 160
            elif t == "situated_closer":
                d = [np.linalg.norm(np.array(o["center"]) - pos) for o in named]
                assert ans == named[int(np.argmin(d))]["category"]
            elif t == "situated_distance":
                assert ans == format_number(_to_polygon(pos, named[0]["footprint"]))
            elif t == "situated_direction":
                word = rec["question"].split()[-1].rstrip("?")
                lo, hi = {"left": (45, 135), "right": (-135, -45), "me": (145, 215)}[word]
                hits = [o for o in objects.values() if np.linalg.norm(np.array(o["center"]) - pos) > 0.05
                        and lo <= (_angle(pos, head, o["center"]) % 360 if word == "me" else _angle(pos, head, o["center"])) <= hi]
                assert [o["category"] for o in hits] == [ans]
            elif t == "object_count":
                cat = [c for c, p in PLURALS.items() if f" {p} " in rec["question"]][0]
                assert ans == str(sum(o["category"] == cat for o in objects.values()))
            elif t == "absolute_distance":
                a, b = named
                assert ans == format_number(np.linalg.norm(np.subtract(a["center"], b["center"])))
            elif t == "object_size":
                o = named[0]
                want = o["size"][2] if "tall" in rec["question"] else max(o["size"])
                assert ans == format_number(want)
            elif t == "room_size":
                c = np.array(info["room"]["corners"])
                area = 0.5 * abs(np.dot(c[:, 0], np.roll(c[:, 1], 1)) - np.dot(c[:, 1], np.roll(c[:, 0], 1)))
                assert ans == format_number(area)
            elif t == "relative_direction":
                a, b, c = named
                h = math.degrees(math.atan2(b["center"][1] - a["center"][1], b["center"][0] - a["center"][0]))
                ang = _angle(a["center"], h, c["center"])
                assert ans == ("left" if 35 <= ang <= 145 else "right" if -145 <= ang <= -35 else "back")
            elif t == "relative_distance":
                a, rest = named[0], named[1:]
                d = [np.linalg.norm(np.subtract(o["center"], a["center"])) for o in rest]
                assert ans == rest[int(np.argmin(d))]["category"]
            checked.add(t)
    assert len(checked) >= 7


def test_situations_match_their_text(samples):
    n = 0
    for sample in samples:
        info = scene_in_bev(sample.scene, sample.poses.bev)
        objects = {o["name"]: o for o in info["objects"]}
        for s in sample.situations:
            named = _names(s.text, objects)
            pos = np.array(s.position)
            toward = lambda o: math.degrees(math.atan2(o["center"][1] - pos[1], o["center"][0] - pos[0]))
            diff = lambda a, b: abs((a - b + 180) % 360 - 180)
            if s.text.startswith("I am sitting on"):
                np.testing.assert_allclose(pos, named[0]["center"], atol=1e-3)
                assert diff(s.heading_deg, toward(named[1])) < 0.01
            elif s.text.startswith("I am standing between"):
                np.testing.assert_allclose(pos, np.mean([named[0]["center"], named[1]["center"]], axis=0), atol=1e-3)
                assert diff(s.heading_deg, toward(named[2])) < 0.01
            elif "behind me" in s.text:
                assert 0.3 - 1e-3 <= _to_polygon(pos, named[0]["footprint"]) <= 0.9 + 1e-3
                assert diff(s.heading_deg, toward(named[1]) + 180) < 0.01
            else:
                assert s.text.startswith("I am standing next to")
                assert 0.3 - 1e-3 <= _to_polygon(pos, named[0]["footprint"]) <= 0.9 + 1e-3
                assert diff(s.heading_deg, toward(named[1])) < 0.01
            # Inside the room.
            c = np.array(info["room"]["corners"])
            assert _to_polygon(pos, c[::-1]) == 0.0 or _to_polygon(pos, c) == 0.0
            n += 1
    assert n >= 8


def test_only_seen_objects_are_named(samples):
    for sample in samples:
        seen = {sample.scene.objects[i].name for i in
                visible_objects(sample.clip.instance, len(sample.scene.objects), OPTIONS.questions.min_visible_pixels)}
        for text in [s.text for s in sample.situations] + [q.question for q in sample.questions]:
            for name in (m[0] for m in NAME.findall(text)):
                assert name in seen, (name, text)


def test_visible_objects_counts_pixels():
    inst = np.zeros((2, 4, 4), np.uint8)
    inst[0, :2, :2] = 1  # object 0: 4 px
    inst[1, :, :] = 3  # object 2: 16 px
    assert visible_objects(inst, 3, 4) == [0, 2]
    assert visible_objects(inst, 3, 5) == [2]


def test_format_number():
    assert format_number(2.449) == "2.4" and format_number(2.45) == "2.5" and format_number(3) == "3.0"
