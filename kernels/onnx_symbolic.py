"""ONNX nodes for the loc3r kernels, emitted while ``torch.onnx.export`` traces a model.

While exporting (``torch.onnx.is_in_onnx_export()``), :func:`loc3r.kernels.ops.attention`
and :func:`loc3r.kernels.ops.int4_linear` call the functions below instead of the torch
ops, through the public ``torch.onnx.ops.symbolic`` API (dynamo exporter, torch >= 2.8):

- attention -> one ``loc3r::FusedAttention`` node (opset ``loc3r`` version 1):
  inputs ``q`` (B,H,T,D), ``k_cache``, ``v_cache`` (B,KVH,S,D), ``prefix_lens`` (B,) int32;
  attributes ``scale`` (float), ``causal`` (int 0/1) and ``plugin_namespace="loc3r"`` (read by
  TensorRT's ONNX parser to find the plugin creator); output (B,H,T,D), q's dtype.
  Query i of sequence b sees cache rows ``j <= prefix_lens[b] + i`` (causal) or
  ``j < prefix_lens[b] + T``. The TensorRT path maps it to the ``loc3r::FusedAttention``
  plugin (``kernels/native/``, :mod:`loc3r.kernels.tensorrt_plugin`).
- int4 linear -> ``com.microsoft::MatMulNBits`` (bits=4, attributes K, N, block_size),
  which onnxruntime runs directly: the packed tensors are already in its layout.

No onnxscript translation table is needed, so a plain ``torch.onnx.export(..., dynamo=True)``
of any module that calls the entries above produces these nodes.
"""

from __future__ import annotations

from typing import Optional

import torch

FUSED_ATTENTION_DOMAIN = "loc3r"
FUSED_ATTENTION_OP = "FusedAttention"
FUSED_ATTENTION_VERSION = 1
MATMUL_NBITS_DOMAIN = "com.microsoft"


def fused_attention_node(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Emit ``loc3r::FusedAttention``; output (B, H, T, D) like q."""
    return torch.onnx.ops.symbolic(
        f"{FUSED_ATTENTION_DOMAIN}::{FUSED_ATTENTION_OP}",
        (q, k_cache, v_cache, prefix_lens),
        {"scale": float(scale), "causal": int(bool(causal)), "plugin_namespace": FUSED_ATTENTION_DOMAIN},
        dtype=q.dtype,
        shape=q.shape,
        version=FUSED_ATTENTION_VERSION,
    )


def matmul_nbits_node(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    k: int,
    block_size: int,
) -> torch.Tensor:
    """Emit ``com.microsoft::MatMulNBits`` (bits=4); output (..., N)."""
    n = packed.shape[0]
    inputs = (x, packed, scales) + ((zero_points,) if zero_points is not None else ())
    return torch.onnx.ops.symbolic(
        f"{MATMUL_NBITS_DOMAIN}::MatMulNBits",
        inputs,
        {"K": int(k), "N": int(n), "bits": 4, "block_size": int(block_size)},
        dtype=x.dtype,
        shape=(*x.shape[:-1], n),
        version=1,
    )
