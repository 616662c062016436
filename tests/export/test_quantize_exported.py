"""Quantization of packages written by ``loc3r export onnx`` (package_writer), end to end.

The fused attention nodes (GroupQueryAttention in the decoder, MultiHeadAttention in the vision
tower and pose prior) survive int8 and int4, and a streaming session over the int8 and int4
packages answers with next-token logits close to the fp32 package's.
"""

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
package_writer = pytest.importorskip("loc3r.export.package_writer")

from loc3r.calibration.dataset import CalibrationOptions, build_calibration_set  # noqa: E402
from loc3r.export.default_model import make_random_checkpoint  # noqa: E402
from loc3r.export.quantize import QUANT_REPORT  # noqa: E402
from loc3r.export.quantize_select import count_op  # noqa: E402
from loc3r.export.sensitivity import OutputError  # noqa: E402
from loc3r.runtime.package import load_package  # noqa: E402

from quant_graphs import write_video_folder  # noqa: E402

FUSED = ("GroupQueryAttention", "MultiHeadAttention")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    ckpt = make_random_checkpoint(root / "ckpt", preset="test-tiny", seed=3)
    videos = write_video_folder(root / "videos", videos=1, frames=3)
    pkgs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOC3R_CACHE_DIR", str(root / "cache"))  # range caches stay in the test's tmp dir
        for precision in ("fp32", "int8", "int4"):
            pkgs[precision] = root / precision
            package_writer.write_package(ckpt, pkgs[precision], package_writer.ExportOptions(
                precision=precision, calib=str(videos), max_context=96, progress=False))
        assert len(list((root / "cache" / "calibration").glob("*.json"))) == 2  # vision, pose prior
    return pkgs, videos


def fused_counts(pkg):
    out = {}
    for g in load_package(pkg).manifest.graphs:
        m = onnx.load(str(pkg / g.file))
        out[g.role] = tuple(count_op(m, op) for op in FUSED)
    return out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_fused_attention_survives(exported, precision):
    pkgs, _ = exported
    ref = fused_counts(pkgs["fp32"])
    assert ref["decoder"][0] > 0 and ref["vision"][1] > 0
    assert fused_counts(pkgs[precision]) == ref
    report = json.loads((pkgs[precision] / QUANT_REPORT).read_text())["graphs"]
    dec = onnx.load(str(pkgs[precision] / "decoder.onnx"))
    assert count_op(dec, "MatMulNBits") == len(report["decoder"]["nodes"]) > 0
    assert report["heads"] == {"method": "fp32"}
    # The exported decoder's q/k/v and gate/up read one activation each: fused before quantizing.
    layers = load_package(pkgs[precision]).manifest.text.num_layers
    assert sorted(report["decoder"]["fused"]) == sorted(
        f"/layers.{i}/{g}/MatMul" for i in range(layers) for g in ("self_attn/q_proj+k_proj+v_proj", "mlp/gate_proj+up_proj"))
    assert report["decoder"]["fused"]["/layers.0/mlp/gate_proj+up_proj/MatMul"] == [
        "/layers.0/mlp/gate_proj/MatMul", "/layers.0/mlp/up_proj/MatMul"]


def test_session_logits_close_to_fp32(exported):
    from loc3r.runtime.session import Pipeline

    pkgs, videos = exported
    calib = build_calibration_set(videos, CalibrationOptions(frames_per_video=3), progress=False)
    logits = {}
    for precision in ("fp32", "int8", "int4"):
        session = Pipeline.load(pkgs[precision], backend="cpu").new_session(on_notice=lambda _m: None)
        for i, rgb in enumerate(calib.frames):
            session.add_frame(rgb, float(i))
        rows = []
        for p in calib.prompts:
            session.ask(p.question, p.situation, max_new_tokens=1)
            rows.append(np.asarray(session.last_prompt_logits, np.float64).reshape(-1))
        logits[precision] = np.stack(rows)
    for precision in ("int8", "int4"):
        err = OutputError.between(logits["fp32"], logits[precision])
        assert err.cosine >= 0.99, (precision, err)
