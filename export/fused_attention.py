"""Fused attention for ONNX export: onnxruntime contrib ops patched in at export time.

Two ``torch.autograd.Function`` s whose eager ``forward`` does the reference
math (so tracing sees the right shapes and values) and whose ``symbolic``
emits one onnxruntime contrib node for the torchscript exporter
(``torch.onnx.export(..., dynamo=False)``):

- :class:`GroupQueryAttentionOp` -> ``com.microsoft.GroupQueryAttention``
  with rotary inside (``do_rotary=1``, rotate-half layout as Qwen2), the
  cos/sin caches as initializers, and past/present KV of shape
  (B, KVH, S_max, D) that the runtime binds to one shared buffer, so the op
  writes the new keys/values in place at ``[past_len, total)``.
- :class:`MultiHeadAttentionOp` -> ``com.microsoft.MultiHeadAttention``
  (non-causal; SigLIP and the pose prior's self/cross attention). 2D RoPE
  stays as elementwise ops on q/k before the fused node.

The patches (:func:`fused_decoder_attention`, :func:`fused_vision_attention`,
:func:`fused_pose_prior_attention`) are context managers that override the
attention method of each module *instance* and restore it on exit; model
code is never changed.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from loc3r.model.qwen2 import Qwen2Attention, rope_cos_sin

CONTRIB_DOMAIN = "com.microsoft"


class GroupQueryAttentionOp(torch.autograd.Function):
    """Causal GQA with rotary inside and a shared past/present buffer.

    q (B, T, H*D), k/v (B, T, KVH*D), past_key/past_value (B, KVH, S, D),
    seqlens_k (B,) int32 = total - 1, total_len () int32 = past_len + T,
    cos_cache/sin_cache (S_max, D/2) -> out (B, T, H*D), present_key/value
    (B, KVH, S, D) with this chunk written at [total - T, total).
    """

    @staticmethod
    def forward(ctx, q, k, v, past_key, past_value, seqlens_k, total_len, cos_cache, sin_cache,
                num_heads: int, kv_num_heads: int):
        b, t, _ = q.shape
        d = past_key.shape[-1]
        total = int(total_len)
        positions = torch.arange(total - t, total, device=q.device)  # (T,)
        cos = torch.cat((cos_cache[positions], cos_cache[positions]), dim=-1)  # (T, D)
        sin = torch.cat((sin_cache[positions], sin_cache[positions]), dim=-1)

        def rope(x):  # (B, h, T, D)
            half = d // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

        qh = rope(q.view(b, t, num_heads, d).transpose(1, 2))  # (B, H, T, D)
        kh = rope(k.view(b, t, kv_num_heads, d).transpose(1, 2))  # (B, KVH, T, D)
        vh = v.view(b, t, kv_num_heads, d).transpose(1, 2)
        present_key = past_key.index_copy(2, positions, kh)
        present_value = past_value.index_copy(2, positions, vh)
        keys = present_key[:, :, :total].repeat_interleave(num_heads // kv_num_heads, dim=1)  # (B, H, total, D)
        values = present_value[:, :, :total].repeat_interleave(num_heads // kv_num_heads, dim=1)
        visible = torch.arange(total)[None, :] <= positions[:, None]  # (T, total)
        scores = torch.matmul(qh, keys.transpose(-1, -2)) * d**-0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, H, T, D)
        return out.transpose(1, 2).reshape(b, t, num_heads * d), present_key, present_value

    @staticmethod
    def symbolic(g, q, k, v, past_key, past_value, seqlens_k, total_len, cos_cache, sin_cache,
                 num_heads: int, kv_num_heads: int):
        out, present_key, present_value = g.op(
            f"{CONTRIB_DOMAIN}::GroupQueryAttention", q, k, v, past_key, past_value, seqlens_k, total_len,
            cos_cache, sin_cache, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, do_rotary_i=1,
            rotary_interleaved_i=0, outputs=3)
        out.setType(q.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class MultiHeadAttentionOp(torch.autograd.Function):
    """Non-causal attention: q (B, Nq, E), k/v (B, Nk, E) -> (B, Nq, E); scale 1/sqrt(E/heads)."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int):
        b, nq, e = q.shape
        d = e // num_heads

        def heads(x):
            return x.view(b, x.shape[1], num_heads, d).transpose(1, 2)  # (B, h, N, d)

        out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(b, nq, e)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        return g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=num_heads).setType(q.type())


