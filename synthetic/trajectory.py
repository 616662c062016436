"""Scan-like camera walks through a room, like a person filming it.

The camera walks through free floor space (a clearance map keeps it away
from walls and furniture) along waypoints that circle the room, at about
1.5 m height. It looks roughly towards the room's middle while panning left
and right, and tilts down by varying amounts. Poses are returned in the
room frame (see :mod:`loc3r.synthetic.scene`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from loc3r.errors import Loc3rError
from loc3r.synthetic.scene import Scene


@dataclass(frozen=True)
class TrajectoryOptions:
    frames: int = 16
    clearance: float = 0.4  # metres from walls and object footprints
    grid: float = 0.1  # clearance-map cell, metres
    height: tuple[float, float] = (1.4, 1.6)
    pitch_deg: tuple[float, float] = (-25.0, -5.0)
    # Room-relative radius of the circle the waypoints follow.
    orbit: tuple[float, float] = (0.15, 0.35)
    # Preferred free view ahead, metres (walls and tall furniture block it).
    min_view: float = 1.5


@dataclass(frozen=True)
class CameraPath:
    """Per-frame camera state in the room frame."""

    positions: np.ndarray  # (F, 3) metres
    yaw_deg: np.ndarray  # (F,) horizontal forward direction, CCW from +x
    pitch_deg: np.ndarray  # (F,) negative looks down


def free_space(scene: Scene, clearance: float, grid: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean map (ny, nx) of cells whose centres keep ``clearance``, and the cell centres' xy (ny, nx, 2)."""
    room = scene.room
    nx, ny = max(int(round(room.width / grid)), 1), max(int(round(room.depth / grid)), 1)
    occ = np.full((ny + 2, nx + 2), 255, np.uint8)  # one-cell wall border
    occ[0, :] = occ[-1, :] = occ[:, 0] = occ[:, -1] = 0
    xs = (np.arange(nx) + 0.5) * room.width / nx
    ys = (np.arange(ny) + 0.5) * room.depth / ny
    gx, gy = np.meshgrid(xs, ys)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.footprint
        inside = (gx >= x0) & (gx <= x1) & (gy >= y0) & (gy <= y1)
        occ[1:-1, 1:-1][inside] = 0
    dist = cv2.distanceTransform(occ, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1] * grid
    # The border cell sits half a cell outside the wall.
    return dist >= clearance + grid / 2, np.stack([gx, gy], axis=-1)


