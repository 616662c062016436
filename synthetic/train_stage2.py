"""Stage 2: with the vision tower and pose prior frozen, train projector, f_cam, LLM and heads.

L = L_CE + 0.05 L_BEV + 0.075 (L_pos + 3.5 L_ori) (:mod:`loc3r.model.losses`).

**Packing.** A scene's questions all follow the same video, so one training
row holds ``prefix + frame blocks + newline`` once and then every question
block (suffix + answer + EOS) of that scene. Each question block attends to
the video and causally to itself only, and its RoPE positions restart right
after the video, exactly as the runtime asks each question on a rewound
cache. So a packed row gives the same logits and head outputs as separate
rows (tested), at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from loc3r.model.losses import LossWeights, bev_loss, next_token_loss, orientation_loss, position_loss, total_loss
from loc3r.model.projector import pool_frame_features
from loc3r.model.qwen2 import rope_cos_sin
from loc3r.synthetic.train_data import IGNORE
from loc3r.synthetic.train_grounding import GroundingOptions, grounding_loss, grounding_targets
from loc3r.synthetic.train_stage1 import run_pose_clip


@dataclass(frozen=True)
class Stage2Options:
    scenes_per_step: int = 4
    max_questions: int = 16  # question blocks per packed row
    lr: float = 1e-3
    weight_decay: float = 0.05
    weights: LossWeights = LossWeights()
    # From-scratch LLMs (loc3r.synthetic.train_drills): budget share over which the frames a step
    # sees grow from 1 to the whole clip (0: whole clips from the first step, as the paper),
    # situation drills per scene and step, and the frames from which the split's questions join.
    frame_curriculum: float = 0.0
    drills: int = 0
    questions_min_frames: Optional[int] = None  # None: only whole clips carry questions
    # From-scratch LLMs (loc3r.synthetic.train_grounding): supervised grounding attention (weight 0: off).
    grounding: GroundingOptions = GroundingOptions()
    # From-scratch LLMs: the BEV loss also on the input of this decoder layer (the object hop's), through the
    # same final norm and BEV head, so that a vision token already holds its position where names look it up.
    early_bev_layer: Optional[int] = None
    # bf16 autocast of the training forward (matmuls in bf16, weights, gradients and optimizer in fp32): 1.7-2.2x
    # faster whole-clip steps on an AVX512-BF16 CPU (loc3r.synthetic.train_run.stage2_autocast).
    bf16: bool = False

    @property
    def uses_drills(self) -> bool:
        return self.frame_curriculum > 0 or self.drills > 0


@dataclass
class PackedBatch:
    """Packed question blocks of B scenes (tensors; Ls = packed suffix length, K = question slots)."""

    suffix_ids: torch.Tensor  # (B, Ls) int64, pad-filled
    labels: torch.Tensor  # (B, Ls) answer tokens, IGNORE elsewhere
    segment: torch.Tensor  # (B, Ls) question slot k, -1 on padding
    offset: torch.Tensor  # (B, Ls) position inside its own block
    pos_index: torch.Tensor  # (B, K) index into the suffix of <Pos> (0 when absent)
    ori_index: torch.Tensor  # (B, K)
    loc_valid: torch.Tensor  # (B, K) bool: the slot is a situated question
    position: torch.Tensor  # (B, K, 2) BEV metres
    heading: torch.Tensor  # (B, K) radians
    scene: np.ndarray  # (B,) scene rows of the split
    question_rows: list[list[int]]  # per scene, the split's question rows in slot order


def pack_questions(split, scenes: np.ndarray, rng: Optional[np.random.Generator], max_questions: int,
                   pos_id: int, ori_id: int, pad_id: int) -> PackedBatch:
    """Pack up to ``max_questions`` questions of each of ``scenes`` (shuffled when ``rng``)."""
    q_scene = split["q_scene"]
    rows = []
    for s in scenes:
        r = np.flatnonzero(q_scene == s)
        if rng is not None:
            r = rng.permutation(r)
        rows.append([int(x) for x in r[:max_questions]])
    blocks = [[split["q_ids"][q, :split["q_len"][q]].astype(np.int64) for q in rs] for rs in rows]
    length = max(sum(len(x) for x in bl) for bl in blocks)
    k = max(len(rs) for rs in rows)
    b = len(scenes)
    ids = np.full((b, length), pad_id, np.int64)
    labels = np.full((b, length), IGNORE, np.int64)
    segment = np.full((b, length), -1, np.int64)
    offset = np.zeros((b, length), np.int64)
    pos_index = np.zeros((b, k), np.int64)
    ori_index = np.zeros((b, k), np.int64)
    valid = np.zeros((b, k), bool)
    position = np.zeros((b, k, 2), np.float32)
    heading = np.zeros((b, k), np.float32)
    for i, (rs, bl) in enumerate(zip(rows, blocks)):
        at = 0
        for j, (q, x) in enumerate(zip(rs, bl)):
            n = len(x)
            ids[i, at:at + n] = x
            start = int(split["q_answer_start"][q])
            labels[i, at + start:at + n] = x[start:]
            segment[i, at:at + n] = j
            offset[i, at:at + n] = np.arange(n)
            if split["q_has_situation"][q]:
                valid[i, j] = True
                pos_index[i, j] = at + int(np.flatnonzero(x == pos_id)[0])
                ori_index[i, j] = at + int(np.flatnonzero(x == ori_id)[0])
                position[i, j] = split["q_position"][q]
                heading[i, j] = np.radians(split["q_heading"][q])
            at += n
        # Padding continues the offsets so that its positions stay in range.
        offset[i, at:] = np.arange(length - at)
    t = torch.from_numpy
    return PackedBatch(t(ids), t(labels), t(segment), t(offset), t(pos_index), t(ori_index), t(valid), t(position),
                       t(heading), np.asarray(scenes), rows)


def packed_attention_mask(video_len: int, segment: torch.Tensor) -> torch.Tensor:
    """Additive mask (B, 1, 1, T, T), T = video_len + Ls: causal over the video; each question
    block sees the video and itself causally; padding sees the video and itself."""
    b, ls = segment.shape
    t = video_len + ls
    idx = torch.arange(t)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    seg = torch.cat((torch.full((b, video_len), -2, dtype=segment.dtype), segment), dim=1)  # (B, T)
    pad_pos = torch.arange(ls) + video_len
    key_video = idx[None, None, :] < video_len  # (1, 1, T)
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    pad_self = torch.zeros(b, t, t, dtype=torch.bool)
    pad_self[:, pad_pos, pad_pos] = (segment == -1)
    allowed = causal[None] & (key_video | (same & (seg[:, :, None] >= 0)) | pad_self)
    blocked = torch.finfo(torch.float32).min
    return torch.where(allowed, 0.0, blocked).view(b, 1, 1, t, t)


def frozen_inputs(model, vision: torch.Tensor, pose: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Frozen encoders: vision (B, F, 3, S, S) -> features (B, F, g*g, Dv); pose (B, F, 3, H, W) -> camera tokens
    (B, F, Dd) (None without camera tokens)."""
    b, f = vision.shape[:2]
    with torch.no_grad():
        feats = model.vision_features(vision.flatten(0, 1))
        feats = feats.view(b, f, feats.shape[1], feats.shape[2])
        cams = run_pose_clip(model.pose_prior, pose)[0] if model.uses_camera_tokens else None
    return feats, cams


