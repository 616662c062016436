"""`loc3r synth` and `loc3r eval` end to end, on tiny inputs."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from loc3r.cli import main
from loc3r.synthetic.dataset import SPLIT_SEED_BASE, scene_seed
from loc3r.errors import Loc3rError

ARGS = ["--scenes", "2", "--frames", "6", "--size", "32x32", "--video-size", "48x48", "--bev-grid", "2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = []
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(name)
        r = CliRunner().invoke(main, ["synth", *ARGS, "--seed", "7", "--split", "test", "--out", str(d / "set")])
        assert r.exit_code == 0, r.output
        out.append(d / "set")
    return out


def test_synth_writes_videos_labels_and_ground_truth(two_runs):
    d = two_runs[0]
    labels = [json.loads(line) for line in (d / "labels.jsonl").read_text().splitlines()]
    assert labels and {lab["scene_id"] for lab in labels} == {"test-2000700000", "test-2000700001"}
    meta = json.loads((d / "meta.json").read_text())
    assert meta["split"] == "test" and meta["labels"] == len(labels)
    lab = labels[0]
    for key in ("id", "scene_id", "video", "frame_timestamps", "type", "situation", "question", "answer",
                "position", "heading"):
        assert key in lab
    assert lab["frame_timestamps"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    cap = cv2.VideoCapture(str(d / lab["video"]))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (48, 48, 3)
        frames.append(cv2.resize(frame[..., ::-1], (32, 32), interpolation=cv2.INTER_AREA))  # BGR -> RGB
    assert len(frames) == 6
    z = np.load(d / lab["scene_file"])
    # The video shows the same views as the training frames, in RGB order.
    video = np.stack(frames).astype(float)
    assert np.abs(video - z["rgb"]).mean() < 8.0 < np.abs(video[..., ::-1] - z["rgb"]).mean()
    assert z["rgb"].shape == (6, 32, 32, 3) and z["depth"].shape == (6, 32, 32)
    assert z["bev_targets"].shape == (6, 2, 2, 2) and z["bev_valid"].all()
    assert z["pose7"].shape == (6, 7) and np.allclose(z["c2w_cam0"][0], np.eye(4))
    info = json.loads((d / "scenes" / f"{lab['scene_id']}.json").read_text())
    assert 3 <= len(info["objects"]) <= 10 and len(info["room"]["corners"]) == 4


def test_synth_is_deterministic(two_runs):
    a, b = two_runs
    assert (a / "labels.jsonl").read_bytes() == (b / "labels.jsonl").read_bytes()
    for f in sorted((a / "scenes").iterdir()):
        if f.suffix == ".json":
            assert f.read_bytes() == (b / "scenes" / f.name).read_bytes()
        else:
            za, zb = np.load(f), np.load(b / "scenes" / f.name)
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                np.testing.assert_array_equal(za[k], zb[k])


def test_split_seed_ranges_are_disjoint():
    assert scene_seed("train", 9999, 99_999) < SPLIT_SEED_BASE["val"] == scene_seed("val", 0, 0)
    assert scene_seed("val", 9999, 99_999) < scene_seed("test", 0, 0)
    with pytest.raises(Loc3rError, match=r"--seed must be in \[0, 9999\], got 10000"):
        scene_seed("train", 10_000, 0)


def test_eval_perfect_predictions_and_baseline(two_runs, tmp_path):
    d = two_runs[0]
    labels = [json.loads(line) for line in (d / "labels.jsonl").read_text().splitlines()]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": lab["id"], "answer": lab["answer"].upper(), "position": lab["position"],
                                         "heading": lab["heading"]}) + "\n" for lab in labels))
    r = CliRunner().invoke(main, ["eval", "--data", str(d), "--predictions", str(preds), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["localization"]["acc@0.5m"] == 100.0 and out["localization"]["acc@30deg"] == 100.0
    assert out["summary"]["all_em"] == 100.0 and out["missing_predictions"] == 0
    r = CliRunner().invoke(main, ["eval", "--data", str(d), "--baseline", "--train-data", str(two_runs[1])])
    assert r.exit_code == 0, r.output
    assert "Acc@0.5m" in r.output and "situated_em" in r.output


@pytest.mark.parametrize("args,message", [
    (["synth", "--scenes", "1", "--size", "64by64", "--out", "{tmp}/x"],
     "error: --size must look like WIDTHxHEIGHT (e.g. 64x64), got '64by64'"),
    (["synth", "--scenes", "0", "--out", "{tmp}/x"], "error: --scenes must be at least 1"),
    (["synth", "--scenes", "1", "--video-size", "65x49", "--out", "{tmp}/x"],
     "error: --video-size must have even sides (mp4 needs them), got 65x49"),
    (["eval", "--data", "{tmp}"], "error: give exactly one of --predictions, --model or --baseline"),
    (["eval", "--data", "{tmp}", "--predictions", "p.jsonl", "--baseline"],
     "error: give exactly one of --predictions, --model or --baseline"),
    (["eval", "--data", "{tmp}", "--predictions", "{tmp}/none.jsonl"], "error: labels file not found: {tmp}/labels.jsonl"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == message.replace("{tmp}", str(tmp_path))


def test_eval_rejects_unknown_ids(two_runs, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "nope", "answer": "x"}) + "\n")
    r = CliRunner().invoke(main, ["eval", "--data", str(two_runs[0]), "--predictions", str(preds)])
    assert r.exit_code == 1 and "1 predictions name ids not in the labels, e.g. 'nope'" in r.output


def test_eval_baseline_accepts_the_labels_file(two_runs):
    r = CliRunner().invoke(main, ["eval", "--data", str(two_runs[0] / "labels.jsonl"), "--baseline", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["situations"] >= 2


def test_synth_without_video(tmp_path):
    r = CliRunner().invoke(main, ["synth", "--scenes", "1", "--frames", "4", "--size", "16x16", "--no-video",
                                  "--bev-grid", "2", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    lab = json.loads((tmp_path / "d" / "labels.jsonl").read_text().splitlines()[0])
    assert lab["video"] is None and not (tmp_path / "d" / "videos").exists()
    r = CliRunner().invoke(main, ["synth", "--scenes", "1", "--no-video", "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and "already holds a dataset" in r.output


def test_workers_do_not_change_the_output(two_runs, tmp_path):
    r = CliRunner().invoke(main, ["synth", *ARGS, "--seed", "7", "--split", "test", "--workers", "2",
                                  "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "w" / "labels.jsonl").read_bytes() == (two_runs[0] / "labels.jsonl").read_bytes()
