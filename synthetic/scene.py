"""Procedural rectangular rooms furnished with recognisable objects.

Everything here is in the *room frame*: metres, origin at a floor corner, the
room spans ``[0, width] x [0, depth] x [0, height]``, z up. The
first-camera-anchored BEV frame that labels use is derived later
(:mod:`loc3r.synthetic.ground_truth`).

Each object is composed of a few coloured primitives (axis-aligned boxes,
vertical cylinders, spheres) so that its category reads from shape and
proportion. Objects face one of four directions, so their boxes stay
axis-aligned and the renderer can ray-cast them with slab tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from loc3r.errors import Loc3rError

RGB = tuple[float, float, float]

OBJECT_COLOURS: dict[str, RGB] = {
    "red": (0.85, 0.13, 0.13),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.85, 0.12),
    "green": (0.18, 0.68, 0.22),
    "blue": (0.14, 0.28, 0.86),
    "purple": (0.52, 0.18, 0.70),
    "pink": (0.96, 0.48, 0.72),
    "white": (0.93, 0.93, 0.93),
}

# Muted, mutually distinct wall tones: each room picks four, one per wall,
# so the walls themselves tell the camera which way it faces.
WALL_COLOURS: dict[str, RGB] = {
    "beige": (0.86, 0.78, 0.60),
    "sage": (0.60, 0.72, 0.56),
    "sky": (0.58, 0.72, 0.88),
    "salmon": (0.90, 0.64, 0.56),
    "lavender": (0.72, 0.64, 0.84),
    "mint": (0.60, 0.86, 0.78),
    "sand": (0.78, 0.70, 0.46),
    "slate": (0.55, 0.58, 0.64),
}
FLOOR_COLOURS: dict[str, RGB] = {"oak": (0.58, 0.42, 0.28), "grey": (0.46, 0.46, 0.50), "walnut": (0.40, 0.28, 0.20)}
CEILING_COLOUR: RGB = (0.95, 0.95, 0.93)
FOLIAGE: RGB = (0.12, 0.45, 0.14)
METAL: RGB = (0.55, 0.55, 0.58)
LINEN: RGB = (0.94, 0.94, 0.90)

# Walls in a fixed order: x=0 (west), x=W (east), y=0 (south), y=D (north).
WALL_NAMES = ("west", "east", "south", "north")


@dataclass(frozen=True)
class Box:
    """Axis-aligned box ``lo <= p <= hi`` (room frame)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    rgb: RGB


@dataclass(frozen=True)
class Cylinder:
    """Vertical cylinder: axis through (cx, cy), from z0 to z1."""

    cx: float
    cy: float
    radius: float
    z0: float
    z1: float
    rgb: RGB


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    rgb: RGB


Primitive = Box | Cylinder | Sphere


@dataclass(frozen=True)
class SceneObject:
    """One piece of furniture.

    ``size`` is (width, depth, height) in the object's own frame (depth is
    front-to-back). ``facing_deg`` is the room-frame direction its front
    points to (0 = +x, 90 = +y). ``footprint`` is its room-frame xy extent
    ``(xmin, ymin, xmax, ymax)``.
    """

    category: str
    colour: str
    center: tuple[float, float]
    facing_deg: int
    size: tuple[float, float, float]
    footprint: tuple[float, float, float, float]
    parts: tuple[Primitive, ...]

    @property
    def name(self) -> str:
        """How text refers to it: 'red chair' (unique within a scene)."""
        return f"{self.colour} {self.category}"


@dataclass(frozen=True)
class Room:
    width: float  # along x
    depth: float  # along y
    height: float
    wall_colours: tuple[str, str, str, str]  # WALL_NAMES order
    floor_colour: str

    @property
    def area(self) -> float:
        return self.width * self.depth


@dataclass(frozen=True)
class Scene:
    scene_id: str
    seed: int
    room: Room
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class SceneOptions:
    """Ranges for procedural rooms."""

    min_room: float = 3.0
    max_room: float = 10.0
    min_objects: int = 3
    max_objects: int = 10
    # Free gap kept between object footprints, metres.
    object_gap: float = 0.3
    wall_margin: float = 0.05


# --- category builders: local frame, front faces +y, centred at the origin ---

