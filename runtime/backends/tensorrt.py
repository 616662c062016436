"""A TensorRT 10 engine runner, imported lazily.

Device buffers use NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``, or
the older ``cuda.cudart`` layout), not pycuda, because:

- it ships prebuilt wheels for x86-64 and aarch64 (JetPack 6/7), while pycuda
  compiles against the local CUDA toolkit at install time;
- it is a thin, explicit binding of the CUDA runtime API (cudaMalloc,
  cudaMemcpyAsync, streams), which is all TensorRT 10's
  ``set_tensor_address`` + ``execute_async_v3`` need, and it does not create
  or push its own CUDA context behind TensorRT's back as pycuda.autoinit does;
- NVIDIA's own TensorRT samples use it since TensorRT 8.6.

Persistent device buffers (the KV cache) are allocated once with
:meth:`TrtRunner.device_buffer` and bound by address with
:meth:`TrtRunner.bind_device`. Where TensorRT or cuda-python is absent,
activating a runner raises one clear :class:`Loc3rError`.

Engines of ``--target tensorrt`` packages (manifest ``target: "tensorrt"``)
hold ``loc3r::FusedAttention`` plugin layers, so the plugin library
(:data:`PLUGIN_LIBRARY`, built by CMakeLists.txt) is loaded into TensorRT's
registry before they are deserialized (:func:`find_plugin_library`,
:func:`load_plugin_library`). Their decoder writes the new K/V rows with a
ScatterND whose output (``present``) is a new tensor: TensorRT 10.3 does not
let an output alias an input (aliased I/O arrived with IKVCacheUpdateLayer in
later releases), so the KV cache is two device buffers per layer that swap
roles every step (:class:`KVPingPong`): no host copies and no allocation per
step, at the cost of the scatter's device-side copy of the cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, TensorSpec, check_graph_io

NOT_AVAILABLE = (
    "backend 'tensorrt' is not available on this machine: the tensorrt Python package "
    "is not installed (install TensorRT 10: JetPack on Jetson, or NVIDIA's wheels)"
)
NO_CUDA_PYTHON = (
    "backend 'tensorrt' needs NVIDIA's cuda-python for device buffers: pip install cuda-python"
)


PLUGIN_LIBRARY = "libloc3r_trt_plugin.so"
PLUGIN_ENV = "LOC3R_TRT_PLUGIN"
PLUGIN_CREATOR = ("FusedAttention", "1", "loc3r")  # name, version, namespace


def plugin_search_paths() -> list[Path]:
    """Where :func:`find_plugin_library` looks, in order: ``$LOC3R_TRT_PLUGIN`` (files or folders,
    os.pathsep-separated), ``./build``, and the CMake build folder of this source tree."""
    out: list[Path] = []
    for item in filter(None, os.environ.get(PLUGIN_ENV, "").split(os.pathsep)):
        path = Path(item).expanduser()
        out.append(path if path.suffix == ".so" else path / PLUGIN_LIBRARY)
    out.append(Path.cwd() / "build" / PLUGIN_LIBRARY)
    out.append(Path(__file__).resolve().parents[2] / "build" / PLUGIN_LIBRARY)
    return out


def find_plugin_library() -> Path:
    """The loc3r TensorRT plugin library, or a Loc3rError saying where it was looked for."""
    candidates = plugin_search_paths()
    for path in candidates:
        if path.is_file():
            return path
    raise Loc3rError(
        f"the loc3r TensorRT plugin library {PLUGIN_LIBRARY} (loc3r::FusedAttention) was not found in "
        f"{', '.join(str(p.parent) for p in candidates)}: build it on the device with "
        f"'cmake -S . -B build && cmake --build build', set {PLUGIN_ENV}, or pass --plugin PATH"
    )


_loaded_plugins: set = set()  # (registry id, path): TensorRT registers a library's creators once


def load_plugin_library(trt, path: Union[str, Path], need_attention: bool = True) -> None:
    """Load ``path`` into TensorRT's plugin registry (once); check it registered loc3r::FusedAttention."""
    path = Path(path)
    if not path.is_file():
        raise Loc3rError(f"plugin library not found: {path}")
    registry = trt.get_plugin_registry()
    key = (id(registry), str(path.resolve()))
    if key in _loaded_plugins:
        return
    if registry.load_library(str(path)) is None:
        raise Loc3rError(f"TensorRT could not load the plugin library {path}")
    _loaded_plugins.add(key)
    if need_attention and hasattr(registry, "get_creator") and registry.get_creator(*PLUGIN_CREATOR) is None:
        raise Loc3rError(f"plugin library {path} did not register loc3r::FusedAttention (version 1)")


class KVPingPong:
    """Two sets of per-layer KV buffers that swap roles each decoder step (``--target tensorrt`` engines).

    ``bind(runner)`` binds ``past_key_values.{i}.*`` to the current side and
    ``present.{i}.*`` to the other; ``swap()`` after the step makes the
    written side current. The valid rows are always in the current side.
    """

    def __init__(self, sides: Sequence[Sequence[tuple]]):
        # sides[s][layer] = (key buffer, value buffer)
        if len(sides) != 2 or len(sides[0]) != len(sides[1]):
            raise Loc3rError("KV ping-pong needs two sides with the same number of layers")
        self._sides = [list(s) for s in sides]
        self.current = 0

    def bind(self, runner) -> None:
        cur, nxt = self._sides[self.current], self._sides[1 - self.current]
        for i, ((pk, pv), (nk, nv)) in enumerate(zip(cur, nxt)):
            runner.bind_device(f"past_key_values.{i}.key", pk)
            runner.bind_device(f"past_key_values.{i}.value", pv)
            runner.bind_device(f"present.{i}.key", nk)
            runner.bind_device(f"present.{i}.value", nv)

    def swap(self) -> None:
        self.current = 1 - self.current

    def layer(self, i: int) -> tuple:
        """The current (key, value) buffers of layer ``i``."""
        return self._sides[self.current][i]


