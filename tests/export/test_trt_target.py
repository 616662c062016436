"""loc3r export onnx --target tensorrt: one loc3r::FusedAttention per attention, no contrib ops, and the code
around the plugin (RoPE, ScatterND cache write, head-dim padding, query folding) proven in onnxruntime
through the same graphs with the attention decomposed."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from loc3r.errors import Loc3rError  # noqa: E402
from loc3r.export.default_model import make_random_checkpoint  # noqa: E402
from loc3r.export.graph_decoder import export_decoder  # noqa: E402
from loc3r.export.graph_pose_prior import export_pose_prior  # noqa: E402
from loc3r.export.graph_vision import export_vision  # noqa: E402
from loc3r.export.package_writer import ExportOptions, write_package  # noqa: E402
from loc3r.export.trt_attention import (padded_head_dim, trt_decoder_attention,  # noqa: E402
                                        trt_pose_prior_attention, trt_vision_attention)
from loc3r.export.trt_target import check_target_precision  # noqa: E402
from loc3r.model.checkpoint import load_checkpoint  # noqa: E402
from loc3r.runtime.package import Manifest, load_package  # noqa: E402

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    ckpt = make_random_checkpoint(root / "ckpt", preset="test-tiny", seed=1)
    pkg = root / "pkg"
    write_package(ckpt, pkg, ExportOptions(max_context=MAX_CONTEXT, progress=False, target="tensorrt"))
    model = load_checkpoint(ckpt, dtype=torch.float32)
    return model, load_package(pkg), root


def nodes(path):
    return list(onnx.load(str(path)).graph.node)


def fused(ns):
    return [n for n in ns if n.domain == "loc3r" and n.op_type == "FusedAttention"]


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ---- graph structure ----

def test_manifest_records_target_and_round_trips(exported):
    _, pkg, _ = exported
    m = pkg.manifest
    assert m.target == "tensorrt"
    assert Manifest.from_dict(m.to_dict()) == m
    d = m.to_dict()
    d.pop("target")
    assert Manifest.from_dict(d).target == "onnxruntime"  # packages without the field still load
    assert "target" not in Manifest.from_dict(d).to_dict()  # the default is not written
    d["target"] = "tflite"
    with pytest.raises(Loc3rError, match="^unknown export target 'tflite'; known: onnxruntime, tensorrt$"):
        Manifest.from_dict(d)


def test_every_attention_is_one_fused_attention_and_no_contrib_ops(exported):
    model, pkg, _ = exported
    for g in pkg.manifest.graphs:
        assert not [n for n in nodes(pkg.graph_path(g.role)) if n.domain == "com.microsoft"], g.role
    dec = nodes(pkg.graph_path("decoder"))
    layers = model.cfg.text.num_layers
    assert len(fused(dec)) == layers
    assert all(attrs(n)["causal"] == 1 and attrs(n)["plugin_namespace"] == b"loc3r" for n in fused(dec))
    assert [n.op_type for n in dec].count("ScatterND") == 2 * layers  # key and value cache writes
    assert "Softmax" not in [n.op_type for n in dec]
    vis = nodes(pkg.graph_path("vision"))
    assert len(fused(vis)) == len(model.vision_tower.layers)
    assert all(attrs(n)["causal"] == 0 for n in fused(vis))
    p = model.cfg.pose_prior
    pose = nodes(pkg.graph_path("pose_prior"))
    assert len(fused(pose)) == p.enc_depth + 4 * p.dec_depth + 4 * p.mem_depth
    assert all(attrs(n)["causal"] == 0 for n in fused(pose))
    assert "Softmax" not in [n.op_type for n in pose + vis]
    assert onnx.load(str(pkg.graph_path("decoder"))).opset_import  # loads; custom domain declared
    assert "loc3r" in {o.domain for o in onnx.load(str(pkg.graph_path("decoder"))).opset_import}


def test_decoder_io_matches_the_onnxruntime_target(exported):
    _, pkg, _ = exported
    spec = pkg.manifest.graph("decoder")
    names = [t.name for t in spec.inputs]
    assert names[:3] == ["inputs_embeds", "seqlens_k", "total_sequence_length"]
    assert "past_key_values.0.key" in names and "present.0.key" in [t.name for t in spec.outputs]


def test_plugin_head_dims():
    assert [padded_head_dim(d) for d in (16, 48, 64, 72, 128, 200)] == [64, 64, 64, 128, 128, 256]


# ---- numerics: the same graphs with the attention decomposed, in onnxruntime ----

def test_decomposed_decoder_chunked_prefill_matches_pytorch(exported, tmp_path):
    model, _, _ = exported
    cfg = model.cfg.text
    spec = export_decoder(model, tmp_path, MAX_CONTEXT, 17, partial(trt_decoder_attention, form="decomposed"))
    sess = ort.InferenceSession(str(tmp_path / spec.file), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 23, cfg.hidden_size, generator=g)
    with torch.no_grad():
        pk, pv = model.empty_cache(1, MAX_CONTEXT)
        want, want_k, want_v = model.prefill(embeds, pk, pv, torch.arange(23))
    shape = (1, cfg.num_kv_heads, MAX_CONTEXT, cfg.head_dim)
    cache = {f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
             for i in range(cfg.num_layers) for kind in ("key", "value")}
    hidden, filled = [], 0
    for n in (9, 1, 7, 1, 5):  # chunked prefill and single-token steps, present fed back as past (ping-pong)
        feed = {"inputs_embeds": embeds[:, filled:filled + n].numpy(),
                "seqlens_k": np.array([filled + n - 1], np.int32),
                "total_sequence_length": np.array(filled + n, np.int32), **cache}
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        hidden.append(out["hidden"])
        cache = {f"past_key_values.{i}.{kind}": out[f"present.{i}.{kind}"]
                 for i in range(cfg.num_layers) for kind in ("key", "value")}
        filled += n
    assert np.abs(np.concatenate(hidden, axis=1) - want.numpy()).max() <= 1e-4
    # The ScatterND write put exactly the rotated keys/values at [0, 23) and left the rest zero.
    assert np.abs(cache["past_key_values.1.key"] - want_k[1].numpy()).max() <= 1e-4
    assert np.abs(cache["past_key_values.0.value"] - want_v[0].numpy()).max() <= 1e-4
    assert not cache["past_key_values.0.key"][:, :, 23:].any()


def test_decomposed_vision_and_pose_prior_match_pytorch(exported, tmp_path):
    model, _, _ = exported
    cfg = model.cfg
    pose_spec = export_pose_prior(model, tmp_path, 17, partial(trt_pose_prior_attention, form="decomposed"))
    vis_spec = export_vision(model, tmp_path, 17, partial(trt_vision_attention, form="decomposed"))
    pose_sess = ort.InferenceSession(str(tmp_path / pose_spec.file), providers=["CPUExecutionProvider"])
    vis_sess = ort.InferenceSession(str(tmp_path / vis_spec.file), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    p = cfg.pose_prior
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    images = torch.randn(2, 1, 3, p.img_height, p.img_width, generator=g)
    st = np.zeros((1, p.state_size, p.dec_embed_dim), np.float32)
    mem = np.zeros((1, p.mem_slots, p.mem_dim), np.float32)
    cams = []
    with torch.no_grad():
        state, memory = model.initial_pose_state(1)
        for t in range(2):
            is_first = torch.tensor([1.0 if t == 0 else 0.0])
            cam, pose, state, memory = model.pose_prior(images[t], state, memory, is_first)
            got = dict(zip([o.name for o in pose_sess.get_outputs()], pose_sess.run(
                None, {"pose_image": images[t].numpy(), "state": st, "memory": mem, "is_first": is_first.numpy()})))
            for name, want in (("pose", pose), ("camera_token", cam), ("state_out", state),
                               ("memory_out", memory)):
                assert np.abs(got[name] - want.numpy()).max() <= 1e-3, name
            st, mem = got["state_out"], got["memory_out"]
            cams.append(got["camera_token"])
        want = model.vision_tokens(pixels)  # (F, n, H)
        cam_tokens = np.concatenate(cams)
        want = torch.cat((model.f_cam(torch.from_numpy(cam_tokens)).unsqueeze(1), want), dim=1)
    got = vis_sess.run(["frame_embeds"], {"pixel_values": pixels.numpy(), "camera_token": cam_tokens})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4


# ---- refusals ----

@pytest.mark.parametrize("precision,plugin,message", [
    ("int4", False, "--precision int4 with --target tensorrt writes MatMulNBits nodes that TensorRT cannot parse "
                    "without the loc3r MatMulNBits plugin: add --matmul-nbits-plugin, or export fp32/fp16 and "
                    "build with 'loc3r export tensorrt --fp16' (or --int8)"),
    ("int8", False, "--precision int8 is not available with --target tensorrt (its calibration runs in onnxruntime, "
                    "which cannot run loc3r::FusedAttention): export fp32 or fp16 and build with "
                    "'loc3r export tensorrt --fp16'"),
    ("int8", True, "--precision int8 is not available with --target tensorrt (its calibration runs in onnxruntime, "
                   "which cannot run loc3r::FusedAttention): export fp32 or fp16 and build with "
                   "'loc3r export tensorrt --fp16'"),
])
def test_low_bit_precisions_are_refused_for_tensorrt(precision, plugin, message):
    with pytest.raises(Loc3rError) as err:
        check_target_precision("tensorrt", precision, plugin)
    assert str(err.value) == message


def test_target_checks():
    check_target_precision("tensorrt", "fp16")
    check_target_precision("tensorrt", "int4", True)
    check_target_precision("onnxruntime", "int8")
    with pytest.raises(Loc3rError, match="^--matmul-nbits-plugin applies to --target tensorrt only$"):
        check_target_precision("onnxruntime", "int4", True)
    with pytest.raises(Loc3rError, match="^unknown export target 'tvm'; choose one of: onnxruntime, tensorrt$"):
        check_target_precision("tvm", "fp32")


def test_cli_refusal_lines_are_exact(exported, tmp_path):
    from click.testing import CliRunner

    from loc3r.export.onnx_cli import onnx_command

    _, _, root = exported
    runner = CliRunner()
    r = runner.invoke(onnx_command, [str(root / "ckpt"), "--out", str(tmp_path / "a"), "--target", "tensorrt",
                                     "--precision", "int8", "--quiet"])
    assert r.exit_code != 0 and r.output == (
        "error: --precision int8 is not available with --target tensorrt (its calibration runs in onnxruntime, "
        "which cannot run loc3r::FusedAttention): export fp32 or fp16 and build with "
        "'loc3r export tensorrt --fp16'\n")
    r = runner.invoke(onnx_command, [str(root / "ckpt"), "--out", str(tmp_path / "b"), "--precision", "int4",
                                     "--matmul-nbits-plugin", "--quiet"])
    assert r.exit_code != 0 and r.output == "error: --matmul-nbits-plugin applies to --target tensorrt only\n"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int4_with_the_plugin_has_only_4_bit_matmul_nbits(exported, tmp_path):
    from collections import Counter

    _, _, root = exported
    m = write_package(root / "ckpt", tmp_path / "i4", ExportOptions(max_context=MAX_CONTEXT, progress=False,
                                                                    precision="int4", target="tensorrt",
                                                                    matmul_nbits_plugin=True))
    assert m.target == "tensorrt" and m.precision == "int4"
    bits = Counter()
    for g in m.graphs:
        ns = nodes(tmp_path / "i4" / g.file)
        assert not [n for n in ns if n.domain == "com.microsoft" and n.op_type != "MatMulNBits"], g.role
        bits.update(attrs(n)["bits"] for n in ns if n.op_type == "MatMulNBits")
    assert set(bits) == {4} and bits[4] > 0  # pose prior and lm_head stay float for the 4-bit-only plugin


def test_plugin_nbits_check_names_the_node(tmp_path):
    import types

    from onnx import TensorProto, helper

    from loc3r.export.trt_target import check_plugin_nbits

    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], name="/lm_head/MatMulNBits",
                            domain="com.microsoft", K=32, N=8, bits=8, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph), str(tmp_path / "lm_head.onnx"))
    manifest = types.SimpleNamespace(graphs=[types.SimpleNamespace(file="lm_head.onnx")])
    with pytest.raises(Loc3rError) as err:
        check_plugin_nbits(tmp_path, manifest)
    assert str(err.value) == ("graph lm_head.onnx has MatMulNBits node /lm_head/MatMulNBits with bits=8 "
                              "block_size=32; the loc3r TensorRT plugin runs bits=4 with block_size 32 or 128 only")


def test_fp16_package_feeds_the_plugin_fp16(exported, tmp_path):
    _, _, root = exported
    m = write_package(root / "ckpt", tmp_path / "fp16", ExportOptions(max_context=MAX_CONTEXT, progress=False,
                                                                      precision="fp16", target="tensorrt"))
    assert m.precision == "fp16" and m.target == "tensorrt"
    for role in ("decoder", "vision", "pose_prior"):
        model = onnx.load(str(tmp_path / "fp16" / m.graph(role).file))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
        fa = fused(model.graph.node)
        assert fa and not [n for n in model.graph.node if n.domain == "com.microsoft"]
        for n in fa:  # the native plugin takes fp16 q/k/v and int32 prefix lengths
            assert [types.get(i) for i in n.input] == [onnx.TensorProto.FLOAT16] * 3 + [onnx.TensorProto.INT32]
    # The KV cache enters and leaves the decoder as fp16: no conversion of the whole cache per step.
    decoder = onnx.load(str(tmp_path / "fp16" / m.graph("decoder").file))
    kv = [v for v in list(decoder.graph.input) + list(decoder.graph.output)
          if v.name.startswith(("past_key_values.", "present."))]
    assert kv and {v.type.tensor_type.elem_type for v in kv} == {onnx.TensorProto.FLOAT16}
