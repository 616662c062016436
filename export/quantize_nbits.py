"""Block-wise weight-only quantization to ``com.microsoft.MatMulNBits`` (4 or 8 bits).

Each selected MatMul's constant weight (K, N) is split along K into blocks of
``block_size``; every block of every output column gets its own scale (and a
zero point when asymmetric). Activations stay float; onnxruntime dequantizes
on the fly (CPU and CUDA), and the W4A16 GPU kernels read the same layout.
Uses onnxruntime's own quantizer (``matmul_nbits_quantizer``), restricted to
the nodes we select, so norms, softmax, fused attention and unselected
MatMuls are left exactly as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import onnx

from loc3r.errors import Loc3rError
from loc3r.export.quantize_select import WeightMatMul, weight_matmuls


@dataclass(frozen=True)
class NBitsOptions:
    """Weight-only quantization settings."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits accuracy_level: None lets onnxruntime pick; 4 = int8 compute on CPU.
    accuracy_level: Optional[int] = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise Loc3rError(f"weight-only quantization supports 4 or 8 bits, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise Loc3rError(f"block size must be a power of two >= 16, got {self.block_size}")


def quantize_matmuls_nbits(
    model: onnx.ModelProto, selected: Sequence[WeightMatMul], options: NBitsOptions = NBitsOptions()
) -> onnx.ModelProto:
    """A copy of ``model`` with the ``selected`` MatMuls replaced by MatMulNBits.

    A weight whose K is smaller than one block is padded by onnxruntime's
    quantizer; callers normally skip such small matrices (see
    :func:`loc3r.export.quantize_select.select_matmuls`).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    keep = {m.name for m in selected}
    exclude = [m.name for m in weight_matmuls(model) if m.name not in keep]
    if not keep:
        return model
    quant = MatMulNBitsQuantizer(
        _copy(model),
        bits=options.bits,
        block_size=options.block_size,
        is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
    )
    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        quant.process()
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    return quant.model.model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
