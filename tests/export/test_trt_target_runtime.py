"""The tensorrt target downstream of the export: engine builds load the loc3r plugin (stand-in tensorrt module),
and a Session runs a tensorrt-target decoder with the KV ping-pong (the decoder run by onnxruntime in its
decomposed form behind a native-TensorRT-like runner), answering exactly as the onnxruntime package does."""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from loc3r.errors import Loc3rError  # noqa: E402
from loc3r.export.default_model import make_random_checkpoint  # noqa: E402
from loc3r.export.graph_decoder import export_decoder  # noqa: E402
from loc3r.export.package_writer import ExportOptions, write_package  # noqa: E402
from loc3r.export.tensorrt_build import EngineOptions, build_engine_package  # noqa: E402
from loc3r.export.trt_attention import trt_decoder_attention  # noqa: E402
from loc3r.model.checkpoint import load_checkpoint  # noqa: E402
from loc3r.runtime.backends.tensorrt import (PLUGIN_ENV, PLUGIN_LIBRARY, KVPingPong,  # noqa: E402
                                             plugin_search_paths)
from loc3r.runtime.package import load_package  # noqa: E402
from loc3r.runtime.session import Pipeline  # noqa: E402
from trt_fakes import Recorder, fake_tensorrt  # noqa: E402

MAX_CONTEXT = 96


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_rt")
    ckpt = make_random_checkpoint(root / "ckpt", preset="test-tiny-nocam", seed=4)
    write_package(ckpt, root / "ort", ExportOptions(max_context=MAX_CONTEXT, progress=False))
    write_package(ckpt, root / "trt", ExportOptions(max_context=MAX_CONTEXT, progress=False, target="tensorrt"))
    return root, load_checkpoint(ckpt, dtype=torch.float32)


# ---- loc3r export tensorrt: the plugin library ----

def test_engine_build_loads_the_plugin_from_the_environment(packages, tmp_path, monkeypatch):
    root, _ = packages
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    lib = tmp_path / "plugins" / PLUGIN_LIBRARY
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(PLUGIN_ENV, str(lib.parent))
    m = build_engine_package(root / "trt", tmp_path / "eng", EngineOptions(fp16=True, progress=False,
                                                                         timing_cache=tmp_path / "t.cache"))
    assert rec.loaded == [PLUGIN_LIBRARY]
    assert "decoder.onnx" in rec.parsed
    assert m.target == "tensorrt" and load_package(tmp_path / "eng").manifest.target == "tensorrt"
    assert all(g.format == "tensorrt" for g in m.graphs)


def test_int8_engines_are_refused_for_the_tensorrt_target(packages, tmp_path, monkeypatch):
    root, _ = packages
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(Recorder()))
    with pytest.raises(Loc3rError) as err:
        build_engine_package(root / "trt", tmp_path / "eng", EngineOptions(fp16=True, int8=True, progress=False))
    assert str(err.value) == ("--int8 is not available for packages exported with --target tensorrt: int8 "
                              "calibration runs the graphs in onnxruntime, which cannot run loc3r::FusedAttention; "
                              "build with --fp16")


def test_engine_build_says_when_the_plugin_is_missing(packages, tmp_path, monkeypatch):
    root, _ = packages
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(Recorder()))
    monkeypatch.setenv(PLUGIN_ENV, str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    searched = plugin_search_paths()
    if searched[-1].is_file():
        pytest.skip("this checkout has a built plugin library")
    with pytest.raises(Loc3rError) as err:
        build_engine_package(root / "trt", tmp_path / "eng", EngineOptions(progress=False))
    assert str(err.value) == (
        f"the loc3r TensorRT plugin library {PLUGIN_LIBRARY} (loc3r::FusedAttention) was not found in "
        f"{tmp_path / 'nowhere'}, {tmp_path / 'build'}, {searched[-1].parent}: build it on the device with "
        f"'cmake -S . -B build && cmake --build build', set {PLUGIN_ENV}, or pass --plugin PATH")
    assert not (tmp_path / "eng").exists()


def test_onnxruntime_packages_are_refused_with_the_target_hint(packages, tmp_path, monkeypatch):
    root, _ = packages
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(Recorder()))
    with pytest.raises(Loc3rError) as err:
        build_engine_package(root / "ort", tmp_path / "eng", EngineOptions(progress=False))
    assert str(err.value) == (
        "graph vision.onnx uses com.microsoft.MultiHeadAttention, which TensorRT's ONNX parser cannot import: "
        "pass --plugin LIB with TensorRT plugins of those names, or export the package with "
        "'loc3r export onnx --target tensorrt'")


