"""bench/peers_{models,systems}.py and the worker protocol of bench/peers.py, on the few-MB ``test-micro`` shape.

The systems must compute the same thing for the comparison to be fair: the
loc3r fp32 package (through ``loc3r export convert`` + ``loc3r export onnx``),
transformers on the Hugging Face LLaVA and onnxruntime-genai's build of the
same decoder produce the same greedy tokens, and the roofline counts the same
weight bytes and FLOPs for both ONNX builds.
"""

import importlib.util
import json

import numpy as np
import pytest

import peers
import peers_models as pm
import peers_systems as ps
from loc3r.errors import Loc3rError
from loc3r.runtime.profile_cli import graph_cost, package_decoder_cost

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    a = pm.ModelArtifacts(tmp_path_factory.mktemp("peers") / "test-micro", pm.get_shape("test-micro"))
    pm.build_hf_checkpoints(a)
    pm.convert_checkpoint(a)
    pm.export_package(a, "fp32")
    if HAS_GENAI:
        pm.build_genai_model(a, "fp32", threads=1)
    return a


def test_shapes_and_paths(tmp_path):
    q = pm.get_shape("qwen2-0.5b")
    assert (q.llava_text["num_hidden_layers"], q.llava_text["hidden_size"], q.llava_text["num_attention_heads"],
            q.llava_text["num_key_value_heads"]) == (24, 896, 14, 2)
    assert (q.llava_vision["hidden_size"], q.llava_vision["patch_size"]) == (768, 16)
    tiny = pm.qwen2_text_kwargs(pm.get_shape("loc3r-tiny"))
    assert (tiny["hidden_size"], tiny["num_hidden_layers"], tiny["head_dim"], tiny["vocab_size"]) == (256, 4, 64, 512)
    a = pm.ModelArtifacts(tmp_path, q)
    assert a.package("int4") == tmp_path / "pkg_int4" and a.genai_dir("fp32") == tmp_path / "genai_fp32"
    with pytest.raises(Loc3rError, match="unknown model shape 'nope'; known: qwen2-0.5b, loc3r-tiny, test-micro"):
        pm.get_shape("nope")


def test_tokenizer_has_video_tokens(arts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(arts.hf_llava / "tokenizer.json"))
    cfg = json.loads((arts.hf_llava / "config.json").read_text())
    assert tok.token_to_id("<video>") == cfg["video_token_index"] < cfg["text_config"]["vocab_size"]
    assert tok.encode("<|im_start|>user", add_special_tokens=False).ids[0] == tok.token_to_id("<|im_start|>")


def test_loc3r_and_torch_decode_the_same_tokens(arts):
    ours, torch_sys = ps.open_system("loc3r-fp32", arts, 1), ps.open_system("torch-fp32", arts, 1)
    for s in (ours, torch_sys):
        assert s.prefill(40) > 0 and s.decode(6) > 0
    assert len(ours.last_tokens) == 7
    assert ours.last_tokens == torch_sys.last_tokens
    assert len(set(ours.last_tokens)) > 1  # not a degenerate echo of one token


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed")
def test_genai_decodes_the_same_tokens_and_costs_the_same(arts):
    ours, genai = ps.open_system("loc3r-fp32", arts, 1), ps.open_system("ort-genai-fp32", arts, 1)
    ours.prefill(40), genai.prefill(40)
    ours.decode(6), genai.decode(6)
    assert genai.last_tokens == ours.last_tokens
    with pytest.raises(ps.NotSupported):
        genai.vision()
    g = graph_cost(arts.genai_dir("fp32") / "model.onnx")
    c = package_decoder_cost(arts.package("fp32"))
    # same decoder and lm_head weights, fused differently: same bytes and FLOPs per token
    assert (g.weight_bytes, g.matmul_flops, g.attention_heads) == (c.weight_bytes, c.matmul_flops, c.attention_heads)
    t = pm.MICRO_TEXT
    params = t["num_hidden_layers"] * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * t["vocab_size"]
    assert c.weight_bytes == 4 * params and c.matmul_flops == 2 * params


def test_video_answers(arts):
    ours, torch_sys = ps.open_system("loc3r-fp32", arts, 1), ps.open_system("torch-fp32", arts, 1)
    info = ours.prepare_video(3)
    assert info["frames"] == 3 and info["ingest_ms_per_frame"] > 0
    seconds, tokens = ours.answer(4)
    assert seconds > 0 and 1 <= tokens <= 4
    torch_sys.prepare_video(3)
    grid = pm.MICRO_VISION["image_size"] // pm.MICRO_VISION["patch_size"]
    ids = torch_sys._prompt_ids(3)
    assert int((ids == torch_sys.cfg.video_token_index).sum()) == 3 * ((grid + 1) // 2) ** 2 + 1
    seconds, tokens = torch_sys.answer(4)
    assert seconds > 0 and tokens == 4  # min_new_tokens: always the full answer length
    assert ours.vision() > 0 and torch_sys.vision() > 0


def test_worker_protocol(arts):
    w = peers.Worker("loc3r-fp32", arts, 1, arts.root.parent)
    assert w.ready["load_s"] > 0
    assert w.call("prefill", n=16)["seconds"] > 0
    assert w.call("decode", steps=2)["seconds"] > 0
    assert w.call("nope") == {"error": "unknown op nope"}
    assert "error" in w.call("prefill", n=10**6)  # past the context: reported, the worker lives on
    assert w.close()["peak_rss_mb"] > 10


def test_parse_args_errors_and_quick(capsys):
    with pytest.raises(SystemExit):
        peers.parse_args(["--systems", "loc3r-fp64"])
    assert "unknown system 'loc3r-fp64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        peers.parse_args(["--prefill", "0,256"])
    _, opts = peers.parse_args(["--quick"])
    assert opts.shapes == ("loc3r-tiny",) and opts.repeats == 2 and opts.decode_context == 1024
    _, opts = peers.parse_args(["--prefill", "512,64", "--repeats", "5", "--answer-repeats", "9"])
    assert opts.prefill_lengths == (64, 512) and opts.answer_repeats == 5


def test_synthetic_inputs():
    frames = ps.synthetic_frames(3, size=16)
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[1])
    ids = ps.random_token_ids(100, 50)
    assert ids.dtype == np.int64 and ids.min() >= 16 and ids.max() < 50


def test_decode_op_profile(arts):
    from peers_opprofile import decode_op_profile

    per_op = decode_op_profile(arts.package("fp32"), context=100, steps=2, threads=1)
    assert "decoder/GroupQueryAttention" in per_op and "lm_head/MatMul" in per_op
    assert all(ms >= 0 for ms in per_op.values())
    assert list(per_op.values()) == sorted(per_op.values(), reverse=True)
    with pytest.raises(ValueError, match="does not fit"):
        decode_op_profile(arts.package("fp32"), context=2000, steps=2, threads=1)
