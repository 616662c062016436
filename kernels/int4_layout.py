"""The packed int4 weight layout shared by the int4 export and the W4A16 kernels.

It is exactly onnxruntime's ``com.microsoft.MatMulNBits`` layout (bits=4), so one
quantized weight serves both the ORT CPU backend and the GPU kernels:

- the float weight is ``W`` of shape (N, K): row ``n`` holds the K input weights of
  output feature ``n`` (the transpose of ``MatMul``'s (K, N) initializer);
- K is split into ``n_blocks = ceil(K / block_size)`` blocks; the last one is zero
  padded;
- ``B`` is uint8 of shape (N, n_blocks, block_size // 2): two 4-bit values per byte,
  the element with the even k index in the LOW nibble;
- ``scales`` has shape (N * n_blocks,), same float dtype as the activations;
- ``zero_points`` (optional) is uint8 of shape (N * ceil(n_blocks / 2),): per row n,
  the block zero points packed two per byte, low nibble first, each row padded to a
  whole byte. Absent zero points mean 8.
- ``W[n, k] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]``.

Tested against onnxruntime: a MatMulNBits node built from :func:`quantize_int4`
and the weights that onnxruntime's own ``MatMulNBitsQuantizer`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from loc3r.errors import Loc3rError

DEFAULT_BLOCK_SIZE = 32
DEFAULT_ZERO_POINT = 8


@dataclass(frozen=True)
class PackedInt4Weight:
    """A (N, K) weight in MatMulNBits form; see the module docstring."""

    packed: torch.Tensor  # (N, n_blocks, block_size // 2) uint8
    scales: torch.Tensor  # (N * n_blocks,) float
    zero_points: Optional[torch.Tensor]  # (N * ceil(n_blocks / 2),) uint8, or None (= 8)
    n: int
    k: int
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.k, self.block_size)


def num_blocks(k: int, block_size: int) -> int:
    """Number of quantization blocks along K (the last one may be padded)."""
    return (k + block_size - 1) // block_size


def check_block_size(block_size: int) -> None:
    """MatMulNBits accepts power-of-two block sizes of at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise Loc3rError(f"int4 block_size must be a power of two >= 16, got {block_size}")


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (..., 2m) in 0..15 into bytes (..., m), even index in the low nibble."""
    v = values.to(torch.uint8)
    return (v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes (..., m) -> values (..., 2m) in 0..15."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_zero_points(zp: torch.Tensor) -> torch.Tensor:
    """(N, n_blocks) zero points in 0..15 -> (N * ceil(n_blocks / 2),) uint8, rows byte aligned."""
    n, nb = zp.shape
    if nb % 2:
        zp = torch.cat([zp, torch.zeros(n, 1, dtype=zp.dtype, device=zp.device)], dim=1)
    return pack_nibbles(zp).reshape(-1)


def unpack_zero_points(zero_points: Optional[torch.Tensor], n: int, n_blocks: int) -> torch.Tensor:
    """Packed zero points (or None) -> (N, n_blocks) uint8 in 0..15."""
    if zero_points is None:
        return torch.full((n, n_blocks), DEFAULT_ZERO_POINT, dtype=torch.uint8)
    row_bytes = (n_blocks + 1) // 2
    if zero_points.numel() != n * row_bytes:
        raise Loc3rError(
            f"int4 zero_points has {zero_points.numel()} bytes, expected N * ceil(n_blocks/2) = {n * row_bytes}"
        )
    return unpack_nibbles(zero_points.reshape(n, row_bytes))[:, :n_blocks]


def quantize_int4(
    weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = False
) -> PackedInt4Weight:
    """Quantize a float (N, K) weight block-wise to MatMulNBits int4.

    Asymmetric (default): per block, the range [min(w, 0), max(w, 0)] maps onto 0..15
    with a zero point. Symmetric: scale = absmax / 7, no zero points stored (zp = 8).
    """
    check_block_size(block_size)
    if weight.dim() != 2:
        raise Loc3rError(f"int4 quantization expects a 2-D (N, K) weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    nb = num_blocks(k, block_size)
    w = weight.detach().float()
    w = torch.nn.functional.pad(w, (0, nb * block_size - k)).reshape(n, nb, block_size)  # (N, nb, bs)
    if symmetric:
        scale = w.abs().amax(dim=-1) / 7.0  # (N, nb)
        zp = torch.full_like(scale, DEFAULT_ZERO_POINT)
    else:
        lo = w.amin(dim=-1).clamp(max=0.0)
        hi = w.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        zp = torch.where(scale > 0, (-lo / torch.where(scale > 0, scale, 1.0)).round(), 8.0).clamp(0, 15)
    safe = torch.where(scale > 0, scale, 1.0)
    q = (w / safe[..., None]).round() + zp[..., None]
    q = q.clamp(0, 15).to(torch.uint8)  # (N, nb, bs)
    packed = pack_nibbles(q)  # (N, nb, bs/2)
    zero_points = None if symmetric else pack_zero_points(zp.to(torch.uint8))
    scales = scale.to(weight.dtype if weight.is_floating_point() else torch.float32).reshape(-1)
    return PackedInt4Weight(packed.contiguous(), scales.contiguous(), zero_points, n, k, block_size)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    k: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """MatMulNBits tensors -> float32 (N, K) weight (the reference dequantizer)."""
    check_block_size(block_size)
    n = packed.shape[0]
    nb = num_blocks(k, block_size)
    if tuple(packed.shape) != (n, nb, block_size // 2) or packed.dtype != torch.uint8:
        raise Loc3rError(
            f"int4 packed weight must be uint8 (N, {nb}, {block_size // 2}) for K={k}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if scales.numel() != n * nb:
        raise Loc3rError(f"int4 scales has {scales.numel()} values, expected N * n_blocks = {n * nb}")
    q = unpack_nibbles(packed).float()  # (N, nb, bs)
    zp = unpack_zero_points(zero_points.cpu() if zero_points is not None else None, n, nb)
    zp = zp.to(q.device).float()  # (N, nb)
    s = scales.reshape(n, nb).float()
    w = (q - zp[..., None]) * s[..., None]  # (N, nb, bs)
    return w.reshape(n, nb * block_size)[:, :k]


def dequantize_packed(weight: PackedInt4Weight) -> torch.Tensor:
    """Float32 (N, K) weight of a :class:`PackedInt4Weight`."""
    return dequantize_int4(weight.packed, weight.scales, weight.zero_points, weight.k, weight.block_size)
