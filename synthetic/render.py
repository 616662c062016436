"""A small vectorised numpy ray caster for the synthetic rooms.

Every pixel's ray is tested against the room's six faces, all boxes
(slab test), vertical cylinders (side + caps) and spheres at once; the
nearest hit wins. Shading is Lambertian under a fixed sun-like light plus a
weak head-light, so shapes read; the floor is tiled and the walls have a
dark skirting board so that camera motion is visible. Rendering at a
multiple of the output size and area-averaging down anti-aliases.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from loc3r.synthetic.camera import DEFAULT_HFOV_DEG, intrinsics, pixel_rays
from loc3r.synthetic.scene import (
    CATEGORIES, CEILING_COLOUR, FLOOR_COLOURS, WALL_COLOURS, Box, Cylinder, Scene, Sphere,
)

# Semantic classes: room surfaces, then object categories.
ROOM_CLASSES = ("floor", "ceiling", "wall_west", "wall_east", "wall_south", "wall_north")
SEMANTIC_CLASSES = ROOM_CLASSES + CATEGORIES

_EPS = 1e-4
_MAX_RAYS = 1 << 19  # rays traced per batch
_LIGHT = np.array([0.35, 0.25, 1.0]) / np.linalg.norm([0.35, 0.25, 1.0])
_ROOM_NORMALS = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=np.float32)


@dataclass(frozen=True)
class RenderOptions:
    width: int = 64
    height: int = 64
    hfov_deg: float = DEFAULT_HFOV_DEG
    supersample: int = 2
    tile: float = 0.5  # floor tile size, metres


@dataclass(frozen=True)
class RenderedClip:
    rgb: np.ndarray  # (F, H, W, 3) uint8, RGB order
    depth: np.ndarray  # (F, H, W) float32, z-depth in metres
    semantic: np.ndarray  # (F, H, W) uint8, index into SEMANTIC_CLASSES
    instance: np.ndarray  # (F, H, W) uint8, 0 = room, 1 + object index
    intrinsics: np.ndarray  # (3, 3) for the output size


@dataclass(frozen=True)
class _PackedObject:
    """One object's primitives as arrays, grouped by kind, plus its bounding box."""

    lo: np.ndarray  # (3,) bounding box
    hi: np.ndarray  # (3,)
    semantic: int
    box_lo: np.ndarray  # (B, 3)
    box_hi: np.ndarray  # (B, 3)
    box_rgb: np.ndarray  # (B, 3)
    cyl: np.ndarray  # (C, 5): cx, cy, r, z0, z1
    cyl_rgb: np.ndarray  # (C, 3)
    sph: np.ndarray  # (S, 4): cx, cy, cz, r
    sph_rgb: np.ndarray  # (S, 3)


def _pack_object(obj, semantic: int) -> _PackedObject:
    boxes = [p for p in obj.parts if isinstance(p, Box)]
    cyls = [p for p in obj.parts if isinstance(p, Cylinder)]
    sphs = [p for p in obj.parts if isinstance(p, Sphere)]

    def arr(rows, width):
        return np.asarray(rows, dtype=np.float32).reshape(-1, width)

    lows, highs = [], []
    for b in boxes:
        lows.append(b.lo), highs.append(b.hi)
    for c in cyls:
        lows.append((c.cx - c.radius, c.cy - c.radius, c.z0)), highs.append((c.cx + c.radius, c.cy + c.radius, c.z1))
    for s in sphs:
        lows.append(tuple(np.subtract(s.center, s.radius))), highs.append(tuple(np.add(s.center, s.radius)))
    return _PackedObject(
        lo=np.min(arr(lows, 3), axis=0) - 1e-3, hi=np.max(arr(highs, 3), axis=0) + 1e-3, semantic=semantic,
        box_lo=arr([b.lo for b in boxes], 3), box_hi=arr([b.hi for b in boxes], 3), box_rgb=arr([b.rgb for b in boxes], 3),
        cyl=arr([(c.cx, c.cy, c.radius, c.z0, c.z1) for c in cyls], 5), cyl_rgb=arr([c.rgb for c in cyls], 3),
        sph=arr([(*s.center, s.radius) for s in sphs], 4), sph_rgb=arr([s.rgb for s in sphs], 3),
    )


def _hit_room(o, d, inv, size):
    """Exit distance through the room's faces, and which face (ROOM_CLASSES index)."""
    bound = np.where(d > 0, size, 0.0)  # (N, 3)
    t = (bound - o) * inv  # (N, 3)
    axis = np.argmin(t, axis=1)
    t_hit = np.take_along_axis(t, axis[:, None], axis=1)[:, 0]
    positive = np.take_along_axis(d, axis[:, None], axis=1)[:, 0] > 0
    face = np.select([axis == 2, axis == 0, axis == 1], [np.where(positive, 1, 0), np.where(positive, 3, 2),
                                                         np.where(positive, 5, 4)])
    return t_hit, face


