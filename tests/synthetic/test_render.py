"""Scene sampling and the ray caster, checked against a scalar reference."""

import math

import numpy as np
import pytest

from loc3r.synthetic.camera import camera_to_world, intrinsics, pixel_rays
from loc3r.synthetic.render import ROOM_CLASSES, SEMANTIC_CLASSES, RenderOptions, render_clip
from loc3r.synthetic.scene import (
    CATEGORIES, OBJECT_COLOURS, Box, Cylinder, Room, Scene, SceneOptions, Sphere, build_object, sample_scene,
)
from loc3r.synthetic.trajectory import TrajectoryOptions, sample_camera_path


def _gap(a, b):
    return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_scene_rules(seed):
    scene = sample_scene("s", seed)
    room = scene.room
    assert 3.0 <= room.width <= 10.0 and 3.0 <= room.depth <= 10.0
    assert len(set(room.wall_colours)) == 4
    assert 3 <= len(scene.objects) <= 10
    names = [o.name for o in scene.objects]
    assert len(set(names)) == len(names)
    for i, a in enumerate(scene.objects):
        assert a.category in CATEGORIES and a.colour in OBJECT_COLOURS
        x0, y0, x1, y1 = a.footprint
        assert 0 < x0 < x1 < room.width and 0 < y0 < y1 < room.depth
        for b in scene.objects[i + 1:]:
            assert _gap(a.footprint, b.footprint) >= SceneOptions().object_gap - 1e-9
        # Every part stays inside the footprint, up to handles and tape (so footprints separate objects).
        for p in a.parts:
            if isinstance(p, Box):
                assert x0 - 0.035 <= p.lo[0] <= p.hi[0] <= x1 + 0.035
                assert y0 - 0.035 <= p.lo[1] <= p.hi[1] <= y1 + 0.035


def test_trajectory_stays_clear_of_walls_and_objects():
    for seed in range(4):
        rng = np.random.default_rng(seed)
        scene = sample_scene("s", seed, rng=rng)
        path = sample_camera_path(scene, rng, TrajectoryOptions(frames=16))
        assert path.positions.shape == (16, 3)
        xy = path.positions[:, :2]
        assert np.all(xy > 0.3) and np.all(xy[:, 0] < scene.room.width - 0.3) and np.all(xy[:, 1] < scene.room.depth - 0.3)
        for o in scene.objects:
            x0, y0, x1, y1 = o.footprint
            dx = np.maximum.reduce([x0 - xy[:, 0], np.zeros(16), xy[:, 0] - x1])
            dy = np.maximum.reduce([y0 - xy[:, 1], np.zeros(16), xy[:, 1] - y1])
            assert np.all(np.hypot(dx, dy) > 0.25)
        assert np.all((path.positions[:, 2] > 1.3) & (path.positions[:, 2] < 1.7))
        assert np.all(path.pitch_deg <= 0) and np.all(path.pitch_deg >= -30)
        assert np.linalg.norm(xy[-1] - xy[0]) > 0.2  # it walks


def _reference_hit(scene, o, d):
    """Scalar ray caster: (t, instance) of the nearest hit."""
    best, inst = math.inf, 0
    room = scene.room
    for a, size in enumerate((room.width, room.depth, room.height)):
        if d[a] != 0:
            t = ((size if d[a] > 0 else 0.0) - o[a]) / d[a]
            if 0 < t < best:
                best = t
    for k, obj in enumerate(scene.objects, start=1):
        for p in obj.parts:
            ts = []
            if isinstance(p, Box):
                lo_t, hi_t = -math.inf, math.inf
                for a in range(3):
                    if abs(d[a]) < 1e-12:
                        if not p.lo[a] <= o[a] <= p.hi[a]:
                            lo_t = math.inf
                        continue
                    t1, t2 = (p.lo[a] - o[a]) / d[a], (p.hi[a] - o[a]) / d[a]
                    lo_t, hi_t = max(lo_t, min(t1, t2)), min(hi_t, max(t1, t2))
                if lo_t <= hi_t and lo_t > 0:
                    ts.append(lo_t)
            elif isinstance(p, Cylinder):
                rx, ry = o[0] - p.cx, o[1] - p.cy
                a2 = d[0] ** 2 + d[1] ** 2
                b = 2 * (rx * d[0] + ry * d[1])
                c = rx * rx + ry * ry - p.radius ** 2
                disc = b * b - 4 * a2 * c
                if disc >= 0 and a2 > 0:
                    t = (-b - math.sqrt(disc)) / (2 * a2)
                    if t > 0 and p.z0 <= o[2] + t * d[2] <= p.z1:
                        ts.append(t)
                for zc in (p.z0, p.z1):
                    if d[2] != 0:
                        t = (zc - o[2]) / d[2]
                        if t > 0 and (o[0] + t * d[0] - p.cx) ** 2 + (o[1] + t * d[1] - p.cy) ** 2 <= p.radius ** 2:
                            ts.append(t)
            elif isinstance(p, Sphere):
                rel = np.subtract(o, p.center)
                a2, b, c = float(d @ d), 2 * float(rel @ d), float(rel @ rel) - p.radius ** 2
                disc = b * b - 4 * a2 * c
                if disc >= 0:
                    t = (-b - math.sqrt(disc)) / (2 * a2)
                    if t > 0:
                        ts.append(t)
            for t in ts:
                if t < best:
                    best, inst = t, k
    return best, inst


