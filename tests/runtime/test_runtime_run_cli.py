"""loc3r-run's flow, on a stand-in Pipeline/Session (the real one is tested with the export)."""

import json
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import fake_session
from loc3r.errors import Loc3rError
from loc3r.runtime import run_cli


@pytest.fixture
def cli(monkeypatch, tiny_package):
    fake_session.FakePipeline.sessions.clear()
    monkeypatch.setattr(run_cli, "load_pipeline", fake_session.FakePipeline.load)

    def invoke(*args, input=None, catch=True):
        argv = [str(a) for a in args] + ["--model", str(tiny_package)]
        return CliRunner().invoke(run_cli.main, argv, input=input, catch_exceptions=catch)

    return invoke


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(10):
        w.write(np.full((48, 64, 3), 20 * i, np.uint8))
    w.release()
    return path


def last_session():
    return fake_session.FakePipeline.sessions[-1]


def test_json_repeated_ask(cli, video):
    r = cli(video, "--ask", "what is on my left ?", "--ask", "what is the table ?",
            "--situation", "i am sitting on the bed .", "--json")
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert set(first) == {"question", "answer", "position", "position_sigma", "orientation_deg",
                          "frames", "timings_ms", "backend"}
    assert first["question"] == "what is on my left ?"
    assert first["answer"] == "saw 10 frames"
    assert first["position"] == [1.5, -0.25] and first["position_sigma"] == 0.5
    assert first["orientation_deg"] == 90.0 and first["frames"] == 10
    assert first["backend"] == "cpu"
    assert lines[1]["question"] == "what is the table ?"
    assert [q for q, _, _ in last_session().asked] == ["what is on my left ?", "what is the table ?"]
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_text_output_without_situation(cli, video):
    r = cli(video, "--ask", "what is on my left ?", "--fps", "5", "--max-new-tokens", "7")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Q: what is on my left ?\nA: saw 5 frames\n"
    assert last_session().asked == [("what is on my left ?", None, 7)]


def test_text_output_with_situation(cli, video):
    r = cli(video, "--ask", "what is on my left ?", "--situation", "i am sitting .", "--max-frames", "3")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        "Q: what is on my left ?",
        "A: saw 3 frames",
        "   position: x=1.50 m, y=-0.25 m (sigma 0.50 m); heading: 90.0 deg",
    ]
    assert [round(m / 20) for _, m, _ in last_session().frames] == [0, 4, 9]


def test_progress_bar_only_on_a_tty(cli, video, monkeypatch):
    monkeypatch.setattr(run_cli, "_isatty", lambda stream: stream is sys.stderr)
    r = cli(video, "--ask", "what ?")
    assert r.exit_code == 0, r.stderr
    assert "frames:" in r.stderr and "/10 [" in r.stderr  # a tqdm bar with the known total


def test_errors_are_one_line(cli, video, tmp_path):
    r = cli(tmp_path / "missing.mp4", "--ask", "what ?")
    assert r.exit_code == 1
    assert r.stderr == f"error: video not found: {tmp_path / 'missing.mp4'}\n"
    assert "Traceback" not in r.stderr
    r = cli(video, "--ask", "  ")
    assert (r.exit_code, r.stderr) == (1, "error: the question is empty\n")
    r = cli(video, "--ask", "what ?", "--backend", "cuda") if "cuda" not in _backends() else None
    if r is not None:
        assert r.exit_code == 1
        assert r.stderr == (
            "error: backend 'cuda' is not available on this machine: onnxruntime has no "
            "CUDAExecutionProvider (install onnxruntime-gpu)\n"
        )


def _backends():
    from loc3r.runtime.backends import available_backends

    return available_backends()


