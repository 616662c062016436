import json

import pytest

from loc3r.runtime.profiler import StageProfiler, peak_rss_mb


def test_stats_drop_warmup():
    p = StageProfiler(warmup=1)
    for ms in (100.0, 1.0, 2.0, 3.0, 4.0):
        p.record("vision", ms / 1000)
    s = p.stats("vision")
    assert s.count == 4
    assert s.p50_ms == pytest.approx(2.5)
    assert s.max_ms == pytest.approx(4.0)
    assert s.p95_ms == pytest.approx(3.85)  # numpy linear percentile of [1, 2, 3, 4]
    assert s.mean_ms == pytest.approx(2.5)
    # A stage with only warm-up samples keeps them.
    p.record("decode", 0.007)
    assert p.stats("decode").count == 1 and p.stats("decode").max_ms == pytest.approx(7.0)
    assert p.stats("nothing") is None


def test_stage_context_and_rates():
    p = StageProfiler(warmup=0)
    with p.stage("preprocess", args={"frame": 0}):
        pass
    assert len(p.samples("preprocess")) == 1 and p.samples("preprocess")[0] >= 0
    p.add_frames(10, 2.0)
    p.record("token_decode", 0.25)
    p.record("token_decode", 0.25)
    p.add_tokens(4)
    p.add_first_token(0.030)
    p.add_first_token(0.050)
    r = p.report(backend="cpu (onnxruntime CPUExecutionProvider)")
    assert r.frames_per_s == pytest.approx(5.0)
    assert r.tokens_per_s == pytest.approx(8.0)
    assert r.time_to_first_token_ms == pytest.approx(40.0)
    assert r.peak_rss_mb > 1
    table = r.to_table()
    assert "backend: cpu" in table and "token_decode" in table and "5.00 frames/s" in table
    assert table.index("preprocess") < table.index("token_decode")  # pipeline order
    d = json.loads(r.to_json())
    assert d["stages"]["token_decode"]["count"] == 2 and d["tokens"] == 4


def test_chrome_trace(tmp_path):
    p = StageProfiler()
    with p.stage("vision", args={"frame": 3}):
        pass
    p.record("token_decode", 0.001)
    path = p.write_chrome_trace(tmp_path / "t.json")
    trace = json.loads(path.read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in events] == ["vision", "token_decode"]
    assert events[0]["args"] == {"frame": 3} and events[0]["tid"] == 0 and events[1]["tid"] == 1
    assert events[1]["dur"] == pytest.approx(1000.0)
    assert all(e["ts"] >= 0 for e in events)


def test_disabled_records_nothing():
    p = StageProfiler(enabled=False)
    with p.stage("vision"):
        pass
    assert p.samples("vision") == []


def test_peak_rss_positive():
    assert peak_rss_mb() > 1
