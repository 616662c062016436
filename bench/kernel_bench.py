"""Benchmark the loc3r kernels: correctness everywhere, speed on a GPU.

    python bench/kernel_bench.py            # GPU: timings + errors; CPU: errors only (Triton interpreter)
    python bench/kernel_bench.py --json out.json

(Not ``bench/kernels.py``: the bench tests put ``bench/`` on ``sys.path``, where a module named
``kernels`` shadows the Hugging Face ``kernels`` package that ``transformers`` probes for.)

On a CUDA device, for Qwen2-7B-shaped problems (28 query heads, 4 KV heads, head dim 128,
hidden 3584, MLP 18944; a frame block is 197 tokens):
- prefill / decode attention against torch SDPA (same GQA, same causal-with-prefix mask);
- W4A16 GEMV (decode) and GEMM (prefill) against torch.matmul on the dequantized fp16 weight;
each with ms, TFLOP/s, GB/s (bytes each kernel must move at least once) and the fraction of
the memory-bandwidth roofline (the device's datasheet peak when known, and a measured
device-to-device copy). Without CUDA it sets TRITON_INTERPRET=1 (before any kernel module
is imported), runs tiny shapes and prints max errors only: CPU timings of the interpreter
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

# Datasheet DRAM bandwidth (GB/s) by device-name substring; None = unknown, use the measured copy.
PEAK_BANDWIDTH_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "A100": 2039.0,
    "Orin": 204.8,  # AGX Orin 64 GB; Orin NX 16 GB is 102.4
    "Thor": 273.0,
}


@dataclass(frozen=True)
class Row:
    """One benchmark line."""

    name: str
    impl: str
    ms: Optional[float]
    tflops: Optional[float]
    gbps: Optional[float]
    bw_fraction_peak: Optional[float]
    bw_fraction_copy: Optional[float]
    max_err: Optional[float]


def peak_bandwidth_gbps(device_name: str) -> Optional[float]:
    for key, gbps in PEAK_BANDWIDTH_GBPS.items():
        if key in device_name:
            return gbps
    return None


def time_ms(fn: Callable[[], object], iters: int) -> float:
    """Median CUDA-event time of fn over iters runs, after warm-up (compiles, autotuning, caches)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measured_copy_gbps(iters: int) -> float:
    """Device-to-device copy bandwidth: read + write of 1 GiB."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * n / (ms * 1e-3) / 1e9


def sdpa_with_prefix(q, k_cache, v_cache, prefix: int, causal: bool = True):
    """torch SDPA baseline over the live cache rows, same masking as the kernel."""
    t = q.shape[2]
    k, v = k_cache[:, :, : prefix + t], v_cache[:, :, : prefix + t]
    mask = None
    if causal and t > 1:
        k_pos = torch.arange(prefix + t, device=q.device)
        mask = k_pos[None, :] <= (prefix + torch.arange(t, device=q.device))[:, None]  # (T, S)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_problem(b, h, kvh, t, prefix, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = prefix + t
    q = torch.randn(b, h, t, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(b, kvh, s, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(b, kvh, s, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    return q, k, v


def attention_rows(name, b, h, kvh, t, prefix, d, dtype, device, iters, peak, copy_gbps) -> List[Row]:
    from loc3r.kernels.decode_attention import decode_attention_triton
    from loc3r.kernels.prefill_attention import attention_reference, prefill_attention_triton

    q, k, v = attention_problem(b, h, kvh, t, prefix, d, dtype, device)
    lens = torch.full((b,), prefix, dtype=torch.int32, device=device)
    if t == 1:
        ours = lambda: decode_attention_triton(q[:, :, 0], k, v, lens + 1)[:, :, None]  # noqa: E731
    else:
        ours = lambda: prefill_attention_triton(q, k, v, lens)  # noqa: E731
    ref = attention_reference(q, k, v, lens)
    err = (ours().float() - ref.float()).abs().max().item()
    if device != "cuda":
        return [Row(name, "triton", None, None, None, None, None, err)]
    keys = prefix + (t + 1) / 2  # keys seen per query on average (causal)
    flops = 4.0 * b * h * t * keys * d
    nbytes = (2 * b * h * t * d + 2 * b * kvh * (prefix + t) * d) * q.element_size()
    rows = []
    for impl, fn in (("triton", ours), ("torch-sdpa", lambda: sdpa_with_prefix(q, k, v, prefix))):
        ms = time_ms(fn, iters)
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(Row(name, impl, ms, flops / (ms * 1e-3) / 1e12, gbps, gbps / peak if peak else None,
                        gbps / copy_gbps, err if impl == "triton" else None))
    return rows


def w4a16_rows(name, m, n, k, block_size, dtype, device, iters, peak, copy_gbps) -> List[Row]:
    from loc3r.kernels.int4_layout import dequantize_packed, quantize_int4
    from loc3r.kernels.w4a16_gemm import w4a16_matmul_reference, w4a16_matmul_triton

    g = torch.Generator().manual_seed(1)
    w = quantize_int4(torch.randn(n, k, generator=g).to(dtype), block_size)
    packed, scales, zp = (t.to(device) for t in (w.packed, w.scales, w.zero_points))
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    ours = lambda: w4a16_matmul_triton(x, packed, scales, zp, k, block_size)  # noqa: E731
    ref = w4a16_matmul_reference(x.float(), packed, scales.float(), zp, k, block_size)
    err = ((ours().float() - ref).abs().max() / ref.abs().max()).item()  # relative to max |y|
    if device != "cuda":
        return [Row(name, "triton", None, None, None, None, None, err)]
    w16 = dequantize_packed(w).to(device=device, dtype=dtype)  # (N, K)
    flops = 2.0 * m * n * k
    act = (m * k + m * n) * x.element_size()
    int4_bytes = packed.numel() + scales.numel() * scales.element_size() + zp.numel() + act
    fp16_bytes = w16.numel() * w16.element_size() + act
    rows = []
    for impl, fn, nbytes in (("triton-w4a16", ours, int4_bytes), ("torch-matmul-fp16", lambda: x @ w16.T, fp16_bytes)):
        ms = time_ms(fn, iters)
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(Row(name, impl, ms, flops / (ms * 1e-3) / 1e12, gbps, gbps / peak if peak else None,
                        gbps / copy_gbps, err if impl.startswith("triton") else None))
    return rows


def run(iters: int) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        name = torch.cuda.get_device_name()
        peak = peak_bandwidth_gbps(name)
        copy_gbps = measured_copy_gbps(iters)
        dt = torch.float16
        # Qwen2-7B attention and MLP shapes.
        attn = [("prefill frame T=197 prefix=4096", 1, 28, 4, 197, 4096, 128),
                ("prefill question T=32 prefix=8192", 1, 28, 4, 32, 8192, 128),
                ("decode cache=8192", 1, 28, 4, 1, 8191, 128),
                ("decode cache=8192 B=4", 4, 28, 4, 1, 8191, 128)]
        gemm = [("gemv M=1 3584->18944", 1, 18944, 3584, 32), ("gemv M=1 18944->3584", 1, 3584, 18944, 32),
                ("gemm M=197 3584->18944", 197, 18944, 3584, 32)]
    else:
        name, peak, copy_gbps, dt = "cpu (Triton interpreter)", None, None, torch.float32
        attn = [("prefill T=5 prefix=7 gqa4 d64", 1, 4, 1, 5, 7, 64),
                ("decode cache=40 gqa7 d128", 1, 7, 1, 1, 39, 128)]
        gemm = [("gemv M=1 64->40", 1, 40, 64, 32), ("gemm M=20 96->48", 20, 48, 96, 32)]
    rows: List[Row] = []
    for case in attn:
        rows += attention_rows(*case, dt, device, iters, peak, copy_gbps)
    for case in gemm:
        rows += w4a16_rows(*case, dt, device, iters, peak, copy_gbps)
    return {"device": name, "dtype": str(dt), "peak_bandwidth_gbps": peak, "measured_copy_gbps": copy_gbps,
            "rows": [asdict(r) for r in rows]}


def fmt(v: Optional[float], spec: str) -> str:
    """format(v, spec), or a dash padded to the spec's width."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def print_report(report: dict) -> None:
    print(f"device: {report['device']}  dtype: {report['dtype']}  "
          f"peak BW: {fmt(report['peak_bandwidth_gbps'], '.0f')} GB/s"
          f"  measured copy: {fmt(report['measured_copy_gbps'], '.0f')} GB/s")
    print(f"{'case':36s} {'impl':18s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>8s} {'%peak':>6s} {'%copy':>6s} "
          f"{'max err':>9s}")
    for r in report["rows"]:
        pct = lambda f: "-" if f is None else f"{100 * f:.0f}%"  # noqa: E731
        print(f"{r['name']:36s} {r['impl']:18s} {fmt(r['ms'], '8.3f')} {fmt(r['tflops'], '8.2f')} "
              f"{fmt(r['gbps'], '8.0f')} {pct(r['bw_fraction_peak']):>6s} {pct(r['bw_fraction_copy']):>6s} "
              f"{fmt(r['max_err'], '9.2e')}")
    print("max err: attention = max |triton - fp32 reference|; w4a16 = max |err| / max |y|.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20, help="timed runs per kernel (median reported)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when the @triton.jit kernels are defined (imported)
    report = run(args.iters)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
