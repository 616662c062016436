"""Rewrite a written fp32 model package for a precision: fp16, int8 or int4.

``loc3r export onnx ... --precision P`` writes the fp32 package, then calls
:func:`quantize_package`, which rewrites the graph files in place and the
manifest (``precision``, KV dtypes for fp16, every sha256).

What each precision does per graph role (from the measurements with
:mod:`loc3r.export.sensitivity`, quoted beside the defaults below):

============  =====================================  ==========================================
role          int4                                   int8
============  =====================================  ==========================================
decoder       4-bit MatMulNBits, block 32            8-bit MatMulNBits, block 32 (weight-only)
lm_head       8-bit MatMulNBits (most sensitive)     8-bit MatMulNBits
vision        4-bit MatMulNBits on large MatMuls     static QDQ int8 (calibrated activations)
pose_prior    8-bit weights, fp32 compute (4-bit:    static QDQ int8 (calibrated activations)
              26% pose error)
embed         fp16 table (a Gather)                  fp16 table
heads, bev    fp32 (the localization heads)          fp32
============  =====================================  ==========================================

In every case only weight MatMuls (and Convs, for QDQ) with at least
``min_k`` inputs and ``min_elements`` weights are touched; norms, softmax,
residual adds and fused attention nodes (GroupQueryAttention,
MultiHeadAttention) stay float32 and intact. ``QuantOptions.exclude`` adds
node-name patterns to keep in float32 (``DEFAULT_EXCLUDE``).

fp16 (GPU packages): every graph but the heads in float16, normalisation
statistics in float32, I/O float32 except the KV cache (float16).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx

from loc3r.errors import Loc3rError
from loc3r.export.quantize_files import external_data_files, load_graph, save_graph
from loc3r.export.fuse_matmuls import fuse_sibling_matmuls
from loc3r.export.quantize_nbits import NBitsOptions, quantize_matmuls_nbits
from loc3r.export.quantize_select import conv_nodes, matches_any, name_unnamed_nodes, select_matmuls
from loc3r.runtime.package import GraphSpec, Manifest, load_package, sha256_of_file, write_manifest

# Measured with ``python -m loc3r.export.sensitivity GRAPH --bits 4`` on the
# exported loc3r-tiny graphs (random weights; one kind of MatMul quantized at a
# time; relative RMS error of the graph's output):
#   decoder (hidden states)     0.45% (q/k_proj) .. 2.3% (o_proj)
#   lm_head (logits)            8.7%, top-1 0.84 at 4 bits; 0.53%, top-1 1.00 at 8 bits
#   vision (frame embeddings)   0.25% .. 3.5% in the tower, 5.3% projector
#   pose_prior (pose)           up to 13.7% (proj_q), 12.1% (enc qkv), 7.9% (pose_head fc1)
#   heads (orientation logits)  7.8% (f_ori fc1), top-1 0.75
# Static int8 QDQ per op type (python -m loc3r.export.sensitivity G --calib V --qdq-ops ...),
# on calibration frames:
#   pose_prior (pose)           Add 29.7% (171 nodes), LayerNormalization 5.5% (41), MatMul 4.1% (80)
#   vision (frame embeddings)   Add 2.4% (47), MatMul 1.9% (28), LayerNormalization 1.4% (8), Conv 0.6%
# so int8 QDQ covers weight MatMuls and Convs only; norms, residual adds, GELU and
# attention (fused) stay float.
# All pose-prior MatMuls at once (calibration frames, pose output): 4-bit 26% rel. RMS,
# 8-bit weight-only 0.87% (fp32 compute; 2.3x slower per frame on 2 CPU threads, a
# third of the size), 8-bit with int8 activations (accuracy_level 4) 13%.
# Hence: the heads stay fp32 and the pose prior is 8-bit at int4, the lm_head is 8-bit in
# int4 packages, and these patterns are never quantized (the localization,
# camera and BEV heads, and the pose regression MLP) whatever the precision.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*pos_head*", "*ori_head*", "*f_pos*", "*f_ori*", "*f_cam*", "*f_proj*", "*bev*",
    "*downstream_head*", "*pose_head*",
)
INT4_AS_INT8: tuple[str, ...] = ("*lm_head*",)
QUANT_REPORT = "quantization.json"
RANGES_DIR = "ranges"

FP32_ROLES = ("heads", "bev_head")


@dataclass(frozen=True)
class QuantOptions:
    """Quantization settings (CLI flags of ``loc3r export onnx``)."""

    block_size: int = 32
    int4_symmetric: bool = False  # asymmetric (zero points) measured more accurate at 4 bits
    # MatMulNBits accuracy_level (compute type): 4 = int8 activations (VNNI on x86, dot-product on Arm).
    # 8-bit: measured ~20x faster on ORT CPU than the default fp32 dequantize path at the same size;
    # 4-bit: 1.5-1.85x faster decode on the Qwen2-0.5B shape with the same greedy tokens
    # (bench/peers.py A/B), as onnxruntime-genai's builder also sets.
    int8_accuracy_level: Optional[int] = 4
    int4_accuracy_level: Optional[int] = 4
    # int8 decoder weights: "nbits" (8-bit MatMulNBits, block-wise scales) or "dynamic"
    # (DynamicQuantizeMatMul). Measured on ORT CPU (hidden 512, 4 layers, 2 threads): nbits rel. logit
    # error 0.019 vs 0.044, decode 5.1 vs 5.4 ms; dynamic prefills faster (23 vs 56 ms / 64 tokens).
    int8_decoder: str = "nbits"
    # The pose prior in int4 packages: "nbits8" (8-bit weights, float activations) or "fp32".
    int4_pose_prior: str = "nbits8"
    # Activation ranges for static QDQ: minmax | percentile | entropy. Measured on held-out
    # frames (loc3r-tiny graphs, rel. RMS): pose prior pose minmax 2.44%, percentile 99.99
    # 2.33%, 99.999 2.28%, entropy 40%; vision embeddings 1.86%, 1.77%, 1.82%, 1.97%.
    calib_method: str = "percentile"
    calib_percentile: float = 99.999
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_k: int = 32  # fewer input features than this: too small to quantize
    min_elements: int = 4096  # smaller weight matrices stay fp32
    cache_dir: Optional[Path] = None  # range caches; None: ~/.cache/loc3r/calibration
    progress: bool = True
    # Weight-only graphs: fuse MatMuls that read the same activation (q/k/v, gate/up) into one
    # before quantizing (export/fuse_matmuls.py). See the README's int4 decode numbers.
    fuse_matmuls: bool = True
    # int4 packages: lm_head weights at 8 bits (default, the most sensitive matrix) or 4 bits
    # (as onnxruntime-genai's builder does): bench/int4_lm_head.py measures speed and logit agreement.
    int4_lm_head_bits: int = 8

    def __post_init__(self) -> None:
        if self.int4_pose_prior not in ("nbits8", "fp32"):
            raise Loc3rError(f"int4 pose prior mode must be 'nbits8' or 'fp32', got '{self.int4_pose_prior}'")
        if self.int4_lm_head_bits not in (4, 8):
            raise Loc3rError(f"int4 lm_head bits must be 4 or 8, got {self.int4_lm_head_bits}")
        if self.int8_decoder not in ("nbits", "dynamic"):
            raise Loc3rError(f"int8 decoder mode must be 'nbits' or 'dynamic', got '{self.int8_decoder}'")
        NBitsOptions(bits=4, block_size=self.block_size)  # validates the block size

    def nbits(self, bits: int) -> NBitsOptions:
        return NBitsOptions(bits=bits, block_size=self.block_size,
                            symmetric=self.int4_symmetric if bits == 4 else True,
                            accuracy_level=self.int4_accuracy_level if bits == 4 else self.int8_accuracy_level)


def _nbits_graph(model: onnx.ModelProto, options: QuantOptions, bits: int,
                 eight_bit: tuple[str, ...] = (), float_compute: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Weight-only MatMulNBits; ``float_compute`` keeps activations float (accuracy_level unset)."""
    fused = []
    if options.fuse_matmuls:
        # Never fuse across the fp32 exclusions or the 8-bit patterns: a group has one precision.
        model, fused = fuse_sibling_matmuls(model, tuple(options.exclude) + tuple(eight_bit))
    selected = select_matmuls(model, options.exclude, options.min_k, options.min_elements)
    wide = [m for m in selected if matches_any(m.name, eight_bit)] if bits == 4 else []
    narrow = [m for m in selected if m not in wide]

    def opts(b: int) -> NBitsOptions:
        o = options.nbits(b)
        return dataclasses.replace(o, accuracy_level=None) if float_compute else o

    model = quantize_matmuls_nbits(model, narrow, opts(bits))
    if wide:
        model = quantize_matmuls_nbits(model, wide, opts(8))
    info = {"method": f"MatMulNBits-{bits}", "block_size": options.block_size,
            "symmetric": opts(bits).symmetric, "accuracy_level": opts(bits).accuracy_level,
            "nodes": [m.name for m in narrow]}
    if wide:
        info["nodes_8bit"] = [m.name for m in wide]
    if fused:
        info["fused"] = {g.name: list(g.members) for g in fused}
    return model, info


