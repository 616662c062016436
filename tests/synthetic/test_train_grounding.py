"""Supervised grounding attention for stage 2 (loc3r.synthetic.train_grounding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loc3r.errors import Loc3rError
from loc3r.model.losses import LossWeights
from loc3r.model.qwen2 import apply_rope, grouped_query_attention
from loc3r.synthetic.train_data import prompt_tokenizer
from loc3r.synthetic.train_grounding import (GroundingOptions, GroundingSource, attention_rows, find_mentions,
                                             grounding_targets, target_tokens, token_coverage)
from loc3r.synthetic.train_stage1 import Stage1Options
from loc3r.synthetic.train_stage2 import (Stage2Options, frozen_inputs, pack_questions, packed_hidden,
                                          split_inputs, stage2_losses, video_block_embeddings)

from .test_train import FRAMES, make_dataset, tiny_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("ground"), 3)
    ds["tok"] = prompt_tokenizer(ds["root"] / "tok")
    ds["source"] = GroundingSource(ds["root"] / "data", ds["split"].summary["scenes"], ds["cfg"].vision.pooled_grid,
                                   ds["tok"])
    return ds


def inputs(ds, model):
    split, sp = ds["split"], ds["special"]
    scenes = np.arange(split.num_scenes)
    batch = pack_questions(split, scenes, None, 12, sp["pos"], sp["ori"], sp["pad"])
    inp = split_inputs(split, scenes)
    feats, cams = frozen_inputs(model, inp["vision"], inp["pose"])
    prefix = torch.from_numpy(split["prefix_ids"].astype(np.int64))
    return prefix, feats, cams, batch, inp


def targets_for(ds, model, batch, feats, opts):
    tp = int(ds["split"]["prefix_ids"].shape[-1])
    n = model.cfg.vision.tokens_per_frame
    video_len = tp + FRAMES * (n + 1) + 1
    return grounding_targets(ds["source"], batch, ds["special"]["pos"], ds["special"]["ori"], video_len, tp,
                             FRAMES, n + 1, opts), video_len, tp


def test_token_coverage_by_hand():
    inst = np.zeros((1, 4, 4), np.uint8)
    inst[0, :2, :2] = 1  # object 0 fills the top-left token
    inst[0, 0, 2] = 2  # object 1: one pixel of the top-right token
    inst[0, 3, 0:2] = 2  # and half of the bottom-left token
    cov = token_coverage(inst, 2, 2)
    assert cov.shape == (1, 4, 2)
    np.testing.assert_allclose(cov[0, :, 0], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(cov[0, :, 1], [0.0, 0.25, 0.5, 0.0])
    with pytest.raises(Loc3rError, match="do not split into a 3x3 token grid"):
        token_coverage(inst, 2, 3)


def test_target_tokens_threshold_and_small_objects():
    cov = np.array([[0.5, 0.2, 0.1, 0.0]])
    assert target_tokens(cov, 0.2).tolist() == [[True, True, False, False]]
    small = np.array([[0.08, 0.03, 0.05, 0.0]])  # never reaches 0.2: tokens with half its best coverage
    assert target_tokens(small, 0.2).tolist() == [[True, False, True, False]]
    assert not target_tokens(np.zeros((2, 3)), 0.2).any()


def test_find_mentions_in_text_order():
    names = [np.array([7, 8]), np.array([9, 8]), np.array([7, 5])]
    ids = np.array([1, 9, 8, 2, 7, 8, 3, 7])  # "9 8" at 1..2, "7 8" at 4..5; "7 5" never
    assert find_mentions(ids, names) == [(2, 1), (5, 0)]
    assert find_mentions(np.array([7]), names) == []


def test_targets_point_at_names_special_tokens_and_shown_objects(dataset):
    model = tiny_model(dataset["cfg"])
    _, feats, _, batch, _ = inputs(dataset, model)
    opts = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1)
    tg, video_len, tp = targets_for(dataset, model, batch, feats, opts)
    tok, sp = dataset["tok"], dataset["special"]
    ids = batch.suffix_ids.numpy()
    assert tg.readout_rows and tg.object_rows and len(tg.readout_rows) % 2 == 0
    assert len(tg.object_keys) == len(tg.object_rows) == len(tg.object_centres)
    n = model.cfg.vision.tokens_per_frame
    vision_pos = {tp + f * (n + 1) + 1 + j for f in range(FRAMES) for j in range(n)}
    for (b, row), keys, centre in zip(tg.object_rows, tg.object_keys, tg.object_centres):
        # The query is the last word of an object name; its keys are vision tokens showing that object.
        word = tok._tok.id_to_token(int(ids[b, row - video_len])).lstrip("▁")
        scene = int(batch.scene[b])
        info = json.loads((dataset["root"] / "data" / "scenes" / f"{dataset['split'].summary['scenes'][scene]}.json")
                          .read_text())
        obj = [o for o in info["objects"] if np.allclose(o["center"], centre)]
        assert len(obj) == 1 and obj[0]["name"].split()[-1] == word
        assert len(keys) and set(int(k) for k in keys) <= vision_pos
        o = info["objects"].index(obj[0])
        cov = dataset["source"].coverage[scene][:, :, o]
        for k in keys:
            f, j = divmod(int(k) - tp, n + 1)
            assert cov[f, j - 1] > 0
    for i in range(0, len(tg.readout_rows), 2):
        (b, pos_row), (b2, ori_row) = tg.readout_rows[i], tg.readout_rows[i + 1]
        assert b == b2 and ori_row == pos_row + 1
        assert ids[b, pos_row - video_len] == sp["pos"] and ids[b, ori_row - video_len] == sp["ori"]
        anchors, _ = tg.readout_keys[i]
        _, last = tg.readout_keys[i + 1]
        # Anchors come before the last name; all are name tokens before <Pos> in the same block.
        assert len(last) == 1 and len(anchors) >= 1 and max(anchors) < last[0] < pos_row
        np.testing.assert_array_equal(tg.readout_keys[i + 1][0], anchors)


def test_direction_targets_point_along_the_true_heading(dataset):
    model = tiny_model(dataset["cfg"])
    _, feats, _, batch, _ = inputs(dataset, model)
    opts = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1, direction_weight=1.0)
    tg, video_len, _ = targets_for(dataset, model, batch, feats, opts)
    ori_rows = tg.readout_rows[1::2]
    assert tg.direction_rows and set(tg.direction_rows) <= set(ori_rows)
    seg = batch.segment.numpy()
    for (b, row), vec in zip(tg.direction_rows, tg.direction_vectors):
        slot = seg[b, row - video_len]
        heading = float(batch.heading[b, slot])
        # Its angle is the situation's heading, its length the distance to the object named last.
        np.testing.assert_allclose([np.cos(heading), np.sin(heading)], vec / np.hypot(*vec), atol=1e-4)
        scene = int(batch.scene[b])
        centres = dataset["source"].centres[scene]
        start = row - 1 - video_len - int(batch.offset[b, row - 1 - video_len])
        last = find_mentions(batch.suffix_ids.numpy()[b, start:row - 1 - video_len],
                             dataset["source"].names[scene])[-1][1]
        np.testing.assert_allclose(np.hypot(*vec), np.hypot(*(centres[last] - batch.position[b, slot].numpy())),
                                   rtol=1e-5)


def test_direction_term_adds_the_facing_vectors_position_loss(dataset):
    from loc3r.model.losses import position_loss

    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = inputs(dataset, model)
    args = (model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
    plain = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1)
    with_dir = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1, direction_weight=0.5)
    base = stage2_losses(*args, (dataset["source"], plain))
    out = stage2_losses(*args, (dataset["source"], with_dir))
    assert "ground_dir_m" not in base
    tg, _, _ = targets_for(dataset, model, batch, feats, with_dir)
    video = video_block_embeddings(model, prefix, feats, cams)
    with torch.no_grad():
        hidden = packed_hidden(model, video, batch)
        bi = torch.tensor([r[0] for r in tg.direction_rows])
        ti = torch.tensor([r[1] for r in tg.direction_rows])
        pred = model.position_head(hidden[bi, ti])
        truth = torch.from_numpy(np.stack(tg.direction_vectors))
        expected = position_loss(pred, truth)
    torch.testing.assert_close(out["ground"], base["ground"] + 0.5 * expected)
    torch.testing.assert_close(out["ground_dir_m"], (pred[:, :2] - truth).norm(dim=-1).mean())


ANSWER = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1, answer_weight=1.0, answer_layer=1)


def test_answer_targets_point_at_question_names_and_the_situation(dataset):
    from loc3r.synthetic.train_data import IGNORE

    model = tiny_model(dataset["cfg"])
    _, feats, _, batch, _ = inputs(dataset, model)
    plain, _, _ = targets_for(dataset, model, batch, feats, GroundingOptions(weight=1.0, object_layer=0,
                                                                             readout_layer=1))
    assert not plain.answer_rows and not plain.ego_rows
    tg, video_len, _ = targets_for(dataset, model, batch, feats, ANSWER)
    assert tg.answer_rows and len(tg.answer_rows) == len(tg.answer_keys)
    ids, labels, seg = batch.suffix_ids.numpy(), batch.labels.numpy(), batch.segment.numpy()
    sp, tok = dataset["special"], dataset["tok"]
    names = {tok._tok.id_to_token(int(n[-1])) for s in dataset["source"].names for n in s}
    for (b, row), (name_keys, loc_keys) in zip(tg.answer_rows, tg.answer_keys):
        i = row - video_len
        # The query predicts the answer's first token: its own label is not an answer, the next one is.
        assert labels[b, i] == IGNORE and labels[b, i + 1] != IGNORE and seg[b, i] == seg[b, i + 1]
        pos, ori = (int(k) - video_len for k in loc_keys)
        assert ids[b, pos] == sp["pos"] and ids[b, ori] == sp["ori"] and seg[b, pos] == seg[b, i]
        # Name keys: object names of this block's question, after <Ori>; they join the object hop when shown.
        assert len(name_keys) >= 1
        for k in name_keys:
            assert ori < k - video_len < i and tok._tok.id_to_token(int(ids[b, k - video_len])) in names
    assert len(tg.object_rows) > len(plain.object_rows)
    assert set(plain.object_rows) < set(tg.object_rows)


def test_ego_vectors_put_left_answers_on_the_left(dataset):
    model = tiny_model(dataset["cfg"])
    _, feats, _, batch, _ = inputs(dataset, model)
    tg, video_len, _ = targets_for(dataset, model, batch, feats, ANSWER)
    assert tg.ego_rows and set(tg.ego_rows) <= set(tg.answer_rows)
    tok = dataset["tok"]
    labels, seg = batch.labels.numpy(), batch.segment.numpy()
    sides = 0
    for (b, row), vec in zip(tg.ego_rows, tg.ego_vectors):
        i = row - video_len
        slot = seg[b, i]
        answer = tok._tok.id_to_token(int(labels[b, i + 1])).lstrip("\u2581")
        scene = int(batch.scene[b])
        ori = int(dict(zip(tg.answer_rows, tg.answer_keys))[(b, row)][1][1]) - video_len
        first = find_mentions(batch.suffix_ids.numpy()[b, ori + 1:i + 1], dataset["source"].names[scene])[0][1]
        centre = dataset["source"].centres[scene][first]
        # Same length as the speaker-to-object vector, rotated into the speaker's frame.
        d = centre - batch.position[b, slot].numpy()
        np.testing.assert_allclose(np.hypot(*vec), np.hypot(*d), rtol=1e-5)
        h = float(batch.heading[b, slot])
        np.testing.assert_allclose(vec[0], np.cos(h) * d[0] + np.sin(h) * d[1], atol=1e-4)
        if answer in ("left", "right"):
            sides += 1
            assert (vec[1] > 0) == (answer == "left")
    assert sides > 0


def test_answer_term_logs_its_mass_and_ego_error(dataset):
    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = inputs(dataset, model)
    args = (model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
    out = stage2_losses(*args, (dataset["source"], ANSWER))
    tg, _, _ = targets_for(dataset, model, batch, feats, ANSWER)
    video = video_block_embeddings(model, prefix, feats, cams)
    captured = {}
    with torch.no_grad():
        hidden = packed_hidden(model, video, batch, captured)
        p = attention_rows(model.language_model.layers[1], captured[1], captured["cos"], captured["sin"],
                           captured["mask"], tg.answer_rows)
        half = p.shape[1] // 2
        masses = []
        for r, (names, loc) in enumerate(tg.answer_keys):
            masses.append((p[r, :half].mean(0)[torch.as_tensor(names)].sum()
                           + p[r, half:].mean(0)[torch.as_tensor(loc)].sum()) / 2)
        bi = torch.tensor([r[0] for r in tg.ego_rows])
        ti = torch.tensor([r[1] for r in tg.ego_rows])
        pred = model.position_head(hidden[bi, ti])[:, :2]
    torch.testing.assert_close(out["ground_ans"], torch.stack(masses).mean())
    truth = torch.from_numpy(np.stack(tg.ego_vectors))
    torch.testing.assert_close(out["ground_ego_m"], (pred - truth).norm(dim=-1).mean())
    assert out["ground"].requires_grad


def test_attention_rows_match_the_layers_attention(dataset):
    model = tiny_model(dataset["cfg"], seed=3)
    prefix, feats, cams, batch, _ = inputs(dataset, model)
    video = video_block_embeddings(model, prefix, feats, cams)
    captured = {}
    with torch.no_grad():
        packed_hidden(model, video, batch, captured)
        layer = model.language_model.layers[1]
        x = captured[1]
        rows = [(0, 5), (1, x.shape[1] - 1), (0, video.shape[1] + 3)]
        probs = attention_rows(layer, x, captured["cos"], captured["sin"], captured["mask"], rows)
        at = layer.self_attn
        xn = layer.input_layernorm(x)
        b, t, _ = x.shape
        v = at.v_proj(xn).view(b, t, at.num_kv_heads, at.head_dim).transpose(1, 2)
        q = apply_rope(at.q_proj(xn).view(b, t, at.num_heads, at.head_dim).transpose(1, 2), captured["cos"],
                       captured["sin"])
        k = apply_rope(at.k_proj(xn).view(b, t, at.num_kv_heads, at.head_dim).transpose(1, 2), captured["cos"],
                       captured["sin"])
        for i, (bi, ti) in enumerate(rows):
            # probs @ V reproduces the model's own attention output for that query.
            ref = grouped_query_attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], captured["mask"][bi, 0, 0])
            mine = torch.einsum("ht,htd->hd", probs[i], v[bi].repeat_interleave(at.num_heads // at.num_kv_heads, 0))
            torch.testing.assert_close(mine, ref[0, :, ti], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(probs[i].sum(-1), torch.ones(at.num_heads))


def test_uniform_attention_gives_the_key_share(dataset):
    """With q = k = 0 every query attends uniformly to what it may see: the object hop's mass is
    (its keys) / (keys visible to it), exactly."""
    model = tiny_model(dataset["cfg"])
    for layer in model.language_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
    prefix, feats, cams, batch, inp = inputs(dataset, model)
    opts = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1)
    tg, video_len, _ = targets_for(dataset, model, batch, feats, opts)
    out = stage2_losses(model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights(),
                        (dataset["source"], opts))
    offset = batch.offset.numpy()
    share = [len(keys) / (video_len + offset[b, row - video_len] + 1)
             for (b, row), keys in zip(tg.object_rows, tg.object_keys)]
    torch.testing.assert_close(out["ground_obj"], torch.tensor(float(np.mean(share))), rtol=1e-5, atol=1e-7)


def test_stage2_total_adds_the_weighted_grounding_term(dataset):
    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = inputs(dataset, model)
    args = (model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
    base = stage2_losses(*args)
    opts = GroundingOptions(weight=0.7, object_layer=0, readout_layer=1)
    out = stage2_losses(*args, (dataset["source"], opts))
    assert "ground" not in base
    assert 0 < float(out["ground_obj"]) < 1 and 0 < float(out["ground_read"]) < 1
    torch.testing.assert_close(out["loss"], base["loss"] + 0.7 * out["ground"])
    out["loss"].backward()
    # The term reaches the query/key projections of both supervised layers.
    for layer in model.language_model.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0


def test_grounding_raises_the_supervised_attention(dataset):
    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = inputs(dataset, model)
    opts = GroundingOptions(weight=1.0, object_layer=0, readout_layer=1)
    params = [p for p in model.language_model.parameters()] + list(model.f_pos.parameters())
    optim = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(30):
        out = stage2_losses(model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"],
                            LossWeights(), (dataset["source"], opts))
        first = first or {k: float(out[k].detach()) for k in ("ground", "ground_obj", "ground_read")}
        optim.zero_grad()
        out["ground"].backward()
        optim.step()
    assert float(out["ground"]) < 0.5 * first["ground"]
    assert float(out["ground_obj"]) > 2 * first["ground_obj"] and float(out["ground_read"]) > 2 * first["ground_read"]


def test_train_with_grounding_logs_its_terms(dataset, tmp_path):
    from loc3r.synthetic.train_run import TrainOptions, train

    root = dataset["root"]
    opts = TrainOptions(out=tmp_path / "run", data=root / "data", val_data=root / "data", preset="test-tiny",
                        minutes=0.04, stage1_share=0.3, val_scenes=2,
                        stage1=Stage1Options(vision_frames=4, pose_clips=1, pose_frames=FRAMES),
                        stage2=Stage2Options(scenes_per_step=2, grounding=GroundingOptions(
                            weight=1.0, object_layer=0, readout_layer=1, answer_weight=0.5, answer_layer=1)))
    train(opts)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    steps = [r for r in log["records"] if r["stage"] == 2]
    assert steps and all(np.isfinite(r["ground"]) and 0 <= r["ground_obj"] <= 1 for r in steps)
    assert all(0 <= r["ground_ans"] <= 1 and np.isfinite(r["ground_ego_m"]) for r in steps)
    assert log["meta"]["options"]["stage2"]["grounding"]["weight"] == 1.0


def test_train_rejects_layers_the_model_lacks(dataset, tmp_path):
    from loc3r.synthetic.train_run import TrainOptions, train

    root = dataset["root"]
    opts = TrainOptions(out=tmp_path / "run", data=root / "data", val_data=root / "data", preset="test-tiny",
                        stage="2", init=None, minutes=0.01,
                        stage2=Stage2Options(grounding=GroundingOptions(weight=1.0, object_layer=0,
                                                                        readout_layer=2)))
    with pytest.raises(Loc3rError, match=r"grounding readout layer must be in \[0, 1\], got 2"):
        train(opts)


@pytest.mark.parametrize("args, message", [
    (["--grounding-weight", "-1"], "--grounding-weight must be 0 or more, got -1.0"),
    (["--grounding-layers", "2"], "--grounding-layers must be two or three layer indices 'OBJECT,READOUT[,ANSWER]', got '2'"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--grounding-answer", "-1"], "--grounding-answer must be 0 or more, got -1.0"),
    (["--grounding-answer", "1"], "--grounding-answer is part of the grounding term: use it with "
                                  "--grounding-weight"),
    (["--grounding-layers", "1,2,3,4"], "--grounding-layers must be two or three layer indices"),
    (["--grounding-direction", "-0.5"], "--grounding-direction must be 0 or more, got -0.5"),
    (["--grounding-direction", "1"], "--grounding-direction is part of the grounding term: use it with "
                                     "--grounding-weight"),
])
def test_cli_rejects_bad_grounding_options(tmp_path, args, message):
    from click.testing import CliRunner

    from loc3r.synthetic.train_cli import train

    result = CliRunner().invoke(train, ["--out", str(tmp_path / "o"), "--data", str(tmp_path), "--val-data",
                                        str(tmp_path), *args])
    assert result.exit_code != 0
    assert message in result.output
