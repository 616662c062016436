"""Pick and write the shipped demo video: a test scene the trained model gets right.

Candidates are situated test questions that the model answered exactly and
localized within 1 m / 30 degrees, widest margin first (from ``eval_test.predictions.jsonl``).
For each, the scene is regenerated (deterministic from its seed), rendered
at a larger size, written as mp4, decoded back and run through the runtime's
preprocessing and the PyTorch model (and, with ``--package``, through that
package with ``loc3r-run``); the first one still answered and localized
correctly from the decoded video is kept. Writes ``demo.mp4`` and
``demo.json`` (situation, question, answer, true position and heading, the
model's prediction) into the output directory.

    python -m loc3r.synthetic.train_demo --checkpoint CKPT --test-data DIR --out loc3r/default_model/demo
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import numpy as np

from loc3r.errors import Loc3rError

MAX_DEMO_BYTES = 2 * 2**20
PREFERRED_TYPES = ("situated_direction", "situated_left_right", "situated_closer", "situated_distance")


def decode_video(path: Path) -> np.ndarray:
    """All frames of an mp4 as RGB uint8 (F, H, W, 3)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[..., ::-1].copy())
    cap.release()
    if not frames:
        raise Loc3rError(f"no frames decoded from {path}")
    return np.stack(frames)


def frames_to_inputs(cfg, rgb: np.ndarray):
    """RGB frames (F, H, W, 3) -> (pixels (1, F, 3, S, S), pose (1, F, 3, Hp, Wp) or None) via the runtime."""
    import torch

    from loc3r.runtime.preprocess import preprocess_pose_batch, preprocess_vision_batch

    v = cfg.vision
    pixels = torch.from_numpy(preprocess_vision_batch(list(rgb), v.image_size, v.mean, v.std))[None]
    pose = None
    if cfg.pose_prior is not None:
        p = cfg.pose_prior
        pose = torch.from_numpy(preprocess_pose_batch(list(rgb), p.img_height, p.img_width, p.mean, p.std,
                                                      p.patch_size))[None]
    return pixels, pose


def localization_ok(pred: dict, lab: dict, max_m: float = 1.0, max_deg: float = 30.0) -> bool:
    from loc3r.synthetic.metrics import heading_error_deg, position_error_m

    return (pred.get("position") is not None and pred.get("heading") is not None
            and position_error_m(pred["position"], lab["position"]) <= max_m
            and heading_error_deg(pred["heading"], lab["heading"]) <= max_deg)


def answered_and_localized(pred: dict, lab: dict) -> bool:
    """The demo's promise: the exact answer, within 1 m and 30 degrees."""
    from loc3r.synthetic.metrics import exact_match

    return exact_match(pred.get("answer"), lab["answer"]) and localization_ok(pred, lab)


def candidates(labels: list[dict], preds: dict[str, dict]) -> list[dict]:
    """Situated labels answered exactly and localized within 1 m / 30 deg, widest margin first
    (the smaller max(position error / 1 m, heading error / 30 deg)), then by question type."""
    from loc3r.synthetic.metrics import heading_error_deg, position_error_m

    good = [lab for lab in labels if lab.get("situation") and lab["id"] in preds
            and answered_and_localized(preds[lab["id"]], lab)]
    rank = {t: i for i, t in enumerate(PREFERRED_TYPES)}

    def worst(lab):
        p = preds[lab["id"]]
        return max(position_error_m(p["position"], lab["position"]), heading_error_deg(p["heading"], lab["heading"]) / 30)

    return sorted(good, key=lambda lab: (round(worst(lab), 3), rank.get(lab["type"], 9)))


