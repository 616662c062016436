"""loc3r.calibration: sets from real video folders, readers through the runtime's preprocessing,
range collection and the range cache."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from loc3r.calibration.dataset import CalibrationOptions, CalibrationSet, Clip, Prompt, build_calibration_set
from loc3r.calibration.range_cache import RangeCache, RangeKey
from loc3r.calibration.ranges import RangeMethod, calibrated_ranges
from loc3r.calibration.readers import pose_prior_feeds, recurrent_io, vision_feeds
from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, TensorSpec, load_package
from loc3r.runtime.preprocess import preprocess_pose, preprocess_vision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from quant_graphs import write_package, write_video_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_video_folder(tmp_path_factory.mktemp("videos"), videos=2, frames=6)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return load_package(write_package(tmp_path_factory.mktemp("pkg") / "fp32"))


def test_set_from_video_folder_with_labels(folder):
    cs = build_calibration_set(folder, CalibrationOptions(frames_per_video=3), progress=False)
    assert [c.name for c in cs.clips] == ["scene0.mp4", "scene1.mp4"]
    assert [len(c.frames) for c in cs.clips] == [3, 3]
    f = cs.frames[0]
    assert f.dtype == np.uint8 and f.shape == (48, 48, 3)
    assert cs.prompts == (Prompt("How many chairs are in scene 0?", "I am standing by the door of scene 0."),
                          Prompt("How many chairs are in scene 1?", "I am standing by the door of scene 1."))
    # Deterministic digest; any change to frames or prompts changes it.
    again = build_calibration_set(folder, CalibrationOptions(frames_per_video=3), progress=False)
    assert again.digest() == cs.digest()
    fewer = build_calibration_set(folder, CalibrationOptions(frames_per_video=2), progress=False)
    assert fewer.digest() != cs.digest()
    no_prompts = CalibrationSet(clips=cs.clips)
    assert no_prompts.digest() != cs.digest()


def test_synth_layout_and_single_video(folder, tmp_path):
    synth = tmp_path / "synth"
    (synth / "videos").mkdir(parents=True)
    for p in folder.glob("*.mp4"):
        (synth / "videos" / p.name).write_bytes(p.read_bytes())
    (synth / "labels.jsonl").write_text((folder / "labels.jsonl").read_text())
    cs = build_calibration_set(synth, CalibrationOptions(frames_per_video=2, max_prompts=1), progress=False)
    assert len(cs.clips) == 2 and len(cs.prompts) == 1
    one = build_calibration_set(folder / "scene1.mp4", CalibrationOptions(frames_per_video=2), progress=False)
    assert len(one.clips) == 1 and len(one.prompts) == 2  # labels.jsonl beside the video


def test_errors(tmp_path):
    with pytest.raises(Loc3rError, match=r"^calibration source not found: "):
        build_calibration_set(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Loc3rError, match=r"^no videos or images found in calibration folder "):
        build_calibration_set(tmp_path / "empty", progress=False)
    with pytest.raises(Loc3rError, match=r"^unknown calibration method 'mse'; known: minmax, percentile, entropy$"):
        RangeMethod("mse")


def test_readers_use_runtime_preprocessing_and_fp32_state(folder, package):
    m = package.manifest
    cs = build_calibration_set(folder, CalibrationOptions(frames_per_video=3), progress=False)
    feeds = list(vision_feeds(cs, m.vision, m.graph("vision")))
    assert len(feeds) == 6
    want = preprocess_vision(cs.frames[4], m.vision.image_size, m.vision.mean, m.vision.std)
    np.testing.assert_array_equal(feeds[4]["pixel_values"][0], want)

    spec = m.graph("pose_prior")
    io = recurrent_io(spec)
    assert io.image.name == "image" and io.pairs == (("state", "new_state"), ("memory", "new_memory"))
    assert io.flag.name == "is_first"
    path = package.graph_path("pose_prior")
    feeds = list(pose_prior_feeds(cs, m.pose_prior, spec, path))
    assert len(feeds) == 6
    assert [float(f["is_first"][0]) for f in feeds] == [1, 0, 0, 1, 0, 0]
    p = m.pose_prior
    np.testing.assert_array_equal(feeds[1]["image"][0], preprocess_pose(
        cs.frames[1], p.img_height, p.img_width, p.mean, p.std, p.patch_size))
    # Frame 2's state is what the fp32 graph produced on frame 1; a new clip starts from zero.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    new_state, new_memory = sess.run(["new_state", "new_memory"], feeds[1])
    np.testing.assert_array_equal(feeds[2]["state"], new_state)
    np.testing.assert_array_equal(feeds[2]["memory"], new_memory)
    assert not feeds[3]["state"].any()


def test_recurrent_io_needs_an_output_per_state():
    spec = GraphSpec("pose_prior", "p.onnx", (TensorSpec("image", "float32", (1, 3, 8, 8)),
                                             TensorSpec("state", "float32", (1, 4, 8))),
                     (TensorSpec("pose", "float32", (1, 7)),))
    with pytest.raises(Loc3rError, match=r"^graph p.onnx: no output carries recurrent input 'state' to the next frame$"):
        recurrent_io(spec)


def test_range_cache_reuse(folder, package, tmp_path):
    cs = build_calibration_set(folder, CalibrationOptions(frames_per_video=2), progress=False)
    m = package.manifest
    path = package.graph_path("vision")
    cache = RangeCache(tmp_path / "cache")
    calls = []

    def feeds():
        calls.append(1)
        return vision_feeds(cs, m.vision, m.graph("vision"))

    sha = package.manifest.files["vision.onnx"]
    r1, hit1 = calibrated_ranges(path, sha, cs.digest(), feeds, RangeMethod("minmax"), cache, progress=False)
    r2, hit2 = calibrated_ranges(path, sha, cs.digest(), feeds, RangeMethod("minmax"), cache, progress=False)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and r1 == r2
    assert "pixel_values" in r1 and r1["pixel_values"][0] < 0 < r1["pixel_values"][1]
    x = np.stack([f["pixel_values"] for f in vision_feeds(cs, m.vision, m.graph("vision"))])
    np.testing.assert_allclose(r1["pixel_values"][1], np.abs(x).max(), rtol=1e-6)  # symmetric minmax
    files = list((tmp_path / "cache").glob("vision-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["model_sha256"] == sha and stored["calibration_sha256"] == cs.digest()
    # Another calibration set, or another model hash: a miss.
    _, hit3 = calibrated_ranges(path, "0" * 64, cs.digest(), feeds, RangeMethod("minmax"), cache, progress=False)
    assert hit3 is False and len(calls) == 2
    # A damaged cache file is recomputed, not trusted.
    files[0].write_text("{not json")
    _, hit4 = calibrated_ranges(path, sha, cs.digest(), feeds, RangeMethod("minmax"), cache, progress=False)
    assert hit4 is False and len(calls) == 3


def test_range_key_depends_on_every_part():
    a = RangeKey("vision", "a" * 64, "b" * 64, "percentile-99.999-2048")
    assert len({a.digest, RangeKey("vision", "c" * 64, "b" * 64, a.method).digest,
                RangeKey("vision", "a" * 64, "c" * 64, a.method).digest,
                RangeKey("vision", "a" * 64, "b" * 64, "minmax").digest}) == 4
    assert a.file_name.startswith("vision-") and a.file_name.endswith(".json")


def test_pose_prior_feeds_pair_each_frame_with_the_previous_one(folder, tmp_path):
    """A package whose pose prior fuses the previous frame gets 6-channel calibration feeds, like the runtime."""
    pytest.importorskip("torch")
    from loc3r.export.default_model import make_random_checkpoint
    from loc3r.export.package_writer import ExportOptions
    from loc3r.export.package_writer import write_package as export_package

    ckpt = make_random_checkpoint(tmp_path / "ckpt", preset="test-tiny-prev", seed=0)
    export_package(ckpt, tmp_path / "pkg", ExportOptions(max_context=128, progress=False))
    pkg = load_package(tmp_path / "pkg")
    m = pkg.manifest
    assert m.pose_prior.previous_frame
    cs = build_calibration_set(folder, CalibrationOptions(frames_per_video=3), progress=False)
    spec = m.graph("pose_prior")
    feeds = list(pose_prior_feeds(cs, m.pose_prior, spec, pkg.graph_path("pose_prior")))
    p = m.pose_prior
    image = recurrent_io(spec).image.name
    frames = [preprocess_pose(f, p.img_height, p.img_width, p.mean, p.std, p.patch_size) for f in cs.frames]
    for i, previous in [(0, 0), (1, 0), (2, 1), (3, 3), (4, 3)]:  # clips of 3 frames; a clip starts on itself
        np.testing.assert_array_equal(feeds[i][image][0], np.concatenate([frames[i], frames[previous]]))
