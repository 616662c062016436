"""The one torch -> ONNX call every graph uses, and the manifest I/O read back from the file.

The torchscript exporter (``dynamo=False``) is used because its
``autograd.Function.symbolic`` hook is how :mod:`loc3r.export.fused_attention`
emits onnxruntime contrib ops. Node names come from module paths
(``/layers.0/self_attn/q_proj/MatMul``), so they are deterministic, and
``nn.Linear`` on 3D inputs exports as MatMul (+ Add), which the MatMulNBits
quantizer sees (2D inputs would give Gemm: every graph feeds Linear layers
3D tensors).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, TensorSpec

DEFAULT_OPSET = 17
# Above this the weights go to an external-data file next to the graph (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8",
                9: "bool"}


def export_graph(module: torch.nn.Module, args: tuple, path: Path, input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: dict, opset: int) -> None:
    """Trace ``module(*args)`` into ``path`` (fp32, constants folded)."""
    import onnx

    path = Path(path)
    if opset < 17:
        raise Loc3rError(f"--opset {opset} is too old: the graphs need opset 17 or newer (LayerNormalization)")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about int() on shapes are expected
        torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    with torch.no_grad():
        example = module(*args)
    example = example if isinstance(example, tuple) else (example,)
    model = onnx.load(str(path))
    _fix_output_shapes(model, example, output_names, dynamic_axes)
    gemm_to_matmul(model)
    name_matmul_weights(model)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def _fix_output_shapes(model, example: tuple, output_names: Sequence[str], dynamic_axes: dict) -> None:
    """Declare every output dimension not named in ``dynamic_axes`` with its fixed size."""
    for value, tensor, name in zip(model.graph.output, example, output_names):
        axes = dynamic_axes.get(name, {})
        dims = value.type.tensor_type.shape.dim
        for i, size in enumerate(tensor.shape):
            if i < len(dims) and i not in axes:
                dims[i].Clear()
                dims[i].dim_value = int(size)


def gemm_to_matmul(model) -> None:
    """Rewrite Gemm(A, W, b, transB=1) with a weight initializer as MatMul(A, W^T) + Add(b), same names.

    The torchscript exporter emits Gemm for Linear on 2D inputs; the
    MatMulNBits quantizer only sees MatMul.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        weight_name = node.input[1] + ".T" if attrs.get("transB", 0) else node.input[1]
        if weight_name not in inits:
            t = numpy_helper.from_array(w, weight_name)
            model.graph.initializer.append(t)
            inits[weight_name] = t
        base = node.name[: -len("Gemm")] if node.name.endswith("Gemm") else node.name + "/"
        if len(node.input) > 2 and node.input[2]:
            mm_out = node.output[0] + "/matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [mm_out], name=base + "MatMul"))
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=base + "Add"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [node.output[0]],
                                          name=base + "MatMul"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def name_matmul_weights(model) -> None:
    """Rename MatMul weights the exporter called ``onnx::MatMul_N`` after their module path.

    ``/layers.0/self_attn/q_proj/MatMul`` reads weight ``layers.0.self_attn.q_proj.weight`` (stored
    transposed, (in, out), as MatMul wants it), so
    quantization reports and precision overrides name weights the way the checkpoint does.
    """
    inits = {i.name: i for i in model.graph.initializer}
    taken = set(inits)
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        old = node.input[1]
        if old in renames or old not in inits or not old.startswith("onnx::"):
            continue
        path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") if "/" in node.name.strip("/") else ""
        if not path:
            continue
        new = f"{path}.weight"
        suffix = 1
        while new in taken:
            new = f"{path}.weight_{suffix}"
            suffix += 1
        renames[old] = new
        taken.add(new)
    if not renames:
        return
    for init in model.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def graph_spec(role: str, path: Path) -> GraphSpec:
    """The manifest entry for the graph file at ``path``: its declared inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        if t.elem_type not in _ONNX_DTYPES:
            raise Loc3rError(f"graph {path.name}: tensor '{value.name}' has an unsupported element type")
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                     for d in t.shape.dim)
        return TensorSpec(name=value.name, dtype=_ONNX_DTYPES[t.elem_type], shape=dims)

    inits = {i.name for i in model.graph.initializer}
    return GraphSpec(role=role, file=Path(path).name,
                     inputs=tuple(spec(v) for v in model.graph.input if v.name not in inits),
                     outputs=tuple(spec(v) for v in model.graph.output))
