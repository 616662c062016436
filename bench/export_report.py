"""Size, accuracy and export time of a checkpoint's model package at each precision.

    python bench/export_report.py CKPT_DIR --calib VIDEOS [--precisions fp32,fp16,int8,int4]
                                  [--max-context N] [--frames N] [--questions N] [--out-dir DIR]

For every precision it exports a package with the ``loc3r export onnx``
machinery (:func:`loc3r.export.package_writer.write_package`, timed), sums
its size on disk, then streams the same frames into an onnxruntime CPU
session of that package and of the fp32 one, asks the same questions, and
compares the next-token logits after each question (max abs difference, mean
cosine, top-1 agreement) and the pose prior's poses (max abs). Frames and
questions come from the calibration source (a folder of videos with a
``labels.jsonl``, e.g. from ``loc3r synth``), sampled with
:mod:`loc3r.calibration`. The fp16 package is for GPUs; on a machine whose
onnxruntime cannot run it the error columns say why.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from loc3r.errors import Loc3rError

DEFAULT_QUESTIONS = ("What is in front of me?", "How many chairs are there?")


@dataclass(frozen=True)
class Row:
    precision: str
    size_bytes: int
    export_s: float
    logits: Optional[object] = None  # loc3r.export.sensitivity.OutputError
    pose_max_abs: Optional[float] = None
    note: str = ""


def package_size(pkg: Path) -> int:
    return sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())


def export_package(ckpt: Path, out: Path, precision: str, calib: Optional[str], max_context: Optional[int]) -> float:
    """Export one package (the ``loc3r export onnx`` machinery); seconds taken."""
    from loc3r.export.package_writer import ExportOptions, write_package

    start = time.perf_counter()
    write_package(ckpt, out, ExportOptions(precision=precision, calib=calib, max_context=max_context,
                                           progress=False))
    return time.perf_counter() - start


def stream_logits(pkg: Path, calib, questions) -> tuple[np.ndarray, np.ndarray]:
    """Next-token logits after each question (Q, V) and the poses (F, 7) of one stream."""
    from loc3r.runtime.session import Pipeline

    pipe = Pipeline.load(pkg, backend="cpu")
    logits = []
    for clip in calib.clips:
        session = pipe.new_session(on_notice=lambda _msg: None)
        for i, rgb in enumerate(clip.frames):
            session.add_frame(rgb, float(i))
        for q in questions:
            session.ask(q.question, q.situation, max_new_tokens=1)
            logits.append(np.asarray(session.last_prompt_logits, np.float64).reshape(-1))
        poses = np.asarray(session.poses) if pipe.manifest.camera_tokens else np.zeros((0, 7))
    return np.stack(logits), poses


def measure(ckpt: Path, precisions: Sequence[str], calib_source: str, frames: int,
            max_context: Optional[int], out_dir: Path, questions: int = 4) -> list[Row]:
    from loc3r.calibration.dataset import CalibrationOptions, Prompt, build_calibration_set
    from loc3r.export.sensitivity import OutputError

    calib = build_calibration_set(calib_source, CalibrationOptions(frames_per_video=frames, max_videos=2),
                                  progress=False)
    prompts = calib.prompts[:questions] or tuple(Prompt(q) for q in DEFAULT_QUESTIONS)
    order = ["fp32"] + [p for p in precisions if p != "fp32"]
    rows, ref = [], None
    for precision in order:
        pkg = out_dir / precision
        shutil.rmtree(pkg, ignore_errors=True)
        print(f"exporting {precision} ...", file=sys.stderr)
        seconds = export_package(ckpt, pkg, precision, calib_source, max_context)
        size = package_size(pkg)
        try:
            logits, poses = stream_logits(pkg, calib, prompts)
        except Exception as exc:  # e.g. fp16 graphs on a CPU-only onnxruntime
            rows.append(Row(precision, size, seconds, note=f"not run on CPU: {str(exc).splitlines()[0][:80]}"))
            continue
        if ref is None:
            ref = (logits, poses)
        err = OutputError.between(ref[0], logits)
        pose_err = float(np.abs(ref[1] - poses).max()) if poses.size else None
        if precision in precisions:
            rows.append(Row(precision, size, seconds, err, pose_err))
    return rows


def format_rows(rows: Sequence[Row]) -> str:
    head = (f"| precision | size (MB) | export (s) | logits max abs | logits cosine | top-1 agreement "
            f"| pose max abs |\n|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if r.logits is None:
            lines.append(f"| {r.precision} | {r.size_bytes / 1e6:.2f} | {r.export_s:.1f} | {r.note} | | | |")
            continue
        pose = "-" if r.pose_max_abs is None else f"{r.pose_max_abs:.4f}"
        lines.append(f"| {r.precision} | {r.size_bytes / 1e6:.2f} | {r.export_s:.1f} | {r.logits.max_abs:.4f} "
                     f"| {r.logits.cosine:.5f} | {r.logits.top1:.3f} | {pose} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/export_report.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt_dir", type=Path, help="a loc3r checkpoint directory (loc3r export convert)")
    ap.add_argument("--calib", required=True, help="folder of videos (+ labels.jsonl): calibration and test frames")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int4")
    ap.add_argument("--frames", type=int, default=4, help="frames per video streamed into each session")
    ap.add_argument("--questions", type=int, default=4, help="questions asked after each video")
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the packages here (default: a temp dir)")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        with tempfile.TemporaryDirectory(prefix="loc3r-export-report-") as tmp:
            out = args.out_dir or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            rows = measure(args.ckpt_dir, precisions, args.calib, args.frames, args.max_context, out,
                           args.questions)
    except Loc3rError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"checkpoint: {args.ckpt_dir}   calibration/test frames: {args.calib}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
