"""Build the embedded default package (``loc3r/default_model/``) that ``loc3r-run`` uses without --model.

Until the trained demo model exists this is a random-weight ``loc3r-tiny``
made through the real export path (``loc3r export onnx``), with the
synthetic word-level tokenizer (:mod:`loc3r.synthetic.tokenizer`). Its
answers are meaningless; it exists so that the CLI, the runtime and their
tests run end to end on a fresh install.

    python -m loc3r.export.default_model                 # random loc3r-tiny
    python -m loc3r.export.default_model --ckpt CKPT_DIR # a trained checkpoint
    python -m loc3r.export.default_model --ckpt CKPT_DIR --precision int8 --calib DIR

To stay under the 20 MB limit for files in git, weights are stored as fp16
initializers followed by a Cast to fp32 (:func:`store_weights_fp16`), so the
package still computes in fp32 on every backend. The checkpoint's
weights are first rounded to fp16 (:func:`round_weights_to_fp16`; for a
trained checkpoint, on a temporary copy), so the stored package computes
exactly the rounded model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import click

from loc3r.errors import Loc3rError

DEFAULT_PRESET = "loc3r-tiny"
SIZE_LIMIT_BYTES = 20 * 2**20
# Initializers at least this large are stored as fp16.
FP16_MIN_ELEMENTS = 256


def default_package_target() -> Path:
    import loc3r

    return Path(loc3r.__file__).resolve().parent / "default_model"


def make_random_checkpoint(out_dir: Path, preset: str = DEFAULT_PRESET, seed: int = 0,
                           fp16_representable: bool = False) -> Path:
    """A random-weight checkpoint of ``preset`` with the synthetic tokenizer; returns ``out_dir``.

    The vocabulary is the synthetic tokenizer's, inside the preset's
    ``vocab_size``; ``<Pos>``/``<Ori>``/``<|im_end|>`` ids go in the config.
    """
    import torch

    from loc3r.model.checkpoint import save_checkpoint
    from loc3r.model.config import get_config
    from loc3r.model.loc3r_vlm import Loc3RVLM
    from loc3r.synthetic.tokenizer import build_tokenizer, special_token_ids

    cfg = get_config(preset)
    tok = build_tokenizer(max_vocab=cfg.text.vocab_size)
    ids = special_token_ids(tok)
    cfg = cfg.replace(pos_token_id=ids.pos, ori_token_id=ids.ori, eos_token_id=ids.im_end)
    torch.manual_seed(seed)
    model = Loc3RVLM(cfg).eval()
    if fp16_representable:
        round_weights_to_fp16(model)
    save_checkpoint(model, Path(out_dir), tok)
    return Path(out_dir)


def round_weights_to_fp16(model) -> None:
    """Round every floating parameter to the nearest fp16 value (kept in fp32)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())


def rounded_checkpoint_copy(ckpt_dir: Path, out_dir: Path) -> Path:
    """A copy of the checkpoint with its weights rounded to fp16 values (tokenizer and chat template kept)."""
    import torch

    from loc3r.export.package_writer import CHAT_TEMPLATE_FILE
    from loc3r.model.checkpoint import TOKENIZER_FILE, load_checkpoint, save_checkpoint

    model = load_checkpoint(ckpt_dir, dtype=torch.float32)
    round_weights_to_fp16(model)
    save_checkpoint(model, out_dir)
    for name in (TOKENIZER_FILE, CHAT_TEMPLATE_FILE):
        if (ckpt_dir / name).is_file():
            shutil.copyfile(ckpt_dir / name, out_dir / name)
    return out_dir


def store_weights_fp16(onnx_path: Path) -> None:
    """Rewrite large fp32 initializers whose values are exactly fp16 as fp16 + Cast(to fp32).

    Half the bytes, the same fp32 graph I/O and the same numbers: only
    initializers that round-trip through fp16 unchanged are rewritten.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            keep.append(init)
            continue
        value = numpy_helper.to_array(init)
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):  # derived constants (RoPE tables, ...) stay fp32
            keep.append(init)
            continue
        half_name = init.name + ".fp16"
        keep.append(numpy_helper.from_array(half, half_name))
        casts.append(helper.make_node("Cast", [half_name], [init.name], to=TensorProto.FLOAT,
                                      name=f"/weights/{init.name}/Cast"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(onnx_path))


def build_default_package(out_dir: Path, ckpt_dir: Optional[Path] = None, progress: bool = True,
                          precision: str = "fp32", calib: Optional[str] = None) -> Path:
    """Export ``ckpt_dir`` (default: a random loc3r-tiny) to ``out_dir``.

    fp32: weights rounded to fp16 and stored as fp16 + Cast (see the module
    docstring). Other precisions go through ``loc3r export onnx``'s own
    quantization (int8 needs ``calib``, frames and prompts to calibrate on).
    """
    from loc3r.export.package_writer import ExportOptions, write_package
    from loc3r.runtime.package import load_package, write_manifest

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="loc3r-default-") as tmp:
        name = "loc3r-tiny-random" if ckpt_dir is None else None
        rounded = precision == "fp32"
        if ckpt_dir is None:
            ckpt_dir = make_random_checkpoint(Path(tmp) / "ckpt", fp16_representable=rounded)
        elif rounded:
            ckpt_dir = rounded_checkpoint_copy(Path(ckpt_dir), Path(tmp) / "ckpt")
        stage = Path(tmp) / "pkg"
        manifest = write_package(Path(ckpt_dir), stage, ExportOptions(
            max_context=None, progress=progress, name=name, precision=precision, calib=calib))
        if rounded:
            for g in manifest.graphs:
                store_weights_fp16(stage / g.file)
            write_manifest(stage, manifest)
        load_package(stage)  # verify
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        if size > SIZE_LIMIT_BYTES:
            raise Loc3rError(f"the default package is {size / 2**20:.1f} MiB, over the "
                             f"{SIZE_LIMIT_BYTES / 2**20:.0f} MiB limit for files in git")
        _replace_package_files(stage, out_dir)
    return out_dir


def _replace_package_files(stage: Path, out_dir: Path) -> None:
    """Put the staged package in ``out_dir``, replacing the old package's files and folders.

    Sub-folders that are not part of a package (e.g. ``demo/``, the shipped
    demo video) are kept.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    package_folders = {p.name for p in stage.iterdir() if p.is_dir()} | {"ranges"}
    for old in out_dir.iterdir():
        if old.is_dir() and not old.is_symlink():
            if old.name in package_folders:
                shutil.rmtree(old)
        else:
            old.unlink()
    for new in stage.iterdir():
        if new.is_dir():
            shutil.copytree(new, out_dir / new.name)
        else:
            shutil.copyfile(new, out_dir / new.name)


@click.command()
@click.option("--ckpt", "ckpt_dir", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to ship (default: a random-weight loc3r-tiny).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where to write (default: loc3r/default_model/ in this checkout).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "int4"]), default="fp32", show_default=True,
              help="Package precision (fp32 is stored as fp16-rounded weights).")
@click.option("--calib", default=None, help="Calibration videos (+ labels.jsonl) for --precision int8.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt_dir: Optional[Path], out_dir: Optional[Path], precision: str, calib: Optional[str],
         debug: bool) -> None:
    """Build the embedded default model package."""
    from loc3r.cli import run_cli_command

    def run() -> None:
        target = build_default_package(out_dir or default_package_target(), ckpt_dir,
                                       precision=precision, calib=calib)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and p.parent.name != "demo")
        click.echo(f"wrote {target} ({size / 2**20:.1f} MiB)")

    run_cli_command(run, debug)


if __name__ == "__main__":
    main()
