"""`loc3r export convert`: success paths and every error message."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loc3r.cli import main
from loc3r.model.checkpoint import load_checkpoint


def build_hf_dir(directory: Path, vocab: int = 128, tied: bool = False) -> Path:
    """A random tiny LlavaOnevisionForConditionalGeneration + a word-level tokenizer.json (103 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, vision_use_head=False)
    text = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, video_token_index=101, image_token_index=102,
                               tie_word_embeddings=tied)
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(directory)
    words = {f"w{i}": i for i in range(100)}
    words.update({"<unk>": 100, "<video>": 101, "<image>": 102})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory) -> Path:
    return build_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def hf_dir(hf_template, tmp_path) -> Path:
    """A fresh copy each test may break."""
    d = tmp_path / "hf"
    d.mkdir()
    for f in hf_template.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def convert(*args: str):
    return CliRunner().invoke(main, ["export", "convert", "--quiet", *args])


def test_export_help_lists_convert_without_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom loc3r.cli import main\n"
            "r = CliRunner().invoke(main, ['export', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print(r.output)\nassert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout


def test_convert_success(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = convert("--llava", str(hf_dir), "--out", str(out))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: ") and lines[0].endswith("camera tokens off")
    assert lines[1:3] == ["added tokens: <Pos>=103, <Ori>=104", "initialised (not in the inputs): f_pos, f_ori, f_proj"]
    assert lines[3] == "dropped (unused by Loc3R-VLM): vision_tower.post_layernorm (2 tensors)"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("w1 <Pos> <Ori> w2").ids == [1, 103, 104, 2]
    model = load_checkpoint(out)
    assert (model.cfg.name, model.cfg.pos_token_id, model.cfg.ori_token_id) == ("ckpt", 103, 104)
    assert not model.cfg.camera_tokens_active
    hf = load_file(str(hf_dir / "model.safetensors"))
    assert torch.equal(model.language_model.layers[1].self_attn.k_proj.bias,
                       hf["language_model.model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(model.lm_head.weight, hf["language_model.lm_head.weight"])


def test_convert_dtype_and_name(hf_dir, tmp_path):
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"), "--dtype", "bfloat16", "--name", "demo")
    assert r.exit_code == 0, r.output
    model = load_checkpoint(tmp_path / "o")
    assert model.cfg.name == "demo" and model.f_proj.mlp.fc1.weight.dtype == torch.bfloat16


def test_transformers5_key_layout_converts_the_same(hf_dir, tmp_path):
    convert("--llava", str(hf_dir), "--out", str(tmp_path / "a"))
    sd = load_file(str(hf_dir / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        else:
            k = "model." + k
        renamed[k] = v
    save_file(renamed, str(hf_dir / "model.safetensors"))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vocabulary_grows_when_tokens_do_not_fit(tmp_path):
    hf_dir = build_hf_dir(tmp_path / "hf", vocab=103, tied=True)
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert "grew the vocabulary from 103 to 128 rows to fit <Pos>=103, <Ori>=104" in r.stderr
    model = load_checkpoint(tmp_path / "o")
    emb = model.language_model.embed_tokens.weight
    old = load_file(str(hf_dir / "model.safetensors"))["language_model.model.embed_tokens.weight"]
    assert emb.shape == (128, 32) and torch.equal(emb[:103], old)
    assert torch.allclose(emb[103], old.mean(0)) and model.lm_head.weight is emb


def fake_cut3r(monkeypatch, dropped: list[str]):
    """Stand in for loc3r.model.convert_cut3r with the agreed interface, returning a real PosePrior state."""
    from loc3r.model.config import get_config
    from loc3r.model.pose_prior import PosePrior

    cfg = get_config("test-tiny").pose_prior
    torch.manual_seed(1)
    sd = PosePrior(cfg).state_dict()
    module = types.ModuleType("loc3r.model.convert_cut3r")
    module.convert_cut3r_checkpoint = lambda path: (sd, cfg, dropped)
    monkeypatch.setitem(sys.modules, "loc3r.model.convert_cut3r", module)
    return sd


def test_convert_with_pose_prior(hf_dir, tmp_path, monkeypatch):
    sd = fake_cut3r(monkeypatch, ["downstream_head.dpt_self.a", "downstream_head.dpt_self.b"])
    pth = tmp_path / "cut3r.pth"
    pth.write_bytes(b"stand-in")
    r = convert("--llava", str(hf_dir), "--pose-prior", str(pth), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].endswith("camera tokens on")
    assert lines[2] == "initialised (not in the inputs): f_cam, f_pos, f_ori, f_proj"
    assert "cut3r.pth:downstream_head.dpt_self (2 tensors)" in lines[3]
    model = load_checkpoint(tmp_path / "o")
    assert model.uses_camera_tokens and model.cfg.tokens_per_frame == 5
    assert all(torch.equal(model.pose_prior.state_dict()[k], v) for k, v in sd.items())


def test_convert_with_a_real_cut3r_file(hf_dir, tmp_path):
    """The released layout: {'model': state dict with 'module.' prefix and dense heads, 'args': ...}."""
    from loc3r.model.config import get_config
    from loc3r.model.pose_prior import PosePrior

    cfg = get_config("test-tiny").pose_prior
    torch.manual_seed(2)
    sd = {f"module.{k}": v for k, v in PosePrior(cfg).state_dict().items()}
    sd["module.downstream_head.dpt_self.act_postprocess.0.weight"] = torch.zeros(3, 3)
    constructor = ("ARCroco3DStereo(ARCroco3DStereoConfig(img_size=(48, 48), enc_num_heads=2, dec_num_heads=2, "
                   "state_dec_num_heads=2, pos_embed='RoPE100', state_pe='2d'))")
    torch.save({"model": sd, "args": {"model": constructor}, "epoch": 1}, tmp_path / "cut3r.pth")
    r = convert("--llava", str(hf_dir), "--pose-prior", str(tmp_path / "cut3r.pth"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert "cut3r.pth:downstream_head.dpt_self (1 tensor)" in r.stdout
    model = load_checkpoint(tmp_path / "o")
    assert model.uses_camera_tokens
    got = model.pose_prior.state_dict()
    assert all(torch.equal(got[k[len("module."):]], v) for k, v in sd.items() if "dpt_self" not in k)


# -- errors: one line each ---------------------------------------------------
def error_line(r) -> str:
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    return r.stderr.strip()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_file(hf_dir, tmp_path, name):
    (hf_dir / name).unlink()
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing file: {hf_dir / name}"


def test_missing_weights(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing file: {hf_dir / 'model.safetensors'} (or model.safetensors.index.json)"


def test_missing_shard(hf_dir, tmp_path):
    keys = list(load_file(str(hf_dir / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing file: {hf_dir / 'model-00001-of-00002.safetensors'}"


def test_missing_pose_prior_file(hf_dir, tmp_path):
    r = convert("--llava", str(hf_dir), "--pose-prior", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing file: {tmp_path / 'none.pth'}"


def test_missing_llava_directory(tmp_path):
    r = convert("--llava", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing directory: {tmp_path / 'nope'}"


def test_unexpected_keys(hf_dir, tmp_path):
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["model.extra_head.weight"] = torch.zeros(2)
    sd["vision_tower.surprise"] = torch.zeros(2)
    sd["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
    sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(2)  # derived: dropped
    save_file(sd, str(hf_dir / "model.safetensors"))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == (f"error: unexpected keys in {hf_dir}: language_model.model.layers.7.mlp.up_proj.weight, "
                             "model.extra_head.weight, vision_tower.surprise")


def test_missing_keys(hf_dir, tmp_path):
    sd = load_file(str(hf_dir / "model.safetensors"))
    del sd["language_model.model.norm.weight"], sd["multi_modal_projector.linear_2.bias"]
    save_file(sd, str(hf_dir / "model.safetensors"))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == f"error: missing keys in {hf_dir}: language_model.norm.weight, projector.linear_2.bias"


def test_shape_mismatch(hf_dir, tmp_path):
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["image_newline"] = torch.zeros(33)
    save_file(sd, str(hf_dir / "model.safetensors"))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == "error: shape mismatch for image_newline: expected (32), found (33)"
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_unsupported_config(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    r = convert("--llava", str(hf_dir), "--out", str(tmp_path / "o"))
    assert error_line(r) == ("error: unsupported vision_feature_select_strategy 'default'; "
                             "SigLIP has no CLS token, only 'full' is supported")
