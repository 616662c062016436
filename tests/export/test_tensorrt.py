"""loc3r export tensorrt without TensorRT: the one-line refusal, profile shapes, the calibration
cache format, and the build orchestration against a stand-in ``tensorrt`` module. A real build
runs only where TensorRT 10 is installed."""

import json
import struct
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from loc3r.errors import Loc3rError
from loc3r.export.tensorrt_build import NOT_AVAILABLE, EngineOptions, build_engine_package
from loc3r.export.tensorrt_calibration import (calibration_cache_text, read_calibration_cache, scale_hex,
                                               trt_version_number)
from loc3r.export.tensorrt_cli import tensorrt
from loc3r.export.tensorrt_profiles import ProfileOptions, graph_profiles, prefill_chunk
from loc3r.runtime.package import (ChatTemplate, GraphSpec, Manifest, PosePriorSpec, SpecialTokens, TensorSpec,
                                   TextSpec, VisionSpec, load_package)

from quant_graphs import write_package
from trt_fakes import Recorder, fake_tensorrt


def T(name, shape, dtype="float32"):
    return TensorSpec(name, dtype, tuple(shape))


def manifest(max_context=96, tokens_per_frame=16):
    kv = ("batch", 2, "kv_len", 64)
    graphs = (
        GraphSpec("pose_prior", "pose_prior.onnx", (T("pose_image", ("batch", 3, 64, 64)), T("state", ("batch", 16, 96)),
                                                    T("is_first", ("batch",))), (T("pose", ("batch", 7)),)),
        GraphSpec("vision", "vision.onnx", (T("pixel_values", ("frames", 3, 64, 64)), T("camera_token", ("frames", 96))),
                  (T("frame_embeds", ("frames", 17, 256)),)),
        GraphSpec("embed", "embed.onnx", (T("input_ids", ("batch", "seq"), "int64"),), (T("embeds", ("batch", "seq", 256)),)),
        GraphSpec("decoder", "decoder.onnx", (T("inputs_embeds", ("batch", "seq", 256)), T("seqlens_k", ("batch",), "int32"),
                                              T("total_sequence_length", (), "int32"), T("past_key_values.0.key", kv)),
                  (T("hidden", ("batch", "seq", 256)), T("present.0.key", kv))),
        GraphSpec("heads", "heads.onnx", (T("pos_hidden", ("batch", "rows", 256)),), (T("position", ("batch", "rows", 3)),)),
    )
    return Manifest(
        name="t", precision="fp32", vision=VisionSpec(64, (0.5,) * 3, (0.5,) * 3, 8, 4, tokens_per_frame),
        text=TextSpec(256, 1, 2, 64, max_context, 512), special_tokens=SpecialTokens(1, 2, 3, 0),
        chat_template=ChatTemplate("", "{situation}{question}"), orientation_bins_deg=(0.0,), graphs=graphs,
        pose_prior=PosePriorSpec(64, 64, 16, (0.5,) * 3, (0.5,) * 3, 16, 96, 16, 192))


def test_cli_without_tensorrt_says_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, here and anywhere
    result = CliRunner().invoke(tensorrt, [str(tmp_path / "pkg"), "--out", str(tmp_path / "eng"), "--fp16"])
    assert result.exit_code == 1
    assert result.output == (
        "error: TensorRT is not installed: 'loc3r export tensorrt' needs the tensorrt Python package "
        "(TensorRT 10; on Jetson it comes with JetPack)\n")
    assert not (tmp_path / "eng").exists()
    assert NOT_AVAILABLE in result.output


def test_profiles_prefill_decode_and_kv_length():
    m = manifest(max_context=96, tokens_per_frame=16)  # a frame block is 17 tokens (+1 newline = 18)
    assert m.tokens_per_frame == 17 and prefill_chunk(m, ProfileOptions()) == 96  # 256 capped at the context
    dec = graph_profiles(m.graph("decoder"), m)
    assert [p.name for p in dec] == ["prefill", "decode"]
    pre, step = dec
    assert pre.shapes["inputs_embeds"] == ((1, 1, 256), (1, 18, 256), (1, 96, 256))
    assert step.shapes["inputs_embeds"] == ((1, 1, 256), (1, 1, 256), (1, 1, 256))
    for p in dec:  # the KV buffer is always the whole context budget
        assert p.shapes["past_key_values.0.key"] == ((1, 2, 96, 64),) * 3
        assert p.shapes["seqlens_k"] == ((1,), (1,), (1,))
        assert "total_sequence_length" not in p.shapes  # scalar
    assert graph_profiles(m.graph("embed"), m)[1].shapes["input_ids"] == ((1, 1), (1, 1), (1, 1))
    (vis,) = graph_profiles(m.graph("vision"), m, ProfileOptions(max_frames=3))
    assert vis.name == "all" and vis.shapes["pixel_values"] == ((1, 3, 64, 64), (1, 3, 64, 64), (3, 3, 64, 64))
    assert vis.shapes["camera_token"] == ((1, 96), (1, 96), (3, 96))
    (heads,) = graph_profiles(m.graph("heads"), m)
    assert heads.shapes["pos_hidden"] == ((1, 1, 256), (1, 18, 256), (1, 96, 256))
    big = manifest(max_context=4096)
    assert graph_profiles(big.graph("decoder"), big, ProfileOptions(prefill_chunk=512))[0].shapes["inputs_embeds"][2] \
        == (1, 512, 256)
    assert prefill_chunk(big, ProfileOptions()) == 256
    with pytest.raises(Loc3rError, match=r"^--prefill-chunk 200 exceeds the package's context of 96$"):
        graph_profiles(m.graph("decoder"), m, ProfileOptions(prefill_chunk=200))


