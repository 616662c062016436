"""TensorRT plugin registration: lazy import, clear errors without TensorRT, real registration with it."""

import importlib.util
import subprocess
import sys

import pytest

from loc3r.errors import Loc3rError
from loc3r.kernels import tensorrt_plugin

HAS_TRT_PLUGIN_API = importlib.util.find_spec("tensorrt") is not None and \
    importlib.util.find_spec("tensorrt.plugin") is not None


def test_importing_the_module_does_not_import_tensorrt():
    code = "import sys, loc3r.kernels.tensorrt_plugin; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(HAS_TRT_PLUGIN_API, reason="TensorRT is installed: the missing-TensorRT error cannot occur")
def test_without_tensorrt_registration_raises_one_clear_line():
    with pytest.raises(Loc3rError, match=r"TensorRT's Python plugin API \(tensorrt.plugin, TensorRT >= 10.6\) "
                                         r"is not installed"):
        tensorrt_plugin.register_python_plugins()


def test_missing_native_library_is_reported(tmp_path):
    with pytest.raises(Loc3rError, match="TensorRT plugin library not found: .*libloc3r_trt_plugin.so"):
        tensorrt_plugin.load_native_plugin_library(tmp_path / "libloc3r_trt_plugin.so")


@pytest.mark.skipif(not HAS_TRT_PLUGIN_API, reason="TensorRT (tensorrt.plugin) is not installable on this machine")
def test_python_plugin_registers_fused_attention():
    import tensorrt as trt

    assert tensorrt_plugin.register_python_plugins() == ["loc3r::FusedAttention"]
    creator = trt.get_plugin_registry().get_creator("FusedAttention", "1", "loc3r")
    assert creator is not None
