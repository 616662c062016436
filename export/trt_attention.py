"""Attention for the TensorRT target: one ``loc3r::FusedAttention`` node per attention.

``loc3r export onnx --target tensorrt`` exports the same graphs as the
onnxruntime target, except that every attention becomes the TensorRT plugin
node ``loc3r::FusedAttention`` (semantics of :func:`loc3r.kernels.ops.attention`:
q (B, H, T, D); k/v caches (B, KVH, S, D) already holding the T new rows at
``[prefix_len, prefix_len + T)``; prefix_lens (B,) int32; attributes ``scale``,
``causal``, ``plugin_namespace="loc3r"``). No onnxruntime contrib op remains.

- **Decoder** (:func:`trt_decoder_attention`): RoPE with standard ops
  (Gather of the cos/sin tables at the positions, rotate-half), then the new
  K/V rows are written into the static-capacity cache with one ``ScatterND``
  per cache (indices (B, KVH, T, 3) = [b, kv_head, position]), and the
  scattered cache is the ``present`` output and the plugin's cache input
  (causal=1). ScatterND was chosen over ScatterElements (the index tensor is
  T*KVH*3 integers, not T*KVH*D) and over Slice+Concat (which needs the
  dynamic tail length and three copies): TensorRT 10's ONNX parser maps it to
  ``IScatterLayer`` (kND), which takes dynamic shapes. Its output is a new
  tensor, so the runtime binds ``present`` to a second buffer and swaps the
  two each step (ping-pong, see :mod:`loc3r.runtime.session`).
- **Vision tower / pose prior** (:func:`trt_vision_attention`,
  :func:`trt_pose_prior_attention`): k/v are the "cache" with prefix 0 and
  causal=0. A cross attention with Nk >= Nq uses prefix Nk - Nq (every query
  sees all Nk keys); with Nk < Nq (the pose prior's memory write) the queries
  are folded into the head axis ((B, H*Nq, 1, D), Nq query heads per KV head),
  so the plugin's contract (prefix >= 0, cache rows >= T) holds.
- **Head dims** the native plugin lacks (it is compiled for 64 and 128;
  SigLIP's 72, the pose prior's 48) are zero-padded up to the next compiled
  size: zeros in q/k add nothing to q.k, zero columns of v are sliced off, and
  the scale stays 1/sqrt(original D).

``form="decomposed"`` exports the same graphs with the attention lowered to
standard ops (:func:`loc3r.kernels.prefill_attention.attention_decomposed`),
so onnxruntime can check all the code around the plugin (RoPE, cache write,
padding, folding) against the PyTorch model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from loc3r.errors import Loc3rError
from loc3r.export.fused_attention import _instance_overrides, _merge_heads
from loc3r.kernels.onnx_symbolic import FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP
from loc3r.model.qwen2 import Qwen2Attention

FORMS = ("fused", "decomposed")
PLUGIN_HEAD_DIMS = (64, 128)  # head dims the native plugin's AOT kernels are compiled for


class FusedAttentionOp(torch.autograd.Function):
    """``loc3r::FusedAttention`` for the torchscript exporter (eager: the kernels' reference)."""

    @staticmethod
    def forward(ctx, q, k_cache, v_cache, prefix_lens, scale: float, causal: bool):
        from loc3r.kernels.prefill_attention import attention_reference

        return attention_reference(q, k_cache, v_cache, prefix_lens, scale, causal)  # (B, H, T, D)

    @staticmethod
    def symbolic(g, q, k_cache, v_cache, prefix_lens, scale: float, causal: bool):
        out = g.op(f"{FUSED_ATTENTION_DOMAIN}::{FUSED_ATTENTION_OP}", q, k_cache, v_cache, prefix_lens,
                   scale_f=float(scale), causal_i=int(bool(causal)), plugin_namespace_s=FUSED_ATTENTION_DOMAIN)
        out.setType(q.type())
        return out


class ScatterRowsOp(torch.autograd.Function):
    """``ScatterND(cache, indices, rows)``: cache (B, KVH, S, D) with rows (B, KVH, T, D) written at
    indices (B, KVH, T, 3) = [b, kv_head, position]; out of place."""

    @staticmethod
    def forward(ctx, cache, indices, rows):
        out = cache.clone()
        out[indices[..., 0], indices[..., 1], indices[..., 2]] = rows.to(cache.dtype)
        return out

    @staticmethod
    def symbolic(g, cache, indices, rows):
        return g.op("ScatterND", cache, indices, rows).setType(cache.type())


def check_form(form: str) -> str:
    if form not in FORMS:
        raise Loc3rError(f"TensorRT attention form must be one of {', '.join(FORMS)}, got {form!r}")
    return form


def padded_head_dim(d: int) -> int:
    """The head dim the plugin runs ``d`` at: the smallest compiled size >= d, else the next power of two."""
    for size in PLUGIN_HEAD_DIMS:
        if d <= size:
            return size
    return 1 << (d - 1).bit_length()


def plugin_attention(q, k_cache, v_cache, prefix_lens, scale: float, causal: bool, form: str):
    """q (B, H, T, D) over caches (B, KVH, S, D) -> (B, H, T, D), one FusedAttention node (or decomposed)."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    if dp != d:  # zero columns: q.k unchanged, extra v columns sliced off below
        pad = (0, dp - d)
        q, k_cache, v_cache = (nn.functional.pad(t, pad) for t in (q, k_cache, v_cache))
    if form == "decomposed":
        from loc3r.kernels.prefill_attention import attention_decomposed

        out = attention_decomposed(q, k_cache, v_cache, prefix_lens, scale, causal)
    else:
        out = FusedAttentionOp.apply(q, k_cache, v_cache, prefix_lens, scale, causal)
    return out[..., :d] if dp != d else out


def _zero_lens(x: torch.Tensor) -> torch.Tensor:
    """(B,) int32 zeros for x (B, ...), traced from x's batch size."""
    return torch.zeros_like(x.reshape(x.shape[0], -1)[:, 0], dtype=torch.int32)


def full_attention(q, k, v, scale: float, form: str) -> torch.Tensor:
    """Non-causal q (B, H, Nq, D) over k/v (B, H, Nk, D) -> (B, H, Nq, D) through the plugin's cache contract."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if nk >= nq:  # every query sees all Nk "cache" rows: prefix Nk - Nq
        return plugin_attention(q, k, v, _zero_lens(q) + (nk - nq), scale, False, form)
    # Fewer keys than queries: fold the queries into heads, Nq query heads per KV head, T = 1.
    folded = q.reshape(b, h * nq, 1, d)  # query head hh * Nq + i reads KV head hh
    out = plugin_attention(folded, k, v, _zero_lens(q) + (nk - 1), scale, False, form)  # (B, H*Nq, 1, D)
    return out.reshape(b, h, nq, d)


# --- decoder --------------------------------------------------------------------------------------

def rope_rows(table_half: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cos or sin (S_max, D/2) at positions (B, T) -> (B, 1, T, D), halves duplicated (rotate-half layout)."""
    full = torch.cat((table_half, table_half), dim=-1)  # (S_max, D)
    return full[positions].unsqueeze(1)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, D) with cos/sin (B, 1, T, D) -> rotated x, as Qwen2."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def cache_indices(b: int, kvh: int, positions: torch.Tensor) -> torch.Tensor:
    """ScatterND indices (B, KVH, T, 3) = [b, kv_head, position] for positions (B, T) int64."""
    t = positions.shape[1]
    bi = torch.arange(b).view(b, 1, 1).expand(b, kvh, t)
    hi = torch.arange(kvh).view(1, kvh, 1).expand(b, kvh, t)
    pi = positions.unsqueeze(1).expand(b, kvh, t)
    return torch.stack((bi, hi, pi), dim=-1)  # (B, KVH, T, 3)