def _dynamic_graph(model: onnx.ModelProto, options: QuantOptions) -> tuple[onnx.ModelProto, dict]:
    from loc3r.export.quantize_int8 import quantize_dynamic_int8

    selected = select_matmuls(model, options.exclude, options.min_k, options.min_elements)
    return quantize_dynamic_int8(model, [m.name for m in selected]), {
        "method": "dynamic-int8", "nodes": [m.name for m in selected]}


def _static_graph(model: onnx.ModelProto, path: Path, spec: GraphSpec, manifest: Manifest,
                  calib, options: QuantOptions, pkg_dir: Path) -> tuple[onnx.ModelProto, dict]:
    from loc3r.calibration.range_cache import RangeCache
    from loc3r.calibration.ranges import RangeMethod, calibrated_ranges
    from loc3r.calibration.readers import pose_prior_feeds, vision_feeds
    from loc3r.export.quantize_int8 import quantize_static_qdq

    if calib is None:
        raise Loc3rError("int8 needs calibration frames for the vision tower and pose prior: pass --calib SOURCE")
    method = RangeMethod(options.calib_method, options.calib_percentile)
    if spec.role == "vision":
        pose_spec = manifest.graph("pose_prior") if manifest.has_graph("pose_prior") else None
        pose_path = pkg_dir / pose_spec.file if pose_spec is not None else None
        feeds = lambda: vision_feeds(calib, manifest.vision, spec, manifest.pose_prior, pose_spec, pose_path)
        total = len(calib.frames)
    else:
        if manifest.pose_prior is None:
            raise Loc3rError("the manifest has a pose_prior graph but no pose_prior section")
        feeds, total = (lambda: pose_prior_feeds(calib, manifest.pose_prior, spec, path)), len(calib.frames)
    ranges, cached = calibrated_ranges(path, sha256_of_file(path), calib.digest(), feeds, method,
                                       RangeCache(options.cache_dir), total, options.progress)
    selected = select_matmuls(model, options.exclude, options.min_k, options.min_elements)
    nodes = [m.name for m in selected] + [n for n in conv_nodes(model) if not matches_any(n, options.exclude)]
    out = quantize_static_qdq(model, ranges, nodes, options.calib_method)
    (pkg_dir / RANGES_DIR).mkdir(exist_ok=True)
    (pkg_dir / RANGES_DIR / f"{Path(spec.file).stem}.json").write_text(json.dumps(
        {"method": method.tag, "ranges": {k: list(v) for k, v in sorted(ranges.items())}}, indent=1) + "\n")
    return out, {"method": "static-qdq-int8", "calibration": method.tag, "ranges_from_cache": cached,
                 "nodes": nodes}


