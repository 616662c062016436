"""Fuse weight MatMuls that read the same activation into one MatMul + Split.

A decoder layer multiplies the same normed hidden state by q, k and v (and
the MLP's normed state by gate and up). Exported from ``nn.Linear`` these are
separate MatMuls; after weight-only quantization each becomes its own
MatMulNBits, so a decode step (one row of activations) runs five small
matrix-vector products per layer where two would do: every node quantizes
the same activations again (accuracy_level 4) and pays its own dispatch.
This pass concatenates sibling weights along N and splits the product back
into the original output names, so everything downstream is untouched and
the result is the same up to float summation order (each output column is
still one dot product over the same K).

Only MatMuls in the default domain whose second input is a 2-D float
initializer used by no other node are candidates; a group needs two or more
of them on the same input tensor with the same K and dtype. Names matching
``exclude`` (:mod:`fnmatch` patterns, as the quantizers use) are never fused,
so heads that stay fp32 stay separate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from loc3r.export.quantize_select import matches_any, weight_matmuls


@dataclass(frozen=True)
class FusedGroup:
    """One fused group: the new MatMul's name and the nodes it replaced (graph order)."""

    name: str
    members: tuple[str, ...]
    n: tuple[int, ...]  # output features of each member, in order


def fused_name(members: list[str]) -> str:
    """``/layers.0/self_attn/q_proj/MatMul`` + ``.../k_proj/MatMul`` -> ``/layers.0/self_attn/q_proj+k_proj/MatMul``.

    The common leading and trailing path parts are kept and the differing middle
    parts joined with ``+``, so patterns like ``*q_proj*`` still match.
    """
    parts = [m.split("/") for m in members]
    lo = 0
    while all(len(p) > lo for p in parts) and len({p[lo] for p in parts}) == 1:
        lo += 1
    hi = 0
    while all(len(p) - hi > lo for p in parts) and len({p[len(p) - 1 - hi] for p in parts}) == 1:
        hi += 1
    middles = ["/".join(p[lo:len(p) - hi]) for p in parts]
    head, tail = parts[0][:lo], parts[0][len(parts[0]) - hi:] if hi else []
    return "/".join(head + ["+".join(middles)] + tail)


def fuse_sibling_matmuls(model: onnx.ModelProto, exclude=()) -> tuple[onnx.ModelProto, list[FusedGroup]]:
    """A copy of ``model`` with sibling weight MatMuls fused; returns it and the groups fused."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)

    index = {node.name: i for i, node in enumerate(graph.node)}
    groups: dict[tuple[str, int, int], list[int]] = {}
    for m in weight_matmuls(out):
        if uses[m.weight] != 1 or matches_any(m.name, exclude):
            continue
        i = index[m.name]
        groups.setdefault((graph.node[i].input[0], m.k, inits[m.weight].data_type), []).append(i)

    fused: list[FusedGroup] = []
    replace: dict[int, list[onnx.NodeProto]] = {}  # first member's index -> new nodes
    drop: set[int] = set()
    dead_weights: set[str] = set()
    taken = {n.name for n in graph.node} | set(inits)
    for (x, _k, _dtype), idx in groups.items():
        if len(idx) < 2:
            continue
        nodes = [graph.node[i] for i in idx]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        name = fused_name([n.name for n in nodes])
        while name in taken:
            name += "_fused"
        taken.add(name)
        w_name, split_name, y_name = f"{name}.weight", f"{name}.split", f"{name}_output_0"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), w_name))
        sizes = [int(w.shape[1]) for w in weights]
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), split_name))
        matmul = helper.make_node("MatMul", [x, w_name], [y_name], name=name)
        split = helper.make_node("Split", [y_name, split_name], [n.output[0] for n in nodes], name=f"{name}/Split",
                                 axis=-1)
        replace[idx[0]] = [matmul, split]
        drop.update(idx)
        dead_weights.update(n.input[1] for n in nodes)
        fused.append(FusedGroup(name, tuple(n.name for n in nodes), tuple(sizes)))
    if not fused:
        return out, []

    new_nodes = []
    for i, node in enumerate(graph.node):
        if i in replace:
            new_nodes += replace[i]
        elif i not in drop:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in dead_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # value_info of the replaced outputs stays valid (same names and shapes).
    return out, fused
