"""``loc3r export onnx``: a checkpoint directory -> a model package (see :mod:`loc3r.export.package_writer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from loc3r.runtime.package import PRECISIONS, TARGETS


@click.command(name="onnx")
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Package directory to create (must not exist or be empty).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="fp32 (CPU reference), fp16 (GPU), int8 (static QDQ, needs --calib), int4 (MatMulNBits).")
@click.option("--calib", metavar="SOURCE", default=None,
              help="Calibration source for int8: a folder of videos (see loc3r.calibration).")
@click.option("--max-context", type=int, default=None,
              help="KV-cache budget in tokens (default: the model's, at most 8192).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 or newer).")
@click.option("--target", type=click.Choice(TARGETS), default="onnxruntime", show_default=True,
              help="onnxruntime: contrib attention ops (GroupQueryAttention, MultiHeadAttention); tensorrt: one "
                   "loc3r::FusedAttention plugin node per attention, for 'loc3r export tensorrt' (fp32/fp16).")
@click.option("--matmul-nbits-plugin", is_flag=True,
              help="With --target tensorrt: allow --precision int4 (MatMulNBits, needs the loc3r TensorRT plugin).")
@click.option("--no-fuse-matmuls", is_flag=True,
              help="int8/int4 weight-only graphs: keep q/k/v and gate/up as separate MatMuls (fused by default: "
                   "one MatMulNBits per group, faster decode, same numbers).")
@click.option("--int4-lm-head-bits", type=click.Choice(["4", "8"]), default="8", show_default=True,
              help="--precision int4: bits of the lm_head weights (8 keeps the most sensitive matrix closer to "
                   "fp32; 4 decodes faster, see the README's Performance section).")
@click.option("--name", default=None, help="Package name in the manifest (default: the model's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def onnx_command(ckpt_dir: Path, out_dir: Path, precision: str, calib: Optional[str], max_context: Optional[int],
                 opset: int, target: str, matmul_nbits_plugin: bool, no_fuse_matmuls: bool, int4_lm_head_bits: str,
                 name: Optional[str], quiet: bool,
                 debug: bool) -> None:
    """Build a model package from the checkpoint in CKPT_DIR.

    Writes loc3r.json (manifest with sha256 of every file), tokenizer.json and
    the ONNX graphs: pose_prior, vision, embed, decoder (GroupQueryAttention,
    in-place KV), lm_head, heads, bev_head.
    """
    from loc3r.cli import run_cli_command

    def run() -> None:
        from loc3r.export.package_writer import ExportOptions, write_package

        opts = ExportOptions(precision=precision, calib=calib, max_context=max_context, opset=opset,
                             progress=not quiet, name=name, target=target,
                             matmul_nbits_plugin=matmul_nbits_plugin, fuse_matmuls=not no_fuse_matmuls,
                             int4_lm_head_bits=int(int4_lm_head_bits))
        manifest = write_package(ckpt_dir, out_dir, opts)
        total = sum((out_dir / f).stat().st_size for f in manifest.files)
        click.echo(f"wrote {out_dir}: {manifest.name}, {manifest.precision} for {manifest.target}, "
                   f"{len(manifest.graphs)} graphs "
                   f"({', '.join(g.role for g in manifest.graphs)}), {total / 2**20:.1f} MiB, "
                   f"context {manifest.text.max_context} tokens")

    run_cli_command(run, debug)
