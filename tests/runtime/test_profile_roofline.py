"""``loc3r profile --roofline``: weight bytes and FLOPs counted from graph files, percentages of the bounds."""

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import loc3r
from loc3r.cli import main as loc3r_main
from loc3r.errors import Loc3rError
from loc3r.runtime import profile_cli
from loc3r.runtime import roofline as roofline_mod
from loc3r.runtime.package import load_package
from loc3r.runtime.profile_cli import DecoderCost, graph_cost, package_decoder_cost, roofline_figures
from loc3r.runtime.profiler import ProfileReport, StageStats

DEFAULT_PKG = Path(loc3r.__file__).parent / "default_model"


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def write_costed_graph(path: Path, external: bool = False) -> None:
    """Every kind of weight matmul the counter must see, and two it must not."""
    f32 = lambda *s: np.ones(s, np.float32)  # noqa: E731
    inits = [
        _init("w1", f32(8, 16)),  # MatMul weight: 128 params, 512 B
        _init("w2", f32(16, 8)),  # through a Transpose: 128 params, 512 B
        _init("wq", np.ones((8, 4), np.int8)), _init("wq_scale", f32(4)), _init("wq_zp", np.zeros(4, np.int8)),
        _init("nb", np.ones((32, 1, 8), np.uint8)), _init("nb_scale", f32(32)),  # MatMulNBits K=16 N=32
        _init("cos", f32(64, 4)),  # rotary cache: not a matmul weight
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),  # (1, 8) @ (8, 16)
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "w2t"], ["h2"]),  # (1, 16) @ (16, 8)
        helper.make_node("MatMul", ["h2", "w1"], ["h3"]),  # w1 again: FLOPs twice, bytes once
        helper.make_node("DequantizeLinear", ["wq", "wq_scale", "wq_zp"], ["wdq"], axis=1),
        helper.make_node("MatMul", ["h2", "wdq"], ["h4"]),  # (1, 8) @ (8, 4)
        helper.make_node("MatMulNBits", ["h3", "nb", "nb_scale"], ["h5"], domain="com.microsoft", K=16, N=32,
                         bits=4, block_size=16),
        helper.make_node("MatMul", ["h5", "h5t"], ["attn"]),  # activation x activation: not counted
        helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["o0"], domain="com.microsoft", num_heads=4,
                         kv_num_heads=2),
        helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["o1"], domain="com.microsoft", num_heads=4,
                         kv_num_heads=2),
    ]
    graph = helper.make_graph(nodes, "costed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))


EXPECTED_BYTES = 512 + 512 + (32 + 16 + 4) + (256 + 128)
EXPECTED_FLOPS = 2.0 * (128 + 128 + 128 + 32 + 16 * 32)


@pytest.mark.parametrize("external", [False, True])
def test_graph_cost_counts_weight_matmuls(tmp_path, external):
    path = tmp_path / "g.onnx"
    write_costed_graph(path, external)
    cost = graph_cost(path)
    assert cost.weight_bytes == EXPECTED_BYTES
    assert cost.matmul_flops == EXPECTED_FLOPS
    assert cost.attention_heads == 8


def test_graph_cost_refuses_a_non_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(Loc3rError, match=f"^cannot read ONNX graph {bad}"):
        graph_cost(bad)


def test_package_cost_of_the_default_package():
    """loc3r-tiny: 4 layers of 256 wide (q/o 256x256, k/v 256x128, MLP 3 x 256x768) + a 512-row lm_head."""
    cost = package_decoder_cost(DEFAULT_PKG)
    params = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768) + 256 * 512
    assert cost.matmul_flops == 2 * params
    assert cost.attention_heads == 4 * 4 and cost.head_dim == 64
    assert cost.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4  # fp32 KV of 4 layers x 2 KV heads
    # bytes read per token: fp16-stored fp32 weights, or 8-bit blocks of 32 with one fp32 scale each
    precision = load_package(DEFAULT_PKG).manifest.precision
    assert cost.weight_bytes == {"fp32": 2 * params, "int8": params + params // 32 * 4}[precision]
    assert cost.head_flops == 2 * 256 * 512
    # a 100-token prompt: every layer per token, the lm_head once, attention to 50 positions on average
    assert cost.prefill_flops_per_token(100) == pytest.approx(2 * (params - 256 * 512) + 2 * 256 * 512 / 100
                                                              + 4 * 16 * 64 * 50)
    assert cost.prefill_flops_per_token(100, logits=False) == pytest.approx(2 * (params - 256 * 512) + 4 * 16 * 64 * 50)


def test_ort_gemm_peak_is_positive():
    assert 0 < profile_cli.measure_ort_matmul_gflops(n=64, repeats=1, threads=1) < 1e5


def test_roofline_figures_hand_computed():
    stats = lambda ms: StageStats(count=3, p50_ms=ms, p95_ms=ms, max_ms=ms, mean_ms=ms)  # noqa: E731
    report = ProfileReport(stages={"token_decode": stats(50.0), "frame_prefill": stats(100.0)}, frames=4,
                           frames_per_s=1.0, tokens=9, tokens_per_s=20.0, time_to_first_token_ms=1.0,
                           peak_rss_mb=1.0)
    cost = DecoderCost(weight_bytes=10**9, matmul_flops=1e9, attention_heads=10, head_dim=100,
                       kv_bytes_per_token=10**5)
    roof = roofline_mod.Roofline(copy_gbps=40.0, triad_gbps=30.0, matmul_gflops=200.0)
    fig = roofline_figures(report, cost, roof, tokens_per_frame=50, context=10_000, frames_context=200)
    # decode: 20 tok/s; 1 GB + 0.1 MB x 10k = 2 GB/token at 40 GB/s -> bound 20 tok/s: 100 %
    assert fig.decode_tokens_per_s == pytest.approx(20.0)
    assert fig.decode_bytes_per_token == 2 * 10**9
    assert fig.decode_fraction == pytest.approx(1.0)
    # prefill: 50 tokens / 0.1 s = 500 tok/s; frames attend to 100 positions on average:
    # (1e9 + 4*10*100*100) FLOPs -> bound 200e9 / that
    flops = 1e9 + 4 * 10 * 100 * 100
    assert fig.prefill_flops_per_token == flops
    assert fig.prefill_fraction == pytest.approx(500 * flops / 200e9)
    lines = fig.to_lines()
    assert lines[0] == "roofline: 40.0 GB/s (STREAM), 200.0 GFLOP/s (fp32 GEMM)"
    assert lines[1] == "decode: 20.00 tokens/s = 100.0% of the bandwidth bound (2000.0 MB/token at context 10000)"
    assert lines[2].startswith("frame prefill: 500.0 tokens/s = 250.1% of the FLOP bound (1.000 GFLOP/token)")


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(4):
        w.write(np.full((48, 64, 3), 30 * i, np.uint8))
    w.release()
    return path


def test_profile_cli_prints_roofline(video, monkeypatch):
    fixed = roofline_mod.Roofline(copy_gbps=10.0, triad_gbps=8.0, matmul_gflops=50.0)
    monkeypatch.setattr(roofline_mod, "measure_roofline", lambda **kw: fixed)
    monkeypatch.setattr(profile_cli, "measure_ort_matmul_gflops", lambda: 1.0)  # slower than numpy's: not used
    # A numeric answer ("12.5": digits are tokens) gives decode steps to time; a one-word answer may not.
    args = ["profile", str(video), "--model", str(DEFAULT_PKG), "--max-new-tokens", "4", "--repeat", "2",
            "--question", "What is the area of the room in square metres?"]
    r = CliRunner().invoke(loc3r_main, args + ["--roofline", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    fig = report["roofline"]
    cost = package_decoder_cost(DEFAULT_PKG)
    context = report["extra"]["context_tokens"]
    assert fig["decode_context"] == context and context > 4 * 17
    assert fig["decode_bytes_per_token"] == cost.decode_bytes(context)
    assert fig["decode_fraction"] == pytest.approx(fig["decode_tokens_per_s"] * fig["decode_bytes_per_token"] / 10e9)
    assert fig["prefill_fraction"] == pytest.approx(fig["prefill_tokens_per_s"] * fig["prefill_flops_per_token"] / 50e9)
    r = CliRunner().invoke(loc3r_main, args + ["--roofline"])
    assert r.exit_code == 0, r.output
    assert "roofline: 10.0 GB/s (STREAM), 50.0 GFLOP/s (fp32 GEMM)" in r.stdout.splitlines()
    assert any(line.startswith("decode: ") and "% of the bandwidth bound" in line for line in r.stdout.splitlines())
    r = CliRunner().invoke(loc3r_main, args)
    assert r.exit_code == 0 and "roofline" not in r.stdout  # opt-in
