"""Loc3R heads: f_cam, f_pos, f_ori, f_proj, and the circular soft-argmax.

All four are 2-layer MLPs (Linear -> GELU -> Linear). The three output heads
read final-normed last-layer hidden states of the LLM.

Orientation bins: ``B`` bins of width 2*pi/B whose centres are
``theta_b = -pi + 2*pi*b/B`` for b = 0..B-1 (for 36 bins: -180, -170, ...,
170 degrees). Headings are radians, wrapped to [-pi, pi); heading 0 is the
centre of bin B/2. :func:`orientation_bin_centres` is the one definition; the
model package manifest carries the same numbers.

Gaussian heads predict a standard deviation through
``softplus(raw) + MIN_SIGMA`` so it is always positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIGMA = 1e-3


def orientation_bin_centres(num_bins: int) -> torch.Tensor:
    """(num_bins,) float32 radians: -pi + 2*pi*b/num_bins."""
    return -math.pi + 2 * math.pi * torch.arange(num_bins, dtype=torch.float64).float() / num_bins


def orientation_bin_centres_deg(num_bins: int) -> list[float]:
    """The bin centres in degrees as plain floats, for the runtime manifest."""
    return [-180.0 + 360.0 * b / num_bins for b in range(num_bins)]


def circular_soft_argmax(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Heading from bin logits (..., B): atan2(sum p sin theta, sum p cos theta), radians in [-pi, pi]."""
    p = torch.softmax(logits.float(), dim=-1)  # (..., B)
    c = centres.to(p.device, p.dtype)
    return torch.atan2((p * torch.sin(c)).sum(-1), (p * torch.cos(c)).sum(-1))


def positive_sigma(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw) + MIN_SIGMA


class TwoLayerMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CameraTokenHead(TwoLayerMLP):
    """f_cam: pose-prior camera token (..., Dd) -> LLM embedding (..., H)."""


class PositionHead(nn.Module):
    """f_pos: <Pos> hidden (..., H) -> (..., 3) = (x, y, sigma), sigma > 0, metres."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.mlp = TwoLayerMLP(hidden_size, mlp_hidden, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h)
        return torch.cat((out[..., :2], positive_sigma(out[..., 2:])), dim=-1)


class OrientationHead(nn.Module):
    """f_ori: <Ori> hidden (..., H) -> (..., num_bins) logits over heading bins."""

    def __init__(self, hidden_size: int, mlp_hidden: int, num_bins: int):
        super().__init__()
        self.mlp = TwoLayerMLP(hidden_size, mlp_hidden, num_bins)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)


class BevProjectionHead(nn.Module):
    """f_proj: vision-token hidden (..., H) -> (..., 4) = (x, y, sigma_x, sigma_y), sigmas > 0."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.mlp = TwoLayerMLP(hidden_size, mlp_hidden, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h)
        return torch.cat((out[..., :2], positive_sigma(out[..., 2:])), dim=-1)
