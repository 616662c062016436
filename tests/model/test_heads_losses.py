"""Circular soft-argmax, Gaussian heads and the Loc3R losses on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loc3r.model.heads import (MIN_SIGMA, BevProjectionHead, PositionHead, circular_soft_argmax,
                               orientation_bin_centres, orientation_bin_centres_deg)
from loc3r.model.losses import (LossWeights, bev_loss, gaussian_nll_2d, next_token_loss, orientation_loss,
                                position_loss, total_loss, wrapped_gaussian_target)

CENTRES = orientation_bin_centres(36)
DEG = math.pi / 180


def peaked(*bins: int, n: int = 36, height: float = 30.0) -> torch.Tensor:
    logits = torch.zeros(n)
    logits[list(bins)] = height
    return logits


def test_bin_centres_are_ten_degrees_from_minus_180():
    assert CENTRES.shape == (36,)
    assert CENTRES[0].item() == pytest.approx(-math.pi)
    assert CENTRES[18].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(CENTRES.diff(), torch.full((35,), 10 * DEG))
    assert orientation_bin_centres_deg(36)[:3] == [-180.0, -170.0, -160.0]
    assert np.allclose(np.deg2rad(orientation_bin_centres_deg(36)), CENTRES.numpy())


@pytest.mark.parametrize("b", [0, 5, 18, 27, 35])
def test_soft_argmax_of_a_peak_is_its_centre(b):
    angle = circular_soft_argmax(peaked(b), CENTRES).item()
    expected = CENTRES[b].item()
    assert math.isclose(math.cos(angle), math.cos(expected), abs_tol=1e-5)
    assert math.isclose(math.sin(angle), math.sin(expected), abs_tol=1e-5)


def test_soft_argmax_wraps_around_180():
    # Equal mass on 170 deg and -180 deg: the circular mean is 175 deg, not the linear mean -5 deg.
    assert circular_soft_argmax(peaked(35, 0), CENTRES).item() == pytest.approx(175 * DEG, abs=1e-5)
    # Equal mass on -170 and 170: +-180 deg.
    assert abs(circular_soft_argmax(peaked(1, 35), CENTRES).item()) == pytest.approx(math.pi, abs=1e-5)
    # Equal mass on -10 and 10: 0.
    assert circular_soft_argmax(peaked(17, 19), CENTRES).item() == pytest.approx(0.0, abs=1e-5)


def test_soft_argmax_is_batched():
    logits = torch.stack([peaked(9), peaked(27)])  # -90, 90 deg
    assert torch.allclose(circular_soft_argmax(logits, CENTRES), torch.tensor([-90 * DEG, 90 * DEG]), atol=1e-5)


def test_gaussian_heads_give_positive_sigmas():
    torch.manual_seed(0)
    pos, bev = PositionHead(8, 16), BevProjectionHead(8, 16)
    h = torch.randn(5, 8) * 100
    p, b = pos(h), bev(h)
    assert p.shape == (5, 3) and b.shape == (5, 4)
    assert (p[:, 2] >= MIN_SIGMA).all() and (b[:, 2:] >= MIN_SIGMA).all()


def test_gaussian_nll_hand_values():
    pred = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[1.0, 2.0]])
    # Anisotropic: 1/2 [1/1 + log 1 + 4/4 + log 4]
    assert gaussian_nll_2d(pred, torch.tensor([[1.0, 2.0]]), target).item() == pytest.approx(0.5 * (2 + math.log(4)))
    # Isotropic sigma 2: 1/2 [1/4 + 4/4 + 2 log 4]
    expected = 0.5 * (0.25 + 1 + 2 * math.log(4))
    assert position_loss(torch.tensor([[0.0, 0.0, 2.0]]), target).item() == pytest.approx(expected)


def test_bev_loss_averages_valid_tokens_only():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert bev_loss(pred, target, torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert bev_loss(pred, target).item() == pytest.approx((1.0 + 25.0) / 2)


def brute_wrapped_gaussian(angle: float, sigma: float) -> np.ndarray:
    c = CENTRES.double().numpy()
    dens = sum(np.exp(-(c - angle + 2 * np.pi * k) ** 2 / (2 * sigma**2)) for k in range(-5, 6))
    return dens / dens.sum()


@pytest.mark.parametrize("angle_deg", [0.0, 42.0, 179.0, -180.0, 180.0, -175.0])
def test_wrapped_gaussian_target_matches_brute_force(angle_deg):
    got = wrapped_gaussian_target(torch.tensor(angle_deg * DEG, dtype=torch.float64), CENTRES.double(), 10 * DEG)
    assert got.sum().item() == pytest.approx(1.0)
    assert np.allclose(got.numpy(), brute_wrapped_gaussian(angle_deg * DEG, 10 * DEG), atol=1e-9)


def test_wrapped_gaussian_target_is_symmetric_across_180():
    t = wrapped_gaussian_target(torch.tensor([math.pi]), CENTRES, 10 * DEG)[0]
    assert t.argmax().item() == 0  # -180 is +180
    assert t[1].item() == pytest.approx(t[35].item(), rel=1e-5)  # -170 and 170 equally likely


def test_orientation_loss_is_kl_to_the_wrapped_target():
    sigma = 10 * DEG
    angle = torch.tensor([178 * DEG])
    target = wrapped_gaussian_target(angle, CENTRES, sigma)
    assert orientation_loss(target.log(), angle, CENTRES, sigma).item() == pytest.approx(0.0, abs=1e-6)
    near = orientation_loss(peaked(0, height=5.0)[None], angle, CENTRES, sigma)  # -180 is 2 deg away
    far = orientation_loss(peaked(18, height=5.0)[None], angle, CENTRES, sigma)  # 0 deg is 178 deg away
    assert 0 < near.item() < far.item()
    t = target[0][target[0] > 0]
    manual = (t * (t.log() - torch.log_softmax(peaked(0, height=5.0), -1)[target[0] > 0])).sum()
    assert near.item() == pytest.approx(manual.item(), rel=1e-5)


def test_total_loss_uses_the_paper_weights():
    w = LossWeights()
    assert (w.bev, w.loc, w.ori_in_loc) == (0.05, 0.075, 3.5)
    got = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0))
    assert got.item() == pytest.approx(1 + 0.05 * 2 + 0.075 * (3 + 3.5 * 4))


def test_next_token_loss_shifts_and_ignores():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # predicts token at position 1
    labels = torch.tensor([[-100, 2, -100]])
    expected = -torch.log_softmax(logits[0, 0], -1)[2]
    assert next_token_loss(logits, labels).item() == pytest.approx(expected.item())
