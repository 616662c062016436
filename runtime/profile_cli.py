"""``loc3r profile VIDEO``: per-stage latency (p50/p95/max after warm-up), throughput and memory.

Ingests the video through a session exactly as ``loc3r-run`` does (same
pipeline interface, see :mod:`loc3r.runtime.run_cli`), then asks the
question ``--repeat`` times (the cache is rewound after each, so every ask
does the same work) and reports:

- per stage: decode, preprocess, pose_prior, vision, frame_prefill,
  question_prefill, token_decode (the first sample of each is warm-up);
- frames/s ingested, tokens/s generated, time to the first answer token;
- peak RSS; and which backend ran.

``--json`` prints the report as JSON; ``--trace FILE`` writes a Chrome trace
(open it in chrome://tracing or ui.perfetto.dev).

``--roofline`` also measures this machine's roofline
(:mod:`loc3r.runtime.roofline`) and prints decode as a percentage of the
memory-bandwidth bound (decoder + lm_head weight bytes, read from the
package's graph files, plus the filled KV cache, per token) and frame prefill
as a percentage of the fp32 GEMM FLOP bound (matmul FLOPs per token from the
graphs' weight shapes, attention FLOPs from the manifest's dims and the
GroupQueryAttention heads). The GEMM peak is the better of numpy's BLAS and
onnxruntime's MatMul. Counting needs the ``onnx`` package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import click

from loc3r.runtime.backends import BACKEND_CHOICES
from loc3r.runtime.roofline import measure_ort_matmul_gflops

DEFAULT_QUESTION = "What is in front of me?"
DEFAULT_SITUATION = "I am standing in the middle of the room."
ROOFLINE_BYTES = 128 << 20  # STREAM arrays for --roofline: well past any CPU cache, small for an 8 GB Orin
MATMUL_OPS = ("MatMul", "Gemm", "MatMulNBits", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul")
_PASS_THROUGH_OPS = ("DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity")


@dataclass(frozen=True)
class GraphCost:
    """Per-token cost of an ONNX graph's weight matmuls (what one decode step reads and computes)."""

    weight_bytes: int  # every matmul weight initializer (with its scales and zero points), counted once
    matmul_flops: float  # 2 * K * N summed over matmuls with a constant weight
    attention_heads: int  # query heads summed over GroupQueryAttention nodes (layers x heads)

    def __add__(self, other: "GraphCost") -> "GraphCost":
        return GraphCost(self.weight_bytes + other.weight_bytes, self.matmul_flops + other.matmul_flops,
                         self.attention_heads + other.attention_heads)


@dataclass(frozen=True)
class DecoderCost:
    """What one token costs the decoder + lm_head: bytes to read and FLOPs to do, by context length."""

    weight_bytes: int
    matmul_flops: float
    attention_heads: int  # layers x query heads
    head_dim: int
    kv_bytes_per_token: int  # K and V of every layer for one position
    head_flops: float = 0.0  # the lm_head's share of matmul_flops (a prompt needs it for its last row only)

    def decode_bytes(self, context: int) -> int:
        """Bytes a decode step reads at ``context`` cached tokens: all weights + the filled KV cache."""
        from loc3r.runtime.roofline import decode_bytes_per_token

        return decode_bytes_per_token(self.weight_bytes, self.kv_bytes_per_token, context)

    def flops_per_token(self, context: float) -> float:
        """Matmuls plus attention (QK^T and PV: 4 * head_dim per head per attended position)."""
        return self.matmul_flops + 4.0 * self.attention_heads * self.head_dim * context

    def prefill_flops_per_token(self, tokens: int, logits: bool = True) -> float:
        """FLOPs per token of a ``tokens``-long prompt into an empty cache (attention to ``tokens / 2`` on average).

        Only the last row needs logits (``logits=False``: none, as for a frame block).
        """
        head = self.head_flops / tokens if logits else 0.0
        return self.flops_per_token(tokens / 2) - self.head_flops + head


def _tensor_nbytes(tensor) -> int:
    from onnx import helper

    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # sub-byte types (INT4/UINT4) are packed two per byte
        itemsize = 0.5
    return int(math.ceil(math.prod(tensor.dims) * itemsize))


