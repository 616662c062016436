"""Small ONNX graphs for the quantization tests, shaped like the package's graphs.

- :func:`build_decoder` writes a Qwen2-style decoder written node by node:
  RMSNorm, q/k/v/o and MLP projections as MatMul with constant weights, one
  ``com.microsoft.GroupQueryAttention`` per layer (rotary inside, past and
  present KV of the full context budget), and an lm_head MatMul. Its weights
  are random with Qwen2-like scales.
- :func:`export_vision` exports the PyTorch SigLIP tower of a preset with
  ``torch.onnx.export(..., dynamo=False)`` (nn.Linear as MatMul).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TinyDecoder:
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    inter: int = 256
    layers: int = 2
    vocab: int = 256
    max_len: int = 64

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_len, self.head_dim)


def build_decoder(path: Path, cfg: TinyDecoder = TinyDecoder(), seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(op, ins, outs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def linear(x, k, n, path, bias=False):
        w = const(f"{path}.weight", rng.standard_normal((k, n)) / np.sqrt(k))
        y = node("MatMul", [x, w], [f"{path}/MatMul_output_0"], f"{path}/MatMul")
        if bias:
            b = const(f"{path}.bias", rng.standard_normal(n) * 0.02)
            y = node("Add", [y, b], [f"{path}/Add_output_0"], f"{path}/Add")
        return y

    def rmsnorm(x, path):
        w = const(f"{path}.weight", 1.0 + 0.1 * rng.standard_normal(cfg.hidden))
        two, eps = const(f"{path}.two", 2.0), const(f"{path}.eps", 1e-6)
        p = node("Pow", [x, two], [f"{path}/Pow_output_0"], f"{path}/Pow")
        m = node("ReduceMean", [p], [f"{path}/ReduceMean_output_0"], f"{path}/ReduceMean", axes=[-1])
        a = node("Add", [m, eps], [f"{path}/Add_output_0"], f"{path}/Add")
        s = node("Sqrt", [a], [f"{path}/Sqrt_output_0"], f"{path}/Sqrt")
        d = node("Div", [x, s], [f"{path}/Div_output_0"], f"{path}/Div")
        return node("Mul", [d, w], [f"{path}/Mul_output_0"], f"{path}/Mul")

    pos = np.arange(cfg.max_len)[:, None]
    inv = 1.0 / 10000 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    const("cos_cache", np.cos(pos * inv))  # (S, D/2)
    const("sin_cache", np.sin(pos * inv))
    vi = helper.make_tensor_value_info
    inputs = [vi("inputs_embeds", T.FLOAT, [1, "seq", cfg.hidden]),
              vi("seqlens_k", T.INT32, [1]), vi("total_sequence_length", T.INT32, [])]
    outputs = [vi("logits", T.FLOAT, [1, "seq", cfg.vocab])]
    x = "inputs_embeds"
    for i in range(cfg.layers):
        p = f"/layers.{i}"
        h = rmsnorm(x, f"{p}/input_layernorm")
        q = linear(h, cfg.hidden, cfg.heads * cfg.head_dim, f"{p}/self_attn/q_proj", bias=True)
        k = linear(h, cfg.hidden, cfg.kv_heads * cfg.head_dim, f"{p}/self_attn/k_proj", bias=True)
        v = linear(h, cfg.hidden, cfg.kv_heads * cfg.head_dim, f"{p}/self_attn/v_proj", bias=True)
        pk, pv = f"past_key.{i}", f"past_value.{i}"
        inputs += [vi(pk, T.FLOAT, list(cfg.kv_shape)), vi(pv, T.FLOAT, list(cfg.kv_shape))]
        outputs += [vi(f"present_key.{i}", T.FLOAT, list(cfg.kv_shape)),
                    vi(f"present_value.{i}", T.FLOAT, list(cfg.kv_shape))]
        attn = node("GroupQueryAttention",
                    [q, k, v, pk, pv, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                    [f"{p}/self_attn/GroupQueryAttention_output_0", f"present_key.{i}", f"present_value.{i}"],
                    f"{p}/self_attn/GroupQueryAttention", domain="com.microsoft",
                    num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, do_rotary=1, rotary_interleaved=0)
        o = linear(attn, cfg.heads * cfg.head_dim, cfg.hidden, f"{p}/self_attn/o_proj")
        x = node("Add", [x, o], [f"{p}/Add_output_0"], f"{p}/Add")
        h = rmsnorm(x, f"{p}/post_attention_layernorm")
        g = linear(h, cfg.hidden, cfg.inter, f"{p}/mlp/gate_proj")
        u = linear(h, cfg.hidden, cfg.inter, f"{p}/mlp/up_proj")
        sg = node("Sigmoid", [g], [f"{p}/mlp/Sigmoid_output_0"], f"{p}/mlp/Sigmoid")
        sl = node("Mul", [g, sg], [f"{p}/mlp/Mul_output_0"], f"{p}/mlp/Mul")
        gu = node("Mul", [sl, u], [f"{p}/mlp/Mul_1_output_0"], f"{p}/mlp/Mul_1")
        d = linear(gu, cfg.inter, cfg.hidden, f"{p}/mlp/down_proj")
        x = node("Add", [x, d], [f"{p}/Add_1_output_0"], f"{p}/Add_1")
    x = rmsnorm(x, "/norm")
    w = const("lm_head.weight", rng.standard_normal((cfg.hidden, cfg.vocab)) / np.sqrt(cfg.hidden) * 4)
    node("MatMul", [x, w], ["logits"], "/lm_head/MatMul")
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def decoder_feeds(cfg: TinyDecoder, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    """A prefill from an empty cache: ``seq`` embeddings, zero KV buffers."""
    rng = np.random.default_rng(seed)
    feeds = {"inputs_embeds": rng.standard_normal((1, seq, cfg.hidden)).astype(np.float32),
             "seqlens_k": np.array([seq - 1], np.int32),
             "total_sequence_length": np.array(seq, np.int32)}
    for i in range(cfg.layers):
        feeds[f"past_key.{i}"] = np.zeros(cfg.kv_shape, np.float32)
        feeds[f"past_value.{i}"] = np.zeros(cfg.kv_shape, np.float32)
    return feeds


def export_vision(path: Path, preset: str = "test-tiny", seed: int = 0) -> Path:
    """The preset's SigLIP tower as ONNX (input ``pixel_values``, output ``features``)."""
    import torch

    from loc3r.model.config import get_config
    from loc3r.model.siglip import SiglipVisionTower

    cfg = get_config(preset).vision
    torch.manual_seed(seed)
    tower = SiglipVisionTower(cfg).eval()
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(tower, (x,), str(path), input_names=["pixel_values"], output_names=["features"],
                          dynamic_axes={"pixel_values": {0: "frames"}, "features": {0: "frames"}},
                          opset_version=17, dynamo=False)
    return path