def _largest_component(free: np.ndarray) -> np.ndarray:
    n, labels = cv2.connectedComponents(free.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(free)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def _grid_path(mask: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """Shortest 8-connected path of cells inside ``mask`` (BFS)."""
    if start == goal:
        return [start]
    ny, nx = mask.shape
    parent = {start: start}
    queue = deque([start])
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    while queue:
        cur = queue.popleft()
        if cur == goal:
            break
        for dy, dx in steps:
            nxt = (cur[0] + dy, cur[1] + dx)
            if 0 <= nxt[0] < ny and 0 <= nxt[1] < nx and mask[nxt] and nxt not in parent:
                parent[nxt] = cur
                queue.append(nxt)
    path = [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


def _straight_is_free(mask: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    n = int(max(abs(a[0] - b[0]), abs(a[1] - b[1]))) * 2 + 2
    rows = np.rint(np.linspace(a[0], b[0], n)).astype(int)
    cols = np.rint(np.linspace(a[1], b[1], n)).astype(int)
    return bool(mask[rows, cols].all())


def view_depth(scene: Scene, xy: np.ndarray, yaw_deg: float, min_height: float = 1.0) -> float:
    """Floor-plan distance from ``xy`` along ``yaw`` to a wall or an object at least ``min_height`` tall."""
    d = np.array([np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))])
    safe = np.where(np.abs(d) < 1e-9, 1e-9, d)
    room = np.array([scene.room.width, scene.room.depth])
    best = float(np.min((np.where(d > 0, room, 0.0) - xy) / safe))
    for obj in scene.objects:
        if obj.size[2] < min_height or obj.category == "lamp":  # low or thin: the view passes over / by it
            continue
        lo, hi = np.array(obj.footprint[:2]), np.array(obj.footprint[2:])
        t1, t2 = (lo - xy) / safe, (hi - xy) / safe
        near, far = float(np.max(np.minimum(t1, t2))), float(np.min(np.maximum(t1, t2)))
        if near <= far and near > 0:
            best = min(best, near)
    return best


def _open_yaw(scene: Scene, xy: np.ndarray, yaw: float, want: float) -> float:
    """``yaw``, or the nearest yaw (10-degree steps) whose view reaches ``want`` metres."""
    for step in range(0, 19):
        for sign in ((1,) if step == 0 else (1, -1)):
            cand = yaw + sign * 10.0 * step
            if view_depth(scene, xy, cand) >= want:
                return cand
    return yaw


def _resample(points: np.ndarray, count: int) -> np.ndarray:
    """``count`` points equally spaced by arc length along a polyline (P, 2)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] <= 1e-9:
        return np.repeat(points[:1], count, axis=0)
    s = np.linspace(0.0, arc[-1], count)
    return np.stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])], axis=1)


def sample_camera_path(scene: Scene, rng: np.random.Generator, options: TrajectoryOptions = TrajectoryOptions()) -> CameraPath:
    """A walk with turns through the room's free space."""
    room = scene.room
    free, centres = free_space(scene, options.clearance, options.grid)
    mask = _largest_component(free)
    if mask.sum() < 4:
        raise Loc3rError(f"scene {scene.scene_id} has no free floor space for a camera walk")
    cells = np.argwhere(mask)  # (M, 2) rows, cols
    cell_xy = centres[cells[:, 0], cells[:, 1]]  # (M, 2)

    middle = np.array([room.width / 2, room.depth / 2])
    radius = np.array([room.width, room.depth]) * rng.uniform(*options.orbit)
    waypoints = int(rng.integers(3, 6))
    start = rng.uniform(0, 2 * np.pi)
    sweep = rng.choice([-1.0, 1.0]) * rng.uniform(np.pi * 0.8, np.pi * 1.7)
    angles = start + sweep * np.linspace(0, 1, waypoints)
    targets = middle + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    targets += rng.normal(0, 0.2, targets.shape)

    snapped = [tuple(cells[int(np.argmin(np.linalg.norm(cell_xy - t, axis=1)))]) for t in targets]
    route: list[tuple[int, int]] = [snapped[0]]
    for a, b in zip(snapped[:-1], snapped[1:]):
        leg = [a, b] if _straight_is_free(mask, a, b) else _grid_path(mask, a, b)
        route.extend(leg[1:])
    xy = centres[[r[0] for r in route], [r[1] for r in route]]  # (P, 2)
    xy = _resample(xy, options.frames)
    if np.linalg.norm(xy[-1] - xy[0]) < 1e-6 and len(cells) > 1:
        # Degenerate walk (a tiny free patch): drift to the farthest free cell.
        far = cell_xy[int(np.argmax(np.linalg.norm(cell_xy - xy[0], axis=1)))]
        xy = _resample(np.stack([xy[0], far]), options.frames)

    t = np.linspace(0.0, 1.0, options.frames)
    # Look towards the room's middle, panning left and right around it.
    to_middle = middle - xy
    base = np.degrees(np.arctan2(to_middle[:, 1], to_middle[:, 0]))
    far_enough = np.linalg.norm(to_middle, axis=1) > 0.6
    travel = np.diff(xy, axis=0, prepend=xy[:1] - (xy[1:2] - xy[:1]))
    travel_dir = np.degrees(np.arctan2(travel[:, 1], travel[:, 0]))
    base = np.where(far_enough, base, travel_dir)
    base = np.degrees(np.unwrap(np.radians(base)))
    pan = rng.uniform(25, 60) * np.sin(2 * np.pi * (rng.uniform(0.6, 1.4) * t + rng.uniform(0, 1)))
    yaw = base + pan + rng.normal(0, 3, options.frames)
    # Do not film a wall or a cabinet from up close: turn to the nearest open view.
    yaw = np.array([_open_yaw(scene, xy[i], yaw[i], options.min_view) for i in range(options.frames)])
    yaw = np.degrees(np.unwrap(np.radians(yaw)))
    # Smooth (a person turns gradually): moving average over 3 frames.
    if options.frames >= 3:
        padded = np.concatenate([yaw[:1], yaw, yaw[-1:]])
        yaw = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
    yaw = (yaw + 180.0) % 360.0 - 180.0

    lo, hi = options.pitch_deg
    pitch = (lo + hi) / 2 + (hi - lo) / 2 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.0) * t + rng.uniform(0, 1)))
    height = rng.uniform(*options.height) + 0.02 * np.sin(2 * np.pi * 3 * t)
    positions = np.concatenate([xy, height[:, None]], axis=1)
    return CameraPath(positions.astype(np.float64), yaw.astype(np.float64), pitch.astype(np.float64))
