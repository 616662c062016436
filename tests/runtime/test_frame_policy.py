"""Frame-budget policies: the selector's decisions, and a session that rebuilds its context correctly."""

from __future__ import annotations

import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.frame_policy import FrameSelector


def run_policy(policy, budget, n):
    notes = []
    sel = FrameSelector(policy, budget, notes.append)
    kept = []
    for i in range(n):
        adm = sel.admit(i, kept)
        if adm.keep is not None:
            kept = list(adm.keep)
        if adm.add:
            kept.append(i)
        assert len(kept) <= budget
    return kept, notes


def test_stop_keeps_the_first_frames_and_says_so_once():
    kept, notes = run_policy("stop", 4, 10)
    assert kept == [0, 1, 2, 3]
    assert len(notes) == 1 and "later frames are refused" in notes[0]


def test_uniform_keeps_an_evenly_spaced_subset():
    kept, notes = run_policy("uniform", 4, 16)
    assert kept == [0, 4, 8, 12]
    assert len(notes) == 2 and all("uniform" in n for n in notes)
    kept, _ = run_policy("uniform", 4, 4)
    assert kept == [0, 1, 2, 3]


def test_recent_is_a_sliding_window():
    kept, notes = run_policy("recent", 4, 10)
    assert kept == [6, 7, 8, 9]
    assert notes and all("oldest" in n for n in notes)


def test_error_policy_and_bad_arguments():
    sel = FrameSelector("error", 2, lambda m: None)
    assert sel.admit(0, []).add and sel.admit(1, [0]).add
    with pytest.raises(Loc3rError, match="frame budget reached: the context holds 2 frames"):
        sel.admit(2, [0, 1])
    with pytest.raises(Loc3rError, match="unknown frame policy 'sometimes'"):
        FrameSelector("sometimes", 2, print)
    with pytest.raises(Loc3rError, match="no room for a single frame"):
        FrameSelector("stop", 0, print)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from loc3r.export.default_model import make_random_checkpoint
    from loc3r.export.package_writer import ExportOptions, write_package
    from loc3r.runtime.session import Pipeline

    root = tmp_path_factory.mktemp("policy")
    ckpt = make_random_checkpoint(root / "ckpt", preset="test-tiny-nocam", seed=4)
    # context 60: prefix + 4 frame blocks of 4 tokens + 20 reserved
    write_package(ckpt, root / "pkg", ExportOptions(max_context=60, progress=False))
    return Pipeline.load(root / "pkg", "cpu")


@pytest.mark.parametrize("policy", ["uniform", "recent", "stop"])
def test_session_rebuild_equals_a_fresh_session_of_the_kept_frames(pipeline, policy):
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(9)]
    notes = []
    prefix = pipeline.tokenizer.encode_prefix().size
    reserve = 60 - prefix - 4 * pipeline.manifest.tokens_per_frame
    s = pipeline.new_session(frame_policy=policy, reserve_tokens=reserve, on_notice=notes.append)
    assert s.selector.budget == 4
    ptr = s.cache.data_pointer()
    added = [s.add_frame(f, i) for i, f in enumerate(rgbs)]
    assert notes, "a policy acting must say so"
    assert s.cache.data_pointer() == ptr
    kept = s.frame_indices
    assert 0 < len(kept) <= 4
    if policy == "stop":
        assert kept == (0, 1, 2, 3) and added[4:] == [False] * 5
    fresh = pipeline.new_session(reserve_tokens=reserve, on_notice=notes.append)
    for i in kept:
        fresh.add_frame(rgbs[i], i)
    a = s.ask("what is on my left?", max_new_tokens=3)
    b = fresh.ask("what is on my left?", max_new_tokens=3)
    assert a.frames == b.frames == len(kept)
    assert np.abs(s.last_prompt_logits - fresh.last_prompt_logits).max() <= 1e-4
    assert a.token_ids == b.token_ids
