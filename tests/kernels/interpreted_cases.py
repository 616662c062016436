"""Kernel-vs-reference cases run under TRITON_INTERPRET=1, in a child process.

``python tests/kernels/interpreted_cases.py`` sets TRITON_INTERPRET=1 before Triton is
imported (the flag is read when ``@triton.jit`` decorates), runs every case and prints
one JSON object {case_id: {"max_err": float, "tol": float, ...}} on stdout. Running it
in a child keeps the flag out of the pytest process. Shapes are tiny: the interpreter
executes every program instance in Python.

Tolerances (max abs error against the fp32 reference):
- attention fp32: 1e-4; attention fp16: 4e-3 (outputs are averages of O(1) values,
  fp16 spacing near 1 is 1e-3); fp16 at large scale (q.k ~ 1e5, past fp16's range): 1e-2;
- W4A16 fp32: 1e-5 x max|ref|; W4A16 fp16: 2e-3 x max|ref| (the dequantized weight
  and the output are rounded to fp16).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

ATTN_TOL = {"float32": 1e-4, "float16": 4e-3}
LARGE_SCALE_TOL = 1e-2  # scores near 1.2e4 carry fp32 rounding of ~1e-3 each
GEMM_REL_TOL = {"float32": 1e-5, "float16": 2e-3}


@dataclass(frozen=True)
class PrefillCase:
    id: str
    b: int
    h: int
    kvh: int
    t: int
    prefix: Tuple[int, ...]  # per sequence
    d: int
    dtype: str
    causal: bool = True
    k_offset: float = 0.0  # added to every key: huge scores, moderate differences (overflow test)
    gpu_tiles: bool = False  # the 64x64 tiles the CUDA path and the AOT cubins use


@dataclass(frozen=True)
class DecodeCase:
    id: str
    b: int
    h: int
    kvh: int
    s: int  # cache capacity
    kv_lens: Tuple[int, ...]
    d: int
    dtype: str
    num_splits: Optional[int] = None
    k_offset: float = 0.0
    gpu_tiles: bool = False  # BLOCK_N = 64 as on CUDA


@dataclass(frozen=True)
class GemmCase:
    id: str
    m: int
    n: int
    k: int
    block_size: int
    symmetric: bool
    dtype: str


PREFILL_CASES = [
    PrefillCase("gqa1-d64-fp32-two-prefixes", 2, 2, 2, 5, (7, 3), 64, "float32"),
    PrefillCase("gqa4-d128-fp16-prefix0-odd", 1, 4, 1, 19, (0,), 128, "float16"),
    PrefillCase("gqa7-d64-fp16", 1, 7, 1, 3, (33,), 64, "float16"),
    PrefillCase("gqa7-d128-fp32-prefix0", 1, 7, 1, 17, (0,), 128, "float32"),
    PrefillCase("gqa4-d64-fp32-noncausal", 1, 8, 2, 9, (4,), 64, "float32", causal=False),
    PrefillCase("gqa4-d64-fp16-large-scale", 1, 8, 2, 7, (11,), 64, "float16", k_offset=1500.0),
    PrefillCase("gqa7-d128-fp16-gpu-tiles", 1, 7, 1, 70, (50,), 128, "float16", gpu_tiles=True),
]
DECODE_CASES = [
    DecodeCase("gqa1-d64-fp32-4-splits", 2, 2, 2, 37, (37, 1), 64, "float32", num_splits=4),
    DecodeCase("gqa4-d128-fp16-3-splits", 1, 8, 2, 45, (45,), 128, "float16", num_splits=3),
    DecodeCase("gqa7-d64-fp16-large-scale", 1, 7, 1, 29, (23,), 64, "float16", num_splits=2, k_offset=1500.0),
    DecodeCase("gqa7-d128-fp32-auto-splits", 2, 14, 2, 21, (21, 9), 128, "float32"),
    DecodeCase("gqa7-d128-fp16-gpu-tiles", 1, 7, 1, 300, (259,), 128, "float16", num_splits=3, gpu_tiles=True),
]
GEMM_CASES = [
    GemmCase("gemv-fp32-asym", 1, 40, 80, 32, False, "float32"),
    GemmCase("gemv-fp16-sym-bs16", 3, 33, 96, 16, True, "float16"),
    GemmCase("gemm-fp16-asym-k-padded", 20, 70, 100, 32, False, "float16"),
    GemmCase("gemm-fp32-sym-bs64", 17, 24, 128, 64, True, "float32"),
]


def query_values(shape: tuple, k_offset: float, g):
    """Standard normal queries; with a key offset, positive ones (1 + 0.5 N) so that q.k is
    about k_offset * D (past fp16's 65504 for 1500 x 64) while the softmax stays spread."""
    import torch

    z = torch.randn(shape, generator=g)
    return 1.0 + 0.5 * z if k_offset else z


def run_prefill(case: PrefillCase) -> dict:
    import torch

    from loc3r.kernels.prefill_attention import attention_reference, prefill_attention_triton

    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dt = getattr(torch, case.dtype)
    s = max(case.prefix) + case.t + 3  # spare cache rows must be ignored
    q = query_values((case.b, case.h, case.t, case.d), case.k_offset, g).to(dt)
    k = (torch.randn(case.b, case.kvh, s, case.d, generator=g) + case.k_offset).to(dt)
    v = torch.randn(case.b, case.kvh, s, case.d, generator=g).to(dt)
    lens = torch.tensor(case.prefix, dtype=torch.int32)
    tiles = {"block_m": 64, "block_n": 64} if case.gpu_tiles else {}
    out = prefill_attention_triton(q, k, v, lens, causal=case.causal, **tiles)
    ref = attention_reference(q, k, v, lens, causal=case.causal)
    naive = q[:, :1] @ k[:, :1].transpose(-1, -2)  # fp16 scores without fp32 accumulation/scaling
    tol = LARGE_SCALE_TOL if case.k_offset else ATTN_TOL[case.dtype]
    return {"max_err": (out.float() - ref.float()).abs().max().item(), "tol": tol,
            "finite": bool(torch.isfinite(out).all()), "naive_scores_overflow": bool(torch.isinf(naive).any())}


def run_decode(case: DecodeCase) -> dict:
    import torch

    from loc3r.kernels.decode_attention import decode_attention_reference, decode_attention_triton

    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dt = getattr(torch, case.dtype)
    q = query_values((case.b, case.h, case.d), case.k_offset, g).to(dt)
    k = (torch.randn(case.b, case.kvh, case.s, case.d, generator=g) + case.k_offset).to(dt)
    v = torch.randn(case.b, case.kvh, case.s, case.d, generator=g).to(dt)
    lens = torch.tensor(case.kv_lens, dtype=torch.int32)
    out = decode_attention_triton(q, k, v, lens, num_splits=case.num_splits, block_n=64 if case.gpu_tiles else None)
    ref = decode_attention_reference(q, k, v, lens)
    naive = q[:, :1, None] @ k[:, :1].transpose(-1, -2)
    tol = LARGE_SCALE_TOL if case.k_offset else ATTN_TOL[case.dtype]
    return {"max_err": (out.float() - ref.float()).abs().max().item(), "tol": tol,
            "finite": bool(torch.isfinite(out).all()), "naive_scores_overflow": bool(torch.isinf(naive).any())}


def run_gemm(case: GemmCase) -> dict:
    import torch

    from loc3r.kernels.int4_layout import quantize_int4
    from loc3r.kernels.w4a16_gemm import w4a16_matmul_reference, w4a16_matmul_triton

    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dt = getattr(torch, case.dtype)
    w = quantize_int4(torch.randn(case.n, case.k, generator=g).to(dt), case.block_size, case.symmetric)
    x = torch.randn(case.m, case.k, generator=g).to(dt)
    out = w4a16_matmul_triton(x, w.packed, w.scales, w.zero_points, case.k, case.block_size)
    ref = w4a16_matmul_reference(x.float(), w.packed, w.scales.float(), w.zero_points, case.k, case.block_size)
    return {"max_err": (out.float() - ref).abs().max().item(),
            "tol": GEMM_REL_TOL[case.dtype] * ref.abs().max().item(), "finite": bool(torch.isfinite(out).all())}


DISPATCH_CASES = ["attention-t1-routes-to-decode", "attention-t4-prefill", "int4-linear-gemv"]


def run_dispatch(case_id: str) -> dict:
    """The CUDA implementations of the torch ops (what runs on a GPU), here on the interpreter."""
    import torch

    from loc3r.kernels import ops
    from loc3r.kernels.int4_layout import quantize_int4
    from loc3r.kernels.prefill_attention import attention_reference

    g = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    if case_id.startswith("attention"):
        t = 1 if "t1" in case_id else 4
        q = torch.randn(2, 8, t, 64, generator=g)
        k, v = torch.randn(2, 2, 40, 64, generator=g), torch.randn(2, 2, 40, 64, generator=g)
        lens = torch.tensor([30, 7], dtype=torch.int32)
        out = ops._prefill_attention_cuda(q, k, v, lens, 0.125, True)
        ref = attention_reference(q, k, v, lens, 0.125, True)
    else:
        w = quantize_int4(torch.randn(48, 96, generator=g))
        x = torch.randn(2, 96, generator=g)
        out = ops._w4a16_matmul_cuda(x, w.packed, w.scales, w.zero_points, 96, 32)
        ref = ops.w4a16_matmul(x, w.packed, w.scales, w.zero_points, 96, 32)  # CPU op = reference
    return {"max_err": (out - ref).abs().max().item(), "tol": ATTN_TOL["float32"], "finite": bool(torch.isfinite(out).all())}


def all_case_ids() -> list:
    return ([f"prefill/{c.id}" for c in PREFILL_CASES] + [f"decode/{c.id}" for c in DECODE_CASES]
            + [f"w4a16/{c.id}" for c in GEMM_CASES] + [f"dispatch/{c}" for c in DISPATCH_CASES])


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (the flag must be set before triton is imported)")
    results = {}
    for c in PREFILL_CASES:
        results[f"prefill/{c.id}"] = run_prefill(c)
    for c in DECODE_CASES:
        results[f"decode/{c.id}"] = run_decode(c)
    for c in GEMM_CASES:
        results[f"w4a16/{c.id}"] = run_gemm(c)
    for c in DISPATCH_CASES:
        results[f"dispatch/{c}"] = run_dispatch(c)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
