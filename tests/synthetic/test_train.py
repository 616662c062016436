"""loc3r-tiny training pieces on a 2-scene dataset and the test-tiny preset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loc3r.errors import Loc3rError
from loc3r.model.config import get_config
from loc3r.model.losses import LossWeights
from loc3r.synthetic.train_data import (IGNORE, CachedSplit, build_cache, model_config_with_tokens, patch_labels,
                                        prompt_tokenizer, write_tokenizer_files)
from loc3r.synthetic.train_drills import DRILL_QUESTION, DrillSource, curriculum_frames, read_scene_objects, step_split
from loc3r.synthetic.train_stage1 import NUM_COLOUR, NUM_SEMANTIC, Stage1Options, VisionProbe, stage1_parameters, \
    stage1_step
from loc3r.synthetic.train_stage2 import (Stage2Options, frozen_inputs, pack_questions, packed_attention_mask,
                                          packed_hidden, split_inputs, stage2_losses, stage2_parameters,
                                          video_block_embeddings)

FRAMES = 4


def make_dataset(root, scenes: int) -> dict:
    """``scenes`` synthetic train scenes of FRAMES 32 px frames, the tokenizer and the test-tiny cache."""
    from loc3r.synthetic.dataset import SynthOptions, synthesize

    synthesize(root / "data", "train", 0, scenes, SynthOptions(frames=FRAMES, size=(32, 32), bev_grid=2,
                                                               write_video=False), progress=False)
    special = write_tokenizer_files(root / "tok")
    cfg = model_config_with_tokens(get_config("test-tiny"), special)
    build_cache(root / "data", root / "cache.npz", cfg, root / "tok", progress=False)
    return {"root": root, "cfg": cfg, "special": special, "split": CachedSplit(root / "cache.npz")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train"), 2)


def tiny_model(cfg, seed=0):
    from loc3r.model.loc3r_vlm import Loc3RVLM
    from loc3r.synthetic.train_run import init_language_weights

    torch.manual_seed(seed)
    model = Loc3RVLM(cfg)
    init_language_weights(model)
    return model


def stage2_inputs(ds, model, max_questions=6):
    split, sp = ds["split"], ds["special"]
    scenes = np.arange(split.num_scenes)
    batch = pack_questions(split, scenes, None, max_questions, sp["pos"], sp["ori"], sp["pad"])
    inp = split_inputs(split, scenes)
    feats, cams = frozen_inputs(model, inp["vision"], inp["pose"])
    prefix = torch.from_numpy(split["prefix_ids"].astype(np.int64))
    return prefix, feats, cams, batch, inp


def test_cache_shapes_and_labels(dataset):
    split, cfg = dataset["split"], dataset["cfg"]
    g = cfg.vision.grid
    assert split["vision"].shape == (2, FRAMES, 3, 32, 32)
    assert split["pose"].shape == (2, FRAMES, 3, cfg.pose_prior.img_height, cfg.pose_prior.img_width)
    assert split["semantic"].shape == split["colour"].shape == split["depth"].shape == (2, FRAMES, g, g)
    assert split["bev_targets"].shape == (2, FRAMES, 2, 2, 2)
    assert split["pose7"].shape == (2, FRAMES, 7)
    assert int(split["semantic"].max()) < NUM_SEMANTIC and int(split["colour"].max()) < NUM_COLOUR
    b = split.question_batch(np.arange(split.num_questions))
    tok = prompt_tokenizer(dataset["root"] / "tok")
    labels = json.loads((dataset["root"] / "cache.json").read_text())
    rows = [json.loads(x) for x in (dataset["root"] / "data" / "labels.jsonl").read_text().splitlines()]
    assert labels["label_ids"] == [r["id"] for r in rows]
    for i, row in enumerate(rows):
        answer_ids = [t for t in b["labels"][i] if t != IGNORE]
        assert answer_ids[-1] == dataset["special"]["eos"]
        assert tok.decode(answer_ids) == row["answer"].lower()
        assert bool(b["has_situation"][i]) == (row["situation"] is not None)


def test_patch_labels_by_hand():
    sem = np.zeros((1, 4, 4), np.uint8)
    sem[0, :2, :2] = 7  # top-left patch: class 7
    sem[0, 2:, 2:] = [[3, 3], [3, 1]]  # bottom-right: majority 3
    inst = np.zeros((1, 4, 4), np.uint8)
    inst[0, :2, :2] = 2  # object index 1 -> colour 4
    depth = np.ones((1, 4, 4), np.float32)
    depth[0, :2, 2:] = [[2.0, 0.0], [4.0, 0.0]]  # zeros are invalid
    s, c, d = patch_labels(sem, inst, depth, [0, 4], size=4, grid=2)
    assert s.tolist() == [[[7, 0], [0, 3]]]
    assert c.tolist() == [[[5, 0], [0, 0]]]
    np.testing.assert_allclose(d, [[[1.0, 3.0], [1.0, 1.0]]])


def test_packed_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, -1]])
    allowed = (packed_attention_mask(2, seg)[0, 0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 1, 0],
                       [1, 1, 0, 0, 0, 1]]


def test_packed_rows_match_separate_forwards(dataset):
    model = tiny_model(dataset["cfg"]).eval()
    split = dataset["split"]
    prefix, feats, cams, batch, inp = stage2_inputs(dataset, model)
    with torch.no_grad():
        video = video_block_embeddings(model, prefix, feats, cams)
        hidden = packed_hidden(model, video, batch)
    v = video.shape[1]
    checked = 0
    for i in range(2):
        for j, q in enumerate(batch.question_rows[i]):
            ids = torch.from_numpy(split["q_ids"][q, :split["q_len"][q]].astype(np.int64))[None]
            with torch.no_grad():
                ref = model(prefix[None], inp["vision"][i:i + 1], ids, inp["pose"][i:i + 1])
            mine = hidden[i, v:][batch.segment[i] == j]
            torch.testing.assert_close(mine, ref.hidden[0, v:], atol=1e-5, rtol=1e-4)
            if batch.loc_valid[i, j]:
                torch.testing.assert_close(model.position_head(hidden[i, v + batch.pos_index[i, j]]), ref.position[0],
                                           atol=1e-5, rtol=1e-4)
            checked += 1
        torch.testing.assert_close(hidden[i, :v], ref.hidden[0, :v], atol=1e-5, rtol=1e-4)
    assert checked >= 4


@pytest.mark.parametrize("weights", [LossWeights(), LossWeights(bev=0.0)])
def test_stage2_total_is_weighted_sum(dataset, weights):
    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = stage2_inputs(dataset, model)
    out = stage2_losses(model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], weights)
    assert bool(batch.loc_valid.any())
    by_hand = out["ce"] + weights.bev * out["bev"] + 0.075 * (out["pos"] + 3.5 * out["ori"])
    torch.testing.assert_close(out["loss"], by_hand)
    assert weights.bev in (0.0, 0.05) and float(out["bev"].detach()) != 0.0


def test_stage2_early_bev_is_the_bev_loss_at_a_layer_input(dataset):
    from loc3r.model.losses import bev_loss
    from loc3r.synthetic.train_stage2 import video_block_embeddings

    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = stage2_inputs(dataset, model)
    args = (model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
    base = stage2_losses(*args)
    out = stage2_losses(*args, early_bev_layer=0)
    torch.testing.assert_close(out["loss"], base["loss"] + 0.05 * out["bev_early"])
    # Layer 0's input is the embeddings themselves: the BEV head on the normed vision tokens.
    video = video_block_embeddings(model, prefix, feats, cams)
    b, f = feats.shape[:2]
    n = model.cfg.vision.tokens_per_frame
    per = n + 1
    tp = prefix.shape[-1]
    tokens = model.language_model.norm(video[:, tp:tp + f * per]).reshape(b, f, per, -1)[:, :, 1:]
    ref = bev_loss(model.bev_head(tokens), inp["bev_targets"].reshape(b, f, n, 2), inp["bev_valid"].reshape(b, f, n))
    torch.testing.assert_close(out["bev_early"], ref)
    assert float(stage2_losses(*args, early_bev_layer=1)["bev_early"]) != float(out["bev_early"])


def test_stage2_steps_decrease_loss_and_freeze_encoders(dataset):
    model = tiny_model(dataset["cfg"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_tower.", "pose_prior."))}
    params = stage2_parameters(model)
    assert not any(p is q for p in params for q in model.vision_tower.parameters())
    optim = torch.optim.AdamW(params, lr=3e-3)
    prefix, feats, cams, batch, inp = stage2_inputs(dataset, model)
    losses = []
    for _ in range(6):
        out = stage2_losses(model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_stage1_steps_decrease_loss(dataset):
    model = tiny_model(dataset["cfg"])
    probe = VisionProbe(model.cfg.vision.hidden_size)
    params = stage1_parameters(model, probe)
    optim = torch.optim.AdamW(params, lr=1e-3)
    opts = Stage1Options(vision_frames=4, pose_clips=2, pose_frames=FRAMES)
    losses = []
    for _ in range(6):
        out = stage1_step(model, probe, dataset["split"], np.random.default_rng(0), opts)  # same batch each time
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        losses.append(float(out["loss"]))
    assert set(out) >= {"semantic", "colour", "depth", "translation", "rotation", "loss"}
    assert losses[-1] < losses[0]


def test_train_writes_round_tripping_checkpoint(dataset, tmp_path):
    from loc3r.model.checkpoint import load_checkpoint
    from loc3r.synthetic.train_run import TrainOptions, train

    root = dataset["root"]
    opts = TrainOptions(out=tmp_path / "run", data=root / "data", val_data=root / "data", preset="test-tiny",
                        minutes=0.05, stage1_share=0.5, val_scenes=2,
                        stage1=Stage1Options(vision_frames=4, pose_clips=1, pose_frames=FRAMES))
    final = train(opts)
    assert final == tmp_path / "run" / "checkpoint"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.json"):
        assert (final / name).is_file()
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert {r["stage"] for r in log["records"]} == {1, 2}
    assert any(r["kind"] == "val" for r in log["records"])
    loaded = load_checkpoint(final)
    assert loaded.cfg.pos_token_id == dataset["special"]["pos"]
    assert loaded.cfg.eos_token_id == dataset["special"]["eos"]
    stage1 = load_checkpoint(tmp_path / "run" / "stage1")
    for k, v in stage1.vision_tower.state_dict().items():  # stage 2 kept the encoders frozen
        assert torch.equal(v, loaded.vision_tower.state_dict()[k])
    prompt_tokenizer(final)  # the template and special ids agree with the tokenizer


def test_cli_eval_needs_test_data(tmp_path):
    from click.testing import CliRunner

    from loc3r.synthetic.train_cli import train

    result = CliRunner().invoke(train, ["--out", str(tmp_path), "--stage", "eval", "--data", str(tmp_path),
                                        "--val-data", str(tmp_path)])
    assert result.exit_code != 0
    assert "--stage eval needs --test-data" in result.output


def test_frozen_features_match_per_step_encoders(dataset):
    """Stage 2 runs the frozen encoders once per split; the table must equal the per-batch outputs."""
    from loc3r.synthetic.train_stage2 import FrozenFeatures

    model = tiny_model(dataset["cfg"]).eval()
    split = dataset["split"]
    table = FrozenFeatures(model, split, chunk=1, progress=False)
    scenes = np.array([1, 0, 1])
    feats, cams = table(scenes)
    inp = split_inputs(split, scenes)
    ref_feats, ref_cams = frozen_inputs(model, inp["vision"], inp["pose"])
    assert feats.dtype == torch.float32 and feats.shape == ref_feats.shape
    torch.testing.assert_close(feats, ref_feats, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(cams, ref_cams, atol=2e-3, rtol=2e-3)


def test_pose_clip_curriculum():
    opts = Stage1Options(pose_frames=16, pose_curriculum=0.5)
    assert [opts.max_clip_frames(f) for f in (0.0, 0.1, 0.25, 0.49, 0.5, 0.9)] == [2, 4, 9, 15, 16, 16]
    rng = np.random.default_rng(0)
    assert {opts.clip_frames(0.0, rng) for _ in range(20)} == {2}
    assert {opts.clip_frames(0.25, rng) for _ in range(400)} == set(range(2, 10))
    assert Stage1Options(pose_frames=16, pose_curriculum=0.0).clip_frames(0.0, rng) == 16


@pytest.mark.parametrize("parts", ["vision", "pose"])
def test_stage1_parts_train_only_their_encoder(dataset, parts):
    model = tiny_model(dataset["cfg"])
    probe = VisionProbe(model.cfg.vision.hidden_size)
    params = stage1_parameters(model, probe, parts)
    vision_ids = {id(p) for p in model.vision_tower.parameters()}
    pose_ids = {id(p) for p in model.pose_prior.parameters()}
    ids = {id(p) for p in params}
    assert (ids & vision_ids == vision_ids) == (parts == "vision")
    assert (ids & pose_ids == pose_ids) == (parts == "pose")
    assert not ids & (pose_ids if parts == "vision" else vision_ids)
    opts = Stage1Options(vision_frames=2, pose_clips=1, pose_frames=FRAMES, parts=parts, pose_curriculum=0.5)
    out = stage1_step(model, probe, dataset["split"], np.random.default_rng(0), opts, frac=0.0)
    assert ("rotation" in out) == (parts == "pose") and ("semantic" in out) == (parts == "vision")
    out["loss"].backward()
    assert all(p.grad is None for p in (model.pose_prior if parts == "vision" else model.vision_tower).parameters())


def test_stage1_parts_rejects_unknown(dataset):
    from loc3r.errors import Loc3rError

    model = tiny_model(dataset["cfg"])
    with pytest.raises(Loc3rError, match="stage-1 parts must be both, vision or pose, got 'all'"):
        stage1_parameters(model, VisionProbe(model.cfg.vision.hidden_size), "all")


def test_pose_bev_loss_by_hand():
    """Tokens on a 2 x 2 patch grid pool to a 1 x 1 BEV grid; the probe is made the identity on 2 dims."""
    from types import SimpleNamespace

    from loc3r.synthetic.train_stage1 import PoseProbe, pose_bev_loss

    probe = PoseProbe(2)
    probe.norm = torch.nn.Identity()
    with torch.no_grad():
        probe.out.weight.copy_(torch.eye(2))
        probe.out.bias.zero_()
    prior = SimpleNamespace(cfg=SimpleNamespace(img_height=32, img_width=32, patch_size=16))
    tokens = torch.tensor([[[[1.0, 2.0], [3.0, 2.0], [1.0, 6.0], [3.0, 6.0]]]])  # (B=1, F=1, N=4, D=2): mean (2, 4)
    bev = torch.tensor([[[[[2.5, 3.0]]]]])  # (1, 1, 1, 1, 2)
    got = pose_bev_loss(prior, probe, tokens, bev, torch.ones(1, 1, 1, 1))
    assert float(got) == pytest.approx(0.5 + 1.0)
    assert float(pose_bev_loss(prior, probe, tokens, bev, torch.zeros(1, 1, 1, 1))) == 0.0


def test_load_encoders_skips_a_pose_prior_of_another_shape(dataset, tmp_path):
    import dataclasses

    from loc3r.errors import Loc3rError
    from loc3r.model.checkpoint import save_checkpoint
    from loc3r.synthetic.train_run import load_encoders

    save_checkpoint(tiny_model(dataset["cfg"], seed=1), tmp_path / "old")  # 3-channel pose images
    cfg = dataset["cfg"]
    prev = cfg.replace(pose_prior=dataclasses.replace(cfg.pose_prior, previous_frame=True))
    model = tiny_model(prev, seed=2)
    before = {k: v.clone() for k, v in model.pose_prior.state_dict().items()}
    load_encoders(model, tmp_path / "old", pose_prior_optional=True)
    old = tiny_model(dataset["cfg"], seed=1)
    for k, v in model.vision_tower.state_dict().items():
        torch.testing.assert_close(v, old.vision_tower.state_dict()[k])
    for k, v in model.pose_prior.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with pytest.raises(Loc3rError, match="has a pose prior of another shape than test-tiny's"):
        load_encoders(tiny_model(prev), tmp_path / "old")


def test_load_full_continues_every_weight_and_checks_the_config(dataset, tmp_path):
    from loc3r.errors import Loc3rError
    from loc3r.model.checkpoint import save_checkpoint
    from loc3r.synthetic.train_run import load_full

    save_checkpoint(tiny_model(dataset["cfg"], seed=1), tmp_path / "run")
    model = tiny_model(dataset["cfg"], seed=2)
    load_full(model, tmp_path / "run")
    ref = tiny_model(dataset["cfg"], seed=1).state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    other = tiny_model(dataset["cfg"].replace(use_camera_tokens=False, pose_prior=None))
    with pytest.raises(Loc3rError, match=r"^--resume: .* is a test-tiny checkpoint of another configuration "
                                         r"than this run's test-tiny$"):
        load_full(other, tmp_path / "run")


def test_cli_resume_needs_stage_2(tmp_path):
    from click.testing import CliRunner

    from loc3r.synthetic.train_cli import train

    res = CliRunner().invoke(train, ["--out", str(tmp_path / "o"), "--data", str(tmp_path), "--val-data",
                                     str(tmp_path), "--stage", "1", "--resume"])
    assert res.exit_code != 0
    assert "--resume continues a stage-2 run: use it with --stage 2" in res.output


def test_cli_steps_budget_stage_2_only(tmp_path):
    from click.testing import CliRunner

    from loc3r.synthetic.train_cli import train

    res = CliRunner().invoke(train, ["--out", str(tmp_path / "o"), "--data", str(tmp_path), "--val-data",
                                     str(tmp_path), "--stage", "1", "--steps", "10"])
    assert res.exit_code != 0
    assert "--steps budgets stage 2: use a positive count with --stage 2, got 10" in res.output


def test_timed_loop_with_a_step_budget_runs_exactly_those_steps():
    from loc3r.synthetic.train_run import timed_loop

    fracs, vals = [], []

    def step_fn(step, frac):
        fracs.append(frac)
        return {}

    steps = timed_loop(1e-9, "t", step_fn, vals.append, lambda s: None, 1e9, 1e9, max_steps=5)
    assert steps == 5 and fracs == [0.0, 0.2, 0.4, 0.6, 0.8] and vals == [5]


# --- stage 2 frame curriculum and situation drills (synthetic/train_drills.py) ---


def test_curriculum_frames_grow_from_one_to_the_clip():
    rng = np.random.default_rng(0)
    assert {curriculum_frames(f, 0.0, 16, rng) for f in (0.0, 0.5, 1.0)} == {16}
    assert {curriculum_frames(0.0, 0.5, 16, rng) for _ in range(20)} == {1}
    mid = [curriculum_frames(0.25, 0.5, 16, rng) for _ in range(200)]  # m = 1 + round(15 * 0.5) = 9
    assert min(mid) == 5 and max(mid) == 9
    late = {curriculum_frames(0.9, 0.5, 16, rng) for _ in range(200)}
    assert late == set(range(8, 17))


def test_drills_name_shown_objects_with_their_truth(dataset):
    root = dataset["root"]
    split = dataset["split"]
    ids = split.summary["scenes"]
    source = DrillSource(root / "data", ids)
    rng = np.random.default_rng(1)
    for frames in (1, FRAMES):
        drills = source.drills(range(len(ids)), frames, 20, rng)
        assert drills
        for d in drills:
            info = json.loads((root / "data" / "scenes" / f"{ids[d.scene]}.json").read_text())
            objects = {o["name"]: o for o in info["objects"]}
            obj = read_scene_objects(root / "data", ids[d.scene])
            behind = " behind me." in d.situation
            a = d.situation.removeprefix("I am sitting on the ").split(",")[0].split(" with the ")[0]
            b = d.situation.split(" the ")[-1].removesuffix(" behind me.").removesuffix(".")
            assert a != b and a in objects and b in objects
            # The anchor object is shown in the step's frames; the position is its centre.
            assert obj.pixels[:frames, obj.names.index(a)].sum() >= source.min_pixels
            assert d.position == pytest.approx(tuple(objects[a]["center"]))
            v = np.subtract(objects[b]["center"], objects[a]["center"])
            toward = math.degrees(math.atan2(v[1], v[0]))
            diff = (d.heading_deg - toward - (180.0 if behind else 0.0) + 180.0) % 360.0 - 180.0
            assert abs(diff) < 1e-6 and -180.0 <= d.heading_deg < 180.0 + 1e-9


def test_drill_blocks_train_localization_only(dataset):
    split, sp = dataset["split"], dataset["special"]
    tok = prompt_tokenizer(dataset["root"] / "tok")
    source = DrillSource(dataset["root"] / "data", split.summary["scenes"])
    scenes = np.arange(split.num_scenes)
    drills = source.drills(scenes, FRAMES, 2, np.random.default_rng(0))
    arrays = step_split(split, scenes, drills, tok, with_questions=False, pad_id=sp["pad"])
    assert len(arrays["q_scene"]) == len(drills)
    assert np.array_equal(arrays["q_answer_start"], arrays["q_len"])
    batch = pack_questions(arrays, scenes, None, 8, sp["pos"], sp["ori"], sp["pad"])
    assert bool((batch.labels == IGNORE).all()) and int(batch.loc_valid.sum()) == len(drills)
    first = [d for d in drills if d.scene == 0][0]
    torch.testing.assert_close(batch.position[0, 0], torch.tensor(first.position, dtype=torch.float32))
    text = tok._tok.decode([int(x) for x in arrays["q_ids"][0, :arrays["q_len"][0]]])
    assert DRILL_QUESTION in text and first.situation.lower() in text
    # No answer tokens: no L_CE, and the localization terms still train the model.
    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, _, inp = stage2_inputs(dataset, model)
    out = stage2_losses(model, prefix, feats[:, :1], cams[:, :1], batch, inp["bev_targets"][:, :1],
                        inp["bev_valid"][:, :1], LossWeights())
    assert float(out["ce"]) == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.f_pos.mlp.fc2.weight.grad.abs().sum() > 0
    # With the questions: the split's rows of these scenes come first, then the drills.
    both = step_split(split, scenes, drills, tok, with_questions=True, pad_id=sp["pad"])
    assert len(both["q_scene"]) == split.num_questions + len(drills)
    with pytest.raises(Loc3rError, match="neither questions nor drills"):
        step_split(split, scenes, [], tok, with_questions=False, pad_id=sp["pad"])


def test_train_with_frame_curriculum_and_drills(dataset, tmp_path):
    from loc3r.synthetic.train_run import TrainOptions, train

    root = dataset["root"]
    opts = TrainOptions(out=tmp_path / "run", data=root / "data", val_data=root / "data", preset="test-tiny",
                        minutes=0.05, stage1_share=0.3, val_scenes=2,
                        stage1=Stage1Options(vision_frames=4, pose_clips=1, pose_frames=FRAMES),
                        stage2=Stage2Options(frame_curriculum=0.5, drills=3, scenes_per_step=2,
                                             weights=LossWeights(bev=0.5, loc=1.0)))
    final = train(opts)
    assert (final / "model.safetensors").is_file()
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    steps = [r for r in log["records"] if r["stage"] == 2 and r["kind"] == "train"]
    assert steps and all(1 <= r["frames"] <= FRAMES for r in steps)
    assert steps[0]["frames"] == 1 and all(np.isfinite(r["loss"]) for r in steps)
    assert log["meta"]["options"]["stage2"]["drills"] == 3


def test_stage2_bf16_autocast_is_close_to_fp32_and_keeps_fp32_weights(dataset):
    from loc3r.synthetic.train_run import stage2_autocast

    model = tiny_model(dataset["cfg"])
    prefix, feats, cams, batch, inp = stage2_inputs(dataset, model)
    args = (model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"], LossWeights())
    ref = stage2_losses(*args)
    with stage2_autocast(True):
        out = stage2_losses(*args)
    for k in ("ce", "bev", "pos", "ori", "loss"):
        assert out[k].dtype == torch.float32, k
        # bf16 keeps 8 mantissa bits: the terms agree to about a percent, not bit for bit.
        torch.testing.assert_close(out[k], ref[k], rtol=3e-2, atol=3e-2)
    assert float(out["loss"].detach()) != float(ref["loss"].detach())
    out["loss"].backward()
    params = stage2_parameters(model)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)
    assert sum(p.grad is not None for p in params) > 10
    with stage2_autocast(False):  # off: the fp32 forward exactly
        torch.testing.assert_close(stage2_losses(*args)["loss"], ref["loss"], rtol=0, atol=0)


def test_train_bf16_option_reaches_the_stage2_step(dataset, tmp_path, monkeypatch):
    import loc3r.synthetic.train_run as train_run

    seen = []
    real = train_run.stage2_autocast

    def spy(bf16):
        seen.append(bf16)
        return real(bf16)

    monkeypatch.setattr(train_run, "stage2_autocast", spy)
    root = dataset["root"]
    opts = train_run.TrainOptions(out=tmp_path / "run", data=root / "data", val_data=root / "data",
                                  preset="test-tiny", minutes=0.03, stage1_share=0.3, val_scenes=2,
                                  stage1=Stage1Options(vision_frames=4, pose_clips=1, pose_frames=FRAMES),
                                  stage2=Stage2Options(scenes_per_step=2, bf16=True))
    train_run.train(opts)
    assert seen and all(seen)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["meta"]["options"]["stage2"]["bf16"] is True
    assert all(np.isfinite(r["loss"]) for r in log["records"] if r["stage"] == 2 and r["kind"] == "train")
