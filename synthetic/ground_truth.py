"""Ground truth in the paper's frames: BEV poses, pose-prior poses, BEV token targets.

Frames (fixed conventions, relied on by the model and the runtime):

* **BEV frame**: gravity-aligned, anchored at the first camera. Origin at the
  first camera's floor position, x along its forward direction projected on
  the floor, y to its left, z up (height above the floor). Metres. Headings
  are the CCW angle of the horizontal forward direction from +x, in degrees
  wrapped to (-180, 180].
* **Pose-prior frame** (CUT3R): camera-to-world in the first camera's OpenCV
  frame (x right, y down, z forward); frame 0 is the identity. Also given as
  ``[t(3), qw, qx, qy, qz]`` with qw >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loc3r.synthetic.camera import camera_to_world, pixel_rays, rotation_to_quaternion
from loc3r.synthetic.scene import Scene
from loc3r.synthetic.trajectory import CameraPath


def wrap_degrees(angle):
    """Wrap degrees to (-180, 180]."""
    a = np.mod(np.asarray(angle, dtype=np.float64) + 180.0, 360.0) - 180.0
    a = np.where(a == -180.0, 180.0, a)
    return float(a) if np.ndim(a) == 0 else a


@dataclass(frozen=True)
class BevFrame:
    """The room-to-BEV transform: translate by -origin, rotate by -yaw."""

    origin: tuple[float, float]  # first camera's room-frame xy
    yaw_deg: float  # first camera's room-frame heading

    def matrix(self) -> np.ndarray:
        """4x4 room -> BEV (z is unchanged: height above the floor)."""
        c, s = np.cos(np.radians(self.yaw_deg)), np.sin(np.radians(self.yaw_deg))
        rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # R(-yaw)
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = -rot @ np.array([self.origin[0], self.origin[1], 0.0])
        return m

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Room-frame xy (..., 2) -> BEV xy (..., 2)."""
        m = self.matrix()
        xy = np.asarray(xy, dtype=np.float64)
        return xy @ m[:2, :2].T + m[:2, 3]

    def heading(self, room_yaw_deg):
        return wrap_degrees(np.asarray(room_yaw_deg) - self.yaw_deg)


@dataclass(frozen=True)
class ClipPoses:
    """Per-frame camera poses of one clip in every frame that training needs."""

    c2w_room: np.ndarray  # (F, 4, 4) room frame (internal)
    c2w_bev: np.ndarray  # (F, 4, 4) camera (OpenCV axes) -> BEV frame
    c2w_cam0: np.ndarray  # (F, 4, 4) camera -> first camera's OpenCV frame (CUT3R)
    pose7: np.ndarray  # (F, 7) [t(3), qw, qx, qy, qz] of c2w_cam0, qw >= 0
    position_bev: np.ndarray  # (F, 3) camera centre in the BEV frame (z = height)
    heading_deg: np.ndarray  # (F,) BEV heading
    bev: BevFrame


def clip_poses(path: CameraPath) -> ClipPoses:
    c2w_room = np.stack([camera_to_world(p, y, pi) for p, y, pi in zip(path.positions, path.yaw_deg, path.pitch_deg)])
    bev = BevFrame((float(path.positions[0, 0]), float(path.positions[0, 1])), float(path.yaw_deg[0]))
    c2w_bev = bev.matrix()[None] @ c2w_room  # (F, 4, 4)
    c2w_cam0 = np.linalg.inv(c2w_room[0])[None] @ c2w_room
    c2w_cam0[0] = np.eye(4)
    pose7 = np.stack([np.concatenate([m[:3, 3], rotation_to_quaternion(m[:3, :3])]) for m in c2w_cam0])
    return ClipPoses(c2w_room, c2w_bev, c2w_cam0, pose7, c2w_bev[:, :3, 3].copy(),
                     bev.heading(path.yaw_deg), bev)


