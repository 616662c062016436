"""``loc3r-run``: ask questions about a video (file, folder, camera or pipeline).

A thin layer over the Python API. It uses this interface of
:mod:`loc3r.runtime.session` (imported lazily, in :func:`load_pipeline`):

- ``Pipeline.load(pkg_dir: Path, backend: str) -> Pipeline``, with
  ``pipeline.backend`` (a :class:`loc3r.runtime.backends.Backend`),
  ``pipeline.manifest`` (:class:`~loc3r.runtime.package.Manifest`),
  ``pipeline.tokenizer`` (:class:`~loc3r.runtime.tokenizer.PromptTokenizer`),
  ``pipeline.new_session(profiler, frame_policy, reserve_tokens) -> Session`` (the
  session's frame budget then equals :func:`frame_budget`'s);
- ``session.add_frame(rgb, t) -> bool | None`` (False: refused by the frame policy);
  ``session.ask(question, situation=None, max_new_tokens=64) -> Answer`` with
  fields ``question, answer, position, position_sigma, orientation_deg,
  frames, timings_ms``; ``session.bev_scene(answer) -> BevScene``.

**Frame budget.** The context holds ``budget`` frame blocks (computed by
:func:`frame_budget` from the manifest, leaving room for the prompt, the
longest question and ``--max-new-tokens``). ``--frame-policy`` decides what
happens when a stream has more frames than that, and every case says so on
stderr:

- ``uniform`` (default): frames evenly spread over the whole stream;
- ``stop``: the first ``budget`` frames;
- ``recent``: the newest ``budget`` frames;
- ``error``: exit with an error instead of dropping frames.

For a video of known length the choice is made here, before decoding. A
live stream (camera, pipeline) sends every frame to the session, which
applies the same policy as its context fills
(:mod:`loc3r.runtime.frame_policy`).

**Modes.** With ``--ask`` (repeatable) the questions are answered in order on
one stream after ingestion. Without ``--ask``, questions are read from stdin,
one per line: on a terminal this is interactive (frames keep streaming in the
background and each question is answered on the frames seen so far); from a
pipe, all frames are ingested first, so the output is deterministic.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import click
import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.backends import BACKEND_CHOICES

# The same names as loc3r.runtime.frame_policy, which the session applies to live streams.
FRAME_POLICIES = ("uniform", "stop", "recent", "error")
# Room kept for the question when its text is not known in advance (interactive mode).
INTERACTIVE_QUESTION_TOKENS = 96


@dataclass(frozen=True)
class RunOptions:
    video: str
    questions: tuple[str, ...]
    situation: Optional[str]
    model: Optional[str]
    backend: str
    fps: Optional[float]
    max_frames: Optional[int]
    max_new_tokens: int
    frame_policy: str
    as_json: bool
    bev: Optional[str]
    profile: bool


def load_pipeline(pkg_dir: Path, backend: str):
    """The session module's ``Pipeline.load``; a seam for tests."""
    try:
        from loc3r.runtime.session import Pipeline
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("loc3r"):
            raise Loc3rError("this loc3r build has no streaming session (loc3r.runtime.session)") from exc
        raise

    return Pipeline.load(pkg_dir, backend)


def resolve_model_dir(model: Optional[str]) -> Path:
    from loc3r.runtime.package import default_package_dir

    return Path(model) if model else default_package_dir()


