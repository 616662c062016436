"""quantize_package on a small fp32 package (vision, pose prior, decoder) at each precision.

Checks: the manifest's precision and checksums (the package still loads),
the graphs still run on onnxruntime CPU with the manifest's I/O, int8 static
QDQ in the vision/pose graphs with calibrated ranges that are cached (a
second export with the same graph and calibration set reads them back),
and clear errors.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from loc3r.calibration.dataset import CalibrationOptions, build_calibration_set
from loc3r.errors import Loc3rError
from loc3r.export.quantize import QUANT_REPORT, QuantOptions, quantize_package
from loc3r.export.quantize_select import count_op, fused_attention_nodes
from loc3r.export.sensitivity import OutputError
from loc3r.runtime.package import load_package

from quant_graphs import TinyDecoder, decoder_feeds, write_package, write_video_folder


@pytest.fixture(scope="module")
def fp32_package(tmp_path_factory):
    return write_package(tmp_path_factory.mktemp("pkg") / "fp32")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder = write_video_folder(tmp_path_factory.mktemp("calib"))
    return build_calibration_set(folder, CalibrationOptions(frames_per_video=3), progress=False)


def copy_package(src, dst):
    shutil.copytree(src, dst)
    return dst


def options(tmp_path, **kw):
    return QuantOptions(cache_dir=tmp_path / "cache", progress=False, min_elements=1024, **kw)


def run_first_output(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_int8_package_static_qdq_and_cached_ranges(fp32_package, calib, tmp_path):
    pkg = copy_package(fp32_package, tmp_path / "int8")
    quantize_package(pkg, "int8", calib, options(tmp_path))
    package = load_package(pkg)  # checksums rewritten
    assert package.manifest.precision == "int8"
    report = json.loads((pkg / QUANT_REPORT).read_text())["graphs"]
    assert report["vision"]["method"] == report["pose_prior"]["method"] == "static-qdq-int8"
    assert report["vision"]["ranges_from_cache"] is False
    assert report["decoder"]["method"] == "MatMulNBits-8"
    for role in ("vision", "pose_prior"):
        m = onnx.load(str(pkg / f"{role}.onnx"))
        assert count_op(m, "QuantizeLinear") > 0 and count_op(m, "DequantizeLinear") > 0
        ranges = json.loads((pkg / "ranges" / f"{role}.json").read_text())["ranges"]
        assert ranges and all(lo <= hi for lo, hi in ranges.values())
    dec = onnx.load(str(pkg / "decoder.onnx"))
    assert len(fused_attention_nodes(dec)) == TinyDecoder().layers
    assert count_op(dec, "MatMulNBits") == len(report["decoder"]["nodes"])
    # The vision tower stays close to fp32 on a real calibration frame.
    from loc3r.calibration.readers import vision_feeds

    feeds = next(vision_feeds(calib, package.manifest.vision, package.manifest.graph("vision")))
    err = OutputError.between(run_first_output(fp32_package / "vision.onnx", feeds),
                              run_first_output(pkg / "vision.onnx", feeds))
    assert err.cosine >= 0.99
    # Same graph, same calibration set, same method: the ranges come from the cache.
    again = copy_package(fp32_package, tmp_path / "int8-again")
    quantize_package(again, "int8", calib, options(tmp_path))
    report2 = json.loads((again / QUANT_REPORT).read_text())["graphs"]
    assert report2["vision"]["ranges_from_cache"] is True and report2["pose_prior"]["ranges_from_cache"] is True
    assert (again / "vision.onnx").read_bytes() == (pkg / "vision.onnx").read_bytes()
    # Another method is another key.
    third = copy_package(fp32_package, tmp_path / "int8-entropy")
    quantize_package(third, "int8", calib, options(tmp_path, calib_method="minmax"))
    assert json.loads((third / QUANT_REPORT).read_text())["graphs"]["vision"]["ranges_from_cache"] is False
    assert len(list((tmp_path / "cache").glob("vision-*.json"))) == 2


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_int4_and_fp16_packages_run(fp32_package, tmp_path, precision):
    pkg = copy_package(fp32_package, tmp_path / precision)
    quantize_package(pkg, precision, None, options(tmp_path))
    manifest = load_package(pkg).manifest
    assert manifest.precision == precision
    cfg = TinyDecoder()
    feeds = decoder_feeds(cfg, 8)
    spec = manifest.graph("decoder")
    kv_dtype = spec.input("past_key.0").dtype
    assert kv_dtype == ("float16" if precision == "fp16" else "float32")
    assert spec.output("present_value.1").dtype == kv_dtype and spec.input("inputs_embeds").dtype == "float32"
    feeds = {k: v.astype(np.float16) if k.startswith("past") and precision == "fp16" else v
             for k, v in feeds.items()}
    ref = run_first_output(fp32_package / "decoder.onnx", decoder_feeds(cfg, 8))[0]
    got = run_first_output(pkg / "decoder.onnx", feeds)[0]
    assert OutputError.between(ref, got).cosine >= 0.99
    report = json.loads((pkg / QUANT_REPORT).read_text())["graphs"]
    if precision == "int4":
        assert report["pose_prior"]["method"] == "MatMulNBits-8" and report["pose_prior"]["accuracy_level"] is None
        pose = onnx.load(str(pkg / "pose_prior.onnx"))
        nbits = [n for n in pose.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == len(report["pose_prior"]["nodes"]) > 0
        assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
        assert not any(a.name == "accuracy_level" and a.i for n in nbits for a in n.attribute)
        assert not any("pose_head" in n for n in report["pose_prior"]["nodes"])  # excluded by default


def test_errors(fp32_package, tmp_path):
    pkg = copy_package(fp32_package, tmp_path / "p")
    with pytest.raises(Loc3rError, match=r"^int8 needs calibration frames for the vision tower and pose prior: "
                                         r"pass --calib SOURCE$"):
        quantize_package(pkg, "int8", None, options(tmp_path))
    with pytest.raises(Loc3rError, match=r"^int4 pose prior mode must be 'nbits8' or 'fp32', got 'int4'$"):
        QuantOptions(int4_pose_prior="int4")
    with pytest.raises(Loc3rError, match=r"^int4 lm_head bits must be 4 or 8, got 2$"):
        QuantOptions(int4_lm_head_bits=2)
    with pytest.raises(Loc3rError, match=r"^unknown precision 'int2'; known: fp32, fp16, int8, int4$"):
        quantize_package(pkg, "int2", None, options(tmp_path))
    quantize_package(pkg, "int4", None, options(tmp_path, int4_pose_prior="fp32"))
    assert json.loads((pkg / QUANT_REPORT).read_text())["graphs"]["pose_prior"] == {"method": "fp32"}
    assert (pkg / "pose_prior.onnx").read_bytes() == (fp32_package / "pose_prior.onnx").read_bytes()
    with pytest.raises(Loc3rError, match=r"is already a int4 package; quantize an fp32 package$"):
        quantize_package(pkg, "int4", None, options(tmp_path))
