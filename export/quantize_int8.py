"""int8 quantization: static QDQ activations with calibrated ranges, or dynamic.

Static (vision tower, pose prior): QuantizeLinear/DequantizeLinear pairs
around the selected weight MatMuls and Convs; weights int8 per channel,
activations int8 with ranges from calibration (see :mod:`loc3r.calibration`).
Ranges come in as ``{tensor name: (lo, hi)}`` so a cached set is reused
without running calibration again. Only the selected nodes get Q/DQ, so
norms, softmax and the fused attention contrib nodes stay float and intact.

Dynamic (the alternative for the decoder): int8 weights, activation scales
computed per call (``DynamicQuantizeMatMul`` / ``MatMulInteger``).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import onnx

from loc3r.errors import Loc3rError
from loc3r.export.quantize_files import is_large, save_graph

Ranges = Mapping[str, tuple[float, float]]

# Ops whose inputs get calibrated ranges: we quantize weight MatMuls and Convs only.
CALIBRATED_OPS = ("MatMul", "Conv")


@contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about pre-processing on the root logger
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise Loc3rError(f"unknown calibration method '{name}'; known: {', '.join(methods)}")
    return methods[name]


def quantize_static_qdq(
    model: onnx.ModelProto,
    ranges: Ranges,
    nodes: Sequence[str],
    method: str = "percentile",
    per_channel: bool = True,
    op_types: Sequence[str] = CALIBRATED_OPS,
) -> onnx.ModelProto:
    """``model`` with QDQ int8 around ``nodes`` (of ``op_types``), activation ranges from ``ranges``."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    if not nodes:
        return model
    cal = calibration_method(method)
    with tempfile.TemporaryDirectory(prefix="loc3r-qdq-") as tmp:
        src, dst, cache = Path(tmp, "in.onnx"), Path(tmp, "out.onnx"), Path(tmp, "ranges.json")
        save_graph(model, src)
        data = {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(cal, data), cache)
        with _quiet_ort_quantization():
            quantize_static(
                str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types), per_channel=per_channel,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes), calibrate_method=cal, calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                use_external_data_format=is_large(model),
            )
        return onnx.load(str(dst))


def quantize_dynamic_int8(model: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """``model`` with int8 weights and per-call activation scales on ``nodes`` (MatMuls)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        return model
    with tempfile.TemporaryDirectory(prefix="loc3r-dyn-") as tmp:
        src, dst = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
        save_graph(model, src)
        with _quiet_ort_quantization():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=list(nodes),
                             weight_type=QuantType.QInt8, per_channel=False,
                             use_external_data_format=is_large(model),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(dst))