LocalPart = tuple[str, tuple, RGB]  # ("box", (lo, hi)) | ("cyl", (cx, cy, r, z0, z1)) | ("sph", (c, r))


def _dark(rgb: RGB, f: float = 0.45) -> RGB:
    return (rgb[0] * f, rgb[1] * f, rgb[2] * f)


def _box(x0, y0, z0, x1, y1, z1, rgb) -> LocalPart:
    return ("box", ((x0, y0, z0), (x1, y1, z1)), rgb)


def _legs(w: float, d: float, top: float, t: float, inset: float, rgb: RGB) -> list[LocalPart]:
    xs = (-w / 2 + inset, w / 2 - inset - t)
    ys = (-d / 2 + inset, d / 2 - inset - t)
    return [_box(x, y, 0.0, x + t, y + t, top, rgb) for x in xs for y in ys]


def _chair(rng, rgb):
    w, d, h = rng.uniform(0.42, 0.52), rng.uniform(0.42, 0.52), rng.uniform(0.85, 1.0)
    seat = 0.46
    parts = _legs(w, d, seat - 0.06, 0.04, 0.0, _dark(rgb))
    parts.append(_box(-w / 2, -d / 2, seat - 0.06, w / 2, d / 2, seat, rgb))
    parts.append(_box(-w / 2, -d / 2, seat, w / 2, -d / 2 + 0.06, h, rgb))
    return (w, d, h), parts


def _table(rng, rgb):
    w, d, h = rng.uniform(0.9, 1.7), rng.uniform(0.6, 1.0), rng.uniform(0.70, 0.78)
    parts = _legs(w, d, h - 0.05, 0.07, 0.04, _dark(rgb, 0.6))
    parts.append(_box(-w / 2, -d / 2, h - 0.05, w / 2, d / 2, h, rgb))
    return (w, d, h), parts


def _bed(rng, rgb):
    w, d, h = rng.uniform(1.2, 1.8), rng.uniform(1.95, 2.15), rng.uniform(0.95, 1.15)
    parts = [
        _box(-w / 2, -d / 2, 0.0, w / 2, d / 2, 0.30, _dark(rgb, 0.5)),  # frame
        _box(-w / 2 + 0.03, -d / 2 + 0.08, 0.30, w / 2 - 0.03, d / 2 - 0.02, 0.50, LINEN),  # mattress
        _box(-w / 2 + 0.02, -d / 2 + 0.75, 0.30, w / 2 - 0.02, d / 2, 0.54, rgb),  # blanket
        _box(-w / 2 + 0.12, -d / 2 + 0.12, 0.50, w / 2 - 0.12, -d / 2 + 0.50, 0.62, LINEN),  # pillow
        _box(-w / 2, -d / 2, 0.0, w / 2, -d / 2 + 0.08, h, rgb),  # headboard
    ]
    return (w, d, h), parts


def _sofa(rng, rgb):
    w, d, h = rng.uniform(1.5, 2.3), rng.uniform(0.8, 0.95), rng.uniform(0.78, 0.9)
    arm = 0.18
    parts = [
        _box(-w / 2 + arm, -d / 2, 0.0, w / 2 - arm, d / 2, 0.42, rgb),  # seat
        _box(-w / 2 + arm, -d / 2, 0.42, w / 2 - arm, -d / 2 + 0.22, h, _dark(rgb, 0.8)),  # back
        _box(-w / 2, -d / 2, 0.0, -w / 2 + arm, d / 2, 0.62, _dark(rgb, 0.7)),  # arms
        _box(w / 2 - arm, -d / 2, 0.0, w / 2, d / 2, 0.62, _dark(rgb, 0.7)),
    ]
    return (w, d, h), parts


def _lamp(rng, rgb):
    r, h = rng.uniform(0.17, 0.23), rng.uniform(1.4, 1.8)
    parts = [
        ("cyl", (0.0, 0.0, 0.15, 0.0, 0.03), METAL),
        ("cyl", (0.0, 0.0, 0.02, 0.03, h - 0.3), METAL),
        ("cyl", (0.0, 0.0, r, h - 0.38, h), rgb),
    ]
    return (2 * r, 2 * r, h), parts


