"""The composed Loc3R-VLM: SigLIP + projector + pose prior + Qwen2 + heads.

Sequence layout (one-shot and streaming alike)::

    [prefix text] + per frame [c_t, v_t,1 .. v_t,n] + [image_newline] + [suffix text]

where ``c_t = f_cam(pose_prior camera token)`` is present only when
``cfg.camera_tokens_active`` (otherwise this is the plain LLaVA-Video VLM),
``v_t,i`` are the projected, bilinearly pooled SigLIP tokens, and the suffix
holds the situation, ``<Pos>``, ``<Ori>``, the question and the assistant
prompt.

Streaming pieces, which the runtime mirrors as separate graphs:
:meth:`encode_frame` (vision + one pose step -> frame block),
:meth:`prefill` (a chunk of embeddings into the KV cache),
:meth:`decode_step` (one token), and :meth:`generate_greedy` on top.
Heads: :meth:`position_head`, :meth:`orientation_head`, :meth:`bev_head`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from loc3r.model.config import Loc3RConfig
from loc3r.model.heads import (BevProjectionHead, CameraTokenHead, OrientationHead, PositionHead,
                               circular_soft_argmax, orientation_bin_centres)
from loc3r.model.projector import MultimodalProjector, pool_frame_features
from loc3r.model.qwen2 import Qwen2Decoder
from loc3r.model.siglip import SiglipVisionTower


class Loc3ROutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V) over the whole sequence
    hidden: torch.Tensor  # (B, T, H) final-normed
    position: torch.Tensor  # (B, 3) f_pos at <Pos>: x, y, sigma
    orientation_logits: torch.Tensor  # (B, num_bins) f_ori at <Ori>
    orientation: torch.Tensor  # (B,) radians, circular soft-argmax
    bev: torch.Tensor  # (B, F, n, 4) f_proj per vision token: x, y, sigma_x, sigma_y
    poses: torch.Tensor  # (B, F, 7) pose-prior poses; (B, F, 0) without camera tokens


def first_token_index(token_ids: torch.Tensor, token_id: Optional[int]) -> torch.Tensor:
    """(B,) index of the first ``token_id`` in each row of (B, T); the last index when absent or None."""
    b, t = token_ids.shape
    last = torch.full((b,), t - 1, dtype=torch.long, device=token_ids.device)
    if token_id is None:
        return last
    hit = token_ids == token_id  # (B, T)
    return torch.where(hit.any(-1), hit.to(torch.int64).argmax(-1), last)


def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), index (B,) -> (B, H)."""
    b, _, h = hidden.shape
    return hidden.gather(1, index.view(b, 1, 1).expand(b, 1, h)).squeeze(1)


def loc3r_heads(cfg: Loc3RConfig) -> dict[str, nn.Module]:
    """Freshly initialised Loc3R heads by attribute name: f_cam (only with a pose prior), f_pos, f_ori, f_proj."""
    h = cfg.text.hidden_size
    head_hidden = cfg.heads.head_hidden or h
    heads: dict[str, nn.Module] = {}
    if cfg.pose_prior is not None:
        heads["f_cam"] = CameraTokenHead(cfg.pose_prior.dec_embed_dim, cfg.heads.cam_hidden or h, h)
    heads["f_pos"] = PositionHead(h, head_hidden)
    heads["f_ori"] = OrientationHead(h, head_hidden, cfg.heads.num_orientation_bins)
    heads["f_proj"] = BevProjectionHead(h, head_hidden)
    return heads


