"""Stage 1: pretrain the vision tower and the pose prior on the synthetic dense truth.

No pretrained SigLIP or CUT3R can be had here, so (paper-notes.md, "What
trains") the two frozen encoders of stage 2 are first trained from scratch:

- **Vision tower** with a throwaway linear probe per patch: majority
  semantic class (cross-entropy), object colour (cross-entropy; 0 = no
  object) and log depth (L1).
- **Pose prior** run recurrently over clips from their first frame, as at
  inference: translation L1 (metres, first-camera frame) + rotation L1 on
  the unit quaternion (both with qw >= 0, so no sign ambiguity is left) on
  every frame after the first, plus a dense term: a throwaway probe reads
  each decoded image token's BEV (x, y) in the first frame's BEV frame
  (CUT3R's world pointmap, flattened to the floor). Clip lengths follow a
  curriculum (:meth:`Stage1Options.clip_frames`).

What we measured (README, "The embedded demo model"): with single-frame
inputs the from-scratch pose prior stayed at the no-motion error even on
2-frame clips, while a small CNN on two stacked frames learned the
frame-to-frame yaw within two minutes. loc3r-tiny therefore feeds the
previous frame on three more channels (``PosePriorConfig.previous_frame``);
with that, the curriculum and the dense term, the recurrence learns to chain
the motion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loc3r.errors import Loc3rError
from loc3r.synthetic.render import SEMANTIC_CLASSES
from loc3r.synthetic.scene import OBJECT_COLOURS

NUM_SEMANTIC = len(SEMANTIC_CLASSES)
NUM_COLOUR = len(OBJECT_COLOURS) + 1  # 0 = no object


@dataclass(frozen=True)
class Stage1Options:
    vision_frames: int = 32  # frames per vision step
    pose_clips: int = 8  # clips per pose step
    pose_frames: int = 16  # frames per pose clip (the first ones)
    lr: float = 1e-3
    weight_decay: float = 0.05
    rotation_weight: float = 2.0
    # What stage 1 trains: "both", "vision" or "pose" (the other encoder stays as it is).
    parts: str = "both"
    # Clip-length curriculum: the longest pose clip grows from 2 frames to ``pose_frames`` over
    # this share of the stage budget (0: full-length clips from the start), and each step draws
    # its length uniformly up to it. Short clips teach frame-to-frame motion first, and keep
    # teaching it; the recurrence learns to chain it as the clips grow.
    pose_curriculum: float = 0.8
    # Weight of the pose prior's dense term: each decoded image token's BEV (x, y) in the
    # first frame's BEV frame (CUT3R's world pointmap, in 2D), through a throwaway probe.
    pose_bev_weight: float = 1.0

    def max_clip_frames(self, frac: float) -> int:
        """Longest pose clip at budget fraction ``frac``."""
        if self.pose_curriculum <= 0:
            return self.pose_frames
        return min(self.pose_frames, 2 + int(frac / self.pose_curriculum * (self.pose_frames - 2)))

    def clip_frames(self, frac: float, rng: np.random.Generator) -> int:
        """Pose clip length of one step at budget fraction ``frac``."""
        longest = self.max_clip_frames(frac)
        return longest if self.pose_curriculum <= 0 else int(rng.integers(2, longest + 1))


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


class PoseProbe(nn.Module):
    """Throwaway dense head on the pose prior's decoded image tokens: (..., Dd) -> BEV (x, y) metres."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(tokens))


def run_pose_clip(pose_prior: nn.Module, images: torch.Tensor,
                  image_tokens: bool = False) -> tuple[torch.Tensor, ...]:
    """The pose prior over clips, recurrently: images (B, F, 3, H, W) -> (camera tokens (B, F, Dd), poses (B, F, 7)),
    plus the decoded image tokens (B, F, N, Dd) when ``image_tokens``."""
    from loc3r.model.pose_prior import with_previous_frames

    b, f = images.shape[:2]
    if pose_prior.cfg.previous_frame:
        images = with_previous_frames(images)
    state, memory = pose_prior.initial_state(b), pose_prior.initial_memory(b)
    tokens, poses, decoded = [], [], []
    for t in range(f):
        is_first = torch.full((b,), 1.0 if t == 0 else 0.0, device=images.device)
        feat, pos = pose_prior.encode(images[:, t])
        tok, pose, state, memory, img = pose_prior.decode_tokens(feat, pos, state, memory, is_first)
        tokens.append(tok)
        poses.append(pose)
        decoded.append(img)
    out = (torch.stack(tokens, 1), torch.stack(poses, 1))
    return out + (torch.stack(decoded, 1),) if image_tokens else out


