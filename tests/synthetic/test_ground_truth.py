"""Pose conventions and per-token BEV targets."""

import numpy as np
import pytest

from loc3r.synthetic.camera import camera_to_world, intrinsics, quaternion_to_rotation, rotation_to_quaternion
from loc3r.synthetic.ground_truth import BevFrame, bev_token_targets, clip_poses, wrap_degrees
from loc3r.synthetic.trajectory import CameraPath


def _path():
    positions = np.array([[2.0, 1.0, 1.5], [2.5, 1.5, 1.45], [3.0, 2.5, 1.55], [2.0, 3.0, 1.5]])
    return CameraPath(positions, np.array([30.0, 75.0, 160.0, -150.0]), np.array([-10.0, 0.0, -20.0, -5.0]))


def test_camera_axes_are_opencv():
    c2w = camera_to_world(np.zeros(3), 90.0, 0.0)  # looking along +y
    np.testing.assert_allclose(c2w[:3, 2], [0, 1, 0], atol=1e-12)  # z forward
    np.testing.assert_allclose(c2w[:3, 0], [1, 0, 0], atol=1e-12)  # x right
    np.testing.assert_allclose(c2w[:3, 1], [0, 0, -1], atol=1e-12)  # y down
    assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)


def test_first_frame_anchors_both_frames():
    poses = clip_poses(_path())
    np.testing.assert_allclose(poses.c2w_cam0[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(poses.pose7[0], [0, 0, 0, 1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(poses.position_bev[0], [0.0, 0.0, 1.5], atol=1e-12)
    assert poses.heading_deg[0] == 0.0
    # BEV x is the first camera's forward direction on the floor, y to its left.
    fwd = poses.c2w_bev[0, :3, 2]
    assert fwd[0] > 0 and abs(fwd[1]) < 1e-12
    np.testing.assert_allclose(poses.c2w_bev[0, :3, 0], [0, -1, 0], atol=1e-12)  # camera right = BEV -y
    # Headings are room yaws relative to the first camera's, wrapped.
    np.testing.assert_allclose(poses.heading_deg, [0.0, 45.0, 130.0, 180.0], atol=1e-9)
    # Frame 1 moved (0.5, 0.5) in the room: rotate by -30 degrees into the BEV frame.
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    np.testing.assert_allclose(poses.position_bev[1, :2], [c * 0.5 + s * 0.5, -s * 0.5 + c * 0.5], atol=1e-12)


def test_pose_frames_agree_and_quaternions_round_trip():
    poses = clip_poses(_path())
    for i in range(4):
        np.testing.assert_allclose(poses.c2w_bev[0] @ poses.c2w_cam0[i], poses.c2w_bev[i], atol=1e-12)
        q = poses.pose7[i, 3:]
        assert q[0] >= 0 and np.linalg.norm(q) == pytest.approx(1.0)
        np.testing.assert_allclose(quaternion_to_rotation(q), poses.c2w_cam0[i, :3, :3], atol=1e-9)
        np.testing.assert_allclose(poses.pose7[i, :3], poses.c2w_cam0[i, :3, 3], atol=1e-12)


def test_quaternion_branches():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q = q if q[0] >= 0 else -q
        np.testing.assert_allclose(rotation_to_quaternion(quaternion_to_rotation(q)), q, atol=1e-9)
    # 180-degree turns (trace = -1) take the non-trace branches.
    for axis in np.eye(3):
        r = 2 * np.outer(axis, axis) - np.eye(3)
        np.testing.assert_allclose(quaternion_to_rotation(rotation_to_quaternion(r)), r, atol=1e-12)


def test_wrap_degrees():
    np.testing.assert_allclose(wrap_degrees(np.array([-180.0, 180.0, 190.0, -190.0, 540.0, 0.0])),
                               [180.0, 180.0, -170.0, 170.0, 180.0, 0.0])


def test_bev_frame_maps_points():
    bev = BevFrame((1.0, 2.0), 90.0)  # first camera at (1, 2) facing +y
    np.testing.assert_allclose(bev.points(np.array([1.0, 5.0])), [3.0, 0.0], atol=1e-12)  # 3 m ahead
    np.testing.assert_allclose(bev.points(np.array([0.0, 2.0])), [0.0, 1.0], atol=1e-12)  # 1 m to its left
    assert bev.heading(180.0) == pytest.approx(90.0)


@pytest.mark.parametrize("grid", [4, 3])
def test_bev_targets_match_a_pixel_loop(grid):
    rng = np.random.default_rng(1)
    f, h, w = 2, 12, 12
    depth = rng.uniform(0.5, 6.0, (f, h, w)).astype(np.float32)
    depth[0, :3, :3] = np.inf  # an invalid patch: cell (0, 0) of the 4x4 grid has 9 of 9 invalid
    depth[1, 0, 0] = 0.0
    k = intrinsics(w, h)
    poses = clip_poses(_path())
    c2w = poses.c2w_bev[:2]
    targets, valid = bev_token_targets(depth, c2w, k, grid)
    assert targets.shape == (f, grid, grid, 2) and valid.shape == (f, grid, grid)
    for i in range(f):
        for r in range(grid):
            for c in range(grid):
                pts, n_all = [], 0
                for v in range(h):
                    for u in range(w):
                        if v * grid // h != r or u * grid // w != c:
                            continue
                        n_all += 1
                        z = depth[i, v, u]
                        if not (np.isfinite(z) and 0 < z <= 20):
                            continue
                        cam = z * np.array([(u + 0.5 - k[0, 2]) / k[0, 0], (v + 0.5 - k[1, 2]) / k[1, 1], 1.0])
                        pts.append((c2w[i, :3, :3] @ cam + c2w[i, :3, 3])[:2])
                ok = len(pts) >= 0.5 * n_all
                assert valid[i, r, c] == ok
                if ok:
                    np.testing.assert_allclose(targets[i, r, c], np.mean(pts, axis=0), rtol=1e-5, atol=1e-5)
                else:
                    assert np.all(targets[i, r, c] == 0)
    if grid == 4:
        assert not valid[0, 0, 0] and valid[1, 0, 0]
