"""Stage 2's frame curriculum and situation drills (synthetic/train_drills.py) on a 2-scene dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loc3r.errors import Loc3rError
from loc3r.model.losses import LossWeights
from loc3r.synthetic.train_data import IGNORE, prompt_tokenizer
from loc3r.synthetic.train_drills import DRILL_QUESTION, DrillSource, curriculum_frames, read_scene_objects, step_split
from loc3r.synthetic.train_stage1 import Stage1Options
from loc3r.synthetic.train_stage2 import Stage2Options, pack_questions, stage2_losses

from tests.synthetic.test_train import FRAMES, dataset, stage2_inputs, tiny_model  # noqa: F401  (fixture)


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
