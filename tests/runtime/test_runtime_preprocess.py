import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.preprocess import (
    crop_for_pose,
    preprocess_pose,
    preprocess_pose_batch,
    preprocess_vision,
    preprocess_vision_batch,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)


def test_vision_constant_image_normalisation():
    rgb = np.full((30, 50, 3), (255, 0, 128), np.uint8)
    x = preprocess_vision(rgb, 16, MEAN, STD)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    want = (np.array([255, 0, 128]) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[:, 5, 7], want, atol=1e-6)


def test_vision_direct_resize_keeps_layout():
    # Left half red, right half blue: a direct resize (no crop) keeps both halves.
    rgb = np.zeros((20, 80, 3), np.uint8)
    rgb[:, :40, 0] = 255
    rgb[:, 40:, 2] = 255
    x = preprocess_vision(rgb, 8, (0, 0, 0), (1, 1, 1))
    assert x[0, :, :3].min() > 0.99 and x[2, :, :3].max() < 0.01
    assert x[2, :, 5:].min() > 0.99 and x[0, :, 5:].max() < 0.01


def test_grayscale_and_rgba_accepted():
    gray = np.full((10, 12), 200, np.uint8)
    rgba = np.full((10, 12, 4), 200, np.uint8)
    a = preprocess_vision(gray, 8, MEAN, STD)
    b = preprocess_vision(rgba, 8, MEAN, STD)
    np.testing.assert_array_equal(a, b)


def test_pose_geometry_landscape():
    # 300x400 (h, w) -> long side 48 -> 36x48 -> crop to multiple of 16: 32x48.
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[:, :, 1] = np.arange(400, dtype=np.float64)[None, :] * 255 / 399
    out = crop_for_pose(rgb, 32, 48, 16)
    assert out.shape == (32, 48, 3)
    # Horizontal gradient survives without a horizontal crop: first column dark, last bright.
    assert out[16, 0, 1] < 10 and out[16, -1, 1] > 245


def test_pose_geometry_centre_crop():
    # Square 64x64 -> 48x48 -> vertical centre crop to 32: rows 8..40 of the 48 kept.
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:16] = 255  # top quarter white -> top 12 rows at 48 px, 8 of them cropped away
    out = crop_for_pose(rgb, 32, 48, 16)
    assert out.shape == (32, 48, 3)
    assert out[0, 24, 0] > 200 and out[2, 24, 0] > 200  # rows 8..11 of the 48 were white
    assert out[10, 24, 0] == 0


def test_pose_portrait_is_padded_to_exact_shape():
    out = preprocess_pose(np.full((400, 100, 3), 50, np.uint8), 32, 48, MEAN, STD, 16)
    assert out.shape == (3, 32, 48)
    assert np.isfinite(out).all()


def test_pose_rejects_non_multiple():
    with pytest.raises(Loc3rError) as e:
        preprocess_pose(np.zeros((8, 8, 3), np.uint8), 30, 48, MEAN, STD, 16)
    assert str(e.value) == "pose prior input 30x48 is not a multiple of patch 16"


def test_batches_match_single():
    frames = [np.random.default_rng(i).integers(0, 255, (24, 40, 3), dtype=np.uint8) for i in range(3)]
    vb = preprocess_vision_batch(frames, 16, MEAN, STD)
    pb = preprocess_pose_batch(frames, 32, 48, MEAN, STD, 16)
    assert vb.shape == (3, 3, 16, 16) and pb.shape == (3, 3, 32, 48)
    np.testing.assert_array_equal(vb[1], preprocess_vision(frames[1], 16, MEAN, STD))
    np.testing.assert_array_equal(pb[2], preprocess_pose(frames[2], 32, 48, MEAN, STD, 16))
    assert preprocess_vision_batch([], 16, MEAN, STD).shape == (0, 3, 16, 16)


def test_bad_frame():
    with pytest.raises(Loc3rError, match="uint8"):
        preprocess_vision(np.zeros((4, 4, 3), np.float32), 8, MEAN, STD)


def test_previous_frame_pairs_match_the_model():
    """The runtime's per-frame pairing equals the model's whole-clip pairing (first frame with itself)."""
    torch = pytest.importorskip("torch")
    from loc3r.model.pose_prior import with_previous_frames
    from loc3r.runtime.preprocess import with_previous_frame

    clip = np.random.default_rng(0).standard_normal((1, 4, 3, 8, 8)).astype(np.float32)
    ref = with_previous_frames(torch.from_numpy(clip)).numpy()
    assert ref.shape == (1, 4, 6, 8, 8)
    previous = None
    for t in range(4):
        got = with_previous_frame(clip[:, t], previous)
        previous = clip[:, t]
        np.testing.assert_array_equal(got, ref[:, t])
    np.testing.assert_array_equal(ref[0, 0, 3:], clip[0, 0])
    np.testing.assert_array_equal(ref[0, 2, 3:], clip[0, 1])