class RotaryCaches(nn.Module):
    """cos/sin caches (S_max, D/2) for GroupQueryAttention, from the model's own RoPE formula."""

    def __init__(self, head_dim: int, theta: float, max_len: int):
        super().__init__()
        cos, sin = rope_cos_sin(torch.arange(max_len), head_dim, theta)  # (S_max, D)
        self.register_buffer("cos_cache", cos[:, : head_dim // 2].contiguous(), persistent=False)
        self.register_buffer("sin_cache", sin[:, : head_dim // 2].contiguous(), persistent=False)


def _gqa_attend(self: Qwen2Attention, q, k, v, caches: RotaryCaches, sin_unused, past_key, past_value,
                seqlens_k, total_len):
    """Replacement for :meth:`Qwen2Attention.attend_with_cache` at export time.

    Called by the export wrapper with the same argument slots: ``cos`` carries
    the :class:`RotaryCaches`, ``cache_position`` the GQA ``seqlens_k`` and
    ``mask`` the ``total_sequence_length``.
    """
    return GroupQueryAttentionOp.apply(q, k, v, past_key, past_value, seqlens_k, total_len, caches.cos_cache,
                                       caches.sin_cache, self.num_heads, self.num_kv_heads)


@contextmanager
def _instance_overrides(pairs: list[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Set instance attributes for the duration of the block, then remove them."""
    try:
        for module, name, fn in pairs:
            setattr(module, name, types.MethodType(fn, module))
        yield
    finally:
        for module, name, _ in pairs:
            module.__dict__.pop(name, None)


@contextmanager
def fused_decoder_attention(decoder: nn.Module) -> Iterator[None]:
    """Every :class:`Qwen2Attention` under ``decoder`` uses :class:`GroupQueryAttentionOp`."""
    pairs = [(m, "attend_with_cache", _gqa_attend) for m in decoder.modules() if isinstance(m, Qwen2Attention)]
    with _instance_overrides(pairs):
        yield


def _siglip_forward(self, x):
    """SiglipAttention.forward with one MultiHeadAttention node."""
    out = MultiHeadAttentionOp.apply(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)  # (B, N, D)
    return self.out_proj(out)


@contextmanager
def fused_vision_attention(vision_tower: nn.Module) -> Iterator[None]:
    """Every SigLIP attention under ``vision_tower`` becomes one MultiHeadAttention node."""
    from loc3r.model.siglip import SiglipAttention

    pairs = [(m, "forward", _siglip_forward) for m in vision_tower.modules() if isinstance(m, SiglipAttention)]
    with _instance_overrides(pairs):
        yield


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _rope_mha(q, k, v, q_rope, k_rope, num_heads: int) -> torch.Tensor:
    """q/k/v (B, H, N, d) with optional 2D RoPE tables -> (B, Nq, H*d) through MultiHeadAttention."""
    from loc3r.model.rope2d import apply_rope

    if q_rope is not None:
        q = apply_rope(q, *q_rope)
    if k_rope is not None:
        k = apply_rope(k, *k_rope)
    return MultiHeadAttentionOp.apply(_merge_heads(q), _merge_heads(k), _merge_heads(v), num_heads)


def _pose_self_forward(self, x, rope):
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
    return self.proj(_rope_mha(q, k, v, rope, rope, self.num_heads))


def _pose_cross_forward(self, query, context, q_rope, k_rope):
    q = self._heads(self.projq(query))  # (B, H, Nq, hd)
    k = self._heads(self.projk(context))  # (B, H, Nk, hd)
    v = self._heads(self.projv(context))
    return self.proj(_rope_mha(q, k, v, q_rope, k_rope, self.num_heads))


@contextmanager
def fused_pose_prior_attention(pose_prior: nn.Module) -> Iterator[None]:
    """Every self/cross attention of the pose prior becomes one MultiHeadAttention node (RoPE before it)."""
    from loc3r.model.pose_prior import CrossAttention, SelfAttention

    pairs = []
    for m in pose_prior.modules():
        if isinstance(m, SelfAttention):
            pairs.append((m, "forward", _pose_self_forward))
        elif isinstance(m, CrossAttention):
            pairs.append((m, "forward", _pose_cross_forward))
    with _instance_overrides(pairs):
        yield
