"""fp16 graphs for GPU packages (onnxruntime CUDA, TensorRT).

Weights and activations become float16 with onnxruntime's converter
(``onnxruntime.transformers.float16``). Kept in float32:

- the normalisation statistics (``Pow``/``ReduceMean``/``Sqrt`` of an
  unfused RMSNorm, and LayerNorm / (Simplified)LayerNormalization nodes):
  squares of activations overflow fp16 past |x| = 256;
- every graph input and output except the KV cache, so the runtime feeds and
  reads float32 as before; the KV cache (GroupQueryAttention's past/present
  buffers) is float16, which halves its memory. Its manifest entries change
  to float16 (see :func:`kv_cache_io`).
"""

from __future__ import annotations

import onnx

from loc3r.export.quantize_files import is_large
from loc3r.export.quantize_select import FUSED_ATTENTION_OPS

FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "LayerNormalization", "SimplifiedLayerNormalization",
            "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization")


def kv_cache_io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs wired to a fused attention node's past/present KV slots (or a ScatterND cache write)."""
    graph_in = {i.name for i in model.graph.input}
    graph_out = {o.name for o in model.graph.output}
    ins, outs = [], []
    # The exporter may put an Identity or a (no-op) Cast between the cache write and the output.
    passthrough = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type in ("Identity", "Cast")}

    def through_identities(name: str) -> str:
        while name not in graph_out and name in passthrough:
            name = passthrough[name]
        return name

    for node in model.graph.node:
        if node.op_type == "ScatterND":
            # TensorRT target: the cache write itself (past in as data, present out).
            ins += [node.input[0]] if node.input[0] in graph_in else []
            present = through_identities(node.output[0])
            outs += [present] if present in graph_out else []
            continue
        if node.op_type not in FUSED_ATTENTION_OPS:
            continue
        # GQA: inputs 3, 4 = past_key, past_value; outputs 1, 2 = present_key, present_value.
        # MultiHeadAttention: inputs 6, 7 and outputs 1, 2.
        slots = (3, 4) if node.op_type == "GroupQueryAttention" else (6, 7)
        ins += [node.input[i] for i in slots if i < len(node.input) and node.input[i] in graph_in]
        outs += [node.output[i] for i in (1, 2) if i < len(node.output) and node.output[i] in graph_out]
    return ins, outs


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model``; I/O float32 except the KV cache (see the module docstring)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    kv_in, kv_out = kv_cache_io(model)
    kv = set(kv_in) | set(kv_out)
    keep = [i.name for i in model.graph.input if i.name not in kv]
    keep += [o.name for o in model.graph.output if o.name not in kv]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(
        copy, keep_io_types=keep, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
        disable_shape_infer=is_large(model),  # shape inference serializes the model (2 GB limit)
    )
