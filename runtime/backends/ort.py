"""An onnxruntime graph runner (CPU, CUDA or TensorRT execution providers).

Polygraphy-style: a context manager with :meth:`activate` / :meth:`infer` /
:meth:`deactivate` and :meth:`last_inference_time`. On activation the graph's
real inputs and outputs are checked against its manifest entry
(:func:`loc3r.runtime.package.check_graph_io`).

Two ways to run:

- :meth:`infer`: numpy in, numpy out (allocates outputs).
- :meth:`infer_bound`: I/O binding. ``in_place`` maps an output name to an
  existing buffer that the graph writes into: this is how the decoder's
  ``present.*`` outputs land in the same KV buffers that are bound as its
  ``past_key_values.*`` inputs, so a step never copies the cache. On CPU the
  buffers are numpy arrays wrapped as OrtValues without a copy; on CUDA pass
  device OrtValues from :meth:`device_buffer`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.backends import Backend
from loc3r.runtime.package import GraphSpec, TensorSpec, check_graph_io

# onnxruntime type strings -> manifest dtypes.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

Buffer = object  # a numpy array, or an onnxruntime.OrtValue


def _tensor_spec(arg) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise Loc3rError(f"graph tensor '{arg.name}' has a type loc3r does not support: {arg.type}")
    # ORT reports symbolic dims as strings and unknown ones as None.
    shape = tuple(d if isinstance(d, (int, str)) else "?" for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


class OrtRunner:
    """Runs one ONNX graph with onnxruntime."""

    def __init__(
        self,
        path: Union[str, Path],
        backend: Backend,
        spec: Optional[GraphSpec] = None,
        threads: Optional[int] = None,
        trt_cache_dir: Optional[Union[str, Path]] = None,
        trt_fp16: bool = False,
    ):
        if backend.engine != "onnxruntime":
            raise Loc3rError(f"OrtRunner cannot run backend '{backend.name}' ({backend.engine})")
        self.path = Path(path)
        self.backend = backend
        self.spec = spec
        self.threads = threads
        self.trt_cache_dir = None if trt_cache_dir is None else Path(trt_cache_dir)
        self.trt_fp16 = trt_fp16  # let ORT's TensorRT provider run layers in fp16 (fp16 packages)
        self.session = None
        self._last_s: Optional[float] = None
        self._device = "cuda" if backend.providers[0] != "CPUExecutionProvider" else "cpu"

    # ---- lifecycle ----
    def activate(self) -> "OrtRunner":
        if self.session is not None:
            return self
        import onnxruntime as ort

        if not self.path.is_file():
            raise Loc3rError(f"graph file not found: {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: keep the user's terminal clean
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = [self._provider_entry(p) for p in self.backend.providers]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Loc3rError(f"cannot load graph {self.path.name}: {first}") from exc
        if self.spec is not None:
            try:
                check_graph_io(self.spec, self.input_specs(), self.output_specs())
            except Loc3rError:
                self.session = None
                raise
        return self

    def _provider_entry(self, name: str):
        if name == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": str(self.trt_fp16), "trt_engine_cache_enable": "True"}
            if self.trt_cache_dir is not None:
                opts["trt_engine_cache_path"] = str(self.trt_cache_dir)
                opts["trt_timing_cache_enable"] = "True"
                opts["trt_timing_cache_path"] = str(self.trt_cache_dir)
            return (name, opts)
        return name

    def deactivate(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _session(self):
        if self.session is None:
            raise Loc3rError(f"graph {self.path.name} is not activated")
        return self.session

    # ---- introspection ----
    def input_specs(self) -> list[TensorSpec]:
        return [_tensor_spec(a) for a in self._session().get_inputs()]

    def output_specs(self) -> list[TensorSpec]:
        return [_tensor_spec(a) for a in self._session().get_outputs()]

    def last_inference_time(self) -> Optional[float]:
        """Seconds taken by the last :meth:`infer`/:meth:`infer_bound` call."""
        return self._last_s

    @property
    def device(self) -> str:
        return self._device

    def device_buffer(self, shape: Sequence[int], dtype=np.float32):
        """A persistent OrtValue on this runner's device (zeroed numpy memory on CPU)."""
        import onnxruntime as ort

        if self._device == "cpu":
            # The OrtValue keeps the numpy array alive and shares its memory.
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(tuple(shape), dtype))
        # Uninitialised device memory is fine for a KV cache: positions past
        # the fill length are masked by the attention's sequence lengths.
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, "cuda", 0)

    # ---- running ----
    def infer(
        self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None
    ) -> dict[str, np.ndarray]:
        """Run with numpy inputs; returns the requested outputs (all by default)."""
        sess = self._session()
        names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
        t0 = time.perf_counter()
        try:
            values = sess.run(names, dict(feed))
        except Exception as exc:
            raise Loc3rError(f"graph {self.path.name} failed: {_first_line(exc)}") from exc
        self._last_s = time.perf_counter() - t0
        return dict(zip(names, values))

    def infer_bound(
        self,
        inputs: Mapping[str, Buffer],
        in_place: Optional[Mapping[str, Buffer]] = None,
        fetch: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run with I/O binding.

        ``inputs``: numpy arrays or OrtValues (numpy on CPU is bound without a
        copy). ``in_place``: output name -> buffer the graph writes into
        (numpy on CPU, or an OrtValue). ``fetch``: other outputs, returned as
        numpy. Outputs in neither are still computed but discarded.
        """
        import onnxruntime as ort

        sess = self._session()
        binding = sess.io_binding()
        keep = []  # OrtValues must outlive the run
        for name, buf in inputs.items():
            if isinstance(buf, np.ndarray):
                if self._device == "cpu":
                    buf = ort.OrtValue.ortvalue_from_numpy(_contiguous(buf, name))
                else:
                    binding.bind_cpu_input(name, np.ascontiguousarray(buf))
                    continue
            keep.append(buf)
            binding.bind_ortvalue_input(name, buf)
        for name, buf in (in_place or {}).items():
            if isinstance(buf, np.ndarray):
                if self._device != "cpu":
                    raise Loc3rError(f"in-place output '{name}' must be a device OrtValue on {self.backend.name}")
                buf = ort.OrtValue.ortvalue_from_numpy(_contiguous(buf, name))
            keep.append(buf)
            binding.bind_ortvalue_output(name, buf)
        for name in fetch:
            binding.bind_output(name, "cpu")
        t0 = time.perf_counter()
        try:
            sess.run_with_iobinding(binding)
        except Exception as exc:
            raise Loc3rError(f"graph {self.path.name} failed: {_first_line(exc)}") from exc
        self._last_s = time.perf_counter() - t0
        if not fetch:
            return {}
        # get_outputs() lists bound outputs in binding order: in-place ones
        # first, then the fetched ones. (copy_outputs_to_cpu would copy the
        # in-place KV buffers too: never use it here.)
        fetched = binding.get_outputs()[len(in_place or {}) :]
        return {name: value.numpy() for name, value in zip(fetch, fetched)}


def _contiguous(buf: np.ndarray, name: str) -> np.ndarray:
    if not buf.flags["C_CONTIGUOUS"]:
        raise Loc3rError(f"buffer for '{name}' must be C-contiguous to be bound in place")
    return buf


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
