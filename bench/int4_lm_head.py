"""int4 packages with the lm_head at 8 bits (the default) against 4 bits: decode speed and agreement with fp32.

    python bench/int4_lm_head.py FP32_PKG [--context 1024] [--steps 16] [--repeats 3] [--threads 2]

FP32_PKG is an fp32 model package (e.g. the one ``bench/peers.py --workdir
DIR`` leaves in ``DIR/qwen2-0.5b/pkg_fp32``). Both int4 packages are made from
copies of it by the quantizer ``loc3r export onnx`` runs (``QuantOptions
(int4_lm_head_bits=8|4)``), then measured alternately in this process, the
p50 over ``--repeats``: decode ms per token at ``--context`` (the session's
own embed, decoder and lm_head steps, as ``Session.ask``), and against the
fp32 package on the same prompt: the cosine of the next-token logits, and how
many of ``--steps`` greedy tokens equal fp32's. Not a test: timings depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def quantized_copy(fp32: Path, out: Path, lm_head_bits: int) -> Path:
    from loc3r.export.quantize import QuantOptions, quantize_package

    shutil.copytree(fp32, out)
    quantize_package(out, "int4", options=QuantOptions(int4_lm_head_bits=lm_head_bits, progress=False))
    return out


def greedy(system, context: int, steps: int) -> tuple[np.ndarray, list[int], float]:
    """Next-token logits after the benchmark's ``context``-token prompt, ``steps`` greedy tokens, and the
    decode seconds per token (:class:`peers_systems.Loc3rSystem`, the same steps as ``bench/peers.py``)."""
    system.prefill(context)
    per_token = system.decode(steps)
    return system.last_logits, system.last_tokens, per_token


def main() -> None:
    from peers_systems import Loc3rSystem

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fp32_package", type=Path)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="int4_lm_head_"))
    try:
        t0 = time.time()
        pkgs = {"fp32": args.fp32_package,
                "int4, lm_head 8-bit": quantized_copy(args.fp32_package, work / "lm8", 8),
                "int4, lm_head 4-bit": quantized_copy(args.fp32_package, work / "lm4", 4)}
        print(f"quantized both in {time.time() - t0:.0f} s", flush=True)
        systems = {k: Loc3rSystem(p, args.threads) for k, p in pkgs.items()}
        ref_logits, ref_tokens, _ = greedy(systems["fp32"], args.context, args.steps)
        times = {k: [] for k in pkgs if k != "fp32"}
        rows, outs = {}, {}

        def cosine(a, b):
            return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

        for _ in range(args.repeats):
            for k in times:
                logits, tokens, per_token = greedy(systems[k], args.context, args.steps)
                times[k].append(per_token)
                outs[k] = (logits, tokens)
                rows[k] = (cosine(logits, ref_logits), sum(a == b for a, b in zip(tokens, ref_tokens)))
        base = float(np.median(times["int4, lm_head 8-bit"]))
        print(f"\ncontext {args.context}, {args.steps} decode steps, p50 of {args.repeats}, {args.threads} threads\n")
        print("| package | lm_head MiB | decode ms/token | tok/s | vs lm_head 8-bit | logit cosine vs fp32 | "
              "greedy tokens = fp32 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k in times:
            ms = float(np.median(times[k])) * 1e3
            size = (pkgs[k] / "lm_head.onnx").stat().st_size / 2**20
            cos, same = rows[k]
            print(f"| {k} | {size:.1f} | {ms:.1f} | {1e3 / ms:.2f} | {base * 1e3 / ms:.2f}x | {cos:.5f} | "
                  f"{same}/{args.steps + 1} |")
        (l8, t8), (l4, t4) = outs["int4, lm_head 8-bit"], outs["int4, lm_head 4-bit"]
        print(f"\nlm_head 4-bit against 8-bit (the same int4 decoder): logit cosine {cosine(l4, l8):.5f}, "
              f"greedy tokens equal {sum(a == b for a, b in zip(t4, t8))}/{args.steps + 1}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
