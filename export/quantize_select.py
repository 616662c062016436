"""Which nodes of an ONNX graph a quantizer may touch.

Weight-only and static quantization act on MatMul nodes whose second input is
a constant weight (an initializer, as ``nn.Linear`` exports), and on Conv.
Activation-by-activation MatMuls (attention scores, when attention is not
fused) are never selected. Fused attention contrib nodes
(GroupQueryAttention, MultiHeadAttention, Attention) are never selected by
any quantizer here, so they stay intact.

Exclusions are :mod:`fnmatch` patterns over node names (the exporter's
deterministic module paths, e.g. ``/layers.0/mlp/down_proj/MatMul``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import onnx
from onnx import numpy_helper

FUSED_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention")


@dataclass(frozen=True)
class WeightMatMul:
    """One MatMul with a constant (K, N) weight."""

    name: str
    weight: str  # initializer name
    k: int  # input features
    n: int  # output features

    @property
    def elements(self) -> int:
        return self.k * self.n


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    """Every MatMul (in graph order) whose B input is a 2-D float initializer."""
    inits = _initializers(model)
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        out.append(WeightMatMul(name=node.name, weight=w.name, k=int(w.dims[0]), n=int(w.dims[1])))
    return out


def conv_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_matmuls(
    model: onnx.ModelProto,
    exclude: Sequence[str] = (),
    min_k: int = 1,
    min_elements: int = 0,
) -> list[WeightMatMul]:
    """Weight MatMuls not excluded by name and large enough: ``k >= min_k`` and ``k*n >= min_elements``."""
    return [
        m for m in weight_matmuls(model)
        if not matches_any(m.name, exclude) and m.k >= min_k and m.elements >= min_elements
    ]


def fused_attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the fused attention contrib nodes (any domain)."""
    return [n.name for n in model.graph.node if n.op_type in FUSED_ATTENTION_OPS]


def count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def unnamed_nodes(model: onnx.ModelProto) -> list[int]:
    """Indices of nodes without a name (quantizers refer to nodes by name)."""
    return [i for i, n in enumerate(model.graph.node) if not n.name]


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a deterministic name ``/<op_type>_<index>`` (in place)."""
    for i in unnamed_nodes(model):
        node = model.graph.node[i]
        node.name = f"/{node.op_type}_{i}"


def weight_array(model: onnx.ModelProto, name: str):
    """An initializer as a numpy array."""
    return numpy_helper.to_array(_initializers(model)[name])
