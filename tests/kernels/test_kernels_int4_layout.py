"""The int4 layout is onnxruntime's MatMulNBits layout, proven by running onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from loc3r.errors import Loc3rError
from loc3r.kernels.int4_layout import (
    dequantize_int4,
    dequantize_packed,
    pack_nibbles,
    pack_zero_points,
    quantize_int4,
    unpack_nibbles,
    unpack_zero_points,
)
from loc3r.kernels.w4a16_gemm import w4a16_matmul_reference


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


def matmul_nbits_model(w, k: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w.packed.numpy(), "B"), numpy_helper.from_array(w.scales.numpy(), "S")]
    names = ["A", "B", "S"]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points.numpy(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft",
                            K=k, N=w.n, bits=4, block_size=w.block_size)
    graph = helper.make_graph(
        [node], "int4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, w.n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_nibbles_low_first_round_trip():
    v = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(v)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), v)


def test_zero_points_rows_are_byte_aligned():
    zp = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)  # odd n_blocks
    packed = pack_zero_points(zp)
    assert packed.tolist() == [0x21, 0x03, 0x54, 0x06]
    assert torch.equal(unpack_zero_points(packed, 2, 3), zp)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k,block_size", [(80, 32), (64, 16), (96, 64)])
def test_packed_weights_run_in_onnxruntime_matmulnbits(symmetric, k, block_size):
    g = torch.Generator().manual_seed(k + block_size)
    w = quantize_int4(torch.randn(6, k, generator=g), block_size, symmetric)
    x = torch.randn(3, k, generator=g)
    got = run_onnx(matmul_nbits_model(w, k), x.numpy())
    ref = w4a16_matmul_reference(x, w.packed, w.scales, w.zero_points, k, block_size)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_is_within_half_a_step(symmetric):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(1))
    p = quantize_int4(w, 32, symmetric)
    step = p.scales.reshape(8, 3).repeat_interleave(32, dim=1)  # (N, K)
    assert ((dequantize_packed(p) - w).abs() <= 0.5 * step + 1e-6).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_onnxruntime_quantizer_weights_unpack_with_our_code(symmetric):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = 96, 10
    rng = np.random.default_rng(3)
    wk = rng.standard_normal((k, n)).astype(np.float32)  # MatMul's (K, N) weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(wk, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=symmetric)
    quantizer.process()
    qmodel = quantizer.model.model
    node = qmodel.graph.node[0]
    assert node.op_type == "MatMulNBits"
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in qmodel.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]]
    zero_points = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    w = dequantize_int4(packed, scales, zero_points, k, 32)  # (N, K)
    assert (w - torch.from_numpy(wk).T).abs().max() < scales.abs().max()  # it is a quantization of wk
    x = rng.standard_normal((4, k)).astype(np.float32)
    got = run_onnx(qmodel, x)
    np.testing.assert_allclose(got, x @ w.numpy().T, rtol=1e-5, atol=1e-4)


def test_bad_shapes_raise_one_line_errors():
    p = quantize_int4(torch.randn(4, 64))
    with pytest.raises(Loc3rError, match=r"packed weight must be uint8 \(N, 3, 16\) for K=80"):
        dequantize_int4(p.packed, p.scales, p.zero_points, 80, 32)
    with pytest.raises(Loc3rError, match="block_size must be a power of two >= 16, got 24"):
        quantize_int4(torch.randn(4, 64), 24)
