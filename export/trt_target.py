"""Export targets: which attention each graph gets, and which precisions a target takes.

- ``onnxruntime`` (default): onnxruntime's contrib ops (GroupQueryAttention,
  MultiHeadAttention; :mod:`loc3r.export.fused_attention`).
- ``tensorrt``: one ``loc3r::FusedAttention`` TensorRT plugin node per
  attention (:mod:`loc3r.export.trt_attention`), no contrib ops. Graphs are
  fp32 or fp16; TensorRT lowers precision itself (``loc3r export tensorrt
  --fp16/--int8``). int4 (MatMulNBits) needs the loc3r MatMulNBits plugin and
  is accepted only with ``--matmul-nbits-plugin``; int8 is refused, here and
  in ``loc3r export tensorrt --int8`` (:data:`NO_INT8`): calibration runs the
  graphs in onnxruntime, which has no FusedAttention kernel.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from loc3r.errors import Loc3rError
from loc3r.runtime.package import TARGETS

TRT_PRECISIONS = ("fp32", "fp16")
NO_INT8 = ("--int8 is not available for packages exported with --target tensorrt: int8 calibration runs the graphs "
           "in onnxruntime, which cannot run loc3r::FusedAttention; build with --fp16")


def attention_patches(target: str, form: str = "fused") -> dict[str, Callable]:
    """role -> context-manager factory ``fn(module)`` that fuses the attention of that graph."""
    if target == "onnxruntime":
        from loc3r.export.fused_attention import (fused_decoder_attention, fused_pose_prior_attention,
                                                  fused_vision_attention)

        return {"decoder": fused_decoder_attention, "vision": fused_vision_attention,
                "pose_prior": fused_pose_prior_attention}
    if target == "tensorrt":
        from loc3r.export.trt_attention import (trt_decoder_attention, trt_pose_prior_attention,
                                                trt_vision_attention)

        return {"decoder": partial(trt_decoder_attention, form=form),
                "vision": partial(trt_vision_attention, form=form),
                "pose_prior": partial(trt_pose_prior_attention, form=form)}
    raise Loc3rError(f"unknown export target '{target}'; choose one of: {', '.join(TARGETS)}")


def check_target_precision(target: str, precision: str, matmul_nbits_plugin: bool = False) -> None:
    """One clear line when ``precision`` cannot be exported for ``target``."""
    if target not in TARGETS:
        raise Loc3rError(f"unknown export target '{target}'; choose one of: {', '.join(TARGETS)}")
    if target == "onnxruntime":
        if matmul_nbits_plugin:
            raise Loc3rError("--matmul-nbits-plugin applies to --target tensorrt only")
        return
    if precision in TRT_PRECISIONS:
        return
    if precision == "int4" and matmul_nbits_plugin:
        return
    if precision == "int4":
        raise Loc3rError("--precision int4 with --target tensorrt writes MatMulNBits nodes that TensorRT cannot "
                         "parse without the loc3r MatMulNBits plugin: add --matmul-nbits-plugin, or export fp32/fp16 "
                         "and build with 'loc3r export tensorrt --fp16' (or --int8)")
    raise Loc3rError(f"--precision {precision} is not available with --target tensorrt (its calibration runs in "
                     "onnxruntime, which cannot run loc3r::FusedAttention): export fp32 or fp16 and build with "
                     "'loc3r export tensorrt --fp16'")


# MatMulNBits shapes the native plugin runs (kernels/native/loc3r_trt_plugins.cpp).
PLUGIN_NBITS = 4
PLUGIN_BLOCK_SIZES = (32, 128)


def quant_options_for(target: str, progress: bool = True, fuse_matmuls: bool = True, int4_lm_head_bits: int = 8):
    """:class:`loc3r.export.quantize.QuantOptions` for ``target``.

    For tensorrt (int4 with the MatMulNBits plugin, 4-bit weights only) the
    pose prior stays fp32 instead of 8-bit MatMulNBits, and lm_head stays
    float instead of 8-bit: TensorRT lowers both itself with ``--fp16``.
    """
    from loc3r.export.quantize import DEFAULT_EXCLUDE, QuantOptions

    if target != "tensorrt":
        return QuantOptions(progress=progress, fuse_matmuls=fuse_matmuls, int4_lm_head_bits=int4_lm_head_bits)
    return QuantOptions(int4_pose_prior="fp32", exclude=DEFAULT_EXCLUDE + ("*lm_head*",), progress=progress,
                        fuse_matmuls=fuse_matmuls)


def check_plugin_nbits(pkg_dir, manifest) -> None:
    """One clear line when a MatMulNBits node of the package is not one the loc3r plugin runs."""
    import onnx

    for spec in manifest.graphs:
        model = onnx.load(str(pkg_dir / spec.file), load_external_data=False)
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            if a.get("bits") != PLUGIN_NBITS or a.get("block_size") not in PLUGIN_BLOCK_SIZES:
                raise Loc3rError(f"graph {spec.file} has MatMulNBits node {node.name} with bits={a.get('bits')} "
                                 f"block_size={a.get('block_size')}; the loc3r TensorRT plugin runs bits=4 with "
                                 f"block_size {' or '.join(map(str, PLUGIN_BLOCK_SIZES))} only")