class Loc3RVLM(nn.Module):
    """Loc3R-VLM. ``pose_prior`` overrides the :class:`PosePrior` built from ``cfg.pose_prior``
    (any module with the same step interface)."""

    def __init__(self, cfg: Loc3RConfig, pose_prior: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        h = cfg.text.hidden_size
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.projector = MultimodalProjector(cfg.vision.hidden_size, h, cfg.projector_hidden_act)
        self.image_newline = nn.Parameter(torch.randn(h) * h**-0.5)
        self.language_model = Qwen2Decoder(cfg.text)
        self.lm_head = nn.Linear(h, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if cfg.pose_prior is not None:
            if pose_prior is None:
                from loc3r.model.pose_prior import PosePrior

                pose_prior = PosePrior(cfg.pose_prior)
            self.pose_prior = pose_prior
        else:
            self.pose_prior = None
            self.f_cam = None
        for name, module in loc3r_heads(cfg).items():
            setattr(self, name, module)

    # -- embeddings ----------------------------------------------------------
    @property
    def uses_camera_tokens(self) -> bool:
        return self.cfg.camera_tokens_active and self.pose_prior is not None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, H)."""
        return self.language_model.embed(input_ids)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP features at the feature layer: (N, 3, S, S) -> (N, grid*grid, Dv)."""
        return self.vision_tower(pixel_values)

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, pooled vision tokens: (N, 3, S, S) -> (N, n, H), n = ceil(grid/2)**2."""
        return pool_frame_features(self.projector(self.vision_features(pixel_values)), self.cfg.vision.grid)

    def camera_embedding(self, pose_image: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                         is_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pose-prior step + f_cam: -> (c_t (B, H), pose (B, 7), new_state, new_memory)."""
        camera_token, pose, new_state, new_memory = self.pose_prior(pose_image, state, memory, is_first)
        return self.f_cam(camera_token), pose, new_state, new_memory

    def initial_pose_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(state (B, S, Dd), memory (B, M, Dm)) before a stream's first frame."""
        return self.pose_prior.initial_state(batch), self.pose_prior.initial_memory(batch)

    def encode_frame(
        self,
        pixel_values: torch.Tensor,
        pose_image: Optional[torch.Tensor] = None,
        state: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
        is_first: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One frame -> its block of embeddings.

        pixel_values (B, 3, S, S) for SigLIP; with camera tokens also
        pose_image (B, 3, Hp, Wp), the pose state/memory and is_first (B,).
        Returns (block (B, P, H), pose (B, 7), new_state, new_memory); without
        camera tokens the block is the n vision tokens and the rest is None.
        """
        vision = self.vision_tokens(pixel_values)  # (B, n, H)
        if not self.uses_camera_tokens:
            return vision, None, None, None
        cam, pose, new_state, new_memory = self.camera_embedding(pose_image, state, memory, is_first)
        return torch.cat((cam.unsqueeze(1).to(vision.dtype), vision), dim=1), pose, new_state, new_memory

    def newline_embedding(self, batch: int) -> torch.Tensor:
        """(B, 1, H): the learned image_newline that follows the last frame."""
        return self.image_newline.view(1, 1, -1).expand(batch, 1, -1)

    def video_embeddings(self, pixel_values: torch.Tensor,
                         pose_images: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All frame blocks + newline: pixel_values (B, F, 3, S, S), pose_images (B, F, 3, Hp, Wp)
        -> (embeds (B, F*P + 1, H), poses (B, F, 7) or (B, F, 0))."""
        b, f = pixel_values.shape[:2]
        vision = self.vision_tokens(pixel_values.flatten(0, 1))  # (B*F, n, H)
        vision = vision.view(b, f, vision.shape[1], vision.shape[2])  # (B, F, n, H)
        if self.uses_camera_tokens:
            if self.cfg.pose_prior.previous_frame:
                from loc3r.model.pose_prior import with_previous_frames

                pose_images = with_previous_frames(pose_images)
            state, memory = self.initial_pose_state(b)
            cams, poses = [], []
            for t in range(f):
                is_first = torch.full((b,), 1.0 if t == 0 else 0.0, device=pixel_values.device)
                cam, pose, state, memory = self.camera_embedding(pose_images[:, t], state, memory, is_first)
                cams.append(cam)
                poses.append(pose)
            blocks = torch.cat((torch.stack(cams, 1).unsqueeze(2).to(vision.dtype), vision), dim=2)  # (B, F, P, H)
            poses_t = torch.stack(poses, 1)  # (B, F, 7)
        else:
            blocks = vision
            poses_t = vision.new_zeros(b, f, 0)
        embeds = torch.cat((blocks.flatten(1, 2), self.newline_embedding(b)), dim=1)  # (B, F*P+1, H)
        return embeds, poses_t

    def sequence_embeddings(self, prefix_ids: torch.Tensor, pixel_values: torch.Tensor, suffix_ids: torch.Tensor,
                            pose_images: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[prefix] + frames + newline + [suffix] -> (embeds (B, T, H), poses)."""
        video, poses = self.video_embeddings(pixel_values, pose_images)
        embeds = torch.cat((self.embed_tokens(prefix_ids), video, self.embed_tokens(suffix_ids)), dim=1)
        return embeds, poses

    # -- language model ------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (past_key, past_value), each (L, B, KVH, capacity, D), in the model's dtype."""
        w = self.language_model.embed_tokens.weight
        return self.language_model.empty_cache(batch, capacity, w.dtype, w.device)

    def prefill(self, inputs_embeds: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk of embeddings (B, T, H) at cache_position (T,) -> (hidden (B, T, H), new_key, new_value)."""
        return self.language_model(inputs_embeds, past_key, past_value, cache_position)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, V)."""
        return self.lm_head(hidden)

    def decode_step(self, token_ids: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                    cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_ids (B, 1), cache_position (1,) -> (logits (B, 1, V), hidden (B, 1, H), new_key, new_value)."""
        hidden, k, v = self.prefill(self.embed_tokens(token_ids), past_key, past_value, cache_position)
        return self.logits(hidden), hidden, k, v

    @torch.no_grad()
    def generate_greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int,
                        capacity: Optional[int] = None, eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding after a prompt of embeddings (B, T, H) -> tokens (B, <= max_new_tokens).

        Stops early once every row has produced ``eos_token_id`` (default
        ``cfg.eos_token_id``); finished rows are padded with it.
        """
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        b, t, _ = inputs_embeds.shape
        capacity = capacity or t + max_new_tokens
        past_key, past_value = self.empty_cache(b, capacity)
        positions = torch.arange(t, device=inputs_embeds.device)
        hidden, past_key, past_value = self.prefill(inputs_embeds, past_key, past_value, positions)
        next_token = self.logits(hidden[:, -1:]).argmax(-1)  # (B, 1)
        finished = torch.zeros(b, dtype=torch.bool, device=inputs_embeds.device)
        out = []
        for step in range(max_new_tokens):
            if eos is not None:
                next_token = torch.where(finished[:, None], torch.full_like(next_token, eos), next_token)
                finished = finished | (next_token[:, 0] == eos)
            out.append(next_token)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            pos = torch.tensor([t + step], device=inputs_embeds.device)
            logits, _, past_key, past_value = self.decode_step(next_token, past_key, past_value, pos)
            next_token = logits[:, -1:].argmax(-1)
        return torch.cat(out, dim=1)

    # -- heads ---------------------------------------------------------------
    def position_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """f_pos: (..., H) -> (..., 3) = (x, y, sigma)."""
        return self.f_pos(hidden)

    def orientation_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_ori: (..., H) -> (logits (..., num_bins), angle (...) radians)."""
        logits = self.f_ori(hidden)
        return logits, circular_soft_argmax(logits, self.orientation_bin_centres())

    def bev_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """f_proj: (..., H) -> (..., 4) = (x, y, sigma_x, sigma_y)."""
        return self.f_proj(hidden)

    def orientation_bin_centres(self) -> torch.Tensor:
        """(num_bins,) radians, see :mod:`loc3r.model.heads`."""
        return orientation_bin_centres(self.cfg.heads.num_orientation_bins)

    # -- one-shot ------------------------------------------------------------
    def forward(self, prefix_ids: torch.Tensor, pixel_values: torch.Tensor, suffix_ids: torch.Tensor,
                pose_images: Optional[torch.Tensor] = None) -> Loc3ROutput:
        """Whole video + text in one pass.

        prefix_ids (B, Tp), pixel_values (B, F, 3, S, S), suffix_ids (B, Ts),
        pose_images (B, F, 3, Hp, Wp) when camera tokens are active. The heads
        are read at the first ``<Pos>``/``<Ori>`` of the suffix (its last token
        when absent).
        """
        b, f = pixel_values.shape[:2]
        embeds, poses = self.sequence_embeddings(prefix_ids, pixel_values, suffix_ids, pose_images)
        past_key, past_value = self.empty_cache(b, embeds.shape[1])
        positions = torch.arange(embeds.shape[1], device=embeds.device)
        hidden, _, _ = self.prefill(embeds, past_key, past_value, positions)  # (B, T, H)

        tp = prefix_ids.shape[1]
        per_frame = self.cfg.tokens_per_frame if self.uses_camera_tokens else self.cfg.vision.tokens_per_frame
        first_vision = per_frame - self.cfg.vision.tokens_per_frame  # 1 with a camera token
        frames = hidden[:, tp:tp + f * per_frame].reshape(b, f, per_frame, -1)[:, :, first_vision:]  # (B, F, n, H)
        suffix_start = tp + f * per_frame + 1
        pos_h = gather_positions(hidden, suffix_start + first_token_index(suffix_ids, self.cfg.pos_token_id))
        ori_h = gather_positions(hidden, suffix_start + first_token_index(suffix_ids, self.cfg.ori_token_id))
        ori_logits, ori_angle = self.orientation_head(ori_h)
        return Loc3ROutput(
            logits=self.logits(hidden),
            hidden=hidden,
            position=self.position_head(pos_h),
            orientation_logits=ori_logits,
            orientation=ori_angle,
            bev=self.bev_head(frames),
            poses=poses,
        )