def _box_object(rng, rgb):
    w, d, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6)
    parts = [
        _box(-w / 2, -d / 2, 0.0, w / 2, d / 2, h, rgb),
        _box(-0.04, -d / 2 - 0.004, h - 0.001, 0.04, d / 2 + 0.004, h + 0.006, _dark(rgb, 0.6)),  # tape
    ]
    return (w, d, h), parts


def _plant(rng, rgb):
    pot_r, pot_h, leaf_r = rng.uniform(0.14, 0.2), rng.uniform(0.3, 0.42), rng.uniform(0.28, 0.4)
    parts = [
        ("cyl", (0.0, 0.0, pot_r, 0.0, pot_h), rgb),
        ("sph", ((0.0, 0.0, pot_h + 0.8 * leaf_r), leaf_r), FOLIAGE),
    ]
    return (2 * leaf_r, 2 * leaf_r, pot_h + 1.8 * leaf_r), parts


def _cabinet(rng, rgb):
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.6), rng.uniform(1.0, 1.9)
    parts = [
        _box(-w / 2, -d / 2, 0.0, w / 2, d / 2, h, rgb),
        _box(-0.01, d / 2, 0.05, 0.01, d / 2 + 0.01, h - 0.05, _dark(rgb, 0.35)),  # door gap
        _box(-0.08, d / 2, h * 0.5, -0.05, d / 2 + 0.03, h * 0.5 + 0.12, METAL),  # handles
        _box(0.05, d / 2, h * 0.5, 0.08, d / 2 + 0.03, h * 0.5 + 0.12, METAL),
    ]
    return (w, d, h), parts


CATEGORY_BUILDERS: dict[str, Callable] = {
    "chair": _chair,
    "table": _table,
    "bed": _bed,
    "sofa": _sofa,
    "lamp": _lamp,
    "box": _box_object,
    "plant": _plant,
    "cabinet": _cabinet,
}
CATEGORIES = tuple(CATEGORY_BUILDERS)
# Categories that usually stand with their back to a wall.
_AGAINST_WALL = {"bed", "sofa", "cabinet"}
# Relative frequency: chairs and boxes are common, beds rare.
_CATEGORY_WEIGHTS = {"chair": 3, "table": 2, "bed": 1, "sofa": 1.5, "lamp": 1.5, "box": 2, "plant": 2, "cabinet": 1.5}


def _rotate_xy(x: float, y: float, quarter_turns: int) -> tuple[float, float]:
    """Rotate (x, y) counter-clockwise by quarter_turns * 90 degrees (exact)."""
    for _ in range(quarter_turns % 4):
        x, y = -y, x
    return x, y