def import_tensorrt():
    """``(tensorrt, cudart)`` or a clear Loc3rError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise Loc3rError(NOT_AVAILABLE) from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise Loc3rError(NO_CUDA_PYTHON) from None
    return trt, cudart


def _check(result):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise Loc3rError(f"CUDA error {int(err)} ({err}) in the TensorRT backend")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


_TRT_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
    "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
}


class DeviceBuffer:
    """A device allocation: pointer, shape and dtype."""

    def __init__(self, cudart, shape: Sequence[int], dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._cudart = cudart
        self.ptr = _check(cudart.cudaMalloc(max(self.nbytes, 1)))
        _check(cudart.cudaMemset(self.ptr, 0, max(self.nbytes, 1)))

    def free(self) -> None:
        if self.ptr is not None:
            _check(self._cudart.cudaFree(self.ptr))
            self.ptr = None


class TrtRunner:
    """Runs one serialized TensorRT 10 engine (Polygraphy-style context manager)."""

    def __init__(self, path: Union[str, Path], spec: Optional[GraphSpec] = None):
        self.path = Path(path)
        self.spec = spec
        self._trt = self._cudart = None
        self.engine = self.context = self.stream = None
        self._bound: dict[str, DeviceBuffer] = {}
        self._scratch: dict[str, DeviceBuffer] = {}
        self._last_s: Optional[float] = None

    def activate(self) -> "TrtRunner":
        if self.context is not None:
            return self
        trt, cudart = import_tensorrt()
        self._trt, self._cudart = trt, cudart
        if not self.path.is_file():
            raise Loc3rError(f"engine file not found: {self.path}")
        logger = trt.Logger(trt.Logger.ERROR)
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise Loc3rError(
                f"cannot load TensorRT engine {self.path.name}: it was built for another GPU or "
                "TensorRT version; rebuild it on this device with 'loc3r export tensorrt'"
            )
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        if self.spec is not None:
            try:
                check_graph_io(self.spec, *self._io_specs())
            except Loc3rError:
                self.deactivate()
                raise
        return self

    def deactivate(self) -> None:
        for buf in list(self._scratch.values()):
            buf.free()
        self._scratch.clear()
        self._bound.clear()
        if self.stream is not None:
            _check(self._cudart.cudaStreamDestroy(self.stream))
        self.engine = self.context = self.stream = None

    def __enter__(self) -> "TrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def last_inference_time(self) -> Optional[float]:
        return self._last_s

    def _io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        trt = self._trt
        ins, outs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dt = _TRT_DTYPES.get(self.engine.get_tensor_dtype(name).name, "float32")
            shape = tuple(d if d >= 0 else "?" for d in self.engine.get_tensor_shape(name))
            spec = TensorSpec(name=name, dtype=dt, shape=shape)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (ins if is_input else outs).append(spec)
        return ins, outs

    def device_buffer(self, shape: Sequence[int], dtype=np.float32) -> DeviceBuffer:
        """A persistent zeroed device buffer (e.g. one layer's KV)."""
        if self._cudart is None:
            raise Loc3rError("TensorRT runner is not activated")
        return DeviceBuffer(self._cudart, shape, dtype)

    def bind_device(self, name: str, buf: DeviceBuffer) -> None:
        """Bind ``name`` (input or output) to ``buf`` for every later run."""
        self._bound[name] = buf

    def infer(
        self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None
    ) -> dict[str, np.ndarray]:
        """Host inputs in, host outputs out; names bound with :meth:`bind_device` stay on device."""
        trt, cudart = self._trt, self._cudart
        if self.context is None:
            raise Loc3rError(f"engine {self.path.name} is not activated")
        H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        t0 = time.perf_counter()
        for name, host in feed.items():
            host = np.ascontiguousarray(host)
            self.context.set_input_shape(name, host.shape)
            buf = self._scratch_for(name, host.shape, host.dtype)
            _check(cudart.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, H2D, self.stream))
            self.context.set_tensor_address(name, buf.ptr)
        for name, buf in self._bound.items():
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.context.set_input_shape(name, buf.shape)
            self.context.set_tensor_address(name, buf.ptr)
        names = list(outputs) if outputs is not None else [
            self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
            and self.engine.get_tensor_name(i) not in self._bound
        ]
        hosts = {}
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(_TRT_DTYPES.get(self.engine.get_tensor_dtype(name).name, "float32"))
            buf = self._scratch_for(name, shape, dtype)
            self.context.set_tensor_address(name, buf.ptr)
            hosts[name] = np.empty(shape, dtype)
        if not self.context.execute_async_v3(int(self.stream)):
            raise Loc3rError(f"TensorRT engine {self.path.name} failed to run")
        for name, host in hosts.items():
            buf = self._scratch[name]
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, buf.ptr, host.nbytes, D2H, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        self._last_s = time.perf_counter() - t0
        return hosts

    def _scratch_for(self, name: str, shape, dtype) -> DeviceBuffer:
        buf = self._scratch.get(name)
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if buf is None or buf.nbytes < need:
            if buf is not None:
                buf.free()
            buf = DeviceBuffer(self._cudart, shape, dtype)
            self._scratch[name] = buf
        return buf
