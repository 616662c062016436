"""Streaming pieces (frame encode, chunked prefill, decode) equal the one-shot forward."""

from __future__ import annotations

import pytest
import torch

from loc3r.model.config import get_config
from loc3r.model.loc3r_vlm import Loc3RVLM
from loc3r.model.qwen2 import causal_cache_mask

TOL = 1e-4


def tiny_model(preset: str) -> Loc3RVLM:
    torch.manual_seed(0)
    cfg = get_config(preset).replace(pos_token_id=120, ori_token_id=121)
    return Loc3RVLM(cfg).eval()


def inputs(model: Loc3RVLM, frames: int = 3):
    g = torch.Generator().manual_seed(3)
    v = model.cfg.vision
    pv = torch.randn(1, frames, 3, v.image_size, v.image_size, generator=g)
    pose_images = None
    if model.cfg.pose_prior is not None:
        p = model.cfg.pose_prior
        pose_images = torch.randn(1, frames, 3, p.img_height, p.img_width, generator=g)
    prefix = torch.tensor([[1, 2, 3]])
    suffix = torch.tensor([[4, 5, 120, 121, 6, 7]])
    return prefix, pv, suffix, pose_images


@pytest.fixture(scope="module", params=["test-tiny", "test-tiny-nocam"])
def model(request):
    return tiny_model(request.param)


def stream(model: Loc3RVLM, prefix, pv, suffix, pose_images, capacity: int):
    """Prefix, then each frame block, then newline + suffix, through one preallocated cache."""
    past_key, past_value = model.empty_cache(1, capacity)
    hidden, pos = [], 0

    def prefill(embeds):
        nonlocal past_key, past_value, pos
        positions = torch.arange(pos, pos + embeds.shape[1])
        h, past_key, past_value = model.prefill(embeds, past_key, past_value, positions)
        hidden.append(h)
        pos += embeds.shape[1]

    prefill(model.embed_tokens(prefix))
    state = memory = None
    if model.uses_camera_tokens:
        state, memory = model.initial_pose_state(1)
    for t in range(pv.shape[1]):
        is_first = torch.tensor([1.0 if t == 0 else 0.0])
        pose_image = None if pose_images is None else pose_images[:, t]
        block, _, state, memory = model.encode_frame(pv[:, t], pose_image, state, memory, is_first)
        prefill(block)
    prefill(torch.cat((model.newline_embedding(1), model.embed_tokens(suffix)), dim=1))
    return torch.cat(hidden, dim=1), past_key, past_value, pos


@torch.no_grad()
def test_chunked_prefill_and_decode_equal_one_shot(model):
    prefix, pv, suffix, pose_images = inputs(model)
    full = model(prefix, pv, suffix, pose_images)
    per_frame = model.cfg.tokens_per_frame
    assert full.logits.shape[1] == prefix.shape[1] + 3 * per_frame + 1 + suffix.shape[1]

    capacity = full.logits.shape[1] + 4
    hidden, past_key, past_value, pos = stream(model, prefix, pv, suffix, pose_images, capacity)
    assert (model.logits(hidden) - full.logits).abs().max().item() <= TOL

    # Decode 3 tokens through the cache == one-shot over the extended sequence.
    tokens = torch.tensor([[10, 11, 12]])
    decoded = []
    for i in range(3):
        logits, _, past_key, past_value = model.decode_step(tokens[:, i:i + 1], past_key, past_value,
                                                            torch.tensor([pos + i]))
        decoded.append(logits)
    longer = model(prefix, pv, torch.cat((suffix, tokens), dim=1), pose_images).logits[:, -3:]
    assert (torch.cat(decoded, dim=1) - longer).abs().max().item() <= TOL


@torch.no_grad()
def test_greedy_generation_through_cache_equals_argmax_of_one_shot(model):
    prefix, pv, suffix, pose_images = inputs(model)
    embeds, _ = model.sequence_embeddings(prefix, pv, suffix, pose_images)
    tokens = model.generate_greedy(embeds, max_new_tokens=4, capacity=embeds.shape[1] + 8)
    assert tokens.shape == (1, 4)
    for i in range(4):  # each token is the argmax of a fresh one-shot forward
        seq = torch.cat((suffix, tokens[:, :i]), dim=1)
        assert model(prefix, pv, seq, pose_images).logits[0, -1].argmax().item() == tokens[0, i].item()


@torch.no_grad()
def test_generation_stops_at_eos(model):
    prefix, pv, suffix, pose_images = inputs(model)
    embeds, _ = model.sequence_embeddings(prefix, pv, suffix, pose_images)
    first = model.generate_greedy(embeds, max_new_tokens=1)[0, 0].item()
    assert model.generate_greedy(embeds, max_new_tokens=6, eos_token_id=first).tolist() == [[first]]


@torch.no_grad()
def test_unfilled_cache_slots_do_not_leak():
    model = tiny_model("test-tiny-nocam")
    embeds = torch.randn(1, 5, model.cfg.text.hidden_size)
    clean_k, clean_v = model.empty_cache(1, 16)
    dirty_k, dirty_v = torch.randn_like(clean_k) * 50, torch.randn_like(clean_v) * 50
    positions = torch.arange(5)
    a, _, _ = model.prefill(embeds, clean_k, clean_v, positions)
    b, new_k, _ = model.prefill(embeds, dirty_k, dirty_v, positions)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(new_k[:, :, :, 5:], dirty_k[:, :, :, 5:])  # only slots 0..4 were written


def test_causal_cache_mask_from_positions():
    mask = causal_cache_mask(torch.tensor([2, 3]), 6, torch.float32)
    assert (mask == 0).tolist() == [[True, True, True, False, False, False],
                                    [True, True, True, True, False, False]]
    assert mask.max() == 0 and mask.min() == torch.finfo(torch.float32).min
