"""Where a loc3r decode step spends its time, by ONNX operator type (onnxruntime's own profiler).

    python bench/peers_opprofile.py PKG_DIR [--context 1024] [--steps 8] [--threads 2]

Runs the package's ``decoder`` graph one token at a time at ``--context``
cached tokens, with the KV cache bound in place as past and present (as the
runtime does), and its ``lm_head`` graph on the one row, under onnxruntime's
profiler; prints milliseconds per step by operator type. ``bench/peers.py``
uses it to say why decode falls short of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def _session(path: Path, threads: int, prefix: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _node_ms(profile_file: str, skip_runs: int) -> dict[str, float]:
    """Total ms per op type over the profiled runs after the first ``skip_runs`` (warm-up)."""
    events = json.loads(Path(profile_file).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[skip_runs]["ts"] if len(runs) > skip_runs else 0
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            out[e["args"]["op_name"]] += e["dur"] / 1e3
    os.remove(profile_file)
    return dict(out)


def decode_op_profile(pkg_dir: Path, context: int, steps: int = 8, threads: int = 2) -> dict:
    """ms per decode step by op type, for the decoder (prefixed ``decoder/``) and lm_head (``lm_head/``)."""
    import onnxruntime as ort

    from loc3r.runtime.package import load_package

    package = load_package(pkg_dir)
    m = package.manifest
    if context + steps + 1 > m.text.max_context:
        raise ValueError(f"context {context} + {steps} steps does not fit the package's {m.text.max_context}")
    with tempfile.TemporaryDirectory() as tmp:
        dec = _session(package.path(m.graph("decoder").file), threads, str(Path(tmp) / "decoder"))
        head = _session(package.path(m.graph("lm_head").file), threads, str(Path(tmp) / "lm_head"))
        kv_shape = (1, m.text.num_kv_heads, m.text.max_context, m.text.head_dim)
        io = dec.io_binding()
        buffers = []
        for i in range(m.text.num_layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(kv_shape, np.float32))
                buffers.append(buf)
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        io.bind_output("hidden")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 1, m.text.hidden_size)).astype(np.float32)  # (1, 1, H)
        warmup = 2
        for step in range(warmup + steps):
            total = context + step + 1
            io.bind_cpu_input("inputs_embeds", x)
            io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            dec.run_with_iobinding(io)
            hidden = io.copy_outputs_to_cpu()[-1]  # bound last: (1, 1, H)
            head.run(None, {"hidden": hidden})
        per_op = {f"decoder/{k}": v / steps for k, v in _node_ms(dec.end_profiling(), warmup).items()}
        per_op.update({f"lm_head/{k}": v / steps for k, v in _node_ms(head.end_profiling(), warmup).items()})
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pkg_dir", type=Path)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    per_op = decode_op_profile(args.pkg_dir, args.context, args.steps, args.threads)
    total = sum(per_op.values())
    print(f"decode step at context {args.context}: {total:.2f} ms of kernels")
    for name, ms in per_op.items():
        print(f"  {name:<40} {ms:8.3f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    sys.exit(main())