def test_calibration_cache_format():
    assert trt_version_number("10.3.0.30") == 100300 and trt_version_number("8.6.1") == 8601
    assert trt_version_number("10.13.2") == 101302
    assert scale_hex(1.0) == "3f800000"
    text = calibration_cache_text({"b": (-2.54, 1.0), "a: weird": (0.0, 127.0), "zero": (0.0, 0.0)}, "10.3.0")
    lines = text.splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert lines[1:] == ["a: weird: 3f800000", f"b: {scale_hex(np.float32(2.54 / 127))}", "zero: 322bcc77"]
    header, scales = read_calibration_cache(text)
    assert header == lines[0] and scales["a: weird"] == 1.0
    assert abs(scales["b"] - 0.02) < 1e-8 and scales["zero"] == struct.unpack(">f", bytes.fromhex("322bcc77"))[0]
    with pytest.raises(Loc3rError, match="no TRT- header"):
        read_calibration_cache("x: 3f800000\n")


# ---- the build flow against a stand-in tensorrt module (records what the builder was asked) ----

@pytest.fixture(scope="module")
def small_package(tmp_path_factory):
    return write_package(tmp_path_factory.mktemp("trt") / "fp32", roles=("pose_prior", "vision"))


def test_build_flow_with_stand_in_tensorrt(small_package, tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    # Ranges as an int8 export would have left them (here: made up, for the vision tower only).
    ranges_dir = tmp_path / "src"
    import shutil

    shutil.copytree(small_package, ranges_dir)
    (ranges_dir / "ranges").mkdir()
    (ranges_dir / "ranges" / "vision.json").write_text(json.dumps({"ranges": {"pixel_values": [-1.0, 1.0]}}))
    (ranges_dir / "ranges" / "pose_prior.json").write_text(json.dumps({"ranges": {"image": [-2.0, 2.0]}}))
    from loc3r.runtime.package import write_manifest

    write_manifest(ranges_dir, load_package(ranges_dir).manifest)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    out = tmp_path / "eng"
    m = build_engine_package(ranges_dir, out, EngineOptions(fp16=True, int8=True, timing_cache=timing,
                                                           progress=False))
    assert m.precision == "int8" and {g.format for g in m.graphs} == {"tensorrt"}
    assert [g.file for g in m.graphs] == ["pose_prior.engine", "vision.engine"]
    pkg = load_package(out)  # checksums cover engines, caches and the build info
    assert (out / "vision.engine").read_bytes() == b"ENGINE"
    assert (out / "vision.calib.cache").read_text() == "TRT-100300-EntropyCalibration2\npixel_values: 3c010204\n"
    assert {"fp16", "int8"} <= rec.builds[0].flags and rec.builds[0].int8_calibrator is not None
    assert rec.builds[1].profiles[0].shapes["pixel_values"][2][0] == 4  # max frames
    assert timing.read_bytes() == b"old+timed+timed"  # read before and saved after every build
    info = json.loads((out / "tensorrt_build.json").read_text())
    assert info["tensorrt"] == "10.3.0.30" and info["graphs"]["vision"]["int8"] == "calibration cache"
    assert pkg.manifest.graph("vision").inputs == load_package(small_package).manifest.graph("vision").inputs
    # A refused build leaves nothing behind; ranges are required for int8 graphs.
    with pytest.raises(Loc3rError, match=r"^--int8 needs activation ranges for pose_prior.onnx: pass --calib "
                                         r"SOURCE, or build from an int8 package$"):
        build_engine_package(small_package, tmp_path / "eng2", EngineOptions(int8=True, timing_cache=timing,
                                                                            progress=False))
    assert not (tmp_path / "eng2").exists()
    with pytest.raises(Loc3rError, match=r"^output directory .* is not empty$"):
        build_engine_package(small_package, out, EngineOptions(progress=False))


def test_contrib_ops_need_a_plugin(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    pkg = write_package(tmp_path / "dec", roles=("decoder",))
    with pytest.raises(Loc3rError, match=r"^graph decoder.onnx uses com.microsoft.GroupQueryAttention, which "
                                         r"TensorRT's ONNX parser cannot import: pass --plugin LIB"):
        build_engine_package(pkg, tmp_path / "eng", EngineOptions(progress=False))


def test_real_tensorrt_build(small_package, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installed (Jetson / NVIDIA GPU machines only)")
    m = build_engine_package(small_package, tmp_path / "eng", EngineOptions(fp16=True, progress=False,
                                                                           timing_cache=tmp_path / "t.cache"))
    assert all(g.format == "tensorrt" for g in m.graphs) and (tmp_path / "t.cache").stat().st_size > 0


def test_int8_build_calibrates_from_videos_when_the_package_has_no_ranges(small_package, tmp_path, monkeypatch):
    from quant_graphs import write_video_folder

    from loc3r.export.tensorrt_calibration import read_calibration_cache

    rec = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    monkeypatch.setenv("LOC3R_CACHE_DIR", str(tmp_path / "cache"))
    videos = write_video_folder(tmp_path / "videos", videos=1, frames=3)
    out = tmp_path / "eng"
    build_engine_package(small_package, out, EngineOptions(int8=True, calib=str(videos), progress=False,
                                                           timing_cache=tmp_path / "t.cache"))
    for stem, image in (("vision", "pixel_values"), ("pose_prior", "image")):
        header, scales = read_calibration_cache((out / f"{stem}.calib.cache").read_text())
        assert header == "TRT-100300-EntropyCalibration2" and image in scales and scales[image] > 0
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 2  # ranges cached for reuse
    assert all("int8" in c.flags for c in rec.builds) and "fp16" not in rec.builds[0].flags
