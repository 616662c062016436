"""The default-package builder: fp16-stored weights compute exactly the fp16-rounded checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from loc3r.export.default_model import build_default_package, make_random_checkpoint  # noqa: E402
from loc3r.runtime.package import load_package  # noqa: E402


def test_build_from_a_checkpoint_keeps_subfolders_and_matches_the_rounded_model(tmp_path):
    from loc3r.model.checkpoint import load_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "ckpt", preset="test-tiny-nocam", seed=7)
    out = tmp_path / "default_model"
    (out / "demo").mkdir(parents=True)
    (out / "demo" / "demo.json").write_text("{}")
    (out / "stale.onnx").write_text("old")
    build_default_package(out, ckpt, progress=False)
    assert (out / "demo" / "demo.json").read_text() == "{}"
    assert not (out / "stale.onnx").exists()
    pkg = load_package(out)

    lm_head = onnx.load(str(pkg.graph_path("lm_head")))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in lm_head.graph.initializer)
    model = load_checkpoint(ckpt, dtype=torch.float32)
    hidden = torch.randn(1, 3, model.cfg.text.hidden_size)
    with torch.no_grad():
        want = torch.nn.functional.linear(hidden, model.lm_head.weight.half().float())
    sess = ort.InferenceSession(str(pkg.graph_path("lm_head")), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"hidden": hidden.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-5
    # derived constants that fp16 cannot hold exactly (the RoPE caches) stay fp32
    decoder = onnx.load(str(pkg.graph_path("decoder")))
    gqa = next(n for n in decoder.graph.node if n.op_type == "GroupQueryAttention")
    tensors = {i.name: i for i in decoder.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in decoder.graph.node if n.op_type == "Constant"})
    assert tensors[gqa.input[7]].data_type == onnx.TensorProto.FLOAT