def quantize_graph(model: onnx.ModelProto, path: Path, spec: GraphSpec, manifest: Manifest, precision: str,
                   calib, options: QuantOptions, pkg_dir: Path) -> tuple[onnx.ModelProto, Optional[dict]]:
    """One graph at ``precision``: ``(model, what was done)``, or ``(model, None)`` when it stays fp32."""
    from loc3r.export.quantize_fp16 import convert_fp16

    role = spec.role
    if role in FP32_ROLES:
        return model, None
    if precision == "fp16":
        return convert_fp16(model), {"method": "fp16"}
    if role == "embed":
        # The table is stored fp16 (half the size, ~1e-4 error): a 4-bit table (GatherBlockQuantized)
        # measured 8.6% relative error on the embeddings, which every later graph inherits.
        return convert_fp16(model), {"method": "fp16-table"}
    if precision == "int4":
        if role == "pose_prior":
            if options.int4_pose_prior == "fp32":
                return model, None
            # 8-bit weights, float activations: pose error 0.87% rel. RMS (4-bit: 26%; 8-bit with
            # int8 activations, accuracy_level 4: 13%), a third of the fp32 size.
            return _nbits_graph(model, options, 8, float_compute=True)
        return _nbits_graph(model, options, 4, INT4_AS_INT8 if options.int4_lm_head_bits == 8 else ())
    if precision == "int8":
        if role in ("vision", "pose_prior"):
            return _static_graph(model, path, spec, manifest, calib, options, pkg_dir)
        if options.int8_decoder == "dynamic":
            return _dynamic_graph(model, options)
        return _nbits_graph(model, options, 8)
    raise Loc3rError(f"unknown precision '{precision}'")


