"""`cmake -S . -B build && cmake --build build` in a temp dir: AOT cubins, launchers, plugin status."""

import ctypes
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from loc3r.kernels.aot import fixed_variants
from loc3r.kernels.decode_attention import split_plan

REPO = Path(__file__).resolve().parents[2]
CUDA_ERROR_NOT_INITIALIZED = 3


@pytest.fixture(scope="module")
def build():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="loc3r-cmake-") as tmp:
        out = Path(tmp) / "build"
        configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(out)], capture_output=True, text=True, timeout=300)
        assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
        compiled = subprocess.run(["cmake", "--build", str(out), "-j", "2"], capture_output=True, text=True, timeout=600)
        assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
        yield out, configure.stdout


def test_every_kernel_is_compiled_for_sm87_and_sm90(build):
    out, _ = build
    manifest = json.loads((out / "aot" / "manifest.json").read_text())
    assert manifest["archs"] == [87, 90]
    assert [v["name"] for v in manifest["variants"]] == [v.name for v in fixed_variants()]
    families = {v["kernel"].rsplit(".", 1)[1] for v in manifest["variants"]}
    assert families == {"prefill_attention_kernel", "decode_attention_split_kernel", "decode_attention_reduce_kernel",
                        "w4a16_gemm_kernel", "w4a16_gemv_kernel"}
    for v in manifest["variants"]:
        for b in v["builds"]:
            cubin = (out / "aot" / "cubin" / f"{v['name']}.sm{b['arch']}.cubin").read_bytes()
            assert cubin[:4] == b"\x7fELF"
            assert hashlib.sha256(cubin).hexdigest() == b["cubin_sha256"]
            ptx = (out / "aot" / "ptx" / f"{v['name']}.sm{b['arch']}.ptx").read_text()
            assert f".target sm_{b['arch']}" in ptx
            assert f".entry {v['function']}(" in ptx


def test_configure_states_what_it_skips(build):
    _, log = build
    assert "loc3r: Triton AOT kernels for sm 87;90" in log
    has_trt = "loc3r: TensorRT plugin (libloc3r_trt_plugin)" in log
    assert has_trt or "TensorRT plugin skipped" in log


def launcher_library(out: Path) -> Path:
    lib = out / "libloc3r_aot.so"
    if not lib.exists():
        pytest.skip("CUDA toolkit headers not found: the AOT launchers were skipped (see the configure log)")
    return lib


def test_selftest_lists_every_kernel_with_valid_cubins(build):
    out, _ = build
    launcher_library(out)
    run = subprocess.run([str(out / "loc3r_aot_selftest")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"loc3r AOT kernels: {len(fixed_variants())}" in run.stdout
    assert "NOT-ELF" not in run.stdout
    assert "CUDA driver: " in run.stdout


def test_launcher_library_matches_python_dispatch(build):
    out, _ = build
    lib = ctypes.CDLL(str(launcher_library(out)))
    lib.loc3r_aot_find.restype = ctypes.c_void_p
    assert lib.loc3r_aot_find(b"w4a16_gemv_fp16_b32_zp")
    assert not lib.loc3r_aot_find(b"no_such_kernel")
    split_size = ctypes.c_int(0)
    for cache_len in (1, 255, 257, 4096, 8192, 40000):
        splits = lib.loc3r_decode_num_splits(cache_len, ctypes.byref(split_size))
        assert (splits, split_size.value) == split_plan(cache_len, 64)
    if not lib.loc3r_aot_driver_available():
        # Launching without a driver fails cleanly instead of crashing.
        shape = (ctypes.c_int * 5)(4, 64, 64, 32, 1)
        rc = lib.loc3r_w4a16_matmul_fp16(None, shape, *[ctypes.c_uint64(0)] * 5)
        assert rc == CUDA_ERROR_NOT_INITIALIZED


def cuda_include_dir():
    for d in (Path("/usr/local/cuda/include"), Path("/usr/include")):
        if (d / "cuda.h").exists():
            return d
    return None


def test_tensorrt_plugin_source_compiles_against_the_api_stub():
    # TensorRT cannot be installed here; a stub of its documented plugin API lets the
    # compiler check the plugin's C++ (overrides, abstract classes, types).
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or cuda_include_dir() is None:
        pytest.skip("needs a C++ compiler and cuda.h (CUDA toolkit)")
    run = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
         "-I", str(REPO / "tests" / "kernels" / "tensorrt_api_stub"), "-I", str(REPO / "kernels" / "native"),
         "-I", str(cuda_include_dir()), str(REPO / "kernels" / "native" / "loc3r_trt_plugins.cpp")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_host_dispatch_passes_arguments_in_kernel_signature_order(build):
    # loc3r_kernels.c names each launch argument after the Triton parameter it feeds.
    import re

    out, _ = build
    manifest = json.loads((out / "aot" / "manifest.json").read_text())
    signature = {v["function"]: [a for a, _ in v["args"]] for v in manifest["variants"]}
    source = (REPO / "kernels" / "native" / "loc3r_kernels.c").read_text()
    arrays = re.findall(r"void \*params_\w+\[\] = \{([^}]*)\};\s*/\* (\w+) \*/", source)
    assert {fn for _, fn in arrays} == set(signature)
    for body, fn in arrays:
        names = [a.strip().lstrip("&") for a in body.split(",")]
        assert names == signature[fn] + ["global_scratch", "profile_scratch"], fn
