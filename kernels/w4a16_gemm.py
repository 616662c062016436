"""W4A16 block-wise GEMM / GEMV: ``y = x @ dequant(B).T`` with B in MatMulNBits layout.

Activations are fp16 (or fp32 for testing), weights int4 packed exactly as
``com.microsoft.MatMulNBits`` stores them (see :mod:`loc3r.kernels.int4_layout`), so the
int4 export's initializers feed this kernel unchanged. Weights are dequantized in
registers tile by tile; accumulation is fp32.

Two kernels:
- ``w4a16_gemm_kernel``: tiles of (BLOCK_M, BLOCK_N) with ``tl.dot``; prefill (M >= 16).
- ``w4a16_gemv_kernel``: one activation row per program, a broadcast-multiply-reduce
  over K; decode (M small), where the cost is reading the int4 weight once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loc3r.errors import Loc3rError
from loc3r.kernels.int4_layout import check_block_size, dequantize_int4, num_blocks

GEMV_MAX_ROWS = 8  # up to this many activation rows use the GEMV kernel


def w4a16_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    k: int,
    block_size: int = 32,
) -> torch.Tensor:
    """Pure-PyTorch reference: (..., K) x MatMulNBits (N, K) -> (..., N), computed in fp32."""
    w = dequantize_int4(packed, scales, zero_points, k, block_size).to(x.device)  # (N, K)
    return (x.float() @ w.T).to(x.dtype)


@triton.jit
def _dequant_tile(B, SCALES, ZEROS, offs_n, kk, k_ok, N, n_blocks,
                  QBLOCK: tl.constexpr, HAS_ZP: tl.constexpr):
    """The (BK, BN) fp32 tile of dequant(B).T at K rows ``kk`` and N columns ``offs_n`` (MatMulNBits layout)."""
    row_bytes = n_blocks * (QBLOCK // 2)
    zp_row_bytes = (n_blocks + 1) // 2
    w_ok = k_ok[:, None] & (offs_n[None, :] < N)  # (BK, BN)
    byte = tl.load(B + offs_n[None, :] * row_bytes + (kk[:, None] // 2), mask=w_ok, other=0)
    q = (byte >> ((kk[:, None] & 1) * 4).to(tl.uint8)) & 0xF  # low nibble first
    blk = kk // QBLOCK
    scale = tl.load(SCALES + offs_n[None, :] * n_blocks + blk[:, None], mask=w_ok, other=0.0)
    if HAS_ZP:
        zb = tl.load(ZEROS + offs_n[None, :] * zp_row_bytes + (blk[:, None] // 2), mask=w_ok, other=0)
        zp = ((zb >> ((blk[:, None] & 1) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
    else:
        zp = 8.0
    return (q.to(tl.float32) - zp) * scale.to(tl.float32)  # (BK, BN)


@triton.jit
def w4a16_gemm_kernel(
    X, B, SCALES, ZEROS, Y,
    M, N, K, n_blocks, stride_xm, stride_ym,
    QBLOCK: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k  # (BK,)
        k_ok = kk < K
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)  # (BM, BK)
        w = _dequant_tile(B, SCALES, ZEROS, offs_n, kk, k_ok, N, n_blocks, QBLOCK, HAS_ZP)  # (BK, BN)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def w4a16_gemv_kernel(
    X, B, SCALES, ZEROS, Y,
    N, K, n_blocks, stride_xm, stride_ym,
    QBLOCK: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(X + row * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
        w = _dequant_tile(B, SCALES, ZEROS, offs_n, kk, k_ok, N, n_blocks, QBLOCK, HAS_ZP)  # (BK, BN)
        acc += tl.sum(x[:, None] * w, axis=0)
    tl.store(Y + row * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=offs_n < N)


def check_w4a16_inputs(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
    k: int, block_size: int,
) -> None:
    """Raise Loc3rError unless the tensors form a valid W4A16 problem."""
    check_block_size(block_size)
    nb = num_blocks(k, block_size)
    if x.shape[-1] != k:
        raise Loc3rError(f"w4a16: activations have K={x.shape[-1]}, the weight has K={k}")
    if packed.dtype != torch.uint8 or packed.dim() != 3 or tuple(packed.shape[1:]) != (nb, block_size // 2):
        raise Loc3rError(f"w4a16: packed weight must be uint8 (N, {nb}, {block_size // 2}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if scales.numel() != packed.shape[0] * nb:
        raise Loc3rError(f"w4a16: scales has {scales.numel()} values, expected {packed.shape[0] * nb}")
    if zero_points is not None and zero_points.numel() != packed.shape[0] * ((nb + 1) // 2):
        raise Loc3rError(f"w4a16: zero_points has {zero_points.numel()} bytes, expected "
                         f"{packed.shape[0] * ((nb + 1) // 2)}")


def w4a16_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    k: int,
    block_size: int = 32,
) -> torch.Tensor:
    """Triton W4A16: (..., K) fp16/fp32 x MatMulNBits (N, K) -> (..., N) in x's dtype."""
    check_w4a16_inputs(x, packed, scales, zero_points, k, block_size)
    n = packed.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    nb = num_blocks(k, block_size)
    packed = packed.contiguous()
    scales = scales.reshape(-1).contiguous()
    zeros = zero_points.reshape(-1).contiguous() if zero_points is not None else packed  # dummy pointer
    block_k = max(block_size, 64)
    if m <= GEMV_MAX_ROWS:
        block_n = 64
        grid = (triton.cdiv(n, block_n), m)
        w4a16_gemv_kernel[grid](
            x2, packed, scales, zeros, y, n, k, nb, x2.stride(0), y.stride(0),
            QBLOCK=block_size, HAS_ZP=zero_points is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    else:
        block_m, block_n = (16 if m <= 16 else 64), 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        w4a16_gemm_kernel[grid](
            x2, packed, scales, zeros, y, m, n, k, nb, x2.stride(0), y.stride(0),
            QBLOCK=block_size, HAS_ZP=zero_points is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    return y.reshape(*lead, n)
