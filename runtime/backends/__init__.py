"""Inference backends: which exist on this machine, and which one to use.

Backend names (the ``--backend`` choices):

- ``cpu``: onnxruntime, CPUExecutionProvider. Always present; the fp32
  reference.
- ``cuda``: onnxruntime, CUDAExecutionProvider (``onnxruntime-gpu``).
- ``tensorrt``: for a package of ``.engine`` files, the native TensorRT 10
  runner (:mod:`.tensorrt`); for a package of ONNX graphs, onnxruntime's
  TensorrtExecutionProvider.
- ``auto``: the best one available for the package: ``tensorrt`` for engine
  packages; for ONNX packages ``cuda`` if present, else ``cpu``. (ORT's
  TensorRT provider is never picked automatically: it builds engines on the
  first run, which can take minutes; ask for it by name.)

Nothing here imports onnxruntime or tensorrt at module import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from loc3r.errors import Loc3rError

BACKEND_CHOICES = ("auto", "cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name, the engine that runs it, and ORT providers."""

    name: str  # "cpu" | "cuda" | "tensorrt"
    engine: str  # "onnxruntime" | "tensorrt"
    providers: tuple[str, ...]  # onnxruntime providers, best first; () for native TensorRT

    def describe(self) -> str:
        if self.engine == "tensorrt":
            return "tensorrt (native TensorRT engines)"
        return f"{self.name} (onnxruntime {self.providers[0]})"


def ort_providers() -> tuple[str, ...]:
    """onnxruntime's available execution providers, or () without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def tensorrt_python_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def available_backends(graph_format: str = "onnx") -> list[str]:
    """Backend names usable here for graphs of ``graph_format``, best first."""
    provs = ort_providers()
    out = []
    if graph_format == "tensorrt":
        if tensorrt_python_available():
            out.append("tensorrt")
        return out
    if "TensorrtExecutionProvider" in provs:
        out.append("tensorrt")
    if "CUDAExecutionProvider" in provs:
        out.append("cuda")
    if "CPUExecutionProvider" in provs:
        out.append("cpu")
    return out


def resolve_backend(request: str, graph_format: str = "onnx") -> Backend:
    """The :class:`Backend` for ``request`` (a BACKEND_CHOICES name), or a clear Loc3rError."""
    if request not in BACKEND_CHOICES:
        raise Loc3rError(f"unknown backend '{request}'; choose one of: {', '.join(BACKEND_CHOICES)}")
    if graph_format not in ("onnx", "tensorrt"):
        raise Loc3rError(f"unknown graph format '{graph_format}' in the model package")
    provs = ort_providers()
    if graph_format == "tensorrt":
        if request not in ("auto", "tensorrt"):
            raise Loc3rError(
                f"backend '{request}' cannot run a TensorRT engine package; use --backend tensorrt "
                "or an ONNX package"
            )
        if not tensorrt_python_available():
            raise Loc3rError(
                "backend 'tensorrt' is not available on this machine: the tensorrt Python package "
                "is not installed (install TensorRT 10: JetPack on Jetson, or NVIDIA's wheels)"
            )
        return Backend("tensorrt", "tensorrt", ())
    if not provs:
        raise Loc3rError("no backend is available on this machine: onnxruntime is not installed (pip install onnxruntime)")
    if request == "auto":
        request = "cuda" if "CUDAExecutionProvider" in provs else "cpu"
    if request == "cpu":
        if "CPUExecutionProvider" not in provs:
            raise Loc3rError("backend 'cpu' is not available on this machine: onnxruntime has no CPUExecutionProvider")
        return Backend("cpu", "onnxruntime", ("CPUExecutionProvider",))
    if request == "cuda":
        if "CUDAExecutionProvider" not in provs:
            raise Loc3rError(
                "backend 'cuda' is not available on this machine: onnxruntime has no "
                "CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        return Backend("cuda", "onnxruntime", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    # request == "tensorrt" on an ONNX package: ORT's TensorRT provider.
    if "TensorrtExecutionProvider" not in provs:
        raise Loc3rError(
            "backend 'tensorrt' is not available on this machine: onnxruntime has no "
            "TensorrtExecutionProvider (install onnxruntime-gpu with TensorRT, or build "
            "engines with 'loc3r export tensorrt' and run that package)"
        )
    rest = tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in provs)
    return Backend("tensorrt", "onnxruntime", ("TensorrtExecutionProvider",) + rest)


def open_runner(path, backend: Backend, spec=None, threads=None):
    """An activated runner for one graph file on ``backend`` (imports the engine lazily).

    ``spec`` (a :class:`loc3r.runtime.package.GraphSpec`) makes activation
    refuse a graph whose I/O differs from the manifest.
    """
    if backend.engine == "tensorrt":
        from loc3r.runtime.backends.tensorrt import TrtRunner

        return TrtRunner(path, spec=spec).activate()
    from loc3r.runtime.backends.ort import OrtRunner

    return OrtRunner(path, backend, spec=spec, threads=threads).activate()