def _decoder_attend(form: str) -> Callable:
    def attend(self: Qwen2Attention, q, k, v, caches, _sin, past_key, past_value, seqlens_k, total_len):
        """Slots as in :mod:`loc3r.export.graph_decoder`: ``caches`` the RotaryCaches, ``seqlens_k``
        (B,) int32 = total - 1 per sequence, ``total_len`` () int32 = the longest total, which bounds the
        positions (a no-op for consistent inputs; it keeps the graph's inputs those of the onnxruntime target)."""
        b, t, _ = q.shape
        d = self.head_dim
        prefix = seqlens_k.to(torch.int64) + 1 - t  # (B,) first position of this chunk
        steps = torch.arange(t)  # (T,)
        positions = torch.minimum(prefix[:, None] + steps[None, :], total_len.to(torch.int64) - 1)  # (B, T)
        cos = rope_rows(caches.cos_cache, positions).to(q.dtype)  # (B, 1, T, D)
        sin = rope_rows(caches.sin_cache, positions).to(q.dtype)
        qh = rotate_half_rope(q.view(b, t, self.num_heads, d).transpose(1, 2), cos, sin)  # (B, H, T, D)
        kh = rotate_half_rope(k.view(b, t, self.num_kv_heads, d).transpose(1, 2), cos, sin)  # (B, KVH, T, D)
        vh = v.view(b, t, self.num_kv_heads, d).transpose(1, 2)  # (B, KVH, T, D)
        idx = cache_indices(b, self.num_kv_heads, positions)  # (B, KVH, T, 3)
        present_key = ScatterRowsOp.apply(past_key, idx, kh)  # (B, KVH, S, D)
        present_value = ScatterRowsOp.apply(past_value, idx, vh)
        out = plugin_attention(qh, present_key.to(qh.dtype), present_value.to(qh.dtype),
                               prefix.to(torch.int32), d**-0.5, True, form)  # (B, H, T, D)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * d), present_key, present_value

    return attend