def graph_cost(path: Path) -> GraphCost:
    """:class:`GraphCost` of one ONNX file (external weights are not loaded: shapes come from the protobuf)."""
    from loc3r.errors import Loc3rError

    try:
        import onnx
    except ModuleNotFoundError:
        raise Loc3rError("roofline figures need the onnx package to read graph weights: pip install onnx") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or non-ONNX file
        raise Loc3rError(f"cannot read ONNX graph {path}: {exc}") from None
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    counted: set[str] = set()

    def weight_initializers(name: str) -> list[str]:
        """Initializers ``name`` is made of, through dequantize/transpose/cast/reshape."""
        if name in inits:
            return [name]
        node = producer.get(name)
        if node is None or node.op_type not in _PASS_THROUGH_OPS:
            return []
        found = weight_initializers(node.input[0])
        if found and node.op_type == "DequantizeLinear":
            found += [i for i in node.input[1:] if i in inits]
        return found

    weight_bytes, flops, heads = 0, 0.0, 0
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GroupQueryAttention":
            heads += int(attrs.get("num_heads", 0))
        if node.op_type not in MATMUL_OPS or len(node.input) < 2:
            continue
        if node.op_type == "MatMulNBits":
            names = [i for i in node.input[1:] if i in inits]
            k_n = int(attrs["K"]) * int(attrs["N"])
        else:
            names = weight_initializers(node.input[1])
            if not names:
                continue  # activation x activation (decomposed attention): not a weight read
            k_n = math.prod(inits[names[0]].dims[-2:]) if len(inits[names[0]].dims) >= 2 else 0
            names += [i for i in node.input[2:] if i in inits]  # scales / zero points / bias
        flops += 2.0 * k_n
        for name in names:
            if name not in counted:
                counted.add(name)
                weight_bytes += _tensor_nbytes(inits[name])
    return GraphCost(weight_bytes, flops, heads)


def package_decoder_cost(pkg_dir: Path) -> DecoderCost:
    """:class:`DecoderCost` of a model package: its ``decoder`` and ``lm_head`` graphs and manifest dims."""
    import numpy as np

    from loc3r.runtime.package import load_package

    package = load_package(pkg_dir)
    m = package.manifest
    head = graph_cost(package.path(m.graph("lm_head").file))
    cost = graph_cost(package.path(m.graph("decoder").file)) + head
    kv_dtype = {t.name: t.dtype for t in m.graph("decoder").inputs}.get("past_key_values.0.key", "float32")
    itemsize = 2 if kv_dtype == "bfloat16" else np.dtype(kv_dtype).itemsize
    kv = 2 * m.text.num_layers * m.text.num_kv_heads * m.text.head_dim * itemsize
    heads = cost.attention_heads or m.text.num_layers * m.text.hidden_size // m.text.head_dim
    return DecoderCost(cost.weight_bytes, cost.matmul_flops, heads, m.text.head_dim, kv, head.matmul_flops)




@dataclass(frozen=True)
class RooflineFigures:
    """Measured speeds against this machine's bounds (fractions, 0..1+)."""

    bandwidth_gbps: float
    matmul_gflops: float
    decode_context: int
    decode_tokens_per_s: Optional[float]
    decode_bytes_per_token: int
    decode_fraction: Optional[float]
    prefill_tokens_per_s: Optional[float]
    prefill_flops_per_token: float
    prefill_fraction: Optional[float]

    def to_lines(self) -> list[str]:
        lines = [f"roofline: {self.bandwidth_gbps:.1f} GB/s (STREAM), {self.matmul_gflops:.1f} GFLOP/s "
                 "(fp32 GEMM)"]
        if self.decode_fraction is not None:
            lines.append(f"decode: {self.decode_tokens_per_s:.2f} tokens/s = {100 * self.decode_fraction:.1f}% "
                         f"of the bandwidth bound ({self.decode_bytes_per_token / 1e6:.1f} MB/token at context "
                         f"{self.decode_context})")
        if self.prefill_fraction is not None:
            lines.append(f"frame prefill: {self.prefill_tokens_per_s:.1f} tokens/s = "
                         f"{100 * self.prefill_fraction:.1f}% of the FLOP bound "
                         f"({self.prefill_flops_per_token / 1e9:.3f} GFLOP/token)")
        return lines


def roofline_figures(report, cost: DecoderCost, roofline, tokens_per_frame: int, context: int,
                     frames_context: int) -> RooflineFigures:
    """Decode (``token_decode`` p50) and frame prefill (``frame_prefill`` p50) against ``roofline``."""
    from loc3r.runtime.roofline import decode_fraction_of_bound, prefill_fraction_of_bound

    decode = report.stages.get("token_decode")
    decode_tps = 1000.0 / decode.p50_ms if decode and decode.p50_ms > 0 else None
    decode_bytes = cost.decode_bytes(context)
    prefill = report.stages.get("frame_prefill")
    prefill_tps = tokens_per_frame * 1000.0 / prefill.p50_ms if prefill and prefill.p50_ms > 0 else None
    prefill_flops = cost.prefill_flops_per_token(max(frames_context, 1), logits=False)  # no logits for frames
    return RooflineFigures(
        bandwidth_gbps=roofline.bandwidth_gbps, matmul_gflops=roofline.matmul_gflops, decode_context=context,
        decode_tokens_per_s=decode_tps, decode_bytes_per_token=decode_bytes,
        decode_fraction=None if decode_tps is None
        else decode_fraction_of_bound(decode_tps, decode_bytes, roofline.bandwidth_gbps),
        prefill_tokens_per_s=prefill_tps, prefill_flops_per_token=prefill_flops,
        prefill_fraction=None if prefill_tps is None
        else prefill_fraction_of_bound(prefill_tps, prefill_flops, roofline.matmul_gflops),
    )