def _slab_entry(o, d, inv, lo, hi):
    """Entry distance into each box (inf on a miss) and the axis entered last.

    o, d, inv: (N, 3); lo, hi: (B, 3) -> (N, B) float, (N, B) int. Axes are
    handled one at a time: numpy reduces over a length-3 axis slowly.
    """
    tnear = tfar = axis = None
    for a in range(3):
        t1 = (lo[:, a] - o[:, a:a + 1]) * inv[:, a:a + 1]  # (N, B)
        t2 = (hi[:, a] - o[:, a:a + 1]) * inv[:, a:a + 1]
        lo_t, hi_t = np.minimum(t1, t2), np.maximum(t1, t2)
        if tnear is None:
            tnear, tfar, axis = lo_t, hi_t, np.zeros(lo_t.shape, np.int8)
        else:
            axis = np.where(lo_t > tnear, np.int8(a), axis)
            tnear, tfar = np.maximum(tnear, lo_t), np.minimum(tfar, hi_t)
    return np.where((tfar >= tnear) & (tnear > _EPS), tnear, np.inf), axis


def _hit_boxes(o, d, inv, lo, hi):
    """Nearest box entry per ray: (t, box index, normal)."""
    n = d.shape[0]
    tnear, entered = _slab_entry(o, d, inv, lo, hi)
    best = np.argmin(tnear, axis=1)  # (N,)
    rows = np.arange(n)
    t = tnear[rows, best]
    axis = entered[rows, best].astype(np.int64)  # face hit = the last slab entered
    normal = np.zeros((n, 3), np.float32)
    normal[rows, axis] = -np.sign(d[rows, axis])
    return t, best, normal


def _hit_cylinders(o, d, cyl):
    """Nearest vertical-cylinder hit per ray (side or caps): (t, index, normal)."""
    n = d.shape[0]
    cx, cy, r, z0, z1 = (cyl[:, i] for i in range(5))  # (C,) each
    rx, ry = o[:, :1] - cx, o[:, 1:2] - cy  # (N, C)
    a = d[:, 0] ** 2 + d[:, 1] ** 2  # (N,)
    b = 2 * (d[:, :1] * rx + d[:, 1:2] * ry)  # (N, C)
    c = rx ** 2 + ry ** 2 - r ** 2  # (N, C)
    disc = b ** 2 - 4 * a[:, None] * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a[:, None])
        z = o[:, 2:3] + t_side * d[:, 2:3]
        t_side = np.where((disc >= 0) & (t_side > _EPS) & (z >= z0) & (z <= z1), t_side, np.inf)
        caps = []
        for zc in (z1, z0):
            t_cap = (zc - o[:, 2:3]) / d[:, 2:3]  # (N, C)
            px = rx + t_cap * d[:, :1]
            py = ry + t_cap * d[:, 1:2]
            caps.append(np.where((t_cap > _EPS) & (px ** 2 + py ** 2 <= r ** 2), t_cap, np.inf))
    flat = np.stack([t_side, caps[0], caps[1]], axis=-1).reshape(n, -1)  # (N, C * 3)
    best = np.argmin(flat, axis=1)
    rows = np.arange(n)
    t = flat[rows, best]
    idx, kind = best // 3, best % 3
    normal = np.zeros((n, 3), np.float32)
    side = (kind == 0) & np.isfinite(t)
    hit = o[side] + t[side, None] * d[side]
    normal[side, 0] = (hit[:, 0] - cx[idx[side]]) / r[idx[side]]
    normal[side, 1] = (hit[:, 1] - cy[idx[side]]) / r[idx[side]]
    normal[kind == 1, 2] = 1.0
    normal[kind == 2, 2] = -1.0
    return t, idx, normal


def _hit_spheres(o, d, sph):
    """Nearest sphere hit per ray: (t, index, normal)."""
    n = d.shape[0]
    centre, r = sph[:, :3], sph[:, 3]
    rel = o[:, None, :] - centre  # (N, S, 3)
    a = (d ** 2).sum(axis=1)  # (N,)
    b = 2 * (rel * d[:, None, :]).sum(axis=2)  # (N, S)
    c = (rel ** 2).sum(axis=2) - r ** 2  # (N, S)
    disc = b ** 2 - 4 * a[:, None] * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a[:, None])
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    best = np.argmin(t, axis=1)
    rows = np.arange(n)
    t = t[rows, best]
    hit = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    normal = (hit - centre[best]) / r[best, None]
    return t, best, np.where(np.isfinite(t)[:, None], normal, 0).astype(np.float32)