@contextmanager
def trt_decoder_attention(decoder: nn.Module, form: str = "fused") -> Iterator[None]:
    """Every :class:`Qwen2Attention` under ``decoder``: RoPE + ScatterND cache write + FusedAttention."""
    fn = _decoder_attend(check_form(form))
    pairs = [(m, "attend_with_cache", fn) for m in decoder.modules() if isinstance(m, Qwen2Attention)]
    with _instance_overrides(pairs):
        yield


# --- vision tower and pose prior ---------------------------------------------------------------------

def _siglip_forward(form: str) -> Callable:
    def forward(self, x):
        b, n, _ = x.shape  # (B, N, C)

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)

        out = full_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                             self.head_dim**-0.5, form)  # (B, h, N, hd)
        return self.out_proj(_merge_heads(out))

    return forward


@contextmanager
def trt_vision_attention(vision_tower: nn.Module, form: str = "fused") -> Iterator[None]:
    """Every SigLIP attention under ``vision_tower`` becomes one FusedAttention node (causal=0)."""
    from loc3r.model.siglip import SiglipAttention

    fn = _siglip_forward(check_form(form))
    pairs = [(m, "forward", fn) for m in vision_tower.modules() if isinstance(m, SiglipAttention)]
    with _instance_overrides(pairs):
        yield


def _rope_full_attention(q, k, v, q_rope, k_rope, form: str) -> torch.Tensor:
    """q/k/v (B, H, N, d) with optional 2D RoPE tables -> (B, Nq, H*d), one FusedAttention node."""
    from loc3r.model.rope2d import apply_rope

    if q_rope is not None:
        q = apply_rope(q, *q_rope)
    if k_rope is not None:
        k = apply_rope(k, *k_rope)
    return _merge_heads(full_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]), form))


def _pose_self_forward(form: str) -> Callable:
    def forward(self, x, rope):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        return self.proj(_rope_full_attention(q, k, v, rope, rope, form))

    return forward


def _pose_cross_forward(form: str) -> Callable:
    def forward(self, query, context, q_rope, k_rope):
        q = self._heads(self.projq(query))  # (B, H, Nq, hd)
        k = self._heads(self.projk(context))  # (B, H, Nk, hd)
        v = self._heads(self.projv(context))
        return self.proj(_rope_full_attention(q, k, v, q_rope, k_rope, form))

    return forward


@contextmanager
def trt_pose_prior_attention(pose_prior: nn.Module, form: str = "fused") -> Iterator[None]:
    """Every self/cross attention of the pose prior becomes one FusedAttention node (RoPE before it)."""
    from loc3r.model.pose_prior import CrossAttention, SelfAttention

    check_form(form)
    pairs = []
    for m in pose_prior.modules():
        if isinstance(m, SelfAttention):
            pairs.append((m, "forward", _pose_self_forward(form)))
        elif isinstance(m, CrossAttention):
            pairs.append((m, "forward", _pose_cross_forward(form)))
    with _instance_overrides(pairs):
        yield
