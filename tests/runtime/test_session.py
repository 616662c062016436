"""Session over an exported fp32 package == the PyTorch model (streaming equals one-shot)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from loc3r.export.default_model import make_random_checkpoint  # noqa: E402
from loc3r.export.package_writer import ExportOptions, write_package  # noqa: E402
from loc3r.model.checkpoint import load_checkpoint  # noqa: E402
from loc3r.runtime.preprocess import preprocess_pose, preprocess_vision  # noqa: E402
from loc3r.runtime.session import Pipeline  # noqa: E402

MAX_CONTEXT = 128
SITUATION = "i am sitting on the bed"
Q1 = "what is on my left?"
Q2 = "how many chairs are there?"


@pytest.fixture(scope="module", params=["test-tiny", "test-tiny-nocam", "test-tiny-prev"])
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_random_checkpoint(root / "ckpt", preset=request.param, seed=2)
    write_package(ckpt, root / "pkg", ExportOptions(max_context=MAX_CONTEXT, progress=False))
    return load_checkpoint(ckpt, dtype=torch.float32), Pipeline.load(root / "pkg", "cpu")


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 2 * i, 44, 3), dtype=np.uint8) for i in range(n)]


def one_shot(model, pipeline, rgbs, question, situation):
    """The PyTorch model over [prefix, frames, newline, suffix] in one forward."""
    m = pipeline.manifest
    tok = pipeline.tokenizer
    pixels = torch.from_numpy(np.stack([preprocess_vision(f, m.vision.image_size, m.vision.mean, m.vision.std)
                                        for f in rgbs]))[None]
    pose = None
    if m.camera_tokens:
        p = m.pose_prior
        pose = torch.from_numpy(np.stack([preprocess_pose(f, p.img_height, p.img_width, p.mean, p.std,
                                                          p.patch_size) for f in rgbs]))[None]
    prefix = torch.from_numpy(tok.encode_prefix())[None]
    suffix = torch.from_numpy(tok.encode_suffix(question, situation).ids)[None]
    with torch.no_grad():
        out = model(prefix, pixels, suffix, pose)
        embeds, _ = model.sequence_embeddings(prefix, pixels, suffix, pose)
        tokens = model.generate_greedy(embeds, 6, capacity=MAX_CONTEXT, eos_token_id=m.special_tokens.eos)
    return out, tokens[0].tolist()


def test_streaming_equals_one_shot(built):
    model, pipeline = built
    rgbs = frames(5)
    s = pipeline.new_session()
    for i, f in enumerate(rgbs):
        assert s.add_frame(f, 0.5 * i)
    ans = s.ask(Q1, situation=SITUATION, max_new_tokens=6)
    out, tokens = one_shot(model, pipeline, rgbs, Q1, SITUATION)
    assert np.abs(s.last_prompt_logits - out.logits[0, -1].numpy()).max() <= 1e-4
    assert np.abs(np.array(ans.position) - out.position[0, :2].numpy()).max() <= 1e-3
    assert abs(ans.position_sigma - float(out.position[0, 2])) <= 1e-3
    assert np.abs(ans.orientation_logits - out.orientation_logits[0].numpy()).max() <= 1e-3
    assert abs(ans.orientation_deg - np.degrees(float(out.orientation[0]))) <= 1e-2
    assert list(ans.token_ids) == tokens  # the full run through the graphs == PyTorch greedy tokens
    assert ans.frames == 5
    if pipeline.manifest.camera_tokens:
        assert np.abs(s.poses - out.poses[0].numpy()).max() <= 1e-3
    # BEV head at ingest == the one-shot f_proj on the vision tokens
    bev = np.stack([f.bev for f in s._frames])
    assert np.abs(bev - out.bev[0].numpy()).max() <= 1e-3


def test_question_order_does_not_matter_and_stream_continues(built):
    model, pipeline = built
    rgbs = frames(6, seed=1)
    a = pipeline.new_session()
    for i, f in enumerate(rgbs[:4]):
        a.add_frame(f, i)
    a.ask(Q1, situation=SITUATION, max_new_tokens=4)
    q2_after_q1 = a.ask(Q2, max_new_tokens=6)
    logits_after_q1 = a.last_prompt_logits.copy()
    b = pipeline.new_session()
    for i, f in enumerate(rgbs[:4]):
        b.add_frame(f, i)
    q2_alone = b.ask(Q2, max_new_tokens=6)
    assert q2_after_q1.token_ids == q2_alone.token_ids
    assert np.abs(logits_after_q1 - b.last_prompt_logits).max() <= 1e-5
    # frames after a question continue the stream: same as the one-shot over all six frames
    for i, f in enumerate(rgbs[4:], start=4):
        a.add_frame(f, i)
    ans = a.ask(Q1, situation=SITUATION, max_new_tokens=6)
    out, tokens = one_shot(model, pipeline, rgbs, Q1, SITUATION)
    assert np.abs(a.last_prompt_logits - out.logits[0, -1].numpy()).max() <= 1e-4
    assert np.abs(np.array(ans.position) - out.position[0, :2].numpy()).max() <= 1e-3
    assert list(ans.token_ids) == tokens


def test_kv_cache_is_never_reallocated(built):
    _, pipeline = built
    s = pipeline.new_session()
    ptr = s.cache.data_pointer()
    start = s.cache.length
    for i, f in enumerate(frames(3)):
        s.add_frame(f, i)
        assert s.cache.data_pointer() == ptr
    assert s.cache.length == start + 3 * pipeline.manifest.tokens_per_frame
    keys_before = s.cache.valid_key(0).copy()
    s.ask(Q1, max_new_tokens=5)
    assert s.cache.data_pointer() == ptr
    assert s.cache.length == s.frames_end  # rewound to the end of the last frame
    assert np.array_equal(s.cache.valid_key(0), keys_before)  # frame keys untouched by the question


def test_ask_errors_are_one_line(built):
    from loc3r.errors import Loc3rError

    _, pipeline = built
    s = pipeline.new_session()
    with pytest.raises(Loc3rError, match="no frames yet"):
        s.ask(Q1)
    s.add_frame(frames(1)[0], 0.0)
    with pytest.raises(Loc3rError, match="the question is empty"):
        s.ask("   ")
    with pytest.raises(Loc3rError, match="too long for the context"):
        s.ask(" ".join(["chair"] * MAX_CONTEXT))
    ans = s.ask(Q1, max_new_tokens=3)  # still usable afterwards
    assert ans.position is None and ans.orientation_deg is None and len(ans.token_ids) <= 3


def test_bev_scene_has_every_vision_token(built):
    _, pipeline = built
    s = pipeline.new_session()
    for i, f in enumerate(frames(2)):
        s.add_frame(f, i)
    ans = s.ask(Q1, situation=SITUATION, max_new_tokens=2)
    scene = s.bev_scene(ans)
    n = pipeline.manifest.vision.tokens_per_frame
    assert scene.token_xy.shape == (2 * n, 2) and scene.token_rgb.shape == (2 * n, 3)
    assert scene.agent_xy == ans.position
    if pipeline.manifest.camera_tokens:
        assert scene.trajectory_xy.shape == (2, 2)
