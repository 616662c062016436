"""`loc3r synth`: generate synthetic rooms, videos and labelled questions."""

from __future__ import annotations

import re
from pathlib import Path

import click

from loc3r.errors import Loc3rError


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """'64x64' -> (64, 64) (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise Loc3rError(f"{flag} must look like WIDTHxHEIGHT (e.g. 64x64), got '{text}'")
    w, h = int(m.group(1)), int(m.group(2))
    if not (8 <= w <= 4096 and 8 <= h <= 4096):
        raise Loc3rError(f"{flag} sides must be between 8 and 4096 pixels, got {w}x{h}")
    return w, h


@click.command("synth")
@click.option("--scenes", type=int, required=True, help="Number of scenes (rooms) to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed, 0..9999 (scene seeds derive from it).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory (new or empty).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True,
              help="Split; each uses a disjoint range of scene seeds.")
@click.option("--frames", type=int, default=16, show_default=True, help="Frames per clip.")
@click.option("--size", default="64x64", show_default=True, help="Training frame size WxH (RGB, depth, targets).")
@click.option("--video-size", default="256x256", show_default=True, help="Size WxH of the mp4 videos.")
@click.option("--fps", type=float, default=2.0, show_default=True, help="Frame rate of the videos.")
@click.option("--bev-grid", type=int, default=4, show_default=True,
              help="G of the GxG pooled token grid for per-token BEV targets (4 for loc3r-tiny).")
@click.option("--no-video", is_flag=True, help="Skip the mp4 videos (faster, for training data).")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes to generate scenes with.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def synth(scenes, seed, out, split, frames, size, video_size, fps, bev_grid, no_video, workers, debug):
    """Generate synthetic rooms: mp4 videos, labels.jsonl and per-scene ground truth.

    Deterministic for (split, seed): the same command writes the same labels
    and arrays. Scene k of a run uses scene seed base + SEED*100000 + k,
    with base 0 (train), 1e9 (val) or 2e9 (test).
    """
    from loc3r.cli import run_cli_command

    def body():
        from loc3r.synthetic.dataset import SynthOptions, synthesize

        if frames < 2 or frames > 256:
            raise Loc3rError(f"--frames must be between 2 and 256, got {frames}")
        if bev_grid < 1:
            raise Loc3rError(f"--bev-grid must be at least 1, got {bev_grid}")
        if fps <= 0:
            raise Loc3rError(f"--fps must be positive, got {fps}")
        options = SynthOptions(frames=frames, size=parse_size(size, "--size"),
                               video_size=parse_size(video_size, "--video-size"), fps=fps, bev_grid=bev_grid,
                               write_video=not no_video)
        vw, vh = options.video_size
        if vw % 2 or vh % 2:
            raise Loc3rError(f"--video-size must have even sides (mp4 needs them), got {vw}x{vh}")
        w, h = options.size
        if h < bev_grid or w < bev_grid:
            raise Loc3rError(f"--bev-grid {bev_grid} is larger than the frame size {w}x{h}")
        meta = synthesize(Path(out), split, seed, scenes, options, workers=workers)
        click.echo(f"wrote {meta['scenes']} scenes and {meta['labels']} questions to {out} "
                   f"(scene seeds {meta['scene_seeds'][0]}..{meta['scene_seeds'][1]})")

    run_cli_command(body, debug)
