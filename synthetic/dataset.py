"""Generate and write synthetic scenes: videos, ground truth and labels.

Layout of an output directory::

    meta.json                 split, seed, options, seed range, counts
    labels.jsonl              one question per line (see ``label_record``)
    videos/<scene_id>.mp4     the clip at --video-size (OpenCV 'mp4v')
    scenes/<scene_id>.npz     training arrays (see ``write_scene``)
    scenes/<scene_id>.json    room and objects in the BEV frame, situations

Splits use disjoint scene-seed ranges: scene ``i`` of ``--seed S`` in split
``train`` / ``val`` / ``test`` gets seed ``base + S * 100000 + i`` with base
0 / 1e9 / 2e9, ``0 <= S < 10000`` and ``i < 100000``. So no scene of one
split can appear in another, whatever seeds are used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from loc3r.errors import Loc3rError
from loc3r.synthetic.ground_truth import ClipPoses, bev_token_targets, clip_poses, scene_in_bev
from loc3r.synthetic.questions import QUESTION_TYPES, Question, QuestionOptions, Situation, make_questions
from loc3r.synthetic.render import RenderedClip, RenderOptions, render_clip
from loc3r.synthetic.scene import Scene, SceneOptions, sample_scene
from loc3r.synthetic.trajectory import TrajectoryOptions, sample_camera_path

SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SEEDS_PER_RUN = 100_000
MAX_RUN_SEED = 10_000
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthOptions:
    frames: int = 16
    size: tuple[int, int] = (64, 64)  # (width, height) of training frames
    video_size: tuple[int, int] = (256, 256)
    fps: float = 2.0
    bev_grid: int = 4  # pooled vision-token grid for BEV targets (4 for loc3r-tiny)
    supersample: int = 2
    hfov_deg: float = 75.0
    write_video: bool = True
    scene: SceneOptions = field(default_factory=SceneOptions)
    questions: QuestionOptions = field(default_factory=QuestionOptions)


@dataclass(frozen=True)
class SceneSample:
    """One generated scene with its clip, ground truth and questions."""

    scene: Scene
    poses: ClipPoses
    clip: RenderedClip  # at options.size
    bev_targets: np.ndarray  # (F, G, G, 2)
    bev_valid: np.ndarray  # (F, G, G)
    situations: list[Situation]
    questions: list[Question]


def scene_seed(split: str, seed: int, index: int) -> int:
    """The seed of scene ``index`` of run ``seed`` in ``split`` (disjoint ranges per split)."""
    if split not in SPLIT_SEED_BASE:
        raise Loc3rError(f"unknown split '{split}'; use one of: {', '.join(SPLIT_SEED_BASE)}")
    if not 0 <= seed < MAX_RUN_SEED:
        raise Loc3rError(f"--seed must be in [0, {MAX_RUN_SEED - 1}], got {seed}")
    if not 0 <= index < SEEDS_PER_RUN:
        raise Loc3rError(f"at most {SEEDS_PER_RUN} scenes per run")
    return SPLIT_SEED_BASE[split] + seed * SEEDS_PER_RUN + index


def generate_scene(split: str, seed: int, index: int, options: SynthOptions = SynthOptions()) -> SceneSample:
    """Sample, render and label one scene, deterministically from (split, seed, index)."""
    s = scene_seed(split, seed, index)
    rng = np.random.default_rng(s)
    render = RenderOptions(width=options.size[0], height=options.size[1], hfov_deg=options.hfov_deg,
                           supersample=options.supersample)
    last_error: Optional[Exception] = None
    for _ in range(20):
        scene = sample_scene(f"{split}-{s:010d}", s, options.scene, rng=rng)
        try:
            path = sample_camera_path(scene, rng, TrajectoryOptions(frames=options.frames))
        except Loc3rError as exc:  # no free floor: draw another room
            last_error = exc
            continue
        poses = clip_poses(path)
        clip = render_clip(scene, poses.c2w_room, render)
        situations, questions = make_questions(scene, poses.bev, clip.instance, rng, options.questions)
        if not situations:
            last_error = Loc3rError(f"no situation could be placed in {scene.scene_id}")
            continue
        targets, valid = bev_token_targets(clip.depth, poses.c2w_bev, clip.intrinsics, options.bev_grid)
        return SceneSample(scene, poses, clip, targets, valid, situations, questions)
    raise Loc3rError(f"could not generate scene {index} of split {split} seed {seed}: {last_error}")


def label_record(sample: SceneSample, k: int, question: Question, video: Optional[str], options: SynthOptions) -> dict:
    """One labels.jsonl line (``video`` is None when videos were not written)."""
    sit = sample.situations[question.situation_index] if question.situation_index is not None else None
    sid = sample.scene.scene_id
    return {
        "id": f"{sid}-q{k:02d}",
        "scene_id": sid,
        "video": video,
        "scene_file": f"scenes/{sid}.npz",
        "frame_timestamps": [round(i / options.fps, 4) for i in range(options.frames)],
        "type": question.type,
        "group": question.group,
        "numeric": QUESTION_TYPES[question.type][1],
        "situation_id": None if sit is None else f"{sid}-s{question.situation_index}",
        "situation": None if sit is None else sit.text,
        "question": question.question,
        "answer": question.answer,
        "position": None if sit is None else list(sit.position),
        "heading": None if sit is None else sit.heading_deg,
    }


def write_video(path: Path, rgb: np.ndarray, fps: float) -> None:
    """Write RGB frames (F, H, W, 3) uint8 as an mp4 ('mp4v')."""
    h, w = rgb.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise Loc3rError(f"OpenCV cannot write an mp4 video to {path}")
    try:
        for frame in rgb:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
    finally:
        writer.release()


def write_scene(sample: SceneSample, out: Path, options: SynthOptions) -> list[dict]:
    """Write one scene's video, .npz and .json; return its label records.

    The .npz holds: ``rgb`` (F, H, W, 3) uint8; ``depth`` (F, H, W) float32
    z-depth in metres; ``semantic`` / ``instance`` (F, H, W) uint8 per-pixel
    class (render.SEMANTIC_CLASSES) and object (0 = room, 1 + index);
    ``intrinsics`` (3, 3); ``c2w_cam0`` (F, 4, 4) and ``pose7`` (F, 7), the
    pose-prior targets; ``c2w_bev`` (F, 4, 4) camera -> BEV;
    ``position_bev`` (F, 3); ``heading_bev`` (F,) degrees;
    ``bev_targets`` (F, G, G, 2) and ``bev_valid`` (F, G, G); ``timestamps`` (F,).
    """
    sid = sample.scene.scene_id
    video = f"videos/{sid}.mp4"
    if options.write_video:
        big = render_clip(sample.scene, sample.poses.c2w_room,
                          RenderOptions(width=options.video_size[0], height=options.video_size[1],
                                        hfov_deg=options.hfov_deg, supersample=1))
        write_video(out / video, big.rgb, options.fps)
    p = sample.poses
    np.savez_compressed(
        out / "scenes" / f"{sid}.npz",
        rgb=sample.clip.rgb, depth=sample.clip.depth, semantic=sample.clip.semantic, instance=sample.clip.instance,
        intrinsics=sample.clip.intrinsics.astype(np.float32), c2w_cam0=p.c2w_cam0.astype(np.float32),
        pose7=p.pose7.astype(np.float32), c2w_bev=p.c2w_bev.astype(np.float32),
        position_bev=p.position_bev.astype(np.float32), heading_bev=np.asarray(p.heading_deg, np.float32),
        bev_targets=sample.bev_targets, bev_valid=sample.bev_valid,
        timestamps=(np.arange(options.frames) / options.fps).astype(np.float32),
    )
    info = scene_in_bev(sample.scene, p.bev)
    info["situations"] = [{"id": f"{sid}-s{i}", "text": s.text, "position": list(s.position), "heading": s.heading_deg}
                          for i, s in enumerate(sample.situations)]
    info["first_camera_height"] = round(float(p.position_bev[0, 2]), 4)
    (out / "scenes" / f"{sid}.json").write_text(json.dumps(info, indent=1) + "\n")
    return [label_record(sample, k, q, video if options.write_video else None, options)
            for k, q in enumerate(sample.questions)]


def _generate_and_write(job: tuple[str, int, int, str, SynthOptions]) -> list[dict]:
    split, seed, index, out, options = job
    return write_scene(generate_scene(split, seed, index, options), Path(out), options)


def synthesize(out: Path, split: str, seed: int, scenes: int, options: SynthOptions = SynthOptions(),
               progress: bool = True, workers: int = 1) -> dict:
    """Generate ``scenes`` scenes into ``out`` with ``workers`` processes; return the meta.json contents.

    The output does not depend on ``workers``: every scene has its own seed
    and labels are written in scene order.
    """
    from tqdm import tqdm

    if scenes < 1:
        raise Loc3rError("--scenes must be at least 1")
    if workers < 1:
        raise Loc3rError(f"--workers must be at least 1, got {workers}")
    scene_seed(split, seed, scenes - 1)  # validates the range
    out = Path(out)
    if (out / "labels.jsonl").exists():
        raise Loc3rError(f"{out} already holds a dataset (labels.jsonl); choose an empty --out")
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    if options.write_video:
        (out / "videos").mkdir(exist_ok=True)
    counts: dict[str, int] = {}
    n_labels = 0
    jobs = [(split, seed, i, str(out), options) for i in range(scenes)]
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_generate_and_write, jobs)
    else:
        results = map(_generate_and_write, jobs)
    try:
        with open(out / "labels.jsonl.partial", "w") as f:
            for records in tqdm(results, total=scenes, desc=f"synth {split}", unit="scene", disable=not progress):
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
                    counts[rec["type"]] = counts.get(rec["type"], 0) + 1
                    n_labels += 1
    finally:
        if pool is not None:
            pool.terminate()
    (out / "labels.jsonl.partial").rename(out / "labels.jsonl")
    meta = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "seed": seed,
        "scenes": scenes,
        "scene_seeds": [scene_seed(split, seed, 0), scene_seed(split, seed, scenes - 1)],
        "split_seed_base": SPLIT_SEED_BASE,
        "labels": n_labels,
        "questions_by_type": dict(sorted(counts.items())),
        "options": asdict(options),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
