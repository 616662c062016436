"""Which MatMuls tolerate quantization: quantize one group at a time, measure the output error.

For every group of weight MatMuls (one node, or one *kind* of node across
layers, e.g. ``/layers.*/mlp/down_proj/MatMul``), a copy of the fp32 graph
with only that group quantized is run on the same inputs as the fp32 graph,
and the error of one output is recorded: max abs, relative RMS error, the
mean and worst row cosine, and top-1 agreement of the last axis (for logits). Groups
are sorted most sensitive first.

The default exclusion lists in :mod:`loc3r.export.quantize` come from this
measurement; ``python -m loc3r.export.sensitivity GRAPH.onnx`` reprints it for
any graph, on random inputs (a decoder gets a prefill from an empty KV cache).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import onnx

from loc3r.errors import Loc3rError
from loc3r.export.quantize_select import WeightMatMul, weight_matmuls

Feeds = Mapping[str, np.ndarray]
Quantizer = Callable[[onnx.ModelProto, Sequence[WeightMatMul]], onnx.ModelProto]


@dataclass(frozen=True)
class OutputError:
    """Error of a quantized output against fp32."""

    max_abs: float
    rel_rms: float  # ||q - f|| / ||f||
    cosine: float  # mean row (last axis) cosine
    min_cosine: float  # worst row
    top1: float  # fraction of rows whose argmax agrees

    @classmethod
    def between(cls, ref: np.ndarray, got: np.ndarray) -> "OutputError":
        ref = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1] if ref.ndim else 1)  # (rows, C)
        got = np.asarray(got, np.float64).reshape(ref.shape)
        num = (ref * got).sum(-1)
        den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        return cls(
            max_abs=float(np.abs(ref - got).max(initial=0.0)),
            rel_rms=float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-30)),
            cosine=float(cos.mean()) if cos.size else 1.0,
            min_cosine=float(cos.min(initial=1.0)),
            top1=float((ref.argmax(-1) == got.argmax(-1)).mean()) if ref.size else 1.0,
        )


@dataclass(frozen=True)
class GroupSensitivity:
    group: str  # a node name, or an fnmatch pattern for a kind of node
    nodes: int
    elements: int  # weight elements in the group
    error: OutputError


def kind_of(node_name: str) -> str:
    """The node's name with layer indices replaced by ``*`` (``/layers.3/x`` -> ``/layers.*/x``)."""
    return re.sub(r"\.(\d+)(?=/|$)", ".*", node_name)


def group_matmuls(matmuls: Sequence[WeightMatMul], by: str = "kind") -> dict[str, list[WeightMatMul]]:
    """Groups in graph order: ``by="node"`` (one per node) or ``"kind"`` (one per :func:`kind_of`)."""
    if by not in ("node", "kind"):
        raise Loc3rError(f"group by 'node' or 'kind', got '{by}'")
    groups: dict[str, list[WeightMatMul]] = {}
    for m in matmuls:
        groups.setdefault(m.name if by == "node" else kind_of(m.name), []).append(m)
    return groups