class FrozenFeatures:
    """Frozen-encoder outputs of a whole split, computed once: stage 2 never changes them.

    ``feats`` (N, F, g*g, Dv) and ``cams`` (N, F, Dd) (None without camera tokens), held
    as float16 (the cache's input precision) and returned as float32.
    """

    def __init__(self, model, split, chunk: int = 16, progress: bool = True, desc: str = "frozen features"):
        from tqdm import tqdm

        n = split.num_scenes
        feats, cams = [], []
        for s in tqdm(range(0, n, chunk), desc=desc, unit="chunk", disable=not progress):
            rows = np.arange(s, min(s + chunk, n))
            inp = split_inputs(split, rows)
            f, c = frozen_inputs(model, inp["vision"], inp["pose"])
            feats.append(f.to(torch.float16))
            if c is not None:
                cams.append(c.to(torch.float16))
        self.feats = torch.cat(feats)
        self.cams = torch.cat(cams) if cams else None

    def __call__(self, scenes: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        idx = torch.from_numpy(np.asarray(scenes, np.int64))
        cams = self.cams[idx].float() if self.cams is not None else None
        return self.feats[idx].float(), cams


def video_block_embeddings(model, prefix_ids: torch.Tensor, feats: torch.Tensor,
                           cams: Optional[torch.Tensor]) -> torch.Tensor:
    """[prefix] + frame blocks + newline as in :meth:`Loc3RVLM.video_embeddings`: -> (B, V, H)."""
    b, f = feats.shape[:2]
    vision = pool_frame_features(model.projector(feats.flatten(0, 1)), model.cfg.vision.grid)  # (B*F, n, H)
    vision = vision.view(b, f, vision.shape[1], vision.shape[2])
    if cams is not None:
        blocks = torch.cat((model.f_cam(cams).unsqueeze(2).to(vision.dtype), vision), dim=2)  # (B, F, P, H)
    else:
        blocks = vision
    prefix = model.embed_tokens(prefix_ids).expand(b, -1, -1)
    return torch.cat((prefix, blocks.flatten(1, 2), model.newline_embedding(b)), dim=1)


def packed_hidden(model, video_embeds: torch.Tensor, batch: PackedBatch,
                  capture: Optional[dict] = None) -> torch.Tensor:
    """Final-normed hidden states (B, V + Ls, H) of video + packed question blocks.

    With ``capture`` (a dict), also records each decoder layer's input under its index and the
    ``cos``, ``sin`` and ``mask`` the layers saw (for :mod:`loc3r.synthetic.train_grounding`)."""
    b, v, _ = video_embeds.shape
    lm = model.language_model
    x = torch.cat((video_embeds, model.embed_tokens(batch.suffix_ids)), dim=1)  # (B, T, H)
    t = x.shape[1]
    positions = torch.cat((torch.arange(v).expand(b, v), v + batch.offset), dim=1)  # (B, T)
    cos, sin = rope_cos_sin(positions.reshape(-1), lm.cfg.head_dim, lm.cfg.rope_theta)
    cos = cos.view(b, 1, t, -1)
    sin = sin.view(b, 1, t, -1)
    mask = packed_attention_mask(v, batch.segment)
    slots = torch.arange(t)
    zeros = x.new_zeros(b, lm.cfg.num_kv_heads, t, lm.cfg.head_dim)
    if capture is not None:
        capture.update(cos=cos, sin=sin, mask=mask)
    for i, layer in enumerate(lm.layers):
        if capture is not None:
            capture[i] = x
        x, _, _ = layer(x, cos, sin, zeros, zeros, slots, mask)
    return lm.norm(x)


def stage2_losses(model, prefix_ids: torch.Tensor, feats: torch.Tensor, cams: Optional[torch.Tensor],
                  batch: PackedBatch, bev_targets: torch.Tensor, bev_valid: torch.Tensor,
                  weights: LossWeights, grounding=None, early_bev_layer: Optional[int] = None) -> dict[str, torch.Tensor]:
    """All stage-2 terms and the weighted total. bev_targets (B, F, G, G, 2), bev_valid (B, F, G, G).

    ``early_bev_layer``: also ``weights.bev * bev_early``, L_BEV of the vision tokens at that decoder
    layer's input (final norm and BEV head shared; training only, nothing is exported).

    ``grounding``: None, or (:class:`~loc3r.synthetic.train_grounding.GroundingSource`,
    :class:`~loc3r.synthetic.train_grounding.GroundingOptions`): adds ``weight * ground`` to the total."""
    video = video_block_embeddings(model, prefix_ids, feats, cams)
    captured: Optional[dict] = {} if grounding is not None or early_bev_layer is not None else None
    hidden = packed_hidden(model, video, batch, captured)  # (B, T, H)
    b, v = video.shape[:2]
    f = feats.shape[1]
    n = model.cfg.vision.tokens_per_frame
    per_frame = n + (1 if cams is not None else 0)
    tp = prefix_ids.shape[-1]

    def vision_bev_loss(states: torch.Tensor) -> torch.Tensor:
        """L_BEV of the BEV head on the vision tokens of normed states (B, T, H)."""
        frames = states[:, tp:tp + f * per_frame].reshape(b, f, per_frame, -1)[:, :, per_frame - n:]  # (B, F, n, H)
        return bev_loss(model.bev_head(frames), bev_targets.reshape(b, f, n, 2), bev_valid.reshape(b, f, n))

    l_bev = vision_bev_loss(hidden)
    suffix_h = hidden[:, v:]  # (B, Ls, H)
    if bool((batch.labels != IGNORE).any()):
        l_ce = next_token_loss(model.logits(suffix_h), batch.labels)
    else:  # only situation drills (no answer tokens): no L_CE term
        l_ce = suffix_h.new_zeros(())
    out = {"ce": l_ce, "bev": l_bev}
    valid = batch.loc_valid
    if bool(valid.any()):
        h = suffix_h.shape[-1]
        pos_h = suffix_h.gather(1, batch.pos_index.unsqueeze(-1).expand(-1, -1, h))[valid]  # (M, H)
        ori_h = suffix_h.gather(1, batch.ori_index.unsqueeze(-1).expand(-1, -1, h))[valid]
        pos_pred = model.position_head(pos_h)
        ori_logits, ori_angle = model.orientation_head(ori_h)
        out["pos"] = position_loss(pos_pred, batch.position[valid])
        out["ori"] = orientation_loss(ori_logits, batch.heading[valid], model.orientation_bin_centres(),
                                      weights.ori_target_sigma_bins * 2 * np.pi / model.cfg.heads.num_orientation_bins)
        with torch.no_grad():
            out["pos_err_m"] = (pos_pred[:, :2] - batch.position[valid]).norm(dim=-1).mean()
            d = torch.remainder(ori_angle - batch.heading[valid] + np.pi, 2 * np.pi) - np.pi
            out["ori_err_deg"] = torch.rad2deg(d.abs()).mean()
    else:
        out["pos"] = out["ori"] = l_ce.new_zeros(())
    out["loss"] = total_loss(l_ce, l_bev, out["pos"], out["ori"], weights)
    if early_bev_layer is not None:
        out["bev_early"] = vision_bev_loss(model.language_model.norm(captured[early_bev_layer]))
        out["loss"] = out["loss"] + weights.bev * out["bev_early"]
    if grounding is not None:
        source, gopts = grounding
        targets = grounding_targets(source, batch, model.cfg.pos_token_id, model.cfg.ori_token_id, v, tp, f,
                                    per_frame, gopts)
        terms = grounding_loss(model, captured, hidden, targets, gopts)
        out.update(terms)
        out["loss"] = out["loss"] + gopts.weight * terms["ground"]
    return out


def split_inputs(split, scenes: np.ndarray, frames: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Model inputs and BEV truth of ``scenes`` from a :class:`CachedSplit` (first ``frames`` frames)."""
    sl = slice(None, frames)
    out = {"vision": torch.from_numpy(split["vision"][scenes, sl].astype(np.float32)),
           "bev_targets": torch.from_numpy(split["bev_targets"][scenes, sl]),
           "bev_valid": torch.from_numpy(split["bev_valid"][scenes, sl])}
    out["pose"] = torch.from_numpy(split["pose"][scenes, sl].astype(np.float32)) if "pose" in split.arrays else None
    return out


def stage2_parameters(model) -> list[torch.nn.Parameter]:
    """What stage 2 trains: everything but the vision tower and the pose prior."""
    frozen = {id(p) for p in model.vision_tower.parameters()}
    if model.pose_prior is not None:
        frozen |= {id(p) for p in model.pose_prior.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def stage2_trainable(model) -> list[torch.nn.Parameter]:
    """Freeze the vision tower and the pose prior, unfreeze the rest; return what stage 2 trains."""
    params = stage2_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params
