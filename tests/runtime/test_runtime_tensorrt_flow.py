"""TrtRunner's buffer and binding flow, on fake tensorrt/cuda-python modules that run on host memory.

Real engines need TensorRT and a GPU (none here); this checks the runner's own
logic: I/O discovery and the manifest check, shapes, host<->device copies,
and persistent device buffers bound by address (the KV-cache path).
"""

import ctypes
import sys
import types
from enum import Enum

import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, TensorSpec


class _Err(int):
    pass


def fake_cudart():
    allocations = {}
    rt = types.SimpleNamespace()

    def malloc(n):
        buf = ctypes.create_string_buffer(n)
        allocations[ctypes.addressof(buf)] = buf
        return _Err(0), ctypes.addressof(buf)

    rt.cudaMalloc = malloc
    rt.cudaFree = lambda ptr: (allocations.pop(ptr), (_Err(0),))[1]
    rt.cudaMemset = lambda ptr, v, n: (ctypes.memset(ptr, v, n), (_Err(0),))[1]
    rt.cudaMemcpyAsync = lambda dst, src, n, kind, stream: (ctypes.memmove(dst, src, n), (_Err(0),))[1]
    rt.cudaStreamCreate = lambda: (_Err(0), 7)
    rt.cudaStreamDestroy = lambda s: (_Err(0),)
    rt.cudaStreamSynchronize = lambda s: (_Err(0),)
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    rt.allocations = allocations
    return rt


def fake_tensorrt():
    """An 'engine' with x (N, 4) -> y = x + 1 and an accumulator acc (4,) += x.sum(0), in place."""
    trt = types.ModuleType("tensorrt")
    trt.TensorIOMode = Enum("TensorIOMode", "INPUT OUTPUT")
    trt.DataType = Enum("DataType", "FLOAT")
    io = [("x", "INPUT", (-1, 4)), ("acc", "INPUT", (4,)), ("y", "OUTPUT", (-1, 4)), ("acc_out", "OUTPUT", (4,))]

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            return {"y": self.shapes["x"], "acc_out": (4,)}[name]

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            n = self.shapes["x"][0]
            view = lambda name, count: np.ctypeslib.as_array(
                (ctypes.c_float * count).from_address(self.addr[name]))
            x = view("x", n * 4).reshape(n, 4)
            view("y", n * 4)[:] = (x + 1).ravel()
            acc_in = view("acc", 4).copy()
            view("acc_out", 4)[:] = acc_in + x.sum(0)
            return True

    class Engine:
        num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return io[i][0]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode[next(m for n, m, _ in io if n == name)]

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            return next(s for n, _, s in io if n == name)

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"engine" else None

    trt.Logger = type("Logger", (), {"ERROR": 0, "__init__": lambda self, level: None})
    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch):
    rt = fake_cudart()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    return rt


SPEC = GraphSpec(
    role="heads", file="heads.engine", format="tensorrt",
    inputs=(TensorSpec("x", "float32", ("n", 4)), TensorSpec("acc", "float32", (4,))),
    outputs=(TensorSpec("y", "float32", ("n", 4)), TensorSpec("acc_out", "float32", (4,))),
)


def test_runner_flow(fakes, tmp_path):
    from loc3r.runtime.backends.tensorrt import TrtRunner

    path = tmp_path / "heads.engine"
    path.write_bytes(b"engine")
    with TrtRunner(path, spec=SPEC) as runner:
        acc = runner.device_buffer((4,), np.float32)
        runner.bind_device("acc", acc)
        runner.bind_device("acc_out", acc)  # in place, as past/present KV
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = runner.infer({"x": x})
        np.testing.assert_array_equal(out["y"], x + 1)
        assert set(out) == {"y"}  # bound outputs stay on the device
        runner.infer({"x": np.ones((3, 4), np.float32)})
        host = np.ctypeslib.as_array((ctypes.c_float * 4).from_address(acc.ptr))
        np.testing.assert_array_equal(host, x.sum(0) + 3)
        assert runner.last_inference_time() > 0
    assert runner.context is None


def test_runner_refuses_bad_engine_and_io(fakes, tmp_path):
    from loc3r.runtime.backends.tensorrt import TrtRunner

    bad = tmp_path / "other.engine"
    bad.write_bytes(b"built elsewhere")
    with pytest.raises(Loc3rError, match="built for another GPU or TensorRT version"):
        TrtRunner(bad).activate()
    good = tmp_path / "heads.engine"
    good.write_bytes(b"engine")
    wrong = GraphSpec(role="heads", file="heads.engine", format="tensorrt", inputs=SPEC.inputs[:1],
                      outputs=SPEC.outputs)
    with pytest.raises(Loc3rError, match="graph heads.engine inputs differ from the manifest: unexpected acc"):
        TrtRunner(good, spec=wrong).activate()


def test_missing_cuda_python(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    from loc3r.runtime.backends.tensorrt import NO_CUDA_PYTHON, TrtRunner

    with pytest.raises(Loc3rError) as e:
        TrtRunner(tmp_path / "x.engine").activate()
    assert str(e.value) == NO_CUDA_PYTHON