def _fp16_io(spec: GraphSpec, model: onnx.ModelProto) -> GraphSpec:
    """The spec with the KV cache I/O as float16 (what :func:`convert_fp16` leaves)."""
    from loc3r.export.quantize_fp16 import kv_cache_io

    kv_in, kv_out = kv_cache_io(model)
    fix = lambda ts, names: tuple(dataclasses.replace(t, dtype="float16") if t.name in names else t for t in ts)
    return dataclasses.replace(spec, inputs=fix(spec.inputs, set(kv_in)), outputs=fix(spec.outputs, set(kv_out)))


def quantize_package(pkg_dir: Path, precision: str, calib=None, options: QuantOptions = QuantOptions()) -> None:
    """Rewrite the fp32 package in ``pkg_dir`` for ``precision`` (in place); fp32 leaves it as is.

    ``calib`` is needed for int8: a :class:`loc3r.calibration.dataset.CalibrationSet`, or a
    calibration source (folder of videos, a video, a ``loc3r synth`` directory) to sample one from.
    Writes ``quantization.json`` (what was quantized in each graph, and how)
    and, for int8, the activation ranges under ``ranges/`` (reused by
    ``loc3r export tensorrt --int8``), then the manifest with new checksums.
    """
    from tqdm import tqdm

    pkg_dir = Path(pkg_dir)
    package = load_package(pkg_dir)
    manifest = package.manifest
    if manifest.precision != "fp32":
        raise Loc3rError(f"{pkg_dir} is already a {manifest.precision} package; quantize an fp32 package")
    if precision == "fp32":
        return
    if precision not in ("fp16", "int8", "int4"):
        raise Loc3rError(f"unknown precision '{precision}'; known: fp32, fp16, int8, int4")
    if isinstance(calib, (str, Path)):
        from loc3r.calibration.dataset import build_calibration_set

        calib = build_calibration_set(calib, progress=options.progress)
    report: dict = {"precision": precision, "graphs": {}}
    graphs = {}
    # The pose prior goes last: the vision tower's calibration runs the fp32 pose prior.
    order = sorted(manifest.graphs, key=lambda g: g.role == "pose_prior")
    for spec in tqdm(order, desc=f"quantizing ({precision})", unit="graph",
                     disable=not options.progress, file=sys.stderr):
        path = pkg_dir / spec.file
        side_files = external_data_files(path)
        model = load_graph(path)
        name_unnamed_nodes(model)
        start = time.perf_counter()
        out, info = quantize_graph(model, path, spec, manifest, precision, calib, options, pkg_dir)
        if info is None:
            report["graphs"][spec.role] = {"method": "fp32"}
            graphs[spec.role] = spec
            continue
        info["seconds"] = round(time.perf_counter() - start, 3)
        report["graphs"][spec.role] = info
        save_graph(out, path, side_files)
        graphs[spec.role] = _fp16_io(spec, model) if precision == "fp16" else spec
    (pkg_dir / QUANT_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    write_manifest(pkg_dir, dataclasses.replace(manifest, precision=precision,
                                                         graphs=tuple(graphs[g.role] for g in manifest.graphs)))
