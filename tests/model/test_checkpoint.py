"""Our checkpoint format: save/load round trip, streamed safetensors, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loc3r.errors import Loc3rError
from loc3r.model.checkpoint import load_checkpoint, save_checkpoint, write_safetensors_streaming
from loc3r.model.config import Loc3RConfig, get_config
from loc3r.model.loc3r_vlm import Loc3RVLM


def model_for(preset: str, **changes) -> Loc3RVLM:
    torch.manual_seed(0)
    return Loc3RVLM(get_config(preset).replace(**changes)).eval()


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken("<Pos>", special=True), AddedToken("<Ori>", special=True)])
    return tok


@pytest.mark.parametrize("preset,tied", [("test-tiny", False), ("test-tiny-nocam", True)])
def test_round_trip(tmp_path, preset, tied):
    cfg = get_config(preset)
    model = model_for(preset, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied),
                      pos_token_id=2, ori_token_id=3)
    save_checkpoint(model, tmp_path, tokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert Loc3RConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == model.cfg
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)

    back = load_checkpoint(tmp_path)
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back.lm_head.weight is back.language_model.embed_tokens.weight) == tied
    v = cfg.vision
    pv = torch.randn(1, 2, 3, v.image_size, v.image_size)
    pose = None
    if cfg.pose_prior is not None:
        pose = torch.randn(1, 2, 3, cfg.pose_prior.img_height, cfg.pose_prior.img_width)
    with torch.no_grad():  # equal weights; only memory alignment may reorder float sums
        assert torch.allclose(model(torch.tensor([[1]]), pv, torch.tensor([[2, 3]]), pose).logits,
                              back(torch.tensor([[1]]), pv, torch.tensor([[2, 3]]), pose).logits, atol=1e-5)


def test_load_casts_dtype(tmp_path):
    save_checkpoint(model_for("test-tiny-nocam"), tmp_path)
    assert load_checkpoint(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_streamed_file_is_standard_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).to(torch.bfloat16),
               "d": torch.tensor(1.5, dtype=torch.float16)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    seen = []
    write_safetensors_streaming(tmp_path / "x.safetensors", specs, tensors.__getitem__, seen.append)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sum(seen) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_load_errors(tmp_path):
    with pytest.raises(Loc3rError, match=f"^missing file: {tmp_path / 'config.json'}$"):
        load_checkpoint(tmp_path)
    model = model_for("test-tiny-nocam")
    save_checkpoint(model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))

    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(Loc3rError, match=r"^unexpected keys in .*model.safetensors: extra.weight$"):
        load_checkpoint(tmp_path)

    del sd["extra.weight"], sd["f_pos.mlp.fc2.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(Loc3rError, match=r"^missing keys in .*model.safetensors: f_pos.mlp.fc2.bias$"):
        load_checkpoint(tmp_path)

    sd["f_pos.mlp.fc2.bias"] = torch.zeros(4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(Loc3rError, match=r"^shape mismatch for f_pos.mlp.fc2.bias: expected \(3\), found \(4\)$"):
        load_checkpoint(tmp_path)