def pose_bev_loss(pose_prior: nn.Module, probe: PoseProbe, tokens: torch.Tensor, bev: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """L1 (metres) of the probe's BEV (x, y) on decoded image tokens (B, F, N, Dd), average-pooled from the pose
    prior's patch grid to the targets' G x G grid; bev (B, F, G, G, 2), valid (B, F, G, G)."""
    cfg = pose_prior.cfg
    b, f, _, d = tokens.shape
    gh, gw = cfg.img_height // cfg.patch_size, cfg.img_width // cfg.patch_size
    grid = tokens.reshape(b * f, gh, gw, d).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, bev.shape[2:4]).permute(0, 2, 3, 1).reshape(bev.shape[:4] + (d,))
    err = (probe(pooled) - bev).abs().sum(-1)  # (B, F, G, G)
    return (err * valid).sum() / valid.sum().clamp_min(1)


def pose_losses(pose_prior: nn.Module, images: torch.Tensor, pose7: torch.Tensor, rotation_weight: float,
                probe: Optional[PoseProbe] = None, bev: Optional[torch.Tensor] = None,
                bev_valid: Optional[torch.Tensor] = None, bev_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """images (B, F, 3, H, W); pose7 (B, F, 7) = [t, qw, qx, qy, qz] camera-to-first-camera -> loss terms;
    with ``probe``, also the dense BEV term on bev (B, F, G, G, 2) / bev_valid (B, F, G, G)."""
    _, pred, decoded = run_pose_clip(pose_prior, images, image_tokens=True)  # (B, F, 7)
    dense = None if probe is None else pose_bev_loss(pose_prior, probe, decoded, bev, bev_valid)
    pred, truth = pred[:, 1:], pose7[:, 1:]
    trans = (pred[..., :3] - truth[..., :3]).abs().sum(-1).mean()
    rot = (pred[..., 3:] - truth[..., 3:]).abs().sum(-1).mean()
    with torch.no_grad():
        dot = (pred[..., 3:] * truth[..., 3:]).sum(-1).abs().clamp(max=1.0)
        rot_err_deg = torch.rad2deg(2 * torch.acos(dot)).mean()
        trans_err = (pred[..., :3] - truth[..., :3]).norm(dim=-1).mean()
        # The same errors for "no motion since the first frame", the bar a pose prior must clear.
        still_rot = torch.rad2deg(2 * torch.acos(truth[..., 3].abs().clamp(max=1.0))).mean()
        still_trans = truth[..., :3].norm(dim=-1).mean()
    out = {"translation": trans, "rotation": rot, "pose": trans + rotation_weight * rot,
           "rotation_err_deg": rot_err_deg, "translation_err_m": trans_err,
           "rotation_err_still_deg": still_rot, "translation_err_still_m": still_trans,
           "pose_frames": torch.tensor(float(images.shape[1]))}
    if dense is not None:
        out["pose_bev"] = dense
        out["pose"] = out["pose"] + bev_weight * dense
    return out


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
            "pose7": torch.from_numpy(split["pose7"][scene, :frames]),
            "bev": torch.from_numpy(split["bev_targets"][scene, :frames]),
            "bev_valid": torch.from_numpy(split["bev_valid"][scene, :frames])}


def stage1_step(model, probe: VisionProbe, split, rng: np.random.Generator,
                options: Stage1Options, frac: float = 1.0, pose_probe: Optional[PoseProbe] = None
                ) -> dict[str, torch.Tensor]:
    """One stage-1 loss on a random batch: vision probe terms, plus pose terms with a pose prior
    (clips of ``options.clip_frames(frac)`` frames)."""
    out: dict[str, torch.Tensor] = {}
    total = None
    if options.parts in ("both", "vision"):
        vb = vision_batch(split, rng, options.vision_frames)
        out = vision_losses(model.vision_tower, probe, vb["pixels"], vb["semantic"], vb["colour"], vb["depth"])
        total = out["vision"]
    if model.pose_prior is not None and options.parts in ("both", "pose"):
        pb = pose_batch(split, rng, options.pose_clips, options.clip_frames(frac, rng))
        use = pose_probe is not None and options.pose_bev_weight > 0
        out.update(pose_losses(model.pose_prior, pb["images"], pb["pose7"], options.rotation_weight,
                               pose_probe if use else None, pb["bev"], pb["bev_valid"], options.pose_bev_weight))
        total = out["pose"] if total is None else total + out["pose"]
    if total is None:
        raise Loc3rError("stage 1 has nothing to train: --stage1-parts pose needs a model with a pose prior")
    out["loss"] = total
    return out


def stage1_parameters(model, probe: VisionProbe, parts: str = "both",
                      pose_probe: Optional[PoseProbe] = None) -> list[nn.Parameter]:
    """What stage 1 trains for ``parts`` ("both", "vision" or "pose")."""
    if parts not in ("both", "vision", "pose"):
        raise Loc3rError(f"stage-1 parts must be both, vision or pose, got '{parts}'")
    params: list[nn.Parameter] = []
    if parts in ("both", "vision"):
        params += list(model.vision_tower.parameters()) + list(probe.parameters())
    if model.pose_prior is not None and parts in ("both", "pose"):
        params += list(model.pose_prior.parameters())
        if pose_probe is not None:
            params += list(pose_probe.parameters())
    return params