def frame_budget(manifest, prefix_tokens: int, reserve_tokens: int) -> int:
    """Frame blocks that fit in the context after the prefix, keeping ``reserve_tokens`` free.

    ``reserve_tokens`` covers everything after the frames: the newline, the
    question suffix and the answer.
    """
    free = manifest.text.max_context - prefix_tokens - reserve_tokens
    return max(0, free // manifest.tokens_per_frame)


def answer_json(ans, backend: str) -> str:
    """The contract's JSON line for one answer (plus the backend used)."""

    def num(x):
        return None if x is None else float(x)

    position = None if ans.position is None else [float(ans.position[0]), float(ans.position[1])]
    return json.dumps(
        {
            "question": ans.question,
            "answer": ans.answer,
            "position": position,
            "position_sigma": num(ans.position_sigma),
            "orientation_deg": num(ans.orientation_deg),
            "frames": int(ans.frames),
            "timings_ms": {k: round(float(v), 3) for k, v in ans.timings_ms.items()},
            "backend": backend,
        }
    )


def answer_text(ans) -> str:
    """The human-readable answer: the text, then position and heading when localized."""
    lines = [f"Q: {ans.question}", f"A: {ans.answer}"]
    if ans.position is not None:
        x, y = float(ans.position[0]), float(ans.position[1])
        loc = f"   position: x={x:.2f} m, y={y:.2f} m"
        if ans.position_sigma is not None:
            loc += f" (sigma {float(ans.position_sigma):.2f} m)"
        if ans.orientation_deg is not None:
            loc += f"; heading: {float(ans.orientation_deg):.1f} deg"
        lines.append(loc)
    return "\n".join(lines)


def note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


class FrameFeeder:
    """Reads sampled frames from the source into the session.

    For a source of known length, the frame policy is applied here, before
    decoding (see the module docstring), so no frame is decoded in vain. For
    a live source every sampled frame goes to the session, which applies the
    same policy (it was created with it) as the budget fills.
    """

    def __init__(self, source, sampling, session, budget: int, policy: str, profiler, lock):
        from loc3r.runtime.video import selected_indices

        if policy not in FRAME_POLICIES:
            raise Loc3rError(f"unknown frame policy '{policy}'; choose one of: {', '.join(FRAME_POLICIES)}")
        self.source, self.sampling, self.session = source, sampling, session
        self.budget, self.policy, self.profiler, self.lock = budget, policy, profiler, lock
        self.count = 0
        self.indices = selected_indices(source, sampling)  # None for live sources
        if self.indices is not None and len(self.indices) > budget:
            self.indices = self._fit_known(self.indices)

    @property
    def total(self) -> Optional[int]:
        return None if self.indices is None else len(self.indices)

    def _fit_known(self, indices: list[int]) -> list[int]:
        tail = f"the video has {len(indices)} frames after sampling but the context holds {self.budget}"
        if self.policy == "error":
            raise Loc3rError(
                f"{tail}; lower --fps or --max-frames, or use --frame-policy uniform, stop or recent"
            )
        if self.policy == "uniform":
            note(f"{tail}: taking {self.budget} uniformly (--frame-policy uniform)")
            picks = np.unique(np.round(np.linspace(0, len(indices) - 1, self.budget)).astype(int))
            return [indices[i] for i in picks]
        if self.policy == "stop":
            note(f"{tail}: keeping the first {self.budget} (--frame-policy stop)")
            return indices[: self.budget]
        note(f"{tail}: keeping the last {self.budget} (--frame-policy recent)")
        return indices[-self.budget :]

    def _frames(self):
        from loc3r.runtime.video import sample_frames

        if self.indices is None:
            return iter(sample_frames(self.source, self.sampling))
        return iter(self.source.frames(keep=set(self.indices)))

    def run(self, progress: bool, stop: Optional[threading.Event] = None) -> int:
        """Ingest until the source ends or ``stop`` is set; returns the frames the session took."""
        from tqdm import tqdm

        frames = self._frames()
        bar = tqdm(total=self.total, unit="frame", desc="frames", file=sys.stderr,
                   disable=not progress, leave=False)
        try:
            while stop is None or not stop.is_set():
                t0 = time.perf_counter()
                with self.profiler.stage("decode"):
                    item = next(frames, None)
                if item is None:
                    break
                rgb, t = item
                with self.lock:
                    taken = self.session.add_frame(rgb, t)
                if taken is not False:  # a session refuses a frame (policy 'stop') with False
                    self.count += 1
                self.profiler.add_frames(1, time.perf_counter() - t0)
                bar.update(1)
        finally:
            bar.close()
        return self.count


def run(opts: RunOptions, stdin: TextIO, stdin_is_tty: bool, stderr_is_tty: bool) -> None:
    """The whole command; ``*_is_tty`` choose interactive mode and the progress bar."""
    from loc3r.runtime.video import SamplingOptions, open_video

    sampling = SamplingOptions(fps=opts.fps, max_frames=opts.max_frames)
    if opts.max_new_tokens < 1:
        raise Loc3rError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if opts.bev is not None and not Path(opts.bev).expanduser().resolve().parent.is_dir():
        raise Loc3rError(f"cannot write --bev {opts.bev}: its folder does not exist")
    # Open the video before loading the model: a bad VIDEO fails fast.
    with open_video(opts.video, sampling) as source:
        model_dir = resolve_model_dir(opts.model)
        _run_on(source, sampling, model_dir, opts, stdin, stdin_is_tty, stderr_is_tty)


def _run_on(source, sampling, model_dir: Path, opts: RunOptions, stdin, stdin_is_tty, stderr_is_tty):
    from loc3r.runtime.profiler import StageProfiler

    questions = list(opts.questions)
    interactive = not questions and stdin_is_tty
    if not questions and not stdin_is_tty:
        # Questions piped on stdin: read them all first, then run as with --ask.
        questions = [line.strip() for line in stdin if line.strip()]
        if not questions:
            raise Loc3rError('no question given: pass --ask "QUESTION" or type questions on stdin')
    pipeline = load_pipeline(model_dir, opts.backend)
    tok = pipeline.tokenizer
    # Encode every question now: an empty or too long one fails before any video is decoded.
    lengths = [tok.encode_suffix(q, opts.situation).ids.size for q in questions]
    question_tokens = max(lengths) if lengths else INTERACTIVE_QUESTION_TOKENS
    reserve = 1 + question_tokens + opts.max_new_tokens  # newline + suffix + answer
    budget = frame_budget(pipeline.manifest, tok.encode_prefix().size, reserve)
    if budget < 1:
        raise Loc3rError(
            f"the question is too long for the context: it needs {reserve} tokens with "
            f"--max-new-tokens {opts.max_new_tokens}, leaving no room for a frame "
            f"(context {pipeline.manifest.text.max_context} tokens)"
        )
    profiler = StageProfiler(warmup=1, enabled=True)
    session = pipeline.new_session(
        profiler=profiler, frame_policy=opts.frame_policy, reserve_tokens=reserve
    )
    backend_name = pipeline.backend.name
    lock = threading.Lock()
    feeder = FrameFeeder(source, sampling, session, budget, opts.frame_policy, profiler, lock)
    answers = []
    if interactive:
        answers = _interactive(feeder, session, lock, opts, backend_name, profiler, stdin)
    else:
        feeder.run(progress=stderr_is_tty)
        for q in questions:
            answers.append(_ask(session, lock, q, opts, backend_name, profiler))
    if opts.bev is not None:
        from loc3r.runtime.bev_plot import draw_bev

        last = next((a for a in reversed(answers) if a.position is not None), answers[-1] if answers else None)
        draw_bev(session.bev_scene(last), Path(opts.bev).expanduser())
        note(f"BEV picture written to {opts.bev}")
    if opts.profile:
        click.echo(profiler.report(backend=pipeline.backend.describe()).to_table(), err=True)


def _ask(session, lock, question: str, opts: RunOptions, backend: str, profiler):
    with lock:
        ans = session.ask(question, situation=opts.situation, max_new_tokens=opts.max_new_tokens)
    click.echo(answer_json(ans, backend) if opts.as_json else answer_text(ans))
    return ans


def _interactive(feeder, session, lock, opts, backend, profiler, stdin) -> list:
    """Questions typed on a terminal while frames stream in on a background thread."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def ingest():
        try:
            feeder.run(progress=False, stop=stop)
        except BaseException as exc:  # reported on the main thread
            failure.append(exc)

    thread = threading.Thread(target=ingest, name="loc3r-frames", daemon=True)
    thread.start()
    click.echo("Frames are streaming in. Type a question and press Enter (Ctrl-D to quit).", err=True)
    answers = []
    try:
        while True:
            click.echo("? ", nl=False, err=True)
            line = stdin.readline()
            if not line or line.strip() in ("quit", "exit"):
                break
            if failure:
                raise failure[0]
            if not line.strip():
                continue
            if feeder.count == 0:
                click.echo("(no frames yet; wait a moment)", err=True)
                continue
            try:
                answers.append(_ask(session, lock, line.strip(), opts, backend, profiler))
            except Loc3rError as exc:  # a bad question should not end the session
                click.echo(f"error: {exc}", err=True)
    finally:
        stop.set()
        thread.join(timeout=5)
    if failure:
        raise failure[0]
    return answers


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video")
@click.option("--ask", "questions", multiple=True, metavar="QUESTION",
              help="A question; repeat for several, answered in order on one stream. "
                   "Without it, questions are read from stdin (interactive on a terminal).")
@click.option("--situation", metavar="TEXT",
              help="Where the asker is ('I am sitting on the bed facing the window'): "
                   "adds position (m) and heading (deg) to every answer.")
@click.option("--model", metavar="DIR", help="Model package directory (default: the embedded package).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Inference backend; auto picks the best available here.")
@click.option("--fps", type=float, help="Sample frames at this rate (default: every frame; "
                                        "for an image folder, the rate that sets its timestamps).")
@click.option("--max-frames", type=int, help="At most N frames: uniform over a file, the first N of a live stream.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Longest answer, in tokens.")
@click.option("--frame-policy", type=click.Choice(FRAME_POLICIES), default="uniform", show_default=True,
              help="What to do when the video has more frames than the context holds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per question.")
@click.option("--bev", metavar="PNG", help="Write a top-down map: tokens, camera path, agent.")
@click.option("--profile", is_flag=True, help="Print per-stage latency and memory on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(video, questions, situation, model, backend, fps, max_frames, max_new_tokens, frame_policy,
         as_json, bev, profile, debug):
    """Answer questions about VIDEO and localize the asker.

    VIDEO is a video file (anything FFmpeg decodes), an image, a folder of
    images, a camera (camera:0) or a GStreamer pipeline (contains '!').

    \b
    Example:
      loc3r-run room.mp4 --situation "I am sitting on the bed" --ask "What is on my left?"
    """
    from loc3r.cli import run_cli_command

    opts = RunOptions(
        video=video, questions=tuple(questions), situation=situation, model=model, backend=backend,
        fps=fps, max_frames=max_frames, max_new_tokens=max_new_tokens, frame_policy=frame_policy,
        as_json=as_json, bev=bev, profile=profile,
    )
    run_cli_command(
        lambda: run(opts, sys.stdin, _isatty(sys.stdin), _isatty(sys.stderr)),
        debug,
    )


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