def place_parts(parts: list[LocalPart], center: tuple[float, float], facing_deg: int) -> tuple[Primitive, ...]:
    """Local parts (front +y) -> room-frame primitives facing ``facing_deg``."""
    turns = ((facing_deg - 90) // 90) % 4
    cx, cy = center
    out: list[Primitive] = []
    for kind, geo, rgb in parts:
        if kind == "box":
            (x0, y0, z0), (x1, y1, z1) = geo
            corners = [_rotate_xy(x, y, turns) for x in (x0, x1) for y in (y0, y1)]
            xs, ys = [c[0] for c in corners], [c[1] for c in corners]
            out.append(Box((cx + min(xs), cy + min(ys), z0), (cx + max(xs), cy + max(ys), z1), rgb))
        elif kind == "cyl":
            px, py, r, z0, z1 = geo
            px, py = _rotate_xy(px, py, turns)
            out.append(Cylinder(cx + px, cy + py, r, z0, z1, rgb))
        else:
            (px, py, pz), r = geo
            px, py = _rotate_xy(px, py, turns)
            out.append(Sphere((cx + px, cy + py, pz), r, rgb))
    return tuple(out)


def _footprint(center, size, facing_deg) -> tuple[float, float, float, float]:
    w, d, _ = size
    if facing_deg % 180 == 0:  # front along x: depth spans x
        w, d = d, w
    return (center[0] - w / 2, center[1] - d / 2, center[0] + w / 2, center[1] + d / 2)


def _gap(a, b) -> float:
    """Gap between two footprints (negative when they overlap)."""
    dx = max(a[0] - b[2], b[0] - a[2])
    dy = max(a[1] - b[3], b[1] - a[3])
    return max(dx, dy)


def _propose_pose(rng, category, size, room: Room, margin: float):
    w, d, _ = size
    if category in _AGAINST_WALL and rng.random() < 0.8:
        wall = int(rng.integers(4))
        facing = (0, 180, 90, 270)[wall]  # west wall faces +x, east -x, south +y, north -y
        if wall < 2:
            x = margin + d / 2 if wall == 0 else room.width - margin - d / 2
            y = rng.uniform(margin + w / 2, room.depth - margin - w / 2) if room.depth > w + 2 * margin else -1.0
        else:
            y = margin + d / 2 if wall == 2 else room.depth - margin - d / 2
            x = rng.uniform(margin + w / 2, room.width - margin - w / 2) if room.width > w + 2 * margin else -1.0
        return (float(x), float(y)), facing
    facing = int(rng.integers(4)) * 90
    return (float(rng.uniform(0, room.width)), float(rng.uniform(0, room.depth))), facing


def build_object(rng: np.random.Generator, category: str, colour: str, room: Room, center=None, facing=None):
    """Sample one object's size and pose; None if the pose falls outside the room."""
    size, parts = CATEGORY_BUILDERS[category](rng, OBJECT_COLOURS[colour])
    size = tuple(float(s) for s in size)
    if center is None:
        center, facing = _propose_pose(rng, category, size, room, 0.05)
    fp = _footprint(center, size, facing)
    if fp[0] < 0.05 or fp[1] < 0.05 or fp[2] > room.width - 0.05 or fp[3] > room.depth - 0.05:
        return None
    return SceneObject(category, colour, center, int(facing), size, fp, place_parts(parts, center, facing))


def sample_room(rng: np.random.Generator, options: SceneOptions) -> Room:
    width = float(round(rng.uniform(options.min_room, options.max_room), 2))
    depth = float(round(rng.uniform(options.min_room, options.max_room), 2))
    walls = tuple(str(c) for c in rng.choice(list(WALL_COLOURS), size=4, replace=False))
    floor = str(rng.choice(list(FLOOR_COLOURS)))
    return Room(width, depth, float(round(rng.uniform(2.6, 3.0), 2)), walls, floor)


def sample_objects(rng: np.random.Generator, room: Room, options: SceneOptions) -> tuple[SceneObject, ...]:
    """Non-overlapping objects with unique (colour, category) names."""
    cap = int(min(options.max_objects, options.min_objects + room.area // 5))
    target = int(rng.integers(options.min_objects, max(cap, options.min_objects) + 1))
    cats = list(_CATEGORY_WEIGHTS)
    p = np.array([_CATEGORY_WEIGHTS[c] for c in cats], dtype=float)
    p /= p.sum()
    placed: list[SceneObject] = []
    names: set[str] = set()
    for _ in range(target * 25):
        if len(placed) >= target:
            break
        category = str(rng.choice(cats, p=p))
        colour = str(rng.choice(list(OBJECT_COLOURS)))
        if f"{colour} {category}" in names:
            continue
        obj = build_object(rng, category, colour, room)
        if obj is None or any(_gap(obj.footprint, o.footprint) < options.object_gap for o in placed):
            continue
        placed.append(obj)
        names.add(obj.name)
    return tuple(placed)


def sample_scene(scene_id: str, seed: int, options: SceneOptions = SceneOptions(), rng=None) -> Scene:
    """A room with ``options.min_objects``..``max_objects`` objects, from ``seed``."""
    rng = np.random.default_rng(seed) if rng is None else rng
    for _ in range(50):
        room = sample_room(rng, options)
        objects = sample_objects(rng, room, options)
        if len(objects) >= options.min_objects:
            return Scene(scene_id, seed, room, objects)
    raise Loc3rError(f"could not place {options.min_objects} objects in a room (seed {seed})")


def scene_primitives(scene: Scene) -> list[tuple[int, Primitive]]:
    """(object index, primitive) for every part of every object."""
    return [(i, part) for i, obj in enumerate(scene.objects) for part in obj.parts]
