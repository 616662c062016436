"""Loc3R training objectives (paper-notes.md, "Training objectives").

- L_BEV, L_pos: Gaussian negative log-likelihood, per coordinate
  1/2 [(x - x^)^2 / s^2 + log s^2] summed over x and y (constant log 2*pi dropped).
- L_ori: KL(target || predicted) over the heading bins, the target being a
  wrapped Gaussian centred on the true heading (sigma ~ 1 bin by default).
- L_total = L_CE + 0.05 L_BEV + 0.075 (L_pos + 3.5 L_ori).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    bev: float = 0.05
    loc: float = 0.075  # multiplies (L_pos + ori_in_loc * L_ori)
    ori_in_loc: float = 3.5
    # Standard deviation of the wrapped-Gaussian orientation target, in bins.
    ori_target_sigma_bins: float = 1.0


def gaussian_nll_2d(pred_xy: torch.Tensor, sigma: torch.Tensor, target_xy: torch.Tensor) -> torch.Tensor:
    """Per-item 2D Gaussian NLL.

    pred_xy, target_xy: (..., 2); sigma: (..., 2) for (sigma_x, sigma_y) or (..., 1)
    for one isotropic sigma. Returns (...).
    """
    var = sigma.expand_as(pred_xy).pow(2)  # (..., 2)
    return 0.5 * ((target_xy - pred_xy).pow(2) / var + var.log()).sum(-1)


def position_loss(pos_pred: torch.Tensor, target_xy: torch.Tensor) -> torch.Tensor:
    """L_pos, mean over the batch. pos_pred (B, 3) = (x, y, sigma); target_xy (B, 2)."""
    return gaussian_nll_2d(pos_pred[..., :2], pos_pred[..., 2:3], target_xy).mean()


def bev_loss(bev_pred: torch.Tensor, target_xy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_BEV, mean over vision tokens. bev_pred (..., 4) = (x, y, sx, sy); target_xy (..., 2);
    valid (...) bool marks tokens with ground truth (all when None)."""
    nll = gaussian_nll_2d(bev_pred[..., :2], bev_pred[..., 2:4], target_xy)  # (...)
    if valid is None:
        return nll.mean()
    w = valid.to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp_min(1.0)


def wrapped_gaussian_target(angle: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """Bin probabilities (..., B) of a Gaussian on the circle centred on ``angle`` (...) radians.

    p_b is proportional to sum_k exp(-(theta_b - angle + 2 pi k)^2 / (2 sigma^2)), k = -2..2.
    """
    diff = centres.to(angle.dtype)[None, :] - angle.reshape(-1, 1)  # (N, B)
    diff = torch.remainder(diff + math.pi, 2 * math.pi) - math.pi  # wrapped to [-pi, pi)
    shifts = 2 * math.pi * torch.arange(-2, 3, dtype=angle.dtype, device=angle.device)  # (5,)
    dens = torch.exp(-(diff[..., None] + shifts).pow(2) / (2 * sigma**2)).sum(-1)  # (N, B)
    probs = dens / dens.sum(-1, keepdim=True)
    return probs.reshape(*angle.shape, centres.shape[0])


def orientation_loss(logits: torch.Tensor, target_angle: torch.Tensor, centres: torch.Tensor,
                     sigma: float) -> torch.Tensor:
    """L_ori = KL(target || softmax(logits)), mean over the batch. logits (B, nb); target_angle (B,)."""
    target = wrapped_gaussian_target(target_angle.float(), centres.float(), sigma)  # (B, nb)
    log_pred = F.log_softmax(logits.float(), dim=-1)
    # Bins with zero target mass contribute exactly 0, even where log_pred is -inf.
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_pred), torch.zeros_like(target))
    return terms.sum(-1).mean()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """L_CE: logits (B, T, V) predict labels shifted by one; labels (B, T) with ignore_index masked."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index)


def total_loss(ce: torch.Tensor, bev: torch.Tensor, pos: torch.Tensor, ori: torch.Tensor,
               weights: LossWeights = LossWeights()) -> torch.Tensor:
    """L_CE + w_bev L_BEV + w_loc (L_pos + ori_in_loc L_ori)."""
    return ce + weights.bev * bev + weights.loc * (pos + weights.ori_in_loc * ori)
