"""PosePrior: RoPE, pose parametrisation, and step-by-step == CUT3R's batched loop."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from loc3r.model.config import PosePriorConfig, cut3r_state_grid_width, get_config
from loc3r.model.pose_prior import PosePrior, pose_from_raw
from loc3r.model.rope2d import apply_rope, rope_cos_sin

CUT3R_POSE_PREFIXES = ("patch_embed.", "enc_blocks.", "enc_norm.", "register_tokens.", "decoder_embed_state.",
                       "dec_blocks_state.", "dec_norm_state.", "decoder_embed.", "dec_blocks.", "dec_norm.",
                       "pose_token", "pose_retriever.", "downstream_head.pose_head.")


def tiny_cfg() -> PosePriorConfig:
    cfg = get_config("test-tiny").pose_prior
    return dataclasses.replace(cfg, state_grid_width=cut3r_state_grid_width(cfg.state_size))


@pytest.fixture(scope="module")
def model() -> PosePrior:
    torch.manual_seed(0)
    return PosePrior(tiny_cfg()).eval()


# --------------------------------------------------------------------------
# An independent reference written from CUT3R's code structure: table-lookup
# RoPE with an offset for negative positions (its PyTorch fallback), explicit
# softmax attention, state-dict tensors by CUT3R key, and CUT3R's
# _forward_impl loop (encode every frame in one batch, then recur).
# --------------------------------------------------------------------------
def ref_rope(tokens, positions, base):
    """tokens (B, H, N, hd), positions (B, N, 2) -> rotated, CUT3R RoPE2D fallback style."""
    half = tokens.shape[-1] // 2
    offset = max(0, -int(positions.min()))
    seq_len = int((positions + offset).max()) + 1
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2).float() / half))
    t = torch.arange(seq_len, dtype=torch.float32) - offset
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    freqs = torch.cat([freqs, freqs], dim=-1)
    cos, sin = freqs.cos(), freqs.sin()

    def rope1d(x, pos1d):
        c = F.embedding(pos1d + offset, cos)[:, None]
        s = F.embedding(pos1d + offset, sin)[:, None]
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    y, x = tokens.chunk(2, dim=-1)
    return torch.cat([rope1d(y, positions[..., 0]), rope1d(x, positions[..., 1])], dim=-1)


def ref_heads(x, heads):
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def ref_attention(q, k, v, qpos, kpos, base):
    if qpos is not None:
        q = ref_rope(q, qpos, base)
    if kpos is not None:
        k = ref_rope(k, kpos, base)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def ref_ln(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-6)


def ref_lin(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def ref_mlp(sd, prefix, x):
    return ref_lin(sd, prefix + ".fc2", F.gelu(ref_lin(sd, prefix + ".fc1", x)))


def ref_self_attn(sd, prefix, x, pos, heads, base):
    q, k, v = ref_lin(sd, prefix + ".qkv", x).chunk(3, dim=-1)
    out = ref_attention(ref_heads(q, heads), ref_heads(k, heads), ref_heads(v, heads), pos, pos, base)
    return ref_lin(sd, prefix + ".proj", out)


def ref_enc_block(sd, prefix, x, pos, heads, base):
    x = x + ref_self_attn(sd, prefix + ".attn", ref_ln(sd, prefix + ".norm1", x), pos, heads, base)
    return x + ref_mlp(sd, prefix + ".mlp", ref_ln(sd, prefix + ".norm2", x))


def ref_dec_block(sd, prefix, x, y, xpos, ypos, heads, base):
    x = x + ref_self_attn(sd, prefix + ".attn", ref_ln(sd, prefix + ".norm1", x), xpos, heads, base)
    y_ = ref_ln(sd, prefix + ".norm_y", y)
    q = ref_heads(ref_lin(sd, prefix + ".cross_attn.projq", ref_ln(sd, prefix + ".norm2", x)), heads)
    k = ref_heads(ref_lin(sd, prefix + ".cross_attn.projk", y_), heads)
    v = ref_heads(ref_lin(sd, prefix + ".cross_attn.projv", y_), heads)
    x = x + ref_lin(sd, prefix + ".cross_attn.proj", ref_attention(q, k, v, xpos, ypos, base))
    return x + ref_mlp(sd, prefix + ".mlp", ref_ln(sd, prefix + ".norm3", x))


def ref_cut3r_poses(sd, cfg, frames):
    """frames (T, B, 3, H, W) -> per-frame lists of pose_out, pose, state, mem."""
    T, B, _, H, W = frames.shape
    p, base = cfg.patch_size, cfg.rope_base
    # _encode_views: all frames in one batch.
    x = F.conv2d(frames.reshape(T * B, 3, H, W), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=p).flatten(2).transpose(1, 2)
    gh, gw = H // p, W // p
    pos = torch.cartesian_prod(torch.arange(gh), torch.arange(gw))[None].expand(T * B, -1, -1)
    for i in range(cfg.enc_depth):
        x = ref_enc_block(sd, f"enc_blocks.{i}", x, pos, cfg.enc_num_heads, base)
    feats = ref_ln(sd, "enc_norm", x).reshape(T, B, gh * gw, -1)
    pos = pos[:B]
    # _init_state
    width = int(cfg.state_size ** 0.5)
    width = width + 1 if width % 2 == 1 else width
    state_pos = torch.tensor([[i // width, i % width] for i in range(cfg.state_size)])[None].expand(B, -1, -1)
    state = ref_lin(sd, "decoder_embed_state", sd["register_tokens.weight"])[None].expand(B, -1, -1)
    mem = sd["pose_retriever.mem"].expand(B, -1, -1)
    vdim = cfg.dec_embed_dim

    def mem_blocks(kind, x, y):
        for j in range(cfg.mem_depth):
            x = ref_dec_block(sd, f"pose_retriever.{kind}.{j}", x, y, None, None, cfg.dec_num_heads, base)
        return x

    outs = []
    for i in range(T):
        feat = feats[i]
        global_feat = feat.mean(dim=1, keepdim=True)
        if i == 0:
            pose_feat = sd["pose_token"].expand(B, -1, -1)
        else:
            query = torch.cat([ref_lin(sd, "pose_retriever.proj_q", global_feat),
                               sd["pose_retriever.masked_token"].expand(B, -1, -1)], dim=-1)
            pose_feat = mem_blocks("read_blocks", query, mem)[..., -vdim:]
        pose_pos = -torch.ones(B, 1, 2, dtype=pos.dtype)
        # _decoder
        f_state, f_img = state, torch.cat([pose_feat, ref_lin(sd, "decoder_embed", feat)], dim=1)
        pos_img = torch.cat([pose_pos, pos], dim=1)
        for j in range(cfg.dec_depth):
            new_state = ref_dec_block(sd, f"dec_blocks_state.{j}", f_state, f_img, state_pos, pos_img,
                                      cfg.state_dec_num_heads, base)
            new_img = ref_dec_block(sd, f"dec_blocks.{j}", f_img, f_state, pos_img, state_pos,
                                    cfg.dec_num_heads, base)
            f_state, f_img = new_state, new_img
        new_state = ref_ln(sd, "dec_norm_state", f_state)
        dec_last = ref_ln(sd, "dec_norm", f_img)
        out_pose = dec_last[:, 0:1]
        entry = torch.cat([ref_lin(sd, "pose_retriever.proj_q", global_feat), out_pose], dim=-1)
        new_mem = mem_blocks("write_blocks", mem, entry)
        raw = ref_mlp(sd, "downstream_head.pose_head.mlp", dec_last[:, 0])
        trans, quat = raw[:, :3], raw[:, 3:]
        d = trans.norm(dim=-1, keepdim=True)
        trans = trans * torch.expm1(d) / d.clip(min=1e-8)
        quat = F.normalize(quat, p=2, dim=-1)
        quat = torch.where(quat[:, 0:1] < 0, -quat, quat)
        state, mem = new_state, new_mem
        outs.append((dec_last[:, 0], torch.cat([trans, quat], dim=-1), state, mem))
    return outs


def run_stream(model, frames):
    """frames (T, B, 3, H, W) through PosePrior.forward one frame at a time."""
    B = frames.shape[1]
    state, mem = model.initial_state(B), model.initial_memory(B)
    outs = []
    for i, frame in enumerate(frames):
        is_first = torch.full((B,), 1.0 if i == 0 else 0.0)
        token, pose, state, mem = model(frame, state, mem, is_first)
        outs.append((token, pose, state, mem))
    return outs


@torch.no_grad()
def test_step_by_step_equals_cut3r_batched_loop(model):
    torch.manual_seed(1)
    frames = torch.rand(4, 2, 3, 32, 48) * 2 - 1
    got = run_stream(model, frames)
    want = ref_cut3r_poses(model.state_dict(), model.cfg, frames)
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(("camera_token", "pose", "state", "memory"), g, w):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"frame {step} {name}")
    # Memory is read from frame 1 on, so later frames must differ from a
    # stream that restarts every frame.
    assert not torch.allclose(got[1][0], run_stream(model, frames[1:2])[0][0])


@torch.no_grad()
def test_batch_of_streams_equals_one_at_a_time(model):
    torch.manual_seed(2)
    frames = torch.rand(3, 3, 3, 32, 48) * 2 - 1
    together = run_stream(model, frames)
    for b in range(3):
        alone = run_stream(model, frames[:, b:b + 1])
        for g, w in zip(together, alone):
            for a, c in zip(g, w):
                torch.testing.assert_close(a[b:b + 1], c, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_is_first_is_per_stream(model):
    """One batch with stream 0 at its first frame and stream 1 at its second."""
    torch.manual_seed(3)
    f0, f1 = torch.rand(2, 1, 3, 32, 48) * 2 - 1
    _, _, s1, m1 = model(f0, model.initial_state(1), model.initial_memory(1), torch.ones(1))
    want_b = model(f1, s1, m1, torch.zeros(1))
    want_a = model(f1, model.initial_state(1), model.initial_memory(1), torch.ones(1))
    got = model(torch.cat([f1, f1]), torch.cat([model.initial_state(1), s1]),
                torch.cat([model.initial_memory(1), m1]), torch.tensor([1.0, 0.0]))
    for g, a, b in zip(got, want_a, want_b):
        torch.testing.assert_close(g, torch.cat([a, b]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encode_decode_split_equals_forward(model):
    torch.manual_seed(4)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    state, mem, first = model.initial_state(2), model.initial_memory(2), torch.ones(2)
    feat, pos = model.encode(image)
    assert feat.shape == (2, 6, model.cfg.enc_embed_dim) and pos.shape == (2, 6, 2)
    for a, b in zip(model.decode_step(feat, pos, state, mem, first), model(image, state, mem, first)):
        assert torch.equal(a, b)


@torch.no_grad()
def test_initial_state_and_memory(model):
    want = model.decoder_embed_state(model.register_tokens.weight)
    state = model.initial_state(3)
    assert state.shape == (3, model.cfg.state_size, model.cfg.dec_embed_dim)
    assert torch.equal(state[2], want)
    mem = model.initial_memory(2)
    assert mem.shape == (2, model.cfg.mem_slots, model.cfg.mem_dim)
    assert torch.equal(mem[1], model.pose_retriever.mem[0])


@torch.no_grad()
def test_poses_are_rigid(model):
    torch.manual_seed(5)
    frames = torch.randn(3, 4, 3, 32, 48) * 3
    for _, pose, _, _ in run_stream(model, frames):
        quat = pose[:, 3:]
        torch.testing.assert_close(quat.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
        assert (quat[:, 0] >= 0).all()
        assert torch.isfinite(pose).all()


def test_pose_from_raw_hand_checked():
    raw = torch.tensor([[3.0, 4.0, 0.0, -2.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    pose = pose_from_raw(raw)
    scale = math.expm1(5.0) / 5.0
    torch.testing.assert_close(pose[0], torch.tensor([3 * scale, 4 * scale, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # Zero translation stays zero (no 0/0).
    torch.testing.assert_close(pose[1], torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]))


def test_rope_hand_checked_with_negative_position():
    # head_dim 8: y-half pairs (0,2),(1,3) turn by y * [1, 100^-1/2]; x-half (4,6),(5,7) by x * [...].
    t = torch.arange(1.0, 9.0).reshape(1, 1, 1, 8)
    pos = torch.tensor([[[2, -1]]])
    cos, sin = rope_cos_sin(pos, 8, 100.0)
    got = apply_rope(t, cos, sin).flatten().tolist()

    def turn(a, b, angle):
        return a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)

    v = list(range(1, 9))
    want = [0.0] * 8
    for (i, j), angle in (((0, 2), 2 * 1.0), ((1, 3), 2 * 0.1), ((4, 6), -1 * 1.0), ((5, 7), -1 * 0.1)):
        want[i], want[j] = turn(v[i], v[j], angle)
    assert got == pytest.approx(want, abs=1e-5)


def test_rope_matches_cut3r_table_lookup_and_is_relative():
    torch.manual_seed(6)
    q = torch.randn(2, 3, 5, 16)
    pos = torch.tensor([[-1, -1], [0, 0], [0, 3], [2, 1], [4, 4]])[None].expand(2, -1, -1)
    rotated = apply_rope(q, *rope_cos_sin(pos, 16, 100.0))
    torch.testing.assert_close(rotated, ref_rope(q, pos, 100.0), atol=1e-5, rtol=1e-5)
    # Scores depend only on position differences, also across negative positions.
    k = torch.randn(2, 3, 5, 16)
    shifted = pos - 7
    s1 = apply_rope(q, *rope_cos_sin(pos, 16, 100.0)) @ apply_rope(k, *rope_cos_sin(pos, 16, 100.0)).transpose(-1, -2)
    s2 = (apply_rope(q, *rope_cos_sin(shifted, 16, 100.0))
          @ apply_rope(k, *rope_cos_sin(shifted, 16, 100.0)).transpose(-1, -2))
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


def test_released_512_model_size_and_names():
    with torch.device("meta"):
        model = PosePrior(PosePriorConfig())
    sd = model.state_dict()
    # paper-notes.md: the pose path of cut3r_512_dpt_4_64.pth has 687,032,071 parameters.
    assert sum(v.numel() for v in sd.values()) == 687_032_071
    assert all(k.startswith(CUT3R_POSE_PREFIXES) for k in sd)
    assert tuple(sd["pose_retriever.mem"].shape) == (1, 256, 1536)
    assert tuple(sd["register_tokens.weight"].shape) == (768, 1024)
    assert tuple(sd["downstream_head.pose_head.mlp.fc2.weight"].shape) == (7, 3072)
    assert tuple(sd["dec_blocks_state.11.cross_attn.projk.weight"].shape) == (768, 768)
    assert cut3r_state_grid_width(768) == 28


def test_config_rejects_bad_head_dims():
    from loc3r.errors import Loc3rError

    with pytest.raises(Loc3rError, match="pose prior: dec width 768 with 128 heads needs a head dim divisible by 4"):
        PosePriorConfig(dec_num_heads=128)
    with pytest.raises(Loc3rError, match=r"pose prior: mem_dim must be 2 \* dec_embed_dim = 1536, got 1024"):
        PosePriorConfig(mem_dim=1024)


def test_translation_scale_matches_expm1():
    from loc3r.model.pose_prior import _expm1_over_x

    x = torch.cat([torch.zeros(1), torch.logspace(-8, 1.5, 500)]).double()  # float32 values
    want = torch.expm1(x) / x.clamp(min=1e-300)
    want[0] = 1.0
    got = _expm1_over_x(x.float()).double()
    torch.testing.assert_close(got, want, rtol=4e-7, atol=0)
