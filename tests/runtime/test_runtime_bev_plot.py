import cv2
import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.bev_plot import BevScene, draw_bev, patch_colors


def scene(**changes):
    rng = np.random.default_rng(0)
    xy = rng.uniform(-2, 2, (64, 2))
    rgb = np.zeros((64, 3), np.uint8)
    rgb[:32] = (0, 200, 0)  # green tokens
    rgb[32:] = (0, 0, 255)  # blue tokens
    base = dict(token_xy=xy, token_rgb=rgb, trajectory_xy=np.array([[0, 0], [0.5, 0.2], [1.0, 0.1]]),
                agent_xy=(0.5, -1.0), agent_heading_deg=90.0, agent_sigma=0.4, title="test")
    base.update(changes)
    return BevScene(**base)


def test_png_written_with_content(tmp_path):
    path = draw_bev(scene(), tmp_path / "bev.png", size_px=400)
    img = cv2.imread(str(path))  # BGR
    assert img.shape == (400, 400, 3)
    b, g, r = (img[..., i].astype(int) for i in range(3))
    green = (g > 150) & (r < 80) & (b < 80)
    blue = (b > 200) & (r < 80) & (g < 80)
    crimson = (r > 180) & (g < 60) & (b > 30) & (b < 100)  # the agent arrow and circle
    assert green.sum() > 50 and blue.sum() > 50 and crimson.sum() > 30
    non_white = (img.min(axis=2) < 240).mean()
    assert 0.02 < non_white < 0.6


def test_minimal_scene(tmp_path):
    s = scene(trajectory_xy=None, agent_xy=None, agent_heading_deg=None, agent_sigma=None, title="")
    img = cv2.imread(str(draw_bev(s, tmp_path / "bev.png", size_px=300)))
    assert img.shape == (300, 300, 3)
    b, g, r = (img[..., i].astype(int) for i in range(3))
    assert ((r > 180) & (g < 60) & (b < 100)).sum() == 0  # no agent drawn


def test_bad_scene(tmp_path):
    with pytest.raises(Loc3rError, match="64 token positions but 3 colours"):
        draw_bev(scene(token_rgb=np.zeros((3, 3), np.uint8)), tmp_path / "x.png")
    with pytest.raises(Loc3rError, match="folder .* does not exist"):
        draw_bev(scene(), tmp_path / "missing" / "x.png")


def test_patch_colors_row_major():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:20, 20:] = (255, 0, 0)  # top-right quadrant red
    cols = patch_colors(rgb, 2)
    assert cols.shape == (4, 3)
    assert cols[1].tolist() == [255, 0, 0] and cols[0].tolist() == [0, 0, 0] and cols[2].tolist() == [0, 0, 0]