def run_graph(model: onnx.ModelProto, feeds_list: Sequence[Feeds], output: str) -> list[np.ndarray]:
    """``output`` for each feed, on onnxruntime CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [sess.run([output], dict(f))[0] for f in feeds_list]


def measure_sensitivity(
    model: onnx.ModelProto,
    feeds_list: Sequence[Feeds],
    quantize: Quantizer,
    output: Optional[str] = None,
    by: str = "kind",
    candidates: Optional[Sequence[WeightMatMul]] = None,
    progress: bool = True,
) -> list[GroupSensitivity]:
    """Error of ``output`` (default: the first graph output) with one group quantized at a time.

    Sorted most sensitive (highest relative RMS error) first.
    """
    from tqdm import tqdm

    if not feeds_list:
        raise Loc3rError("sensitivity needs at least one set of inputs")
    output = output or model.graph.output[0].name
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in run_graph(model, feeds_list, output)])
    groups = group_matmuls(weight_matmuls(model) if candidates is None else candidates, by)
    rows = []
    for name, members in tqdm(groups.items(), desc="sensitivity", disable=not progress, file=sys.stderr):
        got = run_graph(quantize(model, members), feeds_list, output)
        err = OutputError.between(ref, np.concatenate([g.reshape(-1, g.shape[-1]) for g in got]))
        rows.append(GroupSensitivity(name, len(members), sum(m.elements for m in members), err))
    return sorted(rows, key=lambda r: -r.error.rel_rms)


def measure_qdq_op_types(
    graph: "Path",
    feeds_list: Sequence[Feeds],
    op_types: Sequence[str],
    output: Optional[str] = None,
    method: str = "percentile",
) -> list[GroupSensitivity]:
    """Static int8 QDQ on all nodes of one op type at a time (e.g. MatMul, LayerNormalization, Add).

    Ranges are calibrated once over ``feeds_list`` for every op type, then
    each op type is quantized alone and the error of ``output`` recorded.
    This is the measurement behind quantizing only weight MatMuls and Convs
    in the int8 vision tower and pose prior (norms and the rest stay float).
    """
    from loc3r.calibration.ranges import RangeMethod, collect_ranges
    from loc3r.export.quantize_int8 import quantize_static_qdq

    model = onnx.load(str(graph))
    output = output or model.graph.output[0].name
    ranges = collect_ranges(graph, list(feeds_list), RangeMethod(method), progress=False, op_types=op_types)
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in run_graph(model, feeds_list, output)])
    rows = []
    for op in op_types:
        nodes = [n.name for n in model.graph.node if n.op_type == op]
        if not nodes:
            continue
        q = quantize_static_qdq(model, ranges, nodes, method, op_types=(op,))
        got = np.concatenate([g.reshape(-1, g.shape[-1]) for g in run_graph(q, feeds_list, output)])
        rows.append(GroupSensitivity(f"QDQ {op}", len(nodes), 0, OutputError.between(ref, got)))
    return sorted(rows, key=lambda r: -r.error.rel_rms)


def format_table(rows: Sequence[GroupSensitivity]) -> str:
    lines = [f"{'group':<52} {'nodes':>5} {'weights':>9} {'max_abs':>9} {'rel_rms':>8} {'cosine':>8} {'top1':>6}"]
    for r in rows:
        e = r.error
        lines.append(f"{r.group:<52} {r.nodes:>5} {r.elements:>9} {e.max_abs:>9.4f} {e.rel_rms:>8.4f} "
                     f"{e.cosine:>8.5f} {e.top1:>6.3f}")
    return "\n".join(lines)


def random_feeds(model: onnx.ModelProto, dims: Mapping[str, int], count: int = 2, seed: int = 0) -> list[dict]:
    """Inputs for ``model`` without data: standard-normal floats (symbolic dims from ``dims``, default 1).

    Graphs with fused attention get a prefill from an empty cache: KV inputs
    zero, ``seqlens_k = seq - 1`` and ``total_sequence_length = seq`` (seq =
    the length of the embeddings). Other integer inputs are zero.
    """
    from loc3r.export.quantize_fp16 import kv_cache_io

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    kv_in = set(kv_cache_io(model)[0])
    lengths = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 6:
            lengths[node.input[5]], lengths[node.input[6]] = "seqlens_k", "total"
    out = []
    for _ in range(count):
        feeds, seq = {}, None
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            t = inp.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 1) for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            if inp.name in kv_in:
                feeds[inp.name] = np.zeros(shape, dtype)
            elif np.issubdtype(dtype, np.floating):
                feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
                if len(shape) == 3 and seq is None:
                    seq = shape[1]
            else:
                feeds[inp.name] = np.zeros(shape, dtype)
        for name, what in lengths.items():
            n = seq or 1
            feeds[name] = np.full(feeds[name].shape, n - 1 if what == "seqlens_k" else n, feeds[name].dtype)
        out.append(feeds)
    return out


def calibration_feeds(graph: "Path", source: str, frames: int = 4) -> list[dict]:
    """Real inputs for a package's vision or pose_prior graph, from the calibration videos in ``source``."""
    from pathlib import Path

    from loc3r.calibration.dataset import CalibrationOptions, build_calibration_set
    from loc3r.calibration.readers import pose_prior_feeds, vision_feeds
    from loc3r.runtime.package import load_package

    graph = Path(graph)
    pkg = load_package(graph.parent)
    m = pkg.manifest
    spec = next((g for g in m.graphs if g.file == graph.name), None)
    if spec is None or spec.role not in ("vision", "pose_prior"):
        raise Loc3rError(f"--calib feeds only a package's vision or pose_prior graph, not {graph.name}")
    calib = build_calibration_set(source, CalibrationOptions(frames_per_video=frames), progress=False)
    if spec.role == "pose_prior":
        return list(pose_prior_feeds(calib, m.pose_prior, spec, graph))
    pose = m.graph("pose_prior") if m.has_graph("pose_prior") else None
    return list(vision_feeds(calib, m.vision, spec, m.pose_prior, pose,
                             None if pose is None else pkg.path(pose.file)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print which groups of a graph are sensitive to quantization.

    python -m loc3r.export.sensitivity GRAPH.onnx [--bits 4|8] [--block 32] [--by kind|node]
        [--output NAME] [--dim NAME=N ...] [--calib VIDEOS] [--qdq-ops MatMul,LayerNormalization,Add]
    """
    import argparse

    from loc3r.export.quantize_nbits import NBitsOptions, quantize_matmuls_nbits

    ap = argparse.ArgumentParser(prog="python -m loc3r.export.sensitivity",
                                 description="Quantize one group at a time and print the output error.")
    ap.add_argument("graph")
    ap.add_argument("--bits", type=int, default=4, help="weight-only bits (4 or 8)")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--by", default="kind", choices=["kind", "node"])
    ap.add_argument("--output", default=None, help="graph output to compare (default: the first)")
    ap.add_argument("--dim", action="append", default=[],
                    help="symbolic dimension size, NAME=N (e.g. seq=16 kv_len=64 for a decoder)")
    ap.add_argument("--calib", default=None,
                    help="calibration videos: real inputs for a package's vision/pose_prior graph")
    ap.add_argument("--qdq-ops", default=None,
                    help="comma-separated op types: static int8 QDQ one op type at a time instead")
    args = ap.parse_args(argv)
    try:
        dims = {k: int(v) for k, v in (d.split("=", 1) for d in args.dim)}
        model = onnx.load(args.graph)
        feeds = calibration_feeds(args.graph, args.calib) if args.calib else random_feeds(model, dims)
        if args.qdq_ops:
            ops = [o.strip() for o in args.qdq_ops.split(",") if o.strip()]
            rows = measure_qdq_op_types(args.graph, feeds, ops, args.output)
        else:
            opts = NBitsOptions(bits=args.bits, block_size=args.block, symmetric=not args.asymmetric)
            rows = measure_sensitivity(model, feeds, lambda m, g: quantize_matmuls_nbits(m, g, opts),
                                       output=args.output, by=args.by)
    except Loc3rError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
