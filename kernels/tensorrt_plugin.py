"""TensorRT registration of the loc3r plugins, imported lazily (no TensorRT import at module load).

Two ways to give TensorRT the ``loc3r::FusedAttention`` plugin that the ONNX export emits:

- :func:`register_python_plugins` uses TensorRT's Python plugin API (``tensorrt.plugin``,
  TensorRT >= 10.6, IPluginV3 underneath). The implementation runs the Triton kernels
  through torch on TensorRT's stream, which suits a desktop/x86 build with Python in the loop.
- :func:`load_native_plugin_library` loads ``libloc3r_trt_plugin.so`` (built by
  CMakeLists.txt on JetPack), which registers ``loc3r::FusedAttention`` and ``MatMulNBits``
  backed by the AOT cubins and needs no Python at run time. Prefer it on a Jetson.

Both raise :class:`loc3r.errors.Loc3rError` with one clear line when TensorRT is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from loc3r.errors import Loc3rError

PLUGIN_ID = "loc3r::FusedAttention"
_registered: List[str] = []


def import_tensorrt_plugin_api():
    """The ``tensorrt.plugin`` module, or Loc3rError saying what to install."""
    try:
        import tensorrt.plugin as trtp  # noqa: F401
    except ImportError as e:
        raise Loc3rError(
            "TensorRT's Python plugin API (tensorrt.plugin, TensorRT >= 10.6) is not installed: "
            f"{e}; on a Jetson load libloc3r_trt_plugin.so instead (see kernels/README.md)"
        ) from None
    return trtp


def register_python_plugins() -> List[str]:
    """Register loc3r::FusedAttention with tensorrt.plugin (idempotent); returns the plugin ids."""
    if _registered:
        return list(_registered)
    trtp = import_tensorrt_plugin_api()
    from typing import Tuple

    @trtp.register(PLUGIN_ID)
    def fused_attention_desc(
        q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, prefix_lens: trtp.TensorDesc,
        scale: float, causal: int,
    ) -> trtp.TensorDesc:
        return q.like()  # (B, H, T, D), q's dtype

    @trtp.impl(PLUGIN_ID)
    def fused_attention_impl(
        q: trtp.Tensor, k_cache: trtp.Tensor, v_cache: trtp.Tensor, prefix_lens: trtp.Tensor,
        scale: float, causal: int, outputs: Tuple[trtp.Tensor], stream: int,
    ) -> None:
        import torch

        from loc3r.kernels.ops import attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tq, tk, tv = (torch.as_tensor(t, device="cuda") for t in (q, k_cache, v_cache))
            lens = torch.as_tensor(prefix_lens, device="cuda")
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(attention(tq, tk, tv, lens, scale=float(scale), causal=bool(causal)))

    _registered.append(PLUGIN_ID)
    return list(_registered)


def load_native_plugin_library(path: Path) -> None:
    """Load libloc3r_trt_plugin.so into TensorRT's global plugin registry."""
    path = Path(path)
    if not path.is_file():
        raise Loc3rError(f"TensorRT plugin library not found: {path} (build it with CMake, see kernels/README.md)")
    try:
        import tensorrt as trt
    except ImportError as e:
        raise Loc3rError(f"TensorRT is not installed: {e}") from None
    registry = trt.get_plugin_registry()
    if registry.load_library(str(path)) is None:
        raise Loc3rError(f"TensorRT could not load the plugin library {path}")