def backproject_to_bev(depth: np.ndarray, c2w_bev: np.ndarray, k: np.ndarray) -> np.ndarray:
    """BEV xyz of every pixel: depth (F, H, W) z-depth, c2w_bev (F, 4, 4) -> (F, H, W, 3)."""
    f, h, w = depth.shape
    rays = pixel_rays(k, w, h)  # (H, W, 3), z = 1
    cam = rays[None] * depth[..., None]  # (F, H, W, 3)
    world = cam.reshape(f, -1, 3) @ c2w_bev[:, :3, :3].transpose(0, 2, 1) + c2w_bev[:, None, :3, 3]  # (F, HW, 3)
    return world.reshape(f, h, w, 3)


def bev_token_targets(depth: np.ndarray, c2w_bev: np.ndarray, k: np.ndarray, grid: int,
                      max_depth: float = 20.0, min_valid: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-token BEV targets over a ``grid`` x ``grid`` pooling of the image.

    For each cell, the mean BEV (x, y) of the back-projected pixels with a
    finite depth in (0, max_depth]. A cell is valid when at least
    ``min_valid`` of its pixels are. Returns targets (F, G, G, 2) float32
    (row-major: cell [r, c] covers image rows r*H/G.. and columns c*W/G..)
    and valid (F, G, G) bool.
    """
    f, h, w = depth.shape
    ok = np.isfinite(depth) & (depth > 0) & (depth <= max_depth)  # (F, H, W)
    pts = backproject_to_bev(np.where(ok, depth, 0.0), c2w_bev, k)[..., :2]  # (F, H, W, 2)
    pts = np.where(ok[..., None], pts, 0.0)
    rows = (np.arange(h) * grid) // h  # cell row of each pixel row
    cols = (np.arange(w) * grid) // w
    cell = (rows[:, None] * grid + cols[None, :]).ravel()  # (H * W,)
    targets = np.zeros((f, grid * grid, 2))
    valid_frac = np.zeros((f, grid * grid))
    pix_per_cell = np.bincount(cell, minlength=grid * grid)
    for i in range(f):
        cnt = np.bincount(cell, weights=ok[i].ravel(), minlength=grid * grid)
        for c in range(2):
            targets[i, :, c] = np.bincount(cell, weights=pts[i, ..., c].ravel(), minlength=grid * grid)
        targets[i] /= np.maximum(cnt, 1)[:, None]
        valid_frac[i] = cnt / pix_per_cell
    valid = valid_frac >= min_valid
    targets = np.where(valid[..., None], targets, 0.0)
    return targets.reshape(f, grid, grid, 2).astype(np.float32), valid.reshape(f, grid, grid)


def scene_in_bev(scene: Scene, bev: BevFrame) -> dict:
    """The room and object list in the BEV frame, JSON-ready."""
    room = scene.room
    corners = bev.points(np.array([[0, 0], [room.width, 0], [room.width, room.depth], [0, room.depth]]))
    objects = []
    for i, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.footprint
        foot = bev.points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
        top = max(p.hi[2] if hasattr(p, "hi") else (p.z1 if hasattr(p, "z1") else p.center[2] + p.radius)
                  for p in o.parts)
        objects.append({
            "index": i,
            "name": o.name,
            "category": o.category,
            "colour": o.colour,
            "center": [round(float(v), 4) for v in bev.points(np.array(o.center))],
            "facing_deg": round(float(bev.heading(o.facing_deg)), 3),
            "size": [round(float(s), 4) for s in o.size],
            "height_top": round(float(top), 4),
            "footprint": [[round(float(a), 4), round(float(b), 4)] for a, b in foot],
        })
    return {
        "scene_id": scene.scene_id,
        "seed": scene.seed,
        "room": {
            "width": room.width,
            "depth": room.depth,
            "height": room.height,
            "area": round(room.area, 4),
            "wall_colours": list(room.wall_colours),
            "floor_colour": room.floor_colour,
            "corners": [[round(float(a), 4), round(float(b), 4)] for a, b in corners],
            "center": [round(float(v), 4) for v in corners.mean(axis=0)],
        },
        "objects": objects,
    }
