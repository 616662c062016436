"""Converted tiny LLaVA-OneVision models agree with transformers (fp32)."""

from __future__ import annotations

import pytest
import torch

from loc3r.model.checkpoint import load_checkpoint
from loc3r.model.convert_llava import convert_llava

# name -> builder options: GQA with 1 and 2 KV heads, tied/untied, odd head counts, odd patch grid,
# a non-default feature layer, and a sharded checkpoint.
CONFIGS = {
    "kv1-tied-3heads": dict(heads=3, kv_heads=1, head_dim=16, tied=True, image_size=40),
    "kv2-untied-sharded": dict(heads=4, kv_heads=2, head_dim=8, tied=False, feature_layer=-2, shard=True),
    "kv2-untied-6heads": dict(heads=6, kv_heads=2, head_dim=8, tied=False, feature_layer=1, image_size=40),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tiny_llava_factory, tmp_path_factory):
    hf_dir, hf_model = tiny_llava_factory(request.param, **CONFIGS[request.param])
    out = tmp_path_factory.mktemp(f"ours-{request.param}")
    report = convert_llava(hf_dir, out, progress=False)
    assert (hf_dir / "model.safetensors.index.json").is_file() == CONFIGS[request.param].get("shard", False)
    return request.param, hf_model, load_checkpoint(out), report


def video(frames: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 3, size, size, generator=g)


def test_config_is_mapped(pair):
    name, hf, ours, report = pair
    opts, t = CONFIGS[name], ours.cfg.text
    assert (t.num_heads, t.num_kv_heads, t.head_dim) == (opts["heads"], opts["kv_heads"], opts["head_dim"])
    assert t.tie_word_embeddings == opts["tied"]
    assert ours.cfg.vision.feature_layer == opts.get("feature_layer", -1)
    assert (ours.cfg.pos_token_id, ours.cfg.ori_token_id) == (103, 104) == (report.pos_token_id, report.ori_token_id)
    assert not ours.cfg.camera_tokens_active and ours.pose_prior is None
    assert report.initialised == ("f_pos", "f_ori", "f_proj")
    if opts["tied"]:
        assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    assert any("post_layernorm" in k for k in report.dropped)


@torch.no_grad()
def test_vision_features_match(pair):
    name, hf, ours, _ = pair
    size = CONFIGS[name].get("image_size", 32)
    pixels = video(size=size)[0]
    layer = CONFIGS[name].get("feature_layer", -1)
    ref = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
    got = ours.vision_features(pixels)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_pooled_video_features_with_newline_match(pair):
    name, hf, ours, _ = pair
    pv = video(size=CONFIGS[name].get("image_size", 32))
    ref = hf.model.get_video_features(pv).pooler_output  # (1, F*n + 1, H)
    got, poses = ours.video_embeddings(pv)
    assert got.shape == ref.shape == (1, 3 * ours.cfg.vision.tokens_per_frame + 1, ours.cfg.text.hidden_size)
    assert (got - ref).abs().max().item() <= TOL
    assert poses.shape == (1, 3, 0)


def hf_inputs(ours, pv, prefix, suffix):
    n_video = pv.shape[1] * ours.cfg.vision.tokens_per_frame + 1
    return torch.cat((prefix, torch.full((1, n_video), 101), suffix), dim=1)


PREFIX = torch.tensor([[1, 2, 3, 4]])
SUFFIX = torch.tensor([[5, 6, 103, 104, 7, 8, 9]])  # situation, <Pos>, <Ori>, question


@torch.no_grad()
def test_logits_on_video_and_text_match(pair):
    name, hf, ours, _ = pair
    pv = video(size=CONFIGS[name].get("image_size", 32))
    # HF's vocabulary has no <Pos>/<Ori>; any in-vocab id takes their place there.
    ref = hf(input_ids=hf_inputs(ours, pv, PREFIX, SUFFIX.clamp(max=99)), pixel_values_videos=pv).logits
    got = ours(PREFIX, pv, SUFFIX.clamp(max=99)).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_greedy_generation_matches(pair):
    name, hf, ours, _ = pair
    pv = video(size=CONFIGS[name].get("image_size", 32))
    suffix = SUFFIX.clamp(max=99)
    ids = hf_inputs(ours, pv, PREFIX, suffix)
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pv,
                      max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    embeds, _ = ours.sequence_embeddings(PREFIX, pv, suffix)
    got = ours.generate_greedy(embeds, max_new_tokens=8)
    assert ref.shape == (1, 8)
    assert torch.equal(got, ref)
