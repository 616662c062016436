import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import fake_session
from loc3r.cli import main as loc3r_main
from loc3r.runtime import run_cli


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(6):
        w.write(np.full((48, 64, 3), 20 * i, np.uint8))
    w.release()
    return path


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setattr(run_cli, "load_pipeline", fake_session.FakePipeline.load)


def test_profile_json_and_trace(video, tiny_package, tmp_path):
    trace = tmp_path / "trace.json"
    r = CliRunner().invoke(loc3r_main, ["profile", str(video), "--model", str(tiny_package), "--json",
                                        "--trace", str(trace), "--repeat", "3"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["backend"] == "cpu (onnxruntime CPUExecutionProvider)"
    assert report["frames"] == 6
    stages = report["stages"]
    assert set(stages) == {"decode", "preprocess", "pose_prior", "vision", "frame_prefill",
                           "question_prefill", "token_decode"}
    assert stages["vision"]["count"] == 5  # 6 frames, the first is warm-up
    assert stages["question_prefill"]["count"] == 2
    assert report["tokens"] == 9 and report["tokens_per_s"] > 0
    assert report["time_to_first_token_ms"] == pytest.approx(1.0)
    assert report["peak_rss_mb"] > 1
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["name"] == "vision" for e in events) == 6  # warm-up samples are traced too
    assert f"note: Chrome trace written to {trace}" in r.stderr


def test_profile_table(video, tiny_package):
    r = CliRunner().invoke(loc3r_main, ["profile", str(video), "--model", str(tiny_package)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "backend: cpu (onnxruntime CPUExecutionProvider)"
    assert lines[1].split() == ["stage", "n", "p50", "ms", "p95", "ms", "max", "ms"]
    assert any(line.startswith("frames ingested: 6") for line in lines)


def test_profile_errors(tiny_package, tmp_path):
    r = CliRunner().invoke(loc3r_main, ["profile", str(tmp_path / "x.mp4"), "--model", str(tiny_package)])
    assert r.exit_code == 1
    assert r.stderr == f"error: video not found: {tmp_path / 'x.mp4'}\n"