def test_tensorrt_target_onnx_package_is_refused_by_onnxruntime(packages):
    root, _ = packages
    with pytest.raises(Loc3rError) as err:
        Pipeline.load(root / "trt", "cpu")
    assert str(err.value) == (
        f"model package {root / 'trt'} was exported for TensorRT (loc3r::FusedAttention plugin nodes): build "
        "engines from it with 'loc3r export tensorrt' and run that package, or export with --target onnxruntime "
        "for this backend")


# ---- the session's KV ping-pong ----

class PingPongDecoder:
    """A native-TensorRT-like runner (device_buffer / bind_device / infer, no infer_bound) that runs the
    tensorrt-target decoder graph in its decomposed form; host arrays stand in for device buffers."""

    device = "cuda"

    def __init__(self, path: Path):
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.bound: dict = {}
        self.pasts: list = []  # id of the key buffer bound as layer 0's past, per call

    def device_buffer(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype)

    def bind_device(self, name, buf):
        self.bound[name] = buf

    def infer(self, feed, outputs=None):
        past = {k: v for k, v in self.bound.items() if k.startswith("past_key_values.")}
        for k in past:  # never aliased: present goes to the other buffer
            assert self.bound[k.replace("past_key_values.", "present.")] is not past[k]
        self.pasts.append(id(past["past_key_values.0.key"]))
        got = dict(zip(self.outputs, self.sess.run(None, {**feed, **past})))
        for name, value in got.items():
            if name in self.bound:
                np.copyto(self.bound[name], value)  # the engine writing its bound output
        return {n: got[n] for n in (outputs or ["hidden"])}


def test_session_ping_pongs_the_kv_cache_and_answers_like_onnxruntime(packages, tmp_path):
    root, model = packages
    ref = Pipeline.load(root / "ort", "cpu")
    spec = export_decoder(model, tmp_path, MAX_CONTEXT, 17, partial(trt_decoder_attention, form="decomposed"))
    decoder = PingPongDecoder(tmp_path / spec.file)
    trt_manifest = dataclasses.replace(ref.manifest, target="tensorrt")
    pipe = dataclasses.replace(ref, package=dataclasses.replace(ref.package, manifest=trt_manifest),
                               runners={**ref.runners, "decoder": decoder})
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(3)]
    answers = []
    for p in (ref, pipe):
        s = p.new_session()
        for i, f in enumerate(rgbs):
            s.add_frame(f, 0.5 * i)
        a1 = s.ask("what is on my left?", situation="i am sitting on the bed", max_new_tokens=5)
        a2 = s.ask("how many chairs?", max_new_tokens=4)  # after a rewind: the current side still holds the frames
        answers.append((a1.token_ids, a2.token_ids, s.last_prompt_logits, a1.position))
    (t1, t2, logits, pos), (u1, u2, logits_t, pos_t) = answers
    assert (u1, u2) == (t1, t2)
    assert np.abs(logits_t - logits).max() <= 1e-4
    assert np.abs(np.array(pos_t) - np.array(pos)).max() <= 1e-3
    assert len(set(decoder.pasts)) == 2  # two buffers per layer, alternating
    assert all(a != b for a, b in zip(decoder.pasts, decoder.pasts[1:]))


def test_ping_pong_binds_and_swaps():
    class Runner:
        def __init__(self):
            self.bound = {}

        def bind_device(self, name, buf):
            self.bound[name] = buf

    a, b = [("ak", "av")], [("bk", "bv")]
    pp, r = KVPingPong([a, b]), Runner()
    pp.bind(r)
    assert r.bound == {"past_key_values.0.key": "ak", "past_key_values.0.value": "av",
                       "present.0.key": "bk", "present.0.value": "bv"}
    pp.swap()
    pp.bind(r)
    assert r.bound["past_key_values.0.key"] == "bk" and r.bound["present.0.value"] == "av"
    assert pp.layer(0) == ("bk", "bv")
    with pytest.raises(Loc3rError, match="^KV ping-pong needs two sides with the same number of layers$"):
        KVPingPong([a])
