"""CUT3R-style recurrent pose prior: one frame in, camera token + pose out.

Parameter names and shapes follow CUT3R's ``ARCroco3DStereo``
(``src/dust3r/model.py`` in CUT3R/CUT3R) for the pose path only, so a
converted checkpoint (:mod:`loc3r.model.convert_cut3r`) loads with
``strict=True``:

- ``patch_embed.proj``: 16x16 conv; ``enc_blocks.N``: ViT blocks with 2D
  RoPE; ``enc_norm``.
- ``register_tokens`` (an ``nn.Embedding``) projected by
  ``decoder_embed_state`` is the initial state.
- ``dec_blocks_state.N`` / ``dec_blocks.N``: paired decoder blocks. In each
  layer the state attends to the frame and the frame to the state, both
  reading the previous layer's outputs. ``dec_norm_state`` / ``dec_norm``.
- ``pose_token``: the learned pose token of frame 0.
- ``pose_retriever``: CUT3R's ``LocalMemory``. ``read_blocks`` fetch the
  pose token of later frames with the mean encoder token as the query;
  ``write_blocks`` fold ``[proj_q(mean), pose_out]`` into the memory.
- ``downstream_head.pose_head.mlp``: the pose MLP (Dd -> 4 Dd -> 7).

Everything is tensor in / tensor out with explicit state, and there is no
data-dependent Python branch: frame 0 differs from later frames only by the
``is_first`` blend, so the step exports as one graph.

Frame preprocessing (owned by the runtime, not done here): convert to RGB in
[0, 1], resize so the long side is ``cfg.img_width`` (aspect kept), centre-
crop each side down to a multiple of ``cfg.patch_size`` (a 4:3 frame at 512
gives 512x384), then normalise with mean = std = 0.5, i.e. ``x * 2 - 1``.
The tensor is (B, 3, Hp, Wp), channels first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from loc3r.model.config import PosePriorConfig
from loc3r.model.rope2d import apply_rope, rope_cos_sin

RopeTables = Optional[tuple[torch.Tensor, torch.Tensor]]


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear (timm/CroCo ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rope: RopeTables,
            k_rope: RopeTables) -> torch.Tensor:
    """Multi-head attention over (B, H, N, hd) tensors, RoPE on q/k if given."""
    if q_rope is not None:
        q = apply_rope(q, *q_rope)
    if k_rope is not None:
        k = apply_rope(k, *k_rope)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Nq, hd)
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class SelfAttention(nn.Module):
    """Fused-qkv self-attention (CroCo ``Attention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        return self.proj(_attend(q, k, v, rope, rope))


class CrossAttention(nn.Module):
    """Separate q/k/v projections (CroCo ``CrossAttention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, q_rope: RopeTables,
                k_rope: RopeTables) -> torch.Tensor:
        q = self._heads(self.projq(query))  # (B, H, Nq, hd)
        k = self._heads(self.projk(context))  # (B, H, Nk, hd)
        v = self._heads(self.projv(context))  # (B, H, Nk, hd)
        return self.proj(_attend(q, k, v, q_rope, k_rope))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block (CroCo ``Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to a normalised context, MLP (CroCo ``DecoderBlock``)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.norm_y = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, x_rope: RopeTables,
                context_rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), x_rope)
        context = self.norm_y(context)
        x = x + self.cross_attn(self.norm2(x), context, x_rope, context_rope)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; no norm (CroCo ``PatchEmbed``)."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image).flatten(2).transpose(1, 2)  # (B, N, De), row-major patches


class LocalMemory(nn.Module):
    """CUT3R's pose memory: learned slots read and written by decoder blocks, no RoPE."""

    def __init__(self, cfg: PosePriorConfig):
        super().__init__()
        dim = cfg.dec_embed_dim
        self.value_dim = dim
        self.proj_q = nn.Linear(cfg.enc_embed_dim, dim)
        self.masked_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mem = nn.Parameter(torch.zeros(1, cfg.mem_slots, cfg.mem_dim))
        hidden = int(cfg.mem_dim * cfg.mlp_ratio)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(DecoderBlock(cfg.mem_dim, cfg.dec_num_heads, hidden, cfg.norm_eps)
                                 for _ in range(cfg.mem_depth))

        self.write_blocks = blocks()
        self.read_blocks = blocks()

    def read(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Pose token (B, 1, Dd) for the mean frame feature ``query`` (B, 1, De)."""
        key = self.proj_q(query)  # (B, 1, Dd)
        x = torch.cat([key, self.masked_token.expand(key.shape[0], -1, -1)], dim=-1)  # (B, 1, Dm)
        for block in self.read_blocks:
            x = block(x, memory, None, None)
        return x[..., self.value_dim:]  # (B, 1, Dd)

    def write(self, memory: torch.Tensor, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Memory (B, M, Dm) updated with the pair (``query`` (B, 1, De), ``value`` (B, 1, Dd))."""
        entry = torch.cat([self.proj_q(query), value], dim=-1)  # (B, 1, Dm)
        for block in self.write_blocks:
            memory = block(memory, entry, None, None)
        return memory


class PoseDecoder(nn.Module):
    """CUT3R's ``PoseDecoder``: an MLP from the pose token to [t(3), q(4)]."""

    def __init__(self, cfg: PosePriorConfig):
        super().__init__()
        self.mlp = Mlp(cfg.dec_embed_dim, cfg.pose_head_hidden, 7)

    def forward(self, pose_token: torch.Tensor) -> torch.Tensor:
        return self.mlp(pose_token)  # (B, 7)


class PoseHeads(nn.Module):
    """Holds the pose head under CUT3R's ``downstream_head.pose_head`` name; the DPT heads are dropped."""

    def __init__(self, cfg: PosePriorConfig):
        super().__init__()
        self.pose_head = PoseDecoder(cfg)


def _expm1_over_x(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) / x for x >= 0, using only ops every ONNX exporter knows (no Expm1).

    expm1(x) = 2 tanh(x/2) / (1 - tanh(x/2)) keeps float32 precision for
    small x where exp(x) - 1 would cancel; from x = 1 on, exp(x) - 1 is
    exact enough. Near 0 the series 1 + x/2 + x^2/6 gives the limit 1
    (CUT3R clamps the divisor instead; either way t = 0 maps to 0).
    """
    tiny = x < 1e-3
    large = x >= 1.0
    safe = torch.where(tiny, torch.ones_like(x), x)
    half_tanh = torch.tanh(0.5 * safe)
    mid = 2.0 * half_tanh / ((1.0 - half_tanh) * safe)
    big = (torch.exp(safe) - 1.0) / safe
    series = 1.0 + x * (0.5 + x * (1.0 / 6.0))
    return torch.where(tiny, series, torch.where(large, big, mid))


def pose_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """CUT3R's ``postprocess_pose`` in 'exp' mode on raw head output (B, 7).

    Translation scaled by expm1(|t|)/|t|; quaternion (w, x, y, z) normalised
    with w >= 0. Returns (B, 7) = [t(3), qw, qx, qy, qz].
    """
    trans = raw[..., 0:3]
    dist = trans.norm(dim=-1, keepdim=True)  # (B, 1)
    trans = trans * _expm1_over_x(dist)
    quat = F.normalize(raw[..., 3:7], p=2.0, dim=-1)
    quat = torch.where(quat[..., 0:1] < 0, -quat, quat)
    return torch.cat([trans, quat], dim=-1)


def image_positions(batch: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """(B, h*w, 2) int64 (y, x) patch positions in row-major order."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)  # (N,)
    return torch.stack([rows, cols], dim=-1).unsqueeze(0).expand(batch, -1, -1)


class PosePrior(nn.Module):
    """The CUT3R pose path as an explicit-state step function.

    ``forward(image, state, memory, is_first)`` runs one frame; start a
    stream with :meth:`initial_state` and :meth:`initial_memory` and
    ``is_first = 1`` on its first frame.
    """

    def __init__(self, cfg: PosePriorConfig):
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.enc_embed_dim, cfg.dec_embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, enc, cfg.in_channels)
        self.enc_blocks = nn.ModuleList(EncoderBlock(enc, cfg.enc_num_heads, cfg.enc_mlp_hidden, cfg.norm_eps)
                                        for _ in range(cfg.enc_depth))
        self.enc_norm = nn.LayerNorm(enc, eps=cfg.norm_eps)
        self.register_tokens = nn.Embedding(cfg.state_size, enc)
        self.decoder_embed_state = nn.Linear(enc, dec)
        self.dec_blocks_state = nn.ModuleList(
            DecoderBlock(dec, cfg.state_dec_num_heads, cfg.dec_mlp_hidden, cfg.norm_eps)
            for _ in range(cfg.dec_depth))
        self.dec_norm_state = nn.LayerNorm(dec, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.dec_blocks = nn.ModuleList(DecoderBlock(dec, cfg.dec_num_heads, cfg.dec_mlp_hidden, cfg.norm_eps)
                                        for _ in range(cfg.dec_depth))
        self.dec_norm = nn.LayerNorm(dec, eps=cfg.norm_eps)
        self.pose_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.pose_retriever = LocalMemory(cfg)
        self.downstream_head = PoseHeads(cfg)
        self._init_random()

    def _init_random(self) -> None:
        """CUT3R-like initialisation, so an unconverted model is a sane random network."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pose_token, std=0.02)
        nn.init.normal_(self.pose_retriever.masked_token, std=0.2)
        nn.init.normal_(self.pose_retriever.mem, std=0.2)

    # -- state -------------------------------------------------------------
    def initial_state(self, batch: int) -> torch.Tensor:
        """The state before frame 0: ``decoder_embed_state(register_tokens)``, (B, S, Dd)."""
        state = self.decoder_embed_state(self.register_tokens.weight)  # (S, Dd)
        return state.unsqueeze(0).expand(batch, -1, -1)

    def initial_memory(self, batch: int) -> torch.Tensor:
        """The learned local memory ``pose_retriever.mem``, (B, M, Dm)."""
        return self.pose_retriever.mem.expand(batch, -1, -1)

    def state_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, S, 2) int64 grid positions of the state tokens (CUT3R's '2d' state_pe)."""
        index = torch.arange(self.cfg.state_size, device=device)
        width = self.cfg.state_grid_width
        return torch.stack([index // width, index % width], dim=-1).unsqueeze(0).expand(batch, -1, -1)

    # -- encoder -----------------------------------------------------------
    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features (B, N, De) and their (y, x) positions (B, N, 2) for ``image`` (B, 3, Hp, Wp)."""
        batch, _, height, width = image.shape
        patch = self.cfg.patch_size
        pos = image_positions(batch, height // patch, width // patch, image.device)  # (B, N, 2)
        x = self.patch_embed(image)  # (B, N, De)
        rope = rope_cos_sin(pos, self.cfg.enc_embed_dim // self.cfg.enc_num_heads, self.cfg.rope_base)
        for block in self.enc_blocks:
            x = block(x, rope)
        return self.enc_norm(x), pos

    # -- recurrent decoder -------------------------------------------------
    def decode_tokens(self, feat: torch.Tensor, pos: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                      is_first: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One recurrent step on encoded features.

        Args: ``feat`` (B, N, De) and ``pos`` (B, N, 2) from :meth:`encode`;
        ``state`` (B, S, Dd); ``memory`` (B, M, Dm); ``is_first`` (B,) float,
        1 on a stream's first frame (learned pose token) else 0 (pose token
        read from memory).

        Returns ``(camera_token (B, Dd), pose (B, 7), new_state (B, S, Dd),
        new_memory (B, M, Dm), image_tokens (B, N, Dd))``; the decoded image
        tokens feed CUT3R's dense heads, which only stage-1 training uses here.
        """
        cfg = self.cfg
        batch = feat.shape[0]
        global_feat = feat.mean(dim=1, keepdim=True)  # (B, 1, De)
        learned = self.pose_token.expand(batch, -1, -1)  # (B, 1, Dd)
        retrieved = self.pose_retriever.read(global_feat, memory)  # (B, 1, Dd)
        first = is_first.to(learned.dtype).reshape(batch, 1, 1)
        pose_feat = first * learned + (1.0 - first) * retrieved  # (B, 1, Dd)

        f_img = torch.cat([pose_feat, self.decoder_embed(feat)], dim=1)  # (B, 1+N, Dd)
        pose_pos = torch.full((batch, 1, 2), -1, dtype=pos.dtype, device=pos.device)
        pos_img = torch.cat([pose_pos, pos], dim=1)  # (B, 1+N, 2)
        pos_state = self.state_positions(batch, feat.device)  # (B, S, 2)

        dec_hd = cfg.dec_embed_dim // cfg.dec_num_heads
        state_hd = cfg.dec_embed_dim // cfg.state_dec_num_heads
        img_rope_dec = rope_cos_sin(pos_img, dec_hd, cfg.rope_base)
        state_rope_dec = rope_cos_sin(pos_state, dec_hd, cfg.rope_base)
        img_rope_state = rope_cos_sin(pos_img, state_hd, cfg.rope_base)
        state_rope_state = rope_cos_sin(pos_state, state_hd, cfg.rope_base)

        f_state = state
        for block_state, block_img in zip(self.dec_blocks_state, self.dec_blocks):
            # Both sides read the previous layer's outputs.
            next_state = block_state(f_state, f_img, state_rope_state, img_rope_state)
            f_img = block_img(f_img, f_state, img_rope_dec, state_rope_dec)
            f_state = next_state
        new_state = self.dec_norm_state(f_state)  # (B, S, Dd)
        f_img = self.dec_norm(f_img)  # (B, 1+N, Dd)

        camera_token = f_img[:, 0]  # (B, Dd): CUT3R's pose_out
        new_memory = self.pose_retriever.write(memory, global_feat, f_img[:, 0:1])  # (B, M, Dm)
        pose = pose_from_raw(self.downstream_head.pose_head(camera_token))  # (B, 7)
        return camera_token, pose, new_state, new_memory, f_img[:, 1:]

    def decode_step(self, feat: torch.Tensor, pos: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                    is_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One recurrent step (:meth:`decode_tokens` without the image tokens): returns
        ``(camera_token (B, Dd), pose (B, 7), new_state (B, S, Dd), new_memory (B, M, Dm))``."""
        return self.decode_tokens(feat, pos, state, memory, is_first)[:4]

    def forward(self, image: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                is_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame: ``image`` (B, 3, Hp, Wp) normalised with mean = std = 0.5.

        Returns ``(camera_token (B, Dd), pose (B, 7) = [t, qw, qx, qy, qz],
        new_state (B, S, Dd), new_memory (B, M, Dm))``; the pose is
        camera-to-world in the first frame's coordinates.
        """
        feat, pos = self.encode(image)
        return self.decode_step(feat, pos, state, memory, is_first)


def with_previous_frames(images: torch.Tensor) -> torch.Tensor:
    """Clips (B, F, 3, H, W) -> (B, F, 6, H, W): each frame followed by its predecessor on the
    channel axis, the first frame by itself (``PosePriorConfig.previous_frame``)."""
    previous = torch.cat((images[:, :1], images[:, :-1]), dim=1)
    return torch.cat((images, previous), dim=2)
