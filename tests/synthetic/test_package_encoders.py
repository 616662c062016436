"""Stage-1 encoders recovered from the shipped package reproduce the package's own graphs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from loc3r.errors import Loc3rError
from loc3r.model.checkpoint import load_checkpoint
from loc3r.model.projector import pool_frame_features
from loc3r.synthetic.package_encoders import _graph_tensors, _lookup, checkpoint_from_package, encoder_state

PACKAGE = Path(__file__).resolve().parents[2] / "loc3r" / "default_model"


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    out = checkpoint_from_package(PACKAGE, tmp_path_factory.mktemp("stage1") / "stage1")
    return load_checkpoint(out)


def _session(name):
    import onnxruntime as ort

    return ort.InferenceSession(str(PACKAGE / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_pose_prior_matches_the_package_graph(recovered):
    from loc3r.synthetic.train_stage1 import run_pose_clip

    rng = np.random.default_rng(0)
    frames = rng.uniform(-1, 1, (1, 4, 3, 64, 64)).astype(np.float32)
    frames[:, 1:] = frames[:, :1] * 0.9 + frames[:, 1:] * 0.1  # a slowly changing clip
    with torch.no_grad():
        tokens, poses = run_pose_clip(recovered.pose_prior, torch.from_numpy(frames))
    sess = _session("pose_prior")
    state, memory = np.zeros((1, 16, 96), np.float32), np.zeros((1, 16, 192), np.float32)
    for t in range(frames.shape[1]):
        prev = frames[:, max(t - 1, 0)]
        image = np.concatenate((frames[:, t], prev), axis=1)
        out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"pose_image": image, "state": state, "memory": memory,
                                       "is_first": np.array([1.0 if t == 0 else 0.0], np.float32)})))
        state, memory = out["state_out"], out["memory_out"]
        # int8 activations in the graph against float activations here: a few percent, not garbage.
        assert _rel(tokens[:, t].numpy(), out["camera_token"]) < 0.08
        assert _rel(poses[:, t].numpy(), out["pose"]) < 0.08


def test_vision_tower_matches_the_package_graph(recovered):
    inits, _ = _graph_tensors(PACKAGE / "vision.onnx")
    model = recovered
    # The projector and f_cam are stage 2's; load them too so that the whole graph can be compared.
    sd = {k: torch.from_numpy(_lookup(k, tuple(v.shape), inits)) for k, v in model.state_dict().items()
          if k.startswith(("projector.", "f_cam."))}
    model.load_state_dict(sd, strict=False)
    rng = np.random.default_rng(1)
    pixels = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    cam = rng.normal(0, 1, (2, 96)).astype(np.float32)
    with torch.no_grad():
        feats = model.vision_features(torch.from_numpy(pixels))
        vision = pool_frame_features(model.projector(feats), model.cfg.vision.grid)
        ours = torch.cat((model.f_cam(torch.from_numpy(cam)).unsqueeze(1), vision), dim=1).numpy()
    theirs = _session("vision").run(None, {"pixel_values": pixels, "camera_token": cam})[0]
    assert ours.shape == theirs.shape
    assert _rel(ours, theirs) < 0.08


def test_missing_encoder_weights_are_named(tmp_path, recovered):
    import shutil

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for f in ("pose_prior.onnx",):
        shutil.copy(PACKAGE / f, pkg / f)
    import onnx

    g = onnx.load(str(PACKAGE / "vision.onnx"))
    keep = [i for i in g.graph.initializer if i.name != "vision_tower.position_embedding"]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)
    onnx.save(g, str(pkg / "vision.onnx"))
    with pytest.raises(Loc3rError, match="does not hold these encoder weights of loc3r-tiny: "
                                         "vision_tower.position_embedding"):
        encoder_state(pkg, recovered)