def test_ray_caster_matches_scalar_reference():
    rng = np.random.default_rng(7)
    scene = sample_scene("s", 7, rng=rng)
    path = sample_camera_path(scene, rng, TrajectoryOptions(frames=3))
    c2w = np.stack([camera_to_world(p, y, q) for p, y, q in zip(path.positions, path.yaw_deg, path.pitch_deg)])
    clip = render_clip(scene, c2w, RenderOptions(width=24, height=20, supersample=1))
    assert clip.rgb.shape == (3, 20, 24, 3) and clip.depth.shape == (3, 20, 24)
    k = intrinsics(24, 20)
    rays = pixel_rays(k, 24, 20)
    agree, total = 0, 0
    for f in range(3):
        for v in range(0, 20, 2):
            for u in range(0, 24, 2):
                d = c2w[f, :3, :3] @ rays[v, u]
                t, inst = _reference_hit(scene, c2w[f, :3, 3], d)
                total += 1
                if inst == clip.instance[f, v, u]:
                    agree += 1
                    assert clip.depth[f, v, u] == pytest.approx(t, rel=1e-4, abs=1e-4)
    assert agree >= total - 2  # float32 vs float64 may flip a grazing silhouette pixel


def test_empty_room_depth_and_semantics():
    room = Room(6.0, 4.0, 2.8, ("beige", "sage", "sky", "salmon"), "oak")
    scene = Scene("empty", 0, room, ())
    c2w = camera_to_world(np.array([2.0, 2.0, 1.5]), 0.0, 0.0)[None]
    clip = render_clip(scene, c2w, RenderOptions(width=16, height=16, supersample=1))
    # The centre pixels look straight at the east wall, 4 m away (z-depth).
    assert clip.depth[0, 7:9, 7:9] == pytest.approx(np.full((2, 2), 4.0), abs=1e-4)
    assert SEMANTIC_CLASSES[clip.semantic[0, 8, 8]] == "wall_east"
    assert SEMANTIC_CLASSES[clip.semantic[0, 15, 8]] == "floor"
    assert SEMANTIC_CLASSES[clip.semantic[0, 0, 8]] == "ceiling"
    assert clip.instance.max() == 0
    # Floor depth: a pixel row below the horizon meets the floor at z-depth 1.5 / y_ray.
    k = intrinsics(16, 16)
    y_ray = (15 + 0.5 - k[1, 2]) / k[1, 1]
    assert clip.depth[0, 15, 8] == pytest.approx(1.5 / y_ray, rel=1e-4)


def test_object_facing_turns_its_shape():
    room = Room(6.0, 6.0, 2.8, ("beige", "sage", "sky", "salmon"), "oak")
    east = build_object(np.random.default_rng(0), "sofa", "red", room, center=(3.0, 3.0), facing=0)
    north = build_object(np.random.default_rng(0), "sofa", "red", room, center=(3.0, 3.0), facing=90)
    w, d, _ = north.size
    # Facing +y, the width runs along x; facing +x it runs along y.
    assert north.footprint[2] - north.footprint[0] == pytest.approx(w)
    assert east.footprint[3] - east.footprint[1] == pytest.approx(w)
    # The backrest (second part) sits at the back: -x for a sofa facing +x.
    back = east.parts[1]
    assert back.hi[0] == pytest.approx(east.footprint[0] + 0.22)


def test_semantic_classes_cover_categories():
    assert SEMANTIC_CLASSES[: len(ROOM_CLASSES)] == ROOM_CLASSES
    assert set(CATEGORIES) <= set(SEMANTIC_CLASSES) and len(CATEGORIES) >= 8 and len(OBJECT_COLOURS) >= 6
