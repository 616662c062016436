"""Triton kernels against their PyTorch references under TRITON_INTERPRET=1.

The cases run in one child process (see interpreted_cases.py), so the interpreter flag
never reaches this pytest process or other test files.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

HERE = Path(__file__).resolve().parent


def load_cases():
    """interpreted_cases.py is a child-process script; load it by path (no sys.path change)."""
    name = "loc3r_tests_kernels_interpreted_cases"
    spec = importlib.util.spec_from_file_location(name, HERE / "interpreted_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


cases = load_cases()
LARGE = [c for c in cases.PREFILL_CASES + cases.DECODE_CASES if c.k_offset]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "interpreted_cases.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", cases.all_case_ids())
def test_kernel_matches_reference(results, case_id):
    r = results[case_id]
    assert r["finite"], f"{case_id}: non-finite output"
    assert r["max_err"] <= r["tol"], f"{case_id}: max error {r['max_err']:.3g} > tolerance {r['tol']:.3g}"


@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.id)
def test_large_scale_cases_would_overflow_naive_fp16(results, case):
    # The overflow test is only meaningful if plain fp16 scores would be inf.
    kind = "prefill" if isinstance(case, cases.PrefillCase) else "decode"
    assert results[f"{kind}/{case.id}"]["naive_scores_overflow"]


def test_cases_cover_the_required_shapes():
    attn = cases.PREFILL_CASES + cases.DECODE_CASES
    assert {c.h // c.kvh for c in attn} >= {1, 4, 7}
    assert {c.d for c in attn} == {64, 128}
    assert {c.dtype for c in attn} == {"float32", "float16"}
    assert any(0 in c.prefix for c in cases.PREFILL_CASES)
    assert any(c.t % 2 for c in cases.PREFILL_CASES)
    assert any((c.num_splits or 1) > 1 for c in cases.DECODE_CASES)
