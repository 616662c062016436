"""The roofline of this machine: memory bandwidth and peak matmul FLOP/s.

Decode is memory-bound: every generated token streams all decoder weights
plus the filled part of the KV cache. Prefill is compute-bound. These
measurements turn a tokens/s figure into "% of what this machine can do".

Measured with numpy only (no torch), so ``loc3r profile`` can print the
same percentages on an edge image.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Roofline:
    copy_gbps: float  # STREAM copy: 2 x bytes per element moved
    triad_gbps: float  # STREAM triad a = b + s*c: 3 x bytes per element
    matmul_gflops: float  # fp32 GEMM through numpy's BLAS

    @property
    def bandwidth_gbps(self) -> float:
        """The bandwidth bound used for decode: the best STREAM figure."""
        return max(self.copy_gbps, self.triad_gbps)

    def to_dict(self) -> dict:
        return {**asdict(self), "bandwidth_gbps": self.bandwidth_gbps}


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults and caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5) -> tuple[float, float]:
    """STREAM-style copy and triad bandwidth in GB/s over arrays of ``n_bytes``."""
    n = max(1, n_bytes // 8)
    b = np.ones(n, dtype=np.float64)
    c = np.full(n, 2.0, dtype=np.float64)
    a = np.empty_like(b)
    tmp = np.empty_like(b)

    def copy():
        np.copyto(a, b)

    def triad():
        # a = b + 3*c without a temporary allocation per call
        np.multiply(c, 3.0, out=tmp)
        np.add(b, tmp, out=a)

    t_copy = _best_seconds(copy, repeats)
    t_triad = _best_seconds(triad, repeats)
    copy_gbps = 2 * a.nbytes / t_copy / 1e9
    # the two-pass triad moves 5 arrays' worth; STREAM counts 3 for a fused one
    triad_gbps = 5 * a.nbytes / t_triad / 1e9
    return copy_gbps, triad_gbps


def measure_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Peak fp32 GEMM GFLOP/s (2 n^3 FLOPs per n x n product)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    t = _best_seconds(lambda: np.matmul(x, y, out=out), repeats)
    return 2 * n**3 / t / 1e9


def measure_ort_matmul_gflops(n: int = 2048, repeats: int = 3, threads: Optional[int] = None) -> float:
    """Peak fp32 GEMM GFLOP/s of onnxruntime's own CPU MatMul (MLAS), an n x n x n product.

    The compute bound for onnxruntime graphs: MLAS often beats the BLAS numpy
    was built with (:func:`measure_matmul_gflops`).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((n, n), dtype=np.float32)
    t = _best_seconds(lambda: sess.run(None, {"x": x}), repeats)
    return 2.0 * n**3 / t / 1e9


def measure_roofline(n_bytes: int = 256 << 20, matmul_n: int = 1024, repeats: int = 5) -> Roofline:
    copy_gbps, triad_gbps = measure_bandwidth(n_bytes, repeats)
    return Roofline(copy_gbps, triad_gbps, measure_matmul_gflops(matmul_n, repeats))


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_token: int, context: int) -> int:
    """Bytes a decode step must read: every weight once, plus the filled KV cache."""
    return weight_bytes + kv_bytes_per_token * context


def decode_fraction_of_bound(tokens_per_s: float, bytes_per_token: int, bandwidth_gbps: float) -> float:
    """Achieved decode speed as a fraction of the memory-bandwidth bound."""
    bound = bandwidth_gbps * 1e9 / bytes_per_token
    return tokens_per_s / bound


def prefill_fraction_of_bound(tokens_per_s: float, flops_per_token: float, gflops: float) -> float:
    """Achieved prefill speed as a fraction of the compute bound."""
    bound = gflops * 1e9 / flops_per_token
    return tokens_per_s / bound
