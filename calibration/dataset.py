"""Calibration sets: real frames and prompts, sampled once, hashed for the range caches.

A calibration source is a folder of videos (or image folders), a single
video, or a ``loc3r synth`` dataset directory (``videos/`` + ``labels.jsonl``).
Frames are sampled with the runtime's own video sources
(:mod:`loc3r.runtime.video`) and kept as RGB uint8; each graph's reader turns
them into inputs with the runtime's own preprocessing
(:mod:`loc3r.runtime.preprocess`), never a second implementation. The
situations and questions come from a labels JSON-lines file beside the videos
(``labels.jsonl`` in the folder or its parent, the format ``loc3r synth``
writes), when there is one.

:meth:`CalibrationSet.digest` is a sha256 over the frames' pixels and the
prompts, the calibration half of a range-cache key.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from loc3r.errors import Loc3rError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Prompt:
    question: str
    situation: Optional[str] = None


@dataclass(frozen=True)
class Clip:
    """Frames sampled from one video, in order (the pose prior is recurrent)."""

    name: str
    frames: tuple[np.ndarray, ...]  # each (H, W, 3) uint8 RGB


@dataclass(frozen=True)
class CalibrationOptions:
    """How a calibration set is sampled."""

    frames_per_video: int = 8
    max_videos: int = 16
    max_prompts: int = 64
    max_side: int = 1024

    def __post_init__(self) -> None:
        if self.frames_per_video < 1 or self.max_videos < 1 or self.max_prompts < 0:
            raise Loc3rError("calibration needs at least one frame from at least one video")


@dataclass(frozen=True)
class CalibrationSet:
    clips: tuple[Clip, ...]
    prompts: tuple[Prompt, ...] = ()

    @property
    def frames(self) -> list[np.ndarray]:
        return [f for c in self.clips for f in c.frames]

    def digest(self) -> str:
        """sha256 over every frame's shape and pixels and every prompt, in order."""
        h = hashlib.sha256(b"loc3r-calibration-v1\0")
        for clip in self.clips:
            h.update(f"clip:{len(clip.frames)}\0".encode())
            for f in clip.frames:
                h.update(f"{f.shape}\0".encode())
                h.update(np.ascontiguousarray(f).tobytes())
        for p in self.prompts:
            h.update(f"q:{p.question}\0s:{p.situation}\0".encode())
        return h.hexdigest()


def find_videos(folder: Path) -> list[Path]:
    """Video files (and sub-folders of images) directly in ``folder`` or its ``videos/``, sorted."""
    roots = [folder / "videos", folder] if (folder / "videos").is_dir() else [folder]
    found: list[Path] = []
    for root in roots:
        for p in sorted(root.iterdir()):
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                found.append(p)
            elif p.is_dir() and p.name != "videos" and any(
                    q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir() if q.is_file()):
                found.append(p)
    if not found and any(q.suffix.lower() in IMAGE_SUFFIXES for q in folder.iterdir() if q.is_file()):
        found.append(folder)  # the folder itself is one image sequence
    return found


def find_labels(source: Path) -> Optional[Path]:
    """``labels.jsonl`` beside the videos: in the folder, or its parent (a synth ``videos/`` dir)."""
    folder = source if source.is_dir() else source.parent
    for cand in (folder / "labels.jsonl", folder.parent / "labels.jsonl"):
        if cand.is_file():
            return cand
    return None


def read_prompts(labels: Path, limit: int) -> list[Prompt]:
    from loc3r.synthetic.label_files import read_labels

    seen, out = set(), []
    for row in read_labels(labels):
        p = Prompt(question=str(row["question"]), situation=row.get("situation") or None)
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= limit:
            break
    return out


def build_calibration_set(
    source: Union[str, Path], options: CalibrationOptions = CalibrationOptions(), progress: bool = True
) -> CalibrationSet:
    """Sample ``options.frames_per_video`` frames, evenly spread, from up to ``max_videos`` videos."""
    from tqdm import tqdm

    from loc3r.runtime.video import SamplingOptions, open_video, sample_frames

    source = Path(source).expanduser()
    if not source.exists():
        raise Loc3rError(f"calibration source not found: {source}")
    videos = find_videos(source) if source.is_dir() else [source]
    if not videos:
        raise Loc3rError(f"no videos or images found in calibration folder {source}")
    videos = videos[: options.max_videos]
    sampling = SamplingOptions(max_frames=options.frames_per_video, max_side=options.max_side)
    clips = []
    for path in tqdm(videos, desc="calibration frames", unit="video", disable=not progress, file=sys.stderr):
        with open_video(str(path), sampling) as src:
            frames = tuple(rgb for rgb, _ in sample_frames(src, sampling))
        if frames:
            clips.append(Clip(name=path.name, frames=frames))
    if not clips:
        raise Loc3rError(f"no frames could be read from calibration source {source}")
    labels = find_labels(source)
    prompts = read_prompts(labels, options.max_prompts) if labels is not None and options.max_prompts else []
    return CalibrationSet(clips=tuple(clips), prompts=tuple(prompts))
