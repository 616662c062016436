"""``loc3r export``: convert public checkpoints and build model packages.

Subcommands are imported only when invoked, so ``loc3r export --help`` needs
no torch. To add one, put a click command in its own module and add a line to
:data:`EXPORT_COMMANDS` (``name: ("module:attribute", "one-line help")``), or
call ``export.add_command(cmd)`` from code that is already imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from loc3r.cli import LazyGroup, run_cli_command

# name -> (module:attribute, one-line help); help kept here so listing imports nothing.
EXPORT_COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("loc3r.export.cli:convert",
                "Hugging Face LLaVA-Video (+ CUT3R pose prior) -> a loc3r checkpoint directory."),
    "onnx": ("loc3r.export.onnx_cli:onnx_command",
             "A loc3r checkpoint -> a model package of ONNX graphs (fp32, fp16, int8, int4)."),
    "tensorrt": ("loc3r.export.tensorrt_cli:tensorrt",
                 "A model package -> TensorRT engines for this device (needs TensorRT 10)."),
}


class LazyExportGroup(LazyGroup):
    """``loc3r export``'s subcommands, imported on first use."""

    lazy_commands = EXPORT_COMMANDS


@click.group(name="export", cls=LazyExportGroup)
def export() -> None:
    """Convert public checkpoints and build model packages."""


_DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]


@click.command(name="convert")
@click.option("--llava", "llava_dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face LlavaOnevisionForConditionalGeneration directory (config.json, "
                   "model.safetensors or a sharded index, tokenizer.json).")
@click.option("--pose-prior", "pose_prior", type=click.Path(path_type=Path), default=None,
              help="CUT3R checkpoint (.pth). Without it the result is the plain base VLM (no camera tokens).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output checkpoint directory (config.json, model.safetensors, tokenizer.json).")
@click.option("--dtype", type=click.Choice(_DTYPE_CHOICES), default="auto", show_default=True,
              help="Storage dtype; auto keeps the LLM's dtype.")
@click.option("--name", default=None, help="Model name in config.json (default: the output folder's name).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def convert(llava_dir: Path, pose_prior: Optional[Path], out_dir: Path, dtype: str, name: Optional[str],
            quiet: bool, debug: bool) -> None:
    """Convert LLaVA-Video (and optionally a CUT3R pose prior) into a loc3r checkpoint.

    Adds <Pos> and <Ori> to the tokenizer and initialises the Loc3R heads
    (f_pos, f_ori, f_proj, and f_cam with a pose prior), which no public
    checkpoint has.
    """

    def run() -> None:
        from loc3r.model.convert_llava import OUTPUT_DTYPES, convert_llava, summarise_keys

        def log(message: str) -> None:
            click.echo(message, err=True)

        report = convert_llava(llava_dir, out_dir, pose_prior_path=pose_prior,
                               dtype=OUTPUT_DTYPES.get(dtype), name=name, progress=not quiet, log=log)
        cfg = report.config
        click.echo(f"wrote {out_dir}: {report.num_tensors} tensors, {report.num_bytes / 2**20:.1f} MiB, "
                   f"camera tokens {'on' if cfg.camera_tokens_active else 'off'}")
        click.echo(f"added tokens: <Pos>={report.pos_token_id}, <Ori>={report.ori_token_id}")
        click.echo(f"initialised (not in the inputs): {', '.join(report.initialised)}")
        if report.dropped:
            click.echo(f"dropped (unused by Loc3R-VLM): {'; '.join(summarise_keys(list(report.dropped)))}")

    run_cli_command(run, debug)


export.add_command(convert)
