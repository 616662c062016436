"""bench/peers_report.py: figures, roofline fractions, target checks and the table, on hand-made numbers."""

import json

import pytest

from loc3r.runtime.profile_cli import DecoderCost
from peers_report import markdown_table, summarize, table_columns, target_checks, write_json

# 1 GB of weights, 1 MB of KV per position, 2 GFLOP of matmuls per token, 10 layers x 4 heads of 64.
COST = DecoderCost(weight_bytes=10**9, matmul_flops=2e9, attention_heads=40, head_dim=64, kv_bytes_per_token=10**6,
                   head_flops=0.5e9)
ROOF = {"bandwidth_gbps": 20.0, "matmul_gflops": 100.0}


def test_summarize_p50_rates_and_bounds():
    samples = {"prefill_256": [2.0, 1.0, 9.0], "prefill_1024": [8.0], "decode": [0.25, 0.2, 0.3],
               "vision": [0.01, 0.03, 0.02], "answer": [0.5, 0.7]}
    row = summarize(samples, (256, 1024), COST, ROOF, decode_context=1000)
    assert row["prefill_256_tps"] == pytest.approx(128.0)  # p50 2 s for 256 tokens
    assert row["prefill_1024_tps"] == pytest.approx(128.0)
    assert row["decode_tps"] == pytest.approx(4.0)
    assert row["vision_ms"] == pytest.approx(20.0) and row["answer_ms"] == pytest.approx(600.0)
    # decode: 1 GB + 1 MB x 1000 = 2 GB/token; 20 GB/s -> 10 tok/s bound; 4 tok/s = 40 %
    assert row["decode_bytes_per_token"] == 2 * 10**9
    assert row["decode_bound_pct"] == pytest.approx(40.0)
    # prefill 1024: layers 1.5e9 + lm_head 0.5e9 once per prompt + attention to 512 on average
    flops = 1.5e9 + 0.5e9 / 1024 + 4 * 40 * 64 * 512
    assert row["prefill_1024_bound_pct"] == pytest.approx(100 * 128.0 * flops / 100e9)


def test_summarize_missing_ops_are_none():
    row = summarize({"prefill_256": [1.0]}, (256,), None, None, 256)
    assert row == {"prefill_256_tps": 256.0, "decode_tps": None, "vision_ms": None, "answer_ms": None}


def test_target_checks():
    rows = {
        "loc3r-int4": {"decode_tps": 30.0, "decode_bound_pct": 65.0, "prefill_256_tps": 95.0, "answer_ms": 100.0},
        "ort-genai-int4": {"decode_tps": 25.0, "prefill_256_tps": 100.0, "answer_ms": None},
        "torch-fp32": {"answer_ms": 5000.0},
    }
    checks = {c["target"]: c for c in target_checks(rows)}
    assert checks["loc3r int4 decode >= onnxruntime-genai int4"]["value"] == pytest.approx(1.2)
    assert checks["loc3r int4 decode >= onnxruntime-genai int4"]["met"]
    assert not checks["loc3r int4 decode >= 70% of the bandwidth bound"]["met"]
    assert checks["loc3r-int4 prefill 256 >= 0.9x ort-genai-int4"]["met"]  # 0.95x
    answer = checks["loc3r-int4 answer >= 10x faster than the fastest peer at question time"]
    assert answer["value"] == pytest.approx(50.0) and answer["met"]
    assert len(checks) == 4  # no fp32 rows: no fp32 prefill check


def test_markdown_table_marks_missing_figures():
    cols = table_columns((1024, 256))
    assert [h for _, h, _ in cols][:3] == ["prefill 256 tok/s", "prefill 1024 tok/s", "prefill 1024 % FLOP bound"]
    text = markdown_table({"a": {"prefill_256_tps": 1234.4, "decode_tps": 5.678, "peak_rss_mb": 99.6}}, cols)
    lines = text.splitlines()
    assert lines[0].startswith("| system | prefill 256 tok/s |")
    assert lines[1] == "|---|" + "---:|" * len(cols)
    assert lines[2] == "| a | 1234 | n/a | n/a | 5.68 | n/a | n/a | n/a | 100 |"


def test_write_json_round_trip(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"cost": COST, "path": tmp_path})
    data = json.loads(path.read_text())
    assert data["cost"]["weight_bytes"] == 10**9 and data["path"] == str(tmp_path)
