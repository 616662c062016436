"""Decode attention: one query token per sequence over a long KV cache (flash-decoding).

Layout:
- ``q``: (B, H, D), the new token's queries;
- ``k_cache``, ``v_cache``: (B, KVH, S, D); the first ``kv_lens[b]`` rows are valid and
  already include the new token's key/value;
- ``kv_lens``: (B,) int32, 1 <= kv_lens[b] <= S.

Two kernels. ``decode_attention_split_kernel`` gives each (sequence, KV head, split)
its own program: the split's ``split_size`` keys are read once for all ``H // KVH``
query heads of the group (padded to a 16-row ``tl.dot``), and the program writes a
normalized partial output plus its log-sum-exp (base 2). ``decode_attention_reduce_kernel``
merges the splits per query head. The split kernel's ``kv_len_offset`` is added to every
loaded length, so the C dispatch can pass prefix lengths (offset 1) where Python passes
cache lengths (offset 0). Splits are sized from the cache capacity S, not the
live lengths, so no device-to-host sync is needed (CUDA-graph friendly); splits past
``kv_lens[b]`` are empty and weigh zero in the merge.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loc3r.kernels.prefill_attention import attention_reference, check_attention_inputs, default_scale


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Pure-PyTorch reference: q (B,H,D) over the first kv_lens[b] cache rows -> (B,H,D)."""
    out = attention_reference(q[:, :, None], k_cache, v_cache, kv_lens.long() - 1, scale, causal=True)
    return out[:, :, 0]


@triton.jit
def decode_attention_split_kernel(
    Q, K, V, O_PART, LSE_PART, KV_LENS,
    sm_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    num_kv_heads, kv_group, num_splits, split_size, kv_len_offset,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bk // num_kv_heads
    kvh = pid_bk % num_kv_heads
    kv_len = tl.load(KV_LENS + b) + kv_len_offset  # offset 1 lets callers pass prefix lengths
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this KV group (padded)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < kv_group
    heads = kvh * kv_group + offs_g  # (BG,)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)  # (BG, D)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, kv_len)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_kv = start + offs_n
        kv_ok = offs_kv < hi
        k = tl.load(k_base + offs_kv[None, :] * stride_ks + offs_d[:, None],
                    mask=kv_ok[None, :], other=0.0)  # (D, BN)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BG, BN)
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_kv[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # (BN, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has = l_i > 0  # False for an empty split (past kv_len)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    part = (b * num_kv_heads * kv_group + heads) * num_splits + pid_s  # (BG,) row in (B*H, splits)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=g_ok)


@triton.jit
def decode_attention_reduce_kernel(
    O_PART, LSE_PART, O,
    num_heads, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # b * H + h
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + pid * num_splits + offs_s, mask=s_ok, other=float("-inf"))  # (BS,)
    m = tl.max(lse, 0)  # finite: split 0 always holds key 0
    w = tl.exp2(lse - m)  # (BS,), 0 for empty splits
    part = tl.load(O_PART + (pid * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)  # (BS, D)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


def choose_num_splits(cache_len: int, block_n: int, max_splits: int = 64, min_split: int = 256) -> int:
    """Splits for a cache of capacity ``cache_len``: about one per ``min_split`` keys, at most ``max_splits``."""
    return max(1, min(max_splits, triton.cdiv(cache_len, max(min_split, block_n))))


def split_plan(cache_len: int, block_n: int, num_splits: Optional[int] = None) -> tuple:
    """(splits, split_size): split_size is a multiple of block_n; the same rule as loc3r_decode_num_splits in C."""
    splits = num_splits or choose_num_splits(cache_len, block_n)
    split_size = triton.cdiv(triton.cdiv(cache_len, splits), block_n) * block_n
    return triton.cdiv(cache_len, split_size), split_size


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Triton flash-decoding: q (B,H,D), caches (B,KVH,S,D), kv_lens (B,) int32 -> (B,H,D)."""
    check_attention_inputs(q[:, :, None], k_cache, v_cache, kv_lens)
    b, h, d = q.shape
    kvh, cap = k_cache.shape[1], k_cache.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_n = block_n or (64 if q.is_cuda else 16)
    splits, split_size = split_plan(cap, block_n, num_splits)
    group = h // kvh
    o_part = torch.empty((b * h, splits, d), dtype=torch.float32, device=q.device)  # (B*H, splits, D)
    lse_part = torch.empty((b * h, splits), dtype=torch.float32, device=q.device)  # (B*H, splits)
    lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    decode_attention_split_kernel[(b * kvh, splits)](
        q, k_cache, v_cache, o_part, lse_part, lens,
        default_scale(d) if scale is None else float(scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kvh, group, splits, split_size, 0,
        HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)  # (B, H, D)
    decode_attention_reduce_kernel[(b * h,)](
        o_part, lse_part, out, h, splits, out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(splits),
    )
    return out
