import dataclasses

import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime import backends
from loc3r.runtime.backends import available_backends, open_runner, resolve_backend
from loc3r.runtime.package import TensorSpec, load_package


def test_cpu_always_available():
    assert "cpu" in available_backends()
    b = resolve_backend("cpu")
    assert (b.name, b.engine, b.providers) == ("cpu", "onnxruntime", ("CPUExecutionProvider",))


def test_unavailable_cuda_message(monkeypatch):
    monkeypatch.setattr(backends, "ort_providers", lambda: ("CPUExecutionProvider",))
    with pytest.raises(Loc3rError) as e:
        resolve_backend("cuda")
    assert str(e.value) == (
        "backend 'cuda' is not available on this machine: onnxruntime has no "
        "CUDAExecutionProvider (install onnxruntime-gpu)"
    )
    assert resolve_backend("auto").name == "cpu"


def test_unavailable_tensorrt_messages(monkeypatch):
    monkeypatch.setattr(backends, "ort_providers", lambda: ("CPUExecutionProvider",))
    monkeypatch.setattr(backends, "tensorrt_python_available", lambda: False)
    with pytest.raises(Loc3rError, match="onnxruntime has no TensorrtExecutionProvider"):
        resolve_backend("tensorrt")
    with pytest.raises(Loc3rError) as e:
        resolve_backend("auto", graph_format="tensorrt")
    assert str(e.value) == (
        "backend 'tensorrt' is not available on this machine: the tensorrt Python package "
        "is not installed (install TensorRT 10: JetPack on Jetson, or NVIDIA's wheels)"
    )
    with pytest.raises(Loc3rError, match="cannot run a TensorRT engine package"):
        resolve_backend("cpu", graph_format="tensorrt")


def test_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(
        backends, "ort_providers",
        lambda: ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    )
    assert available_backends() == ["tensorrt", "cuda", "cpu"]
    assert resolve_backend("auto").name == "cuda"
    trt = resolve_backend("tensorrt")
    assert trt.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def test_unknown_backend():
    with pytest.raises(Loc3rError) as e:
        resolve_backend("metal")
    assert str(e.value) == "unknown backend 'metal'; choose one of: auto, cpu, cuda, tensorrt"


def test_ort_runner_infer_and_bound(tiny_package):
    pkg = load_package(tiny_package)
    runner = open_runner(pkg.graph_path("heads"), resolve_backend("cpu"), spec=pkg.manifest.graph("heads"))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(runner.infer({"x": x})["y"], x + 1)
    out = np.zeros((2, 4), np.float32)
    assert runner.infer_bound({"x": x}, in_place={"y": out}) == {}
    np.testing.assert_array_equal(out, x + 1)  # written into our buffer
    assert runner.infer_bound({"x": x}, fetch=["y"])["y"].tolist() == (x + 1).tolist()
    assert runner.input_specs() == [TensorSpec("x", "float32", ("batch", 4))]
    runner.deactivate()
    with pytest.raises(Loc3rError, match="is not activated"):
        runner.infer({"x": x})


def test_ort_runner_refuses_io_mismatch(tiny_package):
    pkg = load_package(tiny_package)
    spec = pkg.manifest.graph("heads")
    wrong = dataclasses.replace(spec, inputs=(TensorSpec("pixel_values", "float32", ("batch", 4)),))
    with pytest.raises(Loc3rError) as e:
        open_runner(pkg.graph_path("heads"), resolve_backend("cpu"), spec=wrong)
    assert str(e.value) == "graph heads.onnx inputs differ from the manifest: missing pixel_values; unexpected x"


def test_ort_runner_bad_graph_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(Loc3rError, match="^cannot load graph bad.onnx: "):
        open_runner(bad, resolve_backend("cpu"))


def test_tensorrt_runner():
    from loc3r.runtime.backends import tensorrt as trt_backend

    if backends.tensorrt_python_available():
        pytest.skip("TensorRT is installed here; engine tests need an engine built on this device")
    with pytest.raises(Loc3rError) as e:
        trt_backend.TrtRunner("model.engine").activate()
    assert str(e.value) == trt_backend.NOT_AVAILABLE
