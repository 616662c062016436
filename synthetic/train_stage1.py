"""Stage 1: pretrain the vision tower and the pose prior on the synthetic dense truth.

No pretrained SigLIP or CUT3R can be had here, so (paper-notes.md, "What
trains") the two frozen encoders of stage 2 are first trained from scratch:

- **Vision tower** with a throwaway linear probe per patch: majority
  semantic class (cross-entropy), object colour (cross-entropy; 0 = no
  object) and log depth (L1).
- **Pose prior** run recurrently over whole clips, as at inference:
  translation L1 (metres, first-camera frame) + rotation L1 on the unit
  quaternion (both with qw >= 0, so no sign ambiguity is left) on
  every frame after the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loc3r.synthetic.render import SEMANTIC_CLASSES
from loc3r.synthetic.scene import OBJECT_COLOURS

NUM_SEMANTIC = len(SEMANTIC_CLASSES)
NUM_COLOUR = len(OBJECT_COLOURS) + 1  # 0 = no object


@dataclass(frozen=True)
class Stage1Options:
    vision_frames: int = 32  # frames per vision step
    pose_clips: int = 4  # clips per pose step
    pose_frames: int = 16  # frames per pose clip (the first ones)
    lr: float = 1e-3
    weight_decay: float = 0.05
    rotation_weight: float = 2.0


class VisionProbe(nn.Module):
    """Throwaway per-patch head: features (..., Dv) -> semantic, colour and log-depth outputs."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, NUM_SEMANTIC + NUM_COLOUR + 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.out(self.norm(feats))
        return y[..., :NUM_SEMANTIC], y[..., NUM_SEMANTIC:NUM_SEMANTIC + NUM_COLOUR], y[..., -1]


def vision_losses(tower: nn.Module, probe: VisionProbe, pixels: torch.Tensor, semantic: torch.Tensor,
                  colour: torch.Tensor, depth: torch.Tensor) -> dict[str, torch.Tensor]:
    """pixels (N, 3, S, S); semantic/colour (N, g, g) int64; depth (N, g, g) metres -> loss terms."""
    feats = tower(pixels)  # (N, g*g, Dv)
    sem_logits, col_logits, log_depth = probe(feats)
    sem = F.cross_entropy(sem_logits.flatten(0, 1), semantic.flatten())
    col = F.cross_entropy(col_logits.flatten(0, 1), colour.flatten())
    valid = depth.flatten(1) > 0  # (N, g*g)
    err = (log_depth - depth.flatten(1).clamp_min(1e-3).log()).abs()
    dep = (err * valid).sum() / valid.sum().clamp_min(1)
    acc = (sem_logits.argmax(-1) == semantic.flatten(1)).float().mean()
    return {"semantic": sem, "colour": col, "depth": dep, "vision": sem + col + dep, "semantic_acc": acc.detach()}


def run_pose_clip(pose_prior: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pose prior over clips, recurrently: images (B, F, 3, H, W) -> (camera tokens (B, F, Dd), poses (B, F, 7))."""
    b, f = images.shape[:2]
    state, memory = pose_prior.initial_state(b), pose_prior.initial_memory(b)
    tokens, poses = [], []
    for t in range(f):
        is_first = torch.full((b,), 1.0 if t == 0 else 0.0, device=images.device)
        tok, pose, state, memory = pose_prior(images[:, t], state, memory, is_first)
        tokens.append(tok)
        poses.append(pose)
    return torch.stack(tokens, 1), torch.stack(poses, 1)


def pose_losses(pose_prior: nn.Module, images: torch.Tensor, pose7: torch.Tensor,
                rotation_weight: float) -> dict[str, torch.Tensor]:
    """images (B, F, 3, H, W); pose7 (B, F, 7) = [t, qw, qx, qy, qz] camera-to-first-camera -> loss terms."""
    _, pred = run_pose_clip(pose_prior, images)  # (B, F, 7)
    pred, truth = pred[:, 1:], pose7[:, 1:]
    trans = (pred[..., :3] - truth[..., :3]).abs().sum(-1).mean()
    rot = (pred[..., 3:] - truth[..., 3:]).abs().sum(-1).mean()
    with torch.no_grad():
        dot = (pred[..., 3:] * truth[..., 3:]).sum(-1).abs().clamp(max=1.0)
        rot_err_deg = torch.rad2deg(2 * torch.acos(dot)).mean()
        trans_err = (pred[..., :3] - truth[..., :3]).norm(dim=-1).mean()
    return {"translation": trans, "rotation": rot, "pose": trans + rotation_weight * rot,
            "rotation_err_deg": rot_err_deg, "translation_err_m": trans_err}


def vision_batch(split, rng: np.random.Generator, frames: int) -> dict[str, torch.Tensor]:
    """Random frames of random scenes from a :class:`CachedSplit`."""
    n, f = split["vision"].shape[:2]
    scene = rng.integers(0, n, frames)
    frame = rng.integers(0, f, frames)
    return {"pixels": torch.from_numpy(split["vision"][scene, frame].astype(np.float32)),
            "semantic": torch.from_numpy(split["semantic"][scene, frame].astype(np.int64)),
            "colour": torch.from_numpy(split["colour"][scene, frame].astype(np.int64)),
            "depth": torch.from_numpy(split["depth"][scene, frame])}


def pose_batch(split, rng: np.random.Generator, clips: int, frames: int) -> dict[str, torch.Tensor]:
    """Random whole clips (their first ``frames`` frames) from a :class:`CachedSplit`."""
    scene = rng.integers(0, split["pose"].shape[0], clips)
    return {"images": torch.from_numpy(split["pose"][scene, :frames].astype(np.float32)),
            "pose7": torch.from_numpy(split["pose7"][scene, :frames])}


def stage1_step(model, probe: VisionProbe, split, rng: np.random.Generator,
                options: Stage1Options) -> dict[str, torch.Tensor]:
    """One stage-1 loss on a random batch: vision probe terms, plus pose terms with a pose prior."""
    vb = vision_batch(split, rng, options.vision_frames)
    out = vision_losses(model.vision_tower, probe, vb["pixels"], vb["semantic"], vb["colour"], vb["depth"])
    total = out["vision"]
    if model.pose_prior is not None:
        pb = pose_batch(split, rng, options.pose_clips, options.pose_frames)
        out.update(pose_losses(model.pose_prior, pb["images"], pb["pose7"], options.rotation_weight))
        total = total + out["pose"]
    out["loss"] = total
    return out


def stage1_parameters(model, probe: VisionProbe) -> list[nn.Parameter]:
    params = list(model.vision_tower.parameters()) + list(probe.parameters())
    if model.pose_prior is not None:
        params += list(model.pose_prior.parameters())
    return params
