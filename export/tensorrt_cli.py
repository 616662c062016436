"""``loc3r export tensorrt``: TensorRT engines from a model package (run it on the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from loc3r.cli import run_cli_command


@click.command(name="tensorrt")
@click.argument("pkg_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Engine package directory to write (must be empty or absent).")
@click.option("--fp16", is_flag=True, help="Allow fp16 kernels.")
@click.option("--int8", is_flag=True,
              help="int8 for the vision tower and pose prior: Q/DQ graphs as they are, others from "
                   "activation ranges (the package's, or --calib) via a calibration cache.")
@click.option("--workspace", "workspace_mb", type=int, default=4096, show_default=True,
              help="Builder workspace limit, MB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache kept across builds [default: ~/.cache/loc3r/tensorrt/timing.cache].")
@click.option("--calib", metavar="SOURCE", default=None,
              help="Calibration videos for --int8 when the package has no activation ranges.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="TensorRT plugin library to load (repeatable). Packages exported with --target tensorrt load "
                   "libloc3r_trt_plugin.so by default from $LOC3R_TRT_PLUGIN, ./build or the source tree's build/.")
@click.option("--max-frames", type=int, default=4, show_default=True, help="Most frames per vision call.")
@click.option("--prefill-chunk", type=int, default=None,
              help="Most tokens per prefill call [default: max(frame block, 256), within the context].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def tensorrt(pkg_dir: Path, out_dir: Path, fp16: bool, int8: bool, workspace_mb: int, timing_cache: Optional[Path],
             calib: Optional[str], plugins: tuple, max_frames: int, prefill_chunk: Optional[int], quiet: bool,
             debug: bool) -> None:
    """Build TensorRT engines for every graph of the model package PKG_DIR.

    Engines are specific to the GPU and TensorRT version that build them, so
    run this on the device (Jetson) against a package exported on the host.
    """

    def run() -> None:
        from loc3r.export.tensorrt_build import EngineOptions, build_engine_package
        from loc3r.export.tensorrt_profiles import ProfileOptions

        opts = EngineOptions(fp16=fp16, int8=int8, workspace_mb=workspace_mb, timing_cache=timing_cache,
                             calib=calib, plugins=tuple(plugins),
                             profiles=ProfileOptions(max_frames=max_frames, prefill_chunk=prefill_chunk),
                             progress=not quiet)
        manifest = build_engine_package(pkg_dir, out_dir, opts)
        click.echo(f"wrote {out_dir}: {len(manifest.graphs)} engines, {manifest.precision}")

    run_cli_command(run, debug)