def test_wrong_model_dir(monkeypatch, video, tmp_path):
    monkeypatch.setattr(run_cli, "load_pipeline", fake_session.FakePipeline.load)
    r = CliRunner().invoke(run_cli.main, [str(video), "--ask", "q", "--model", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr == f"error: not a loc3r model package: {tmp_path} has no loc3r.json\n"


def test_debug_shows_the_exception(cli, tmp_path):
    with pytest.raises(Loc3rError, match="video not found"):
        cli(tmp_path / "missing.mp4", "--ask", "what ?", "--debug", catch=False)


def test_question_longer_than_context(cli, video):
    long_q = " ".join(["what"] * 600)
    r = cli(video, "--ask", long_q)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: the question is too long for the context: it needs 669 tokens")


def test_frame_policies(cli, video):
    # max_context 512, prefix 3, reserve 1 + 6 + 485 -> 17 tokens left -> 3 frames of 5 tokens.
    args = [video, "--ask", "what ?", "--max-new-tokens", "485"]
    tail = "note: the video has 10 frames after sampling but the context holds 3: "
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == tail + "taking 3 uniformly (--frame-policy uniform)\n"
    assert [round(m / 20) for _, m, _ in last_session().frames] == [0, 4, 9]
    assert last_session().frame_policy == "uniform"
    assert last_session().reserve_tokens == 1 + 6 + 485  # the session's budget matches the CLI's
    r = cli(*args, "--frame-policy", "stop")
    assert (r.exit_code, r.stderr) == (0, tail + "keeping the first 3 (--frame-policy stop)\n")
    assert [round(m / 20) for _, m, _ in last_session().frames] == [0, 1, 2]
    r = cli(*args, "--frame-policy", "recent")
    assert (r.exit_code, r.stderr) == (0, tail + "keeping the last 3 (--frame-policy recent)\n")
    assert [round(m / 20) for _, m, _ in last_session().frames] == [7, 8, 9]
    r = cli(*args, "--frame-policy", "error")
    assert r.exit_code == 1
    assert r.stderr == (
        "error: the video has 10 frames after sampling but the context holds 3; lower --fps or "
        "--max-frames, or use --frame-policy uniform, stop or recent\n"
    )
    r = cli(*args, "--frame-policy", "first")
    assert r.exit_code == 2 and "Invalid value for '--frame-policy'" in r.stderr


def test_live_stream_goes_to_the_session_policy():
    """A source of unknown length sends every frame; the session applies the policy and may refuse."""
    import threading

    from loc3r.runtime import video as video_mod
    from loc3r.runtime.profiler import StageProfiler

    class Live(video_mod.VideoSource):
        def frames(self, keep=None):
            for i in range(10):
                yield np.full((8, 8, 3), 20 * i, np.uint8), i * 0.1

    session = fake_session.FakeSession(StageProfiler(), frame_policy="stop")
    feeder = run_cli.FrameFeeder(Live(), video_mod.SamplingOptions(), session, 3, "stop",
                                 StageProfiler(), threading.Lock())
    assert feeder.total is None
    assert feeder.run(progress=False) == 4  # the fake session's own budget; refusals are not counted
    assert len(session.frames) == 4


def test_questions_from_stdin(cli, video):
    r = cli(video, "--json", input="what is on my left ?\n\nwhat is the table ?\n")
    assert r.exit_code == 0, r.stderr
    assert [json.loads(x)["question"] for x in r.stdout.splitlines()] == [
        "what is on my left ?", "what is the table ?"]
    r = cli(video, input="")
    assert r.exit_code == 1
    assert r.stderr == 'error: no question given: pass --ask "QUESTION" or type questions on stdin\n'


def test_interactive_on_a_tty(cli, video, monkeypatch):
    monkeypatch.setattr(run_cli, "_isatty", lambda stream: stream is sys.stdin)
    r = cli(video, "--json", input="what is on my left ?\nquit\n")
    assert r.exit_code == 0, r.stderr
    assert "Type a question" in r.stderr
    answers = [json.loads(x) for x in r.stdout.splitlines()]
    # Frames stream on a background thread: the answer sees however many had arrived.
    assert len(answers) <= 1
    if answers:
        assert answers[0]["question"] == "what is on my left ?" and 1 <= answers[0]["frames"] <= 10


def test_bev_and_profile(cli, video, tmp_path):
    out = tmp_path / "bev.png"
    r = cli(video, "--ask", "what ?", "--situation", "i am sitting .", "--bev", out, "--profile")
    assert r.exit_code == 0, r.stderr
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (800, 800, 3)
    assert f"note: BEV picture written to {out}" in r.stderr
    assert "backend: cpu (onnxruntime CPUExecutionProvider)" in r.stderr
    for stage in ("decode", "vision", "token_decode"):
        assert stage in r.stderr
    r = cli(video, "--ask", "what ?", "--bev", tmp_path / "nope" / "b.png")
    assert r.exit_code == 1
    assert "its folder does not exist" in r.stderr


def test_help_is_fast_and_torch_free():
    import subprocess

    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom loc3r.runtime.run_cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0\n"
        "assert '--frame-policy' in r.output and '--situation' in r.output\n"
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_bad_videos_exit_with_one_line(cli, video, tmp_path):
    import struct

    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    zero = bytearray(data)
    i = zero.find(b"mdat")
    size = struct.unpack(">I", zero[i - 4 : i])[0]
    zero[i + 4 : i - 4 + size] = bytes(size - 8)
    (tmp_path / "zero.mp4").write_bytes(bytes(zero))
    (tmp_path / "notes.mp4").write_text("not a video\n")
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "1.png").write_bytes(b"\x89PNG broken")
    cases = {
        cut: f"corrupt or truncated video: {cut} (FFmpeg cannot read its header)",
        tmp_path / "zero.mp4": f"no decodable frames in {tmp_path / 'zero.mp4'}",
        tmp_path / "notes.mp4": f"not a video: {tmp_path / 'notes.mp4'} (FFmpeg cannot open it; VIDEO is a "
                                "video file, an image, a folder of images, camera:N or a GStreamer pipeline)",
        folder: f"cannot read image 1.png in {folder} (corrupt or not an image)",
    }
    for path, message in cases.items():
        r = cli(path, "--ask", "what ?")
        assert (r.exit_code, r.stderr) == (1, f"error: {message}\n"), path
        assert r.stdout == ""


def test_huge_frames_just_work(cli, tmp_path):
    img = np.zeros((4320, 7680, 3), np.uint8)
    path = tmp_path / "8k.jpg"
    cv2.imwrite(str(path), img)
    r = cli(path, "--ask", "what ?")
    assert r.exit_code == 0, r.stderr
    assert last_session().frames[0][0] == (1152, 2048, 3)  # downscaled on read
