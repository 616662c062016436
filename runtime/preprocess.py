"""The one preprocessing implementation: RGB uint8 frames -> normalised float32 CHW.

Runtime, calibration and synthetic data all call these functions, so a model
sees exactly the same pixels in training, calibration and deployment.

- Vision tower (SigLIP, as LLaVA-Video feeds it): a direct resize of the whole
  frame to ``size x size`` (aspect ratio not kept, nothing cropped), as the
  SigLIP image processor does (no centre crop). SigLIP resamples with PIL
  bicubic, which is anti-aliased when shrinking; OpenCV's bicubic is not, so
  we shrink with INTER_AREA (anti-aliased) and enlarge with INTER_CUBIC. The
  exported model is calibrated and trained through this function, so it is
  the reference. Then ``(x / 255 - mean) / std``.
- Pose prior (CUT3R's 512 preprocessing): resize so the long side equals the
  target width (INTER_AREA when shrinking, the anti-aliased choice; CUT3R
  uses PIL LANCZOS; bicubic when enlarging), centre-crop each side down to a
  multiple of ``patch``, then, because the exported graph has a static input,
  centre-crop (or edge-pad, for portrait frames) to exactly
  ``(height, width)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from loc3r.errors import Loc3rError


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise Loc3rError("a frame must be a uint8 numpy array")
    if rgb.ndim == 2:  # grayscale
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3, 4):
        raise Loc3rError(f"a frame must be HxWx3 RGB, got shape {tuple(rgb.shape)}")
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    elif rgb.shape[2] == 4:
        rgb = rgb[:, :, :3]
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise Loc3rError(f"a frame must not be empty, got shape {tuple(rgb.shape)}")
    return rgb


def _normalize_chw(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = rgb.astype(np.float32) * np.float32(1.0 / 255.0)  # (H, W, 3)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    shrinking = width * height < w * h
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=interp)


def preprocess_vision(
    rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """One frame for the vision tower: float32 (3, size, size).

    Direct resize to ``size x size`` (area when shrinking, bicubic when
    enlarging), then ``(x/255 - mean) / std``.
    """
    rgb = _resize(_check_rgb(rgb), size, size)
    return _normalize_chw(rgb, mean, std)  # (3, size, size)


def crop_for_pose(rgb: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """The CUT3R-style geometric part of :func:`preprocess_pose`: uint8 (height, width, 3)."""
    rgb = _check_rgb(rgb)
    if height % patch or width % patch:
        raise Loc3rError(f"pose prior input {height}x{width} is not a multiple of patch {patch}")
    h, w = rgb.shape[:2]
    # Long side to the target width (CUT3R's "512" rule).
    scale = width / max(h, w)
    nw, nh = max(patch, round(w * scale)), max(patch, round(h * scale))
    img = _resize(rgb, nw, nh)
    # Centre crop each side down to a multiple of the patch size.
    cw, ch = nw - nw % patch, nh - nh % patch
    x0, y0 = (nw - cw) // 2, (nh - ch) // 2
    img = img[y0 : y0 + ch, x0 : x0 + cw]
    # The graph has a static input: centre crop or zero-pad (edge-replicate)
    # to exactly (height, width).
    return _fit_exact(img, height, width)


def _fit_exact(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h > height:
        y0 = (h - height) // 2
        img = img[y0 : y0 + height]
    if w > width:
        x0 = (w - width) // 2
        img = img[:, x0 : x0 + width]
    h, w = img.shape[:2]
    if (h, w) != (height, width):
        top, left = (height - h) // 2, (width - w) // 2
        img = cv2.copyMakeBorder(
            img, top, height - h - top, left, width - w - left, cv2.BORDER_REPLICATE
        )
    return np.ascontiguousarray(img)


def preprocess_pose(
    rgb: np.ndarray,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    patch: int,
) -> np.ndarray:
    """One frame for the pose prior: float32 (3, height, width).

    Long side resized to ``width``, centre-cropped to multiples of ``patch``,
    then centre-cropped (or edge-padded, for tall frames) to exactly
    ``(height, width)``; then ``(x/255 - mean) / std``.
    """
    return _normalize_chw(crop_for_pose(rgb, height, width, patch), mean, std)


def preprocess_vision_batch(
    frames: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """float32 (N, 3, size, size)."""
    if len(frames) == 0:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack([preprocess_vision(f, size, mean, std) for f in frames])


def preprocess_pose_batch(
    frames: Sequence[np.ndarray],
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    patch: int,
) -> np.ndarray:
    """float32 (N, 3, height, width)."""
    if len(frames) == 0:
        return np.zeros((0, 3, height, width), np.float32)
    return np.stack([preprocess_pose(f, height, width, mean, std, patch) for f in frames])


def with_previous_frame(current: np.ndarray, previous: Optional[np.ndarray]) -> np.ndarray:
    """Pose image with the previous frame on 3 more channels: (..., 3, H, W) x2 -> (..., 6, H, W).

    ``previous`` is None on a stream's first frame, which is paired with itself (the model's
    ``with_previous_frames``)."""
    return np.concatenate((current, current if previous is None else previous), axis=-3)


class PoseStream:
    """The pose prior's input for each frame of one stream, as the graph takes it: (1, C, H, W).

    ``spec`` is a manifest's ``PosePriorSpec``; with ``spec.previous_frame`` each frame is
    paired with the one before (:func:`with_previous_frame`). The session and the
    calibration reader both build pose inputs through this class.
    """

    def __init__(self, spec):
        self.spec = spec
        self._previous: Optional[np.ndarray] = None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        p = self.spec
        x = preprocess_pose(rgb, p.img_height, p.img_width, p.mean, p.std, p.patch_size)[None]
        if not p.previous_frame:
            return x
        out = with_previous_frame(x, self._previous)
        self._previous = x
        return out
