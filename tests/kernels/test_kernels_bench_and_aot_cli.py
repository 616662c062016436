"""bench/kernel_bench.py on CPU (correctness only) and the AOT command line's input errors."""

import json
import subprocess
import sys
from pathlib import Path

from loc3r.kernels import aot

REPO = Path(__file__).resolve().parents[2]


def test_bench_on_cpu_reports_small_errors_and_no_timings(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    if report["measured_copy_gbps"] is None:  # no GPU: interpreter, errors only
        assert report["device"] == "cpu (Triton interpreter)"
        assert all(r["ms"] is None for r in report["rows"])
    kinds = {r["name"].split()[0] for r in report["rows"]}
    assert kinds == {"prefill", "decode", "gemv", "gemm"}
    assert all(r["max_err"] < 1e-3 for r in report["rows"] if r["max_err"] is not None)
    assert "max err" in run.stdout


def test_aot_lists_outputs_without_compiling(tmp_path, capsys):
    assert aot.main(["--out-dir", str(tmp_path), "--list-outputs", "--kernels", "w4a16_gemv_*"]) == 0
    files = capsys.readouterr().out.split()
    assert files[0].endswith("include/loc3r_aot_kernels.h")
    assert sorted(Path(f).name for f in files[2:]) == sorted(
        f"w4a16_gemv_fp16_b{b}_{z}.c" for b in (32, 128) for z in ("zp", "nozp"))
    assert not any(tmp_path.iterdir())


def test_aot_rejects_unknown_kernels_and_old_archs(tmp_path, capsys):
    assert aot.main(["--out-dir", str(tmp_path), "--list-outputs", "--kernels", "nope*"]) == 1
    assert "error: no AOT kernel matches ['nope*']" in capsys.readouterr().err
    assert aot.main(["--out-dir", str(tmp_path), "--arch", "75"]) == 1
    assert "AOT targets need sm_80 or newer" in capsys.readouterr().err


def test_aot_compiles_one_kernel_for_both_targets(tmp_path):
    manifest = aot.build(tmp_path, [87, 90], ["decode_attention_reduce_fp16_d64"], jobs=1)
    (variant,) = manifest["variants"]
    assert [b["arch"] for b in variant["builds"]] == [87, 90]
    src = (tmp_path / "src" / "decode_attention_reduce_fp16_d64.c").read_text()
    assert "CUresult loc3r_decode_attention_reduce_fp16_d64(CUstream stream" in src
    assert "&global_scratch, &profile_scratch" in src