def package_prediction(package: Path, video: Path, situation: str, question: str) -> dict:
    """What a user sees: ``loc3r-run VIDEO --model PACKAGE --situation .. --ask .. --json`` (a subprocess)."""
    import subprocess
    import sys

    code = "from loc3r.runtime.run_cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, str(video), "--model", str(package), "--situation", situation,
                          "--ask", question, "--json"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise Loc3rError(f"loc3r-run failed on {video}: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"answer": result["answer"], "position": result["position"], "heading": result["orientation_deg"]}


def prediction_record(pred: dict, lab: dict) -> dict:
    """demo.json's record of one prediction: answer, position, heading and their errors against the label."""
    from loc3r.synthetic.metrics import heading_error_deg, position_error_m

    return {"answer": pred["answer"], "position": [round(x, 3) for x in pred["position"]],
            "heading_deg": round(pred["heading"], 2),
            "position_error_m": round(position_error_m(pred["position"], lab["position"]), 3),
            "heading_error_deg": round(heading_error_deg(pred["heading"], lab["heading"]), 2)}


def write_demo(checkpoint: Path, test_data: Path, predictions: Path, out: Path, size: int = 512, fps: float = 2.0,
               tries: int = 30, package: Optional[Path] = None) -> Optional[dict]:
    """Write ``demo.mp4`` + ``demo.json`` for the first candidate that survives the video round trip.

    With ``package``, the candidate must also be answered and localized correctly by that package through the
    runtime (what the README's first command runs), and its output is recorded as ``package_prediction``."""
    from loc3r.model.checkpoint import load_checkpoint
    from loc3r.synthetic.dataset import SPLIT_SEED_BASE, SEEDS_PER_RUN, SynthOptions, generate_scene, write_video
    from loc3r.synthetic.label_files import read_labels, read_predictions
    from loc3r.synthetic.render import RenderOptions, render_clip
    from loc3r.synthetic.train_data import prompt_tokenizer
    from loc3r.synthetic.train_eval import predict_scene

    meta = json.loads((Path(test_data) / "meta.json").read_text())
    seed, split = int(meta["seed"]), meta["split"]
    opts = SynthOptions(frames=int(meta["options"]["frames"]), hfov_deg=float(meta["options"]["hfov_deg"]))
    model = load_checkpoint(checkpoint)
    tok = prompt_tokenizer(checkpoint)
    labels = read_labels(test_data)
    preds = read_predictions(predictions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tried = set()
    for lab in candidates(labels, preds)[:tries * 3]:
        if lab["scene_id"] in tried or len(tried) >= tries:
            continue
        tried.add(lab["scene_id"])
        index = int(lab["scene_id"].rsplit("-", 1)[1]) - SPLIT_SEED_BASE[split] - seed * SEEDS_PER_RUN
        sample = generate_scene(split, seed, index, opts)
        if sample.scene.scene_id != lab["scene_id"]:
            raise Loc3rError(f"regenerated scene {sample.scene.scene_id} differs from {lab['scene_id']}")
        big = render_clip(sample.scene, sample.poses.c2w_room,
                          RenderOptions(width=size, height=size, hfov_deg=opts.hfov_deg, supersample=1))
        video = out / "demo.mp4"
        write_video(video, big.rgb, fps)
        if video.stat().st_size > MAX_DEMO_BYTES:
            continue
        pixels, pose = frames_to_inputs(model.cfg, decode_video(video))
        pred = predict_scene(model, tok, pixels, pose, [lab])[lab["id"]]
        if not answered_and_localized(pred, lab):
            continue
        shipped = None
        if package is not None:
            shipped = package_prediction(package, video, lab["situation"], lab["question"])
            if not answered_and_localized(shipped, lab):
                continue
        info = {
            "video": "demo.mp4", "fps": fps, "frames": int(big.rgb.shape[0]), "size": [size, size],
            "scene_id": lab["scene_id"], "label_id": lab["id"], "type": lab["type"],
            "situation": lab["situation"], "question": lab["question"], "answer": lab["answer"],
            "position": lab["position"], "heading_deg": lab["heading"],
            "frame": "BEV: origin at the first camera's floor point, x forward, y left, metres; "
                     "heading CCW from +x in degrees",
            "model_prediction": {"checkpoint": str(checkpoint), **prediction_record(pred, lab)},
            "command": f'loc3r-run demo.mp4 --situation "{lab["situation"]}" --ask "{lab["question"]}"',
        }
        if shipped is not None:
            manifest = json.loads((Path(package) / "loc3r.json").read_text())
            info["package_prediction"] = {"precision": manifest["precision"], **prediction_record(shipped, lab)}
        (out / "demo.json").write_text(json.dumps(info, indent=1) + "\n")
        return info
    return None


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--test-data", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Default: CHECKPOINT/../eval_test.predictions.jsonl")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--size", type=int, default=512, show_default=True, help="Video side in pixels.")
@click.option("--package", type=click.Path(exists=True, file_okay=False), default=None,
              help="The package to ship: the demo must also come out right through it (loc3r-run), and its "
                   "output is recorded (the golden test compares against it).")
@click.option("--debug", is_flag=True)
def main(checkpoint, test_data, predictions, out, size, package, debug):
    """Write the demo video and its ground truth for a scene the model gets right."""
    from loc3r.cli import run_cli_command

    def body():
        preds = Path(predictions) if predictions else Path(checkpoint).parent / "eval_test.predictions.jsonl"
        info = write_demo(Path(checkpoint), Path(test_data), preds, Path(out), size,
                          package=Path(package) if package else None)
        if info is None:
            raise Loc3rError("no test scene is answered and localized correctly (1 m / 30 deg) from its video")
        click.echo(json.dumps(info, indent=1))

    run_cli_command(body, debug)


if __name__ == "__main__":
    main()
