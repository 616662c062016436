"""``loc3r profile VIDEO``: per-stage latency (p50/p95/max after warm-up), throughput and memory.

Ingests the video through a session exactly as ``loc3r-run`` does (same
pipeline interface, see :mod:`loc3r.runtime.run_cli`), then asks the
question ``--repeat`` times (the cache is rewound after each, so every ask
does the same work) and reports:

- per stage: decode, preprocess, pose_prior, vision, frame_prefill,
  question_prefill, token_decode (the first sample of each is warm-up);
- frames/s ingested, tokens/s generated, time to the first answer token;
- peak RSS; and which backend ran.

``--json`` prints the report as JSON; ``--trace FILE`` writes a Chrome trace
(open it in chrome://tracing or ui.perfetto.dev).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import click

from loc3r.runtime.backends import BACKEND_CHOICES

DEFAULT_QUESTION = "What is in front of me?"
DEFAULT_SITUATION = "I am standing in the middle of the room."


def profile_video(
    video: str,
    model: Optional[str],
    backend: str,
    fps: Optional[float],
    max_frames: Optional[int],
    question: str,
    situation: Optional[str],
    max_new_tokens: int,
    repeat: int,
    warmup: int,
):
    """Run the stream and return ``(ProfileReport, StageProfiler)``."""
    from loc3r.errors import Loc3rError
    from loc3r.runtime import run_cli
    from loc3r.runtime.profiler import StageProfiler
    from loc3r.runtime.video import SamplingOptions, open_video

    if repeat < 1:
        raise Loc3rError(f"--repeat must be at least 1, got {repeat}")
    sampling = SamplingOptions(fps=fps, max_frames=max_frames)
    with open_video(video, sampling) as source:
        model_dir = run_cli.resolve_model_dir(model)
        pipeline = run_cli.load_pipeline(model_dir, backend)
        tok = pipeline.tokenizer
        reserve = 1 + tok.encode_suffix(question, situation).ids.size + max_new_tokens
        budget = run_cli.frame_budget(pipeline.manifest, tok.encode_prefix().size, reserve)
        if budget < 1:
            raise Loc3rError(f"the question and --max-new-tokens {max_new_tokens} leave no room "
                             "for a frame in the context")
        profiler = StageProfiler(warmup=warmup)
        session = pipeline.new_session(profiler=profiler, frame_policy="uniform", reserve_tokens=reserve)
        feeder = run_cli.FrameFeeder(source, sampling, session, budget, "uniform", profiler,
                                     threading.Lock())
        frames = feeder.run(progress=False)
        for _ in range(repeat):
            session.ask(question, situation=situation, max_new_tokens=max_new_tokens)
    extra = {"model": str(model_dir), "frames_in_context": frames, "question_repeats": repeat}
    return profiler.report(backend=pipeline.backend.describe(), extra=extra), profiler


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video")
@click.option("--model", metavar="DIR", help="Model package directory (default: the embedded package).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--fps", type=float, help="Sample frames at this rate (default: every frame).")
@click.option("--max-frames", type=int, help="At most N frames, uniform over the video.")
@click.option("--question", default=DEFAULT_QUESTION, show_default=True, help="The question asked.")
@click.option("--situation", default=DEFAULT_SITUATION, show_default=True,
              help="The situation given, so the localization heads run too (\"\" for none).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Ask the question this many times.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Samples per stage left out of the statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trace", type=click.Path(dir_okay=False), metavar="FILE", help="Write a Chrome trace here.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def profile(video, model, backend, fps, max_frames, question, situation, max_new_tokens, repeat, warmup,
            as_json, trace, debug):
    """Per-stage latency, frames/s, tokens/s, time to first token and peak memory on VIDEO."""
    from loc3r.cli import run_cli_command

    def body():
        report, profiler = profile_video(video, model, backend, fps, max_frames, question,
                                         situation or None, max_new_tokens, repeat, warmup)
        click.echo(report.to_json() if as_json else report.to_table())
        if trace:
            path = profiler.write_chrome_trace(Path(trace))
            click.echo(f"note: Chrome trace written to {path}", err=True)

    run_cli_command(body, debug)
