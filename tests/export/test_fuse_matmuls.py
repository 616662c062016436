"""Sibling MatMul fusion (export/fuse_matmuls.py): same outputs, fewer MatMuls, exclusions kept apart."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from loc3r.export.fuse_matmuls import fuse_sibling_matmuls, fused_name
from loc3r.export.quantize_select import count_op

from quant_graphs import TinyDecoder, build_decoder, decoder_feeds

CFG = TinyDecoder()
OUTPUTS = ["logits"] + [f"present_{kv}.{i}" for i in range(CFG.layers) for kv in ("key", "value")]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return onnx.load(str(build_decoder(tmp_path_factory.mktemp("dec") / "decoder.onnx", CFG)))


def run(model, feeds, names):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)


def test_fused_decoder_gives_the_same_outputs_with_fewer_matmuls(decoder):
    fused, groups = fuse_sibling_matmuls(decoder, exclude=("*lm_head*",))
    onnx.checker.check_model(fused)
    assert count_op(decoder, "MatMul") == 7 * CFG.layers + 1
    assert count_op(fused, "MatMul") == 4 * CFG.layers + 1
    assert count_op(fused, "Split") == 2 * CFG.layers
    assert [(g.name, g.members, g.n) for g in groups[:2]] == [
        ("/layers.0/self_attn/q_proj+k_proj+v_proj/MatMul",
         ("/layers.0/self_attn/q_proj/MatMul", "/layers.0/self_attn/k_proj/MatMul",
          "/layers.0/self_attn/v_proj/MatMul"),
         (CFG.heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim)),
        ("/layers.0/mlp/gate_proj+up_proj/MatMul", ("/layers.0/mlp/gate_proj/MatMul", "/layers.0/mlp/up_proj/MatMul"),
         (CFG.inter, CFG.inter)),
    ]
    # The replaced weights are gone; the fused weight is their concatenation along N.
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    ref = {t.name: numpy_helper.to_array(t) for t in decoder.graph.initializer}
    assert "/layers.0/self_attn/q_proj.weight" not in inits
    np.testing.assert_array_equal(inits["/layers.0/mlp/gate_proj+up_proj/MatMul.weight"],
                                  np.concatenate([ref["/layers.0/mlp/gate_proj.weight"],
                                                  ref["/layers.0/mlp/up_proj.weight"]], axis=1))
    for seq in (1, 7):
        feeds = decoder_feeds(CFG, seq, seed=seq)
        for a, b in zip(run(decoder, feeds, OUTPUTS), run(fused, feeds, OUTPUTS)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # The input graph is not modified.
    assert count_op(decoder, "MatMul") == 7 * CFG.layers + 1


def test_excluded_matmuls_stay_separate(decoder):
    fused, groups = fuse_sibling_matmuls(decoder, exclude=("*k_proj*", "*mlp*"))
    assert [g.name for g in groups] == [f"/layers.{i}/self_attn/q_proj+v_proj/MatMul" for i in range(CFG.layers)]
    names = {n.name for n in fused.graph.node}
    assert "/layers.0/self_attn/k_proj/MatMul" in names and "/layers.1/mlp/up_proj/MatMul" in names
    feeds = decoder_feeds(CFG, 3)
    np.testing.assert_allclose(run(fused, feeds, ["logits"])[0], run(decoder, feeds, ["logits"])[0],
                               rtol=1e-5, atol=1e-5)


def _graph(shared_weight: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w3")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="/a/MatMul"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="/b/MatMul"),
             helper.make_node("MatMul", ["b", "w3"], ["c"], name="/c/MatMul"),
             helper.make_node("Add", ["a", "c"], ["y"], name="/add")]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])]
    if shared_weight:  # w1 also feeds a second product: it must stay as it is
        nodes.append(helper.make_node("MatMul", ["b", "w1_t"], ["z"], name="/z/MatMul"))
        nodes.insert(0, helper.make_node("Transpose", ["w1"], ["w1_t"], name="/t"))
        outputs.append(helper.make_tensor_value_info("z", T.FLOAT, [2, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])], outputs, [w1, w2, w3])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_used_elsewhere_is_not_fused():
    model = _graph(shared_weight=True)
    fused, groups = fuse_sibling_matmuls(model)
    assert groups == [] and count_op(fused, "MatMul") == 4


def test_small_graph_round_trip():
    model = _graph(shared_weight=False)
    fused, groups = fuse_sibling_matmuls(model)
    assert [(g.name, g.n) for g in groups] == [("/a+b/MatMul", (4, 6))]
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(fused, {"x": x}, ["y"])[0], run(model, {"x": x}, ["y"])[0], rtol=1e-5, atol=1e-5)


def test_fused_name():
    assert fused_name(["/l/attn/q/MatMul", "/l/attn/k/MatMul"]) == "/l/attn/q+k/MatMul"
    assert fused_name(["/x/MatMul", "/y/z/MatMul"]) == "/x+y/z/MatMul"
    assert fused_name(["a", "b"]) == "a+b"
