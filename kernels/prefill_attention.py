"""Prefill attention: a block of T new tokens attends causally to itself and fully to a cached prefix.

Layout (the KV cache is preallocated and written in place before the call):
- ``q``: (B, H, T, D), the new tokens' queries;
- ``k_cache``, ``v_cache``: (B, KVH, S, D) with ``S >= prefix_len + T``; rows
  ``[prefix_len, prefix_len + T)`` already hold the new tokens' keys/values, rows past
  ``prefix_len + T`` are ignored;
- ``prefix_lens``: (B,) int32, cached tokens before the block, per sequence;
- query ``i`` sits at position ``prefix_len + i`` and sees keys ``j <= prefix_len + i``
  (``causal=True``) or all keys ``j < prefix_len + T`` (``causal=False``);
- GQA: query head ``h`` reads KV head ``h // (H // KVH)``.

The Triton kernel is flash attention: an online softmax over BLOCK_N keys at a time,
fp32 accumulation and exp2 with the running max subtracted, so fp16 inputs at large
scale never overflow. Head dims 64 and 128 (any power of two from 16 to 256 works).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from loc3r.errors import Loc3rError

LOG2E = 1.4426950408889634


def attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: Optional[float] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch reference for prefill (and decode, T=1): (B, H, T, D) in q's dtype, computed in fp32."""
    b, h, t, d = q.shape
    kvh = k_cache.shape[1]
    scale = default_scale(d) if scale is None else scale
    out = torch.empty_like(q)
    for i in range(b):
        p = int(prefix_lens[i])
        end = p + t
        k = k_cache[i, :, :end].float().repeat_interleave(h // kvh, dim=0)  # (H, end, D)
        v = v_cache[i, :, :end].float().repeat_interleave(h // kvh, dim=0)  # (H, end, D)
        s = (q[i].float() @ k.transpose(-1, -2)) * scale  # (H, T, end)
        if causal:
            q_pos = p + torch.arange(t, device=q.device)[:, None]  # (T, 1)
            k_pos = torch.arange(end, device=q.device)[None, :]  # (1, end)
            s = s.masked_fill(k_pos > q_pos, float("-inf"))
        out[i] = (torch.softmax(s, dim=-1) @ v).to(q.dtype)  # (H, T, D)
    return out


def attention_decomposed(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """The same attention as plain tensor ops over the whole cache with a mask: no Python loop,
    no data-dependent shapes, so ``torch.onnx.export`` lowers it to standard ONNX ops
    (for onnxruntime graphs, which have no FusedAttention kernel). fp32 softmax."""
    b, h, t, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[:, :, None].expand(b, kvh, h // kvh, s, d).reshape(b, h, s, d)  # (B, H, S, D)
    v = v_cache[:, :, None].expand(b, kvh, h // kvh, s, d).reshape(b, h, s, d)  # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    lens = prefix_lens.to(torch.int64)
    k_pos = torch.arange(s, device=q.device)  # (S,)
    if causal:
        last = lens[:, None] + torch.arange(t, device=q.device)[None, :]  # (B, T) own position
    else:
        last = (lens + t - 1)[:, None].expand(b, t)  # (B, T) last new token
    allowed = k_pos[None, None, :] <= last[:, :, None]  # (B, T, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)  # (B, H, T, D)


def default_scale(head_dim: int) -> float:
    """Softmax scale 1/sqrt(D)."""
    return 1.0 / math.sqrt(head_dim)


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           lens: torch.Tensor) -> None:
    """Raise Loc3rError unless q (B,H,T,D), caches (B,KVH,S,D) and lens (B,) fit together."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise Loc3rError(f"attention expects q (B,H,T,D) and equal k/v caches (B,KVH,S,D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, h, t, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise Loc3rError(f"attention: cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if h % k_cache.shape[1]:
        raise Loc3rError(f"attention: {h} query heads are not a multiple of {k_cache.shape[1]} KV heads")
    if d < 16 or d > 256 or d & (d - 1):
        raise Loc3rError(f"attention: head dim must be a power of two in [16, 256], got {d}")
    if t < 1:
        raise Loc3rError("attention: q has no tokens")
    if lens.shape != (b,):
        raise Loc3rError(f"attention: lengths must have shape ({b},), got {tuple(lens.shape)}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise Loc3rError(f"attention: q, k, v dtypes differ ({q.dtype}, {k_cache.dtype}, {v_cache.dtype})")


@triton.jit
def prefill_attention_kernel(
    Q, K, V, O, PREFIX_LENS,
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ot,
    T, num_heads, kv_group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // kv_group
    prefix = tl.load(PREFIX_LENS + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BM, D)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_end = prefix + T
    q_pos = prefix + offs_m  # (BM,) absolute positions; padded rows still see key 0, so no NaN
    if CAUSAL:
        hi = tl.minimum(prefix + (pid_m + 1) * BLOCK_M, kv_end)
    else:
        hi = kv_end
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start in range(0, hi, BLOCK_N):
        offs_kv = start + offs_n  # (BN,)
        kv_ok = offs_kv < hi
        k = tl.load(k_base + offs_kv[None, :] * stride_ks + offs_d[:, None],
                    mask=kv_ok[None, :], other=0.0)  # (D, BN)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BM, BN) fp32
        valid = kv_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_kv[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (BM, BN) in [0, 1]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_kv[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # (BN, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: Optional[float] = None,
    causal: bool = True,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Triton flash prefill: q (B,H,T,D), caches (B,KVH,S,D), prefix_lens (B,) int32 -> (B,H,T,D)."""
    check_attention_inputs(q, k_cache, v_cache, prefix_lens)
    b, h, t, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, T, D)
    lens = prefix_lens.to(device=q.device, dtype=torch.int32).contiguous()
    # Small tiles keep the CPU interpreter fast; 64x64 suits fp16 on sm_87 / sm_90. fp32 at
    # D=128 with 64-key tiles needs ~180 KB of shared memory, over Orin's 164 KB: use 32.
    block_m = block_m or (64 if q.is_cuda else 16)
    block_n = block_n or (64 if q.is_cuda and q.element_size() <= 2 else 32)
    grid = (triton.cdiv(t, block_m), b * h)
    prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, lens,
        default_scale(d) if scale is None else float(scale),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        t, h, h // k_cache.shape[1],
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