def _trace(room_size, room_rgb, objects: list[_PackedObject], o, d, tile: float):
    """Shade rays (origins o, directions d with z_cam = 1): rgb (N, 3), z-depth (N,), semantic, instance."""
    safe = np.where(np.abs(d) < 1e-9, 1e-9, d)
    inv = 1.0 / safe
    t, face = _hit_room(o, d, inv, room_size)
    normal = _ROOM_NORMALS[face]
    rgb = room_rgb[face]
    semantic = face.astype(np.int64)
    instance = np.zeros(len(t), np.int64)

    bbox_t, _ = _slab_entry(o, d, inv, np.stack([ob.lo for ob in objects]), np.stack([ob.hi for ob in objects])) \
        if objects else (np.empty((len(t), 0)), None)
    for k, ob in enumerate(objects):
        rays = np.nonzero(bbox_t[:, k] < t)[0]  # only rays whose path to the nearest hit crosses the bbox
        if rays.size == 0:
            continue
        ro, rd = o[rays], d[rays]
        for kind in ("box", "cyl", "sph"):
            if kind == "box" and len(ob.box_lo):
                tk, ik, nk = _hit_boxes(ro, rd, inv[rays], ob.box_lo, ob.box_hi)
                colours = ob.box_rgb
            elif kind == "cyl" and len(ob.cyl):
                tk, ik, nk = _hit_cylinders(ro, rd, ob.cyl)
                colours = ob.cyl_rgb
            elif kind == "sph" and len(ob.sph):
                tk, ik, nk = _hit_spheres(ro, rd, ob.sph)
                colours = ob.sph_rgb
            else:
                continue
            closer = tk < t[rays]
            sel = rays[closer]
            t[sel] = tk[closer]
            normal[sel] = nk[closer]
            rgb[sel] = colours[ik[closer]]
            semantic[sel] = ob.semantic
            instance[sel] = k + 1

    hit = o + t[:, None] * d
    room_hit = instance == 0
    floor = room_hit & (face == 0)
    checker = (np.floor(hit[:, 0] / tile) + np.floor(hit[:, 1] / tile)) % 2
    rgb[floor] *= np.where(checker[floor] > 0, 0.86, 1.0)[:, None]
    skirting = room_hit & (face >= 2) & (hit[:, 2] < 0.1)
    rgb[skirting] *= 0.55

    view = d / np.linalg.norm(d, axis=1, keepdims=True)
    lambert = np.clip(normal @ _LIGHT, 0, 1)
    headlight = np.clip(-(normal * view).sum(axis=1), 0, 1)
    shade = 0.42 + 0.38 * lambert + 0.25 * headlight
    return np.clip(rgb * shade[:, None], 0, 1), t, semantic, instance


def render_clip(scene: Scene, c2w_room: np.ndarray, options: RenderOptions = RenderOptions()) -> RenderedClip:
    """Render frames for camera-to-room poses ``c2w_room`` (F, 4, 4)."""
    ss = max(int(options.supersample), 1)
    w, h = options.width * ss, options.height * ss
    rays_cam = pixel_rays(intrinsics(w, h, options.hfov_deg), w, h).reshape(-1, 3).astype(np.float32)  # (N, 3)
    room = scene.room
    room_size = np.array([room.width, room.depth, room.height], dtype=np.float32)
    walls = [WALL_COLOURS[c] for c in room.wall_colours]
    room_rgb = np.array([FLOOR_COLOURS[room.floor_colour], CEILING_COLOUR, *walls], dtype=np.float32)
    objects = [_pack_object(o, len(ROOM_CLASSES) + CATEGORIES.index(o.category)) for o in scene.objects]

    frames = c2w_room.shape[0]
    n = rays_cam.shape[0]
    chunk = max(1, _MAX_RAYS // n)  # frames per batch, bounding memory at large sizes
    colour = np.empty((frames * n, 3), np.float32)
    t = np.empty(frames * n, np.float32)
    sem = np.empty(frames * n, np.int64)
    inst = np.empty(frames * n, np.int64)
    for f0 in range(0, frames, chunk):
        f1 = min(frames, f0 + chunk)
        rot = c2w_room[f0:f1, :3, :3].astype(np.float32)  # (f, 3, 3)
        d = (rays_cam[None] @ rot.transpose(0, 2, 1)).reshape(-1, 3)  # (f * N, 3); z_cam = 1: t is z-depth
        o = np.repeat(c2w_room[f0:f1, :3, 3].astype(np.float32), n, axis=0)  # (f * N, 3)
        sl = slice(f0 * n, f1 * n)
        colour[sl], t[sl], sem[sl], inst[sl] = _trace(room_size, room_rgb, objects, o, d, options.tile)

    colour = colour.reshape(frames, h, w, 3).astype(np.float32)
    t = t.reshape(frames, h, w).astype(np.float32)
    rgb = np.empty((frames, options.height, options.width, 3), np.uint8)
    depth = np.empty((frames, options.height, options.width), np.float32)
    for i in range(frames):
        c, z = colour[i], t[i]
        if ss > 1:
            c = cv2.resize(c, (options.width, options.height), interpolation=cv2.INTER_AREA)
            z = cv2.resize(z, (options.width, options.height), interpolation=cv2.INTER_AREA)
        rgb[i] = np.clip(np.rint(c * 255), 0, 255).astype(np.uint8)
        depth[i] = z
    centre = ss // 2
    semantic = sem.reshape(frames, h, w)[:, centre::ss, centre::ss].astype(np.uint8)
    instance = inst.reshape(frames, h, w)[:, centre::ss, centre::ss].astype(np.uint8)
    return RenderedClip(rgb, depth, semantic, instance, intrinsics(options.width, options.height, options.hfov_deg))
