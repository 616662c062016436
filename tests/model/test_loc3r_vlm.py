"""The composed Loc3RVLM: frame-block layout, camera tokens, and where the heads read."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loc3r.model.config import get_config
from loc3r.model.heads import circular_soft_argmax, orientation_bin_centres
from loc3r.model.loc3r_vlm import Loc3RVLM, first_token_index

POS, ORI = 120, 121


class StandInPosePrior(nn.Module):
    """The PosePrior step interface with trivially checkable outputs."""

    def __init__(self, dim: int, state: int = 3, slots: int = 2, mem_dim: int = 5):
        super().__init__()
        self.dim, self.state, self.slots, self.mem_dim = dim, state, slots, mem_dim
        self.proj = nn.Linear(3, dim)

    def initial_state(self, batch):
        return torch.zeros(batch, self.state, self.dim)

    def initial_memory(self, batch):
        return torch.zeros(batch, self.slots, self.mem_dim)

    def forward(self, image, state, memory, is_first):
        token = self.proj(image.mean(dim=(2, 3))) + state[:, 0]  # (B, Dd), depends on the carried state
        pose = torch.cat((image.mean(dim=(1, 2, 3))[:, None].expand(-1, 3), torch.ones(image.shape[0], 1),
                          torch.zeros(image.shape[0], 3)), dim=1)
        return token, pose, state + 1.0, memory + is_first.view(-1, 1, 1)


def make(preset: str = "test-tiny", pose_prior=None, **changes) -> Loc3RVLM:
    torch.manual_seed(0)
    cfg = get_config(preset).replace(pos_token_id=POS, ori_token_id=ORI, **changes)
    return Loc3RVLM(cfg, pose_prior=pose_prior).eval()


def frames(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, p = model.cfg.vision, model.cfg.pose_prior
    pv = torch.randn(1, n, 3, v.image_size, v.image_size, generator=g)
    pose = torch.randn(1, n, 3, p.img_height, p.img_width, generator=g) if p is not None else None
    return pv, pose


@torch.no_grad()
def test_frame_block_is_camera_token_then_vision_tokens():
    cfg = get_config("test-tiny")
    model = make(pose_prior=StandInPosePrior(cfg.pose_prior.dec_embed_dim))
    pv, pose = frames(model)
    state, memory = model.initial_pose_state(1)
    block, p, new_state, new_memory = model.encode_frame(pv[:, 0], pose[:, 0], state, memory, torch.ones(1))
    assert block.shape == (1, cfg.tokens_per_frame, cfg.text.hidden_size)
    expected_cam = model.f_cam(model.pose_prior(pose[:, 0], state, memory, torch.ones(1))[0])
    assert torch.allclose(block[:, 0], expected_cam)
    assert torch.allclose(block[:, 1:], model.vision_tokens(pv[:, 0]))
    assert torch.equal(new_state, state + 1) and torch.equal(new_memory, memory + 1)


@torch.no_grad()
def test_video_carries_pose_state_from_frame_to_frame():
    cfg = get_config("test-tiny")
    model = make(pose_prior=StandInPosePrior(cfg.pose_prior.dec_embed_dim))
    pv, pose = frames(model, n=3)
    embeds, poses = model.video_embeddings(pv, pose)
    per = cfg.tokens_per_frame
    assert embeds.shape == (1, 3 * per + 1, cfg.text.hidden_size)
    assert poses.shape == (1, 3, 7)
    state, memory = model.initial_pose_state(1)
    for t in range(3):
        block, _, state, memory = model.encode_frame(pv[:, t], pose[:, t], state, memory,
                                                     torch.tensor([float(t == 0)]))
        assert torch.allclose(embeds[:, t * per:(t + 1) * per], block, atol=1e-6)
    assert torch.equal(embeds[0, -1], model.image_newline)


@torch.no_grad()
def test_real_pose_prior_gives_rigid_poses_and_camera_tokens():
    model = make()
    pv, pose = frames(model, n=2)
    out = model(torch.tensor([[1, 2]]), pv, torch.tensor([[3, POS, ORI, 4]]), pose)
    assert out.poses.shape == (1, 2, 7)
    assert torch.allclose(out.poses[..., 3:].norm(dim=-1), torch.ones(1, 2), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("preset", ["test-tiny", "test-tiny-nocam"])
def test_heads_read_pos_ori_and_vision_tokens(preset):
    model = make(preset)
    pv, pose = frames(model, n=2)
    prefix, suffix = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, POS, ORI, 6]])
    out = model(prefix, pv, suffix, pose)
    cfg = model.cfg
    per, n = cfg.tokens_per_frame, cfg.vision.tokens_per_frame
    start = 3 + 2 * per + 1
    assert torch.allclose(out.position, model.f_pos(out.hidden[:, start + 2]))
    assert torch.allclose(out.orientation_logits, model.f_ori(out.hidden[:, start + 3]))
    assert torch.allclose(out.orientation, circular_soft_argmax(out.orientation_logits, orientation_bin_centres(36)))
    assert out.bev.shape == (1, 2, n, 4)
    cam = 1 if cfg.camera_tokens_active else 0
    frame1_vision = out.hidden[:, 3 + per + cam:3 + 2 * per]
    assert torch.allclose(out.bev[:, 1], model.f_proj(frame1_vision))
    assert (out.bev[..., 2:] > 0).all() and (out.position[:, 2] > 0).all()
    assert out.orientation.abs().max() <= math.pi


def test_camera_tokens_off_is_the_base_vlm_layout():
    model = make(use_camera_tokens=False)
    assert model.pose_prior is not None and not model.uses_camera_tokens
    pv, pose = frames(model, n=2)
    with torch.no_grad():
        embeds, poses = model.video_embeddings(pv, pose)
    assert embeds.shape[1] == 2 * model.cfg.vision.tokens_per_frame + 1
    assert poses.shape == (1, 2, 0)


def test_first_token_index():
    ids = torch.tensor([[5, 7, 9, 7], [1, 2, 3, 4]])
    assert first_token_index(ids, 7).tolist() == [1, 3]  # absent -> last
    assert first_token_index(ids, None).tolist() == [3, 3]


def test_module_names():
    names = {n for n, _ in make().named_children()}
    assert names == {"vision_tower", "projector", "language_model", "lm_head", "pose_prior", "f_cam", "f_pos",
                     "f_ori", "f_proj"}
    assert "image_newline" in dict(make().named_parameters())