def profile_video(
    video: str,
    model: Optional[str],
    backend: str,
    fps: Optional[float],
    max_frames: Optional[int],
    question: str,
    situation: Optional[str],
    max_new_tokens: int,
    repeat: int,
    warmup: int,
):
    """Run the stream and return ``(ProfileReport, StageProfiler)``."""
    from loc3r.errors import Loc3rError
    from loc3r.runtime import run_cli
    from loc3r.runtime.profiler import StageProfiler
    from loc3r.runtime.video import SamplingOptions, open_video

    if repeat < 1:
        raise Loc3rError(f"--repeat must be at least 1, got {repeat}")
    sampling = SamplingOptions(fps=fps, max_frames=max_frames)
    with open_video(video, sampling) as source:
        model_dir = run_cli.resolve_model_dir(model)
        pipeline = run_cli.load_pipeline(model_dir, backend)
        tok = pipeline.tokenizer
        reserve = 1 + tok.encode_suffix(question, situation).ids.size + max_new_tokens
        budget = run_cli.frame_budget(pipeline.manifest, tok.encode_prefix().size, reserve)
        if budget < 1:
            raise Loc3rError(f"the question and --max-new-tokens {max_new_tokens} leave no room "
                             "for a frame in the context")
        profiler = StageProfiler(warmup=warmup)
        session = pipeline.new_session(profiler=profiler, frame_policy="uniform", reserve_tokens=reserve)
        feeder = run_cli.FrameFeeder(source, sampling, session, budget, "uniform", profiler,
                                     threading.Lock())
        frames = feeder.run(progress=False)
        for _ in range(repeat):
            session.ask(question, situation=situation, max_new_tokens=max_new_tokens)
    extra = {"model": str(model_dir), "frames_in_context": frames, "question_repeats": repeat,
             "context_tokens": int(getattr(session, "frames_end", 0)) + reserve - max_new_tokens // 2}
    return profiler.report(backend=pipeline.backend.describe(), extra=extra), profiler


def package_roofline(report) -> RooflineFigures:
    """Roofline percentages for the package ``report`` was measured on (its ``extra['model']``)."""
    from loc3r.runtime.package import load_package
    from loc3r.runtime.roofline import measure_roofline

    pkg_dir = Path(str(report.extra["model"]))
    manifest = load_package(pkg_dir).manifest
    cost = package_decoder_cost(pkg_dir)
    roofline = measure_roofline(n_bytes=ROOFLINE_BYTES, matmul_n=1024, repeats=3)
    ort_gflops = measure_ort_matmul_gflops()
    if ort_gflops > roofline.matmul_gflops:  # the compute bound is the best GEMM this machine runs
        roofline = dataclasses.replace(roofline, matmul_gflops=ort_gflops)
    context = int(report.extra.get("context_tokens", manifest.text.max_context))
    frames_context = manifest.tokens_per_frame * int(report.extra.get("frames_in_context", 1))
    return roofline_figures(report, cost, roofline, manifest.tokens_per_frame, context, frames_context)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video")
@click.option("--model", metavar="DIR", help="Model package directory (default: the embedded package).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--fps", type=float, help="Sample frames at this rate (default: every frame).")
@click.option("--max-frames", type=int, help="At most N frames, uniform over the video.")
@click.option("--question", default=DEFAULT_QUESTION, show_default=True, help="The question asked.")
@click.option("--situation", default=DEFAULT_SITUATION, show_default=True,
              help="The situation given, so the localization heads run too (\"\" for none).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Ask the question this many times.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Samples per stage left out of the statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trace", type=click.Path(dir_okay=False), metavar="FILE", help="Write a Chrome trace here.")
@click.option("--roofline", "with_roofline", is_flag=True,
              help="Also measure this machine's bandwidth and GEMM peak and print decode and frame prefill "
                   "as % of those bounds (needs the onnx package).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def profile(video, model, backend, fps, max_frames, question, situation, max_new_tokens, repeat, warmup,
            as_json, trace, with_roofline, debug):
    """Per-stage latency, frames/s, tokens/s, time to first token and peak memory on VIDEO."""
    from loc3r.cli import run_cli_command

    def body():
        report, profiler = profile_video(video, model, backend, fps, max_frames, question,
                                         situation or None, max_new_tokens, repeat, warmup)
        figures = package_roofline(report) if with_roofline else None
        if as_json:
            out = report.to_dict()
            if figures is not None:
                out["roofline"] = asdict(figures)
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo("\n".join([report.to_table()] + (figures.to_lines() if figures else [])))
        if trace:
            path = profiler.write_chrome_trace(Path(trace))
            click.echo(f"note: Chrome trace written to {path}", err=True)

    run_cli_command(body, debug)