def export_pose_prior(path: Path, preset: str = "test-tiny", seed: int = 0) -> Path:
    """The preset's pose prior step as ONNX: (image, state, memory, is_first) ->
    (camera_token, pose, new_state, new_memory)."""
    import torch

    from loc3r.model.config import get_config
    from loc3r.model.pose_prior import PosePrior

    cfg = get_config(preset).pose_prior
    torch.manual_seed(seed)
    prior = PosePrior(cfg).eval()
    img = torch.zeros(1, 3, cfg.img_height, cfg.img_width)
    state, memory = prior.initial_state(1).detach().clone(), prior.initial_memory(1).detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(prior, (img, state, memory, torch.ones(1)), str(path),
                          input_names=["image", "state", "memory", "is_first"],
                          output_names=["camera_token", "pose", "new_state", "new_memory"],
                          opset_version=17, dynamo=False)
    return path


def write_package(pkg: Path, preset: str = "test-tiny", decoder: TinyDecoder = TinyDecoder(),
                  roles: tuple[str, ...] = ("pose_prior", "vision", "decoder")) -> Path:
    """An fp32 package with (some of) vision, pose_prior and decoder graphs (no tokenizer contents needed)."""
    import onnx

    from loc3r.model.config import get_config
    from loc3r.runtime.package import (ChatTemplate, GraphSpec, Manifest, PosePriorSpec, SpecialTokens,
                                       TensorSpec, TextSpec, VisionSpec, write_manifest)

    pkg.mkdir(parents=True, exist_ok=True)
    cfg = get_config(preset)
    builders = {"vision": lambda p: export_vision(p, preset), "pose_prior": lambda p: export_pose_prior(p, preset),
                "decoder": lambda p: build_decoder(p, decoder)}
    for role in roles:
        builders[role](pkg / f"{role}.onnx")
    (pkg / "tokenizer.json").write_text("{}")

    def io(model_path: Path):
        m = onnx.load(str(model_path))

        def spec(v):
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
            return TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

        return tuple(spec(v) for v in m.graph.input), tuple(spec(v) for v in m.graph.output)

    graphs = tuple(GraphSpec(role, f"{role}.onnx", *io(pkg / f"{role}.onnx"))
                   for role in roles)
    v, p = cfg.vision, cfg.pose_prior
    manifest = Manifest(
        name=preset, precision="fp32",
        vision=VisionSpec(v.image_size, v.mean, v.std, v.grid, v.pooled_grid, v.tokens_per_frame),
        text=TextSpec(decoder.hidden, decoder.layers, decoder.kv_heads, decoder.head_dim, decoder.max_len,
                      decoder.vocab),
        special_tokens=SpecialTokens(pos=1, ori=2, eos=3, pad=0),
        chat_template=ChatTemplate(prefix="", suffix="{situation}{question}"),
        orientation_bins_deg=(0.0, 90.0, 180.0, 270.0), graphs=graphs,
        pose_prior=PosePriorSpec(p.img_height, p.img_width, p.patch_size, (0.5,) * 3, (0.5,) * 3,
                                 p.state_size, p.dec_embed_dim, p.mem_slots, p.mem_dim),
    )
    write_manifest(pkg, manifest)
    return pkg


def write_video_folder(folder: Path, videos: int = 2, frames: int = 6, size: int = 48, seed: int = 0) -> Path:
    """Tiny mp4 clips of moving colour gradients, plus a labels.jsonl like ``loc3r synth`` writes."""
    import json

    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    rows = []
    for v in range(videos):
        path = folder / f"scene{v}.mp4"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (size, size))
        base = rng.integers(0, 255, 3)
        for t in range(frames):
            img = np.stack([(xx * 4 + t * 20 + base[0]) % 256, (yy * 4 + base[1]) % 256,
                            ((xx + yy) * 2 + t * 7 + base[2]) % 256], -1).astype(np.uint8)
            w.write(img)
        w.release()
        rows.append({"id": f"scene{v}-q00", "type": "count", "video": f"scene{v}.mp4",
                     "question": f"How many chairs are in scene {v}?", "answer": "2",
                     "situation": f"I am standing by the door of scene {v}."})
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
