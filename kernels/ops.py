"""Torch custom ops for the loc3r kernels, and the one attention entry a model calls.

Importing this module registers (once, as torch.library requires):

- ``loc3r::prefill_attention(q, k_cache, v_cache, prefix_lens, scale, causal) -> out``
- ``loc3r::decode_attention(q, k_cache, v_cache, kv_lens, scale) -> out``
- ``loc3r::w4a16_matmul(x, packed, scales, zero_points, k, block_size) -> y``

On CUDA tensors they run the Triton kernels (imported lazily, so CPU-only installs need
no Triton); on every other device they run the pure-PyTorch references. Each has a fake
(meta) implementation, so ``torch.export`` / ``torch.compile`` treat them as opaque
nodes. While ``torch.onnx.export`` runs, the entries :func:`attention` and
:func:`int4_linear` emit ``loc3r::FusedAttention`` and ``com.microsoft::MatMulNBits``
nodes instead (:mod:`loc3r.kernels.onnx_symbolic`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from loc3r.errors import Loc3rError
from loc3r.kernels.decode_attention import decode_attention_reference
from loc3r.kernels.int4_layout import dequantize_int4
from loc3r.kernels.onnx_symbolic import fused_attention_node, matmul_nbits_node
from loc3r.kernels.prefill_attention import (
    attention_decomposed,
    attention_reference,
    check_attention_inputs,
    default_scale,
)
from loc3r.kernels.w4a16_gemm import check_w4a16_inputs, w4a16_matmul_reference


# --- loc3r::prefill_attention ------------------------------------------------------------

@torch.library.custom_op("loc3r::prefill_attention", mutates_args=())
def prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_lens: Tensor, scale: float, causal: bool
) -> Tensor:
    """q (B,H,T,D) over caches (B,KVH,S,D) holding prefix_lens[b] + T tokens -> (B,H,T,D)."""
    return attention_reference(q, k_cache, v_cache, prefix_lens, scale, causal)


@prefill_attention.register_kernel("cuda")
def _prefill_attention_cuda(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_lens: Tensor, scale: float, causal: bool
) -> Tensor:
    if q.shape[2] == 1 and causal:  # one new token: flash-decoding is the faster schedule
        from loc3r.kernels.decode_attention import decode_attention_triton

        kv_lens = prefix_lens.to(torch.int32) + 1
        return decode_attention_triton(q[:, :, 0], k_cache, v_cache, kv_lens, scale)[:, :, None]
    from loc3r.kernels.prefill_attention import prefill_attention_triton

    return prefill_attention_triton(q, k_cache, v_cache, prefix_lens, scale, causal)


@prefill_attention.register_fake
def _prefill_attention_fake(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_lens: Tensor, scale: float, causal: bool
) -> Tensor:
    return torch.empty_like(q)


# --- loc3r::decode_attention -------------------------------------------------------------

@torch.library.custom_op("loc3r::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor, scale: float) -> Tensor:
    """q (B,H,D) over the first kv_lens[b] rows of caches (B,KVH,S,D) -> (B,H,D)."""
    return decode_attention_reference(q, k_cache, v_cache, kv_lens, scale)


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor, scale: float) -> Tensor:
    from loc3r.kernels.decode_attention import decode_attention_triton

    return decode_attention_triton(q, k_cache, v_cache, kv_lens, scale)


@decode_attention.register_fake
def _decode_attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)


# --- loc3r::w4a16_matmul -----------------------------------------------------------------

@torch.library.custom_op("loc3r::w4a16_matmul", mutates_args=())
def w4a16_matmul(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, block_size: int
) -> Tensor:
    """(..., K) x MatMulNBits int4 weight (N, K) -> (..., N)."""
    return w4a16_matmul_reference(x, packed, scales, zero_points, k, block_size)


@w4a16_matmul.register_kernel("cuda")
def _w4a16_matmul_cuda(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, block_size: int
) -> Tensor:
    from loc3r.kernels.w4a16_gemm import w4a16_matmul_triton

    return w4a16_matmul_triton(x, packed, scales, zero_points, k, block_size)


@w4a16_matmul.register_fake
def _w4a16_matmul_fake(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, block_size: int
) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# --- the entries a model calls -------------------------------------------------------------

ONNX_ATTENTION_FORMS = ("fused", "decomposed")
_onnx_attention_form = contextvars.ContextVar("loc3r_onnx_attention_form", default="fused")


@contextlib.contextmanager
def onnx_attention_form(form: str) -> Iterator[None]:
    """Choose how :func:`attention` exports inside the block: ``"fused"`` (default) emits one
    ``loc3r::FusedAttention`` node (TensorRT plugin path); ``"decomposed"`` emits standard
    ONNX ops (MatMul, Softmax, masks), which onnxruntime runs."""
    if form not in ONNX_ATTENTION_FORMS:
        raise Loc3rError(f"ONNX attention form must be one of {', '.join(ONNX_ATTENTION_FORMS)}, got {form!r}")
    token = _onnx_attention_form.set(form)
    try:
        yield
    finally:
        _onnx_attention_form.reset(token)


def attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_lens: Union[Tensor, int],
    scale: Optional[float] = None,
    causal: bool = True,
) -> Tensor:
    """Fused attention of T new tokens over a KV cache; the call a model makes.

    q: (B, H, T, D); k_cache, v_cache: (B, KVH, S, D) with the new tokens' keys/values
    already written at rows [prefix_len, prefix_len + T); prefix_lens: (B,) int32 tensor
    or one int for all sequences. Query i sits at position prefix_len + i. Returns
    (B, H, T, D) in q's dtype. CUDA runs Triton (T == 1 uses flash-decoding), CPU the
    reference; under torch.onnx.export it becomes one ``loc3r::FusedAttention`` node, or
    standard ONNX ops inside ``with onnx_attention_form("decomposed"):``. When a gradient
    is needed it runs the differentiable decomposed form (the kernels are inference-only).
    """
    if isinstance(prefix_lens, int):
        prefix_lens = torch.full((q.shape[0],), prefix_lens, dtype=torch.int32, device=q.device)
    check_attention_inputs(q, k_cache, v_cache, prefix_lens)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if torch.onnx.is_in_onnx_export():
        if _onnx_attention_form.get() == "decomposed":
            return attention_decomposed(q, k_cache, v_cache, prefix_lens, scale, causal)
        return fused_attention_node(q, k_cache, v_cache, prefix_lens.to(torch.int32), scale, causal)
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        # The kernels are inference-only; training differentiates the decomposed form.
        return attention_decomposed(q, k_cache, v_cache, prefix_lens, scale, causal)
    return torch.ops.loc3r.prefill_attention(q, k_cache, v_cache, prefix_lens.to(torch.int32), scale, causal)


def int4_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Optional[Tensor],
    k: int,
    block_size: int = 32,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """A Linear layer with a MatMulNBits int4 weight: (..., K) -> (..., N), plus optional bias (N,)."""
    if not x.is_floating_point():
        raise Loc3rError(f"int4_linear: activations must be floating point, got {x.dtype}")
    check_w4a16_inputs(x, packed, scales, zero_points, k, block_size)
    if torch.onnx.is_in_onnx_export():
        y = matmul_nbits_node(x, packed, scales, zero_points, k, block_size)
    elif torch.is_grad_enabled() and x.requires_grad:  # inference kernel; differentiate the dequantized matmul
        w = dequantize_int4(packed, scales, zero_points, k, block_size).to(device=x.device, dtype=x.dtype)
        y = x @ w.T  # (..., N)
    else:
        y = torch.ops.loc3r.w4a16_matmul(x, packed, scales, zero_points, k, block_size)
    return y if bias is None else y + bias
