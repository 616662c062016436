"""Video sources: RGB uint8 frames with timestamps, sampled at ``--fps``.

:func:`open_video` turns the user's ``VIDEO`` argument into a source:

- ``camera:N``: a local camera through OpenCV (V4L2 on Linux). Live; the
  timestamp is seconds since the first frame; length unknown.
- a GStreamer pipeline (any string containing ``!``), opened with
  ``cv2.CAP_GSTREAMER``, e.g. Jetson hardware decode::

      filesrc location=v.mp4 ! qtdemux ! h264parse ! nvv4l2decoder !
      nvvidconv ! video/x-raw,format=BGRx ! videoconvert !
      video/x-raw,format=BGR ! appsink

  The pipeline must end in an ``appsink`` delivering BGR. Length unknown.
- a folder: every image in it (.png .jpg .jpeg .bmp .tif .tiff .webp),
  in natural order (frame2 before frame10); frame ``i`` has timestamp
  ``i / fps`` where ``fps`` is ``--fps`` (1.0 when not given), so every
  image is kept unless ``--max-frames`` subsamples.
- a single image file: a one-frame video.
- any other file: decoded by OpenCV's FFmpeg, rotation metadata applied.

Frames come out as RGB ``(H, W, 3)`` uint8, whatever the source format
(grayscale, RGBA and 16-bit are converted), upright: video rotation metadata
and images' EXIF orientation are applied. File timestamps are the frame
index over the header frame rate.

**Sampling** (:func:`sample_frames`): with ``--fps F`` a frame is kept when
its timestamp reaches the next sample time (the first frame is always kept;
then every ``1/F`` seconds); without it every frame is kept. With
``--max-frames N``: when the number of frames is known up front (files with a
frame count and frame rate in their header, folders), N frames are taken
uniformly over the whole video (after fps sampling); when it is not known
(cameras, pipelines), the first N are taken and the stream stops.

**Huge frames.** A frame whose long side exceeds ``max_side`` (default 2048
pixels: above anything the models use, since the pose prior reads 512 and
the vision tower 384) is downscaled with area interpolation as soon as it is
read, so an 8K video runs within a few hundred MB. A frame with more than
``MAX_PIXELS`` pixels (a 16K x 16K image) is refused with a clear error
instead of risking the machine's memory.

Errors are :class:`Loc3rError` with one line; the exact texts are tested.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from loc3r.errors import Loc3rError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_SIDE = 2048
MAX_PIXELS = 16384 * 16384
# Leading bytes of common video containers: a file that starts like a video but
# that FFmpeg cannot open is reported as corrupt, anything else as not a video.
_VIDEO_SIGNATURES = (
    (4, b"ftyp"),  # mp4, mov, 3gp
    (0, b"\x1a\x45\xdf\xa3"),  # mkv, webm
    (8, b"AVI "),  # avi (RIFF....AVI )
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),  # mpeg-ps
    (0, b"\x00\x00\x01\xb3"),  # mpeg-es
    (0, b"\x47", 188, b"\x47"),  # mpeg-ts: a sync byte every 188 bytes
)

Frame = tuple[np.ndarray, float]  # (rgb (H, W, 3) uint8, timestamp in seconds)


@dataclass(frozen=True)
class SamplingOptions:
    """How frames are taken from a source."""

    fps: Optional[float] = None  # None: every frame
    max_frames: Optional[int] = None  # None: no limit
    max_side: int = DEFAULT_MAX_SIDE  # downscale frames whose long side exceeds this

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise Loc3rError(f"--fps must be positive, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise Loc3rError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.max_side < 16:
            raise Loc3rError(f"max_side must be at least 16, got {self.max_side}")


@contextmanager
def _quiet_opencv():
    """Silence OpenCV's and FFmpeg's own stderr chatter; errors come from us, once."""
    import cv2

    # FFmpeg's log level is read once, when OpenCV first initialises FFmpeg.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logging = cv2.utils.logging
    old = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(old)


def to_rgb(frame: np.ndarray, max_side: int = DEFAULT_MAX_SIDE, name: str = "frame") -> np.ndarray:
    """An OpenCV BGR/BGRA/gray frame as contiguous RGB uint8, downscaled above ``max_side``."""
    import cv2

    if frame.dtype != np.uint8:
        # 16-bit images: keep the top 8 bits.
        if frame.dtype == np.uint16:
            frame = (frame >> 8).astype(np.uint8)
        else:
            raise Loc3rError(f"{name} has unsupported pixel type {frame.dtype}")
    h, w = frame.shape[:2]
    if h * w > MAX_PIXELS:
        raise Loc3rError(
            f"{name} is {w}x{h} pixels, larger than the {MAX_PIXELS // 1_000_000} megapixel limit"
        )
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class VideoSource:
    """Frames from one source, in order. Iterate with :func:`sample_frames`."""

    description: str = ""

    @property
    def frame_count(self) -> Optional[int]:
        """Frames in the source, when known before decoding; None for live sources."""
        return None

    @property
    def native_fps(self) -> Optional[float]:
        return None

    def nominal_timestamps(self) -> Optional[np.ndarray]:
        """Timestamps of all frames when known up front (for uniform sampling)."""
        return None

    def frames(self, keep: Optional[set[int]] = None) -> Iterator[Frame]:
        """``(rgb, t)`` for each frame, or only frame indices in ``keep`` (others are skipped cheaply)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileSource(VideoSource):
    """A video file decoded by OpenCV's FFmpeg backend."""

    def __init__(self, path: Path, max_side: int = DEFAULT_MAX_SIDE):
        import cv2

        self.path = path
        self.max_side = max_side
        self.description = str(path)
        with _quiet_opencv():
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
            if cap.isOpened():
                # Apply rotation metadata (the FFmpeg backend's default; said explicitly).
                cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
        if not cap.isOpened():
            if _looks_like_video(path):
                raise Loc3rError(f"corrupt or truncated video: {path} (FFmpeg cannot read its header)")
            raise Loc3rError(
                f"not a video: {path} (FFmpeg cannot open it; VIDEO is a video file, an image, "
                "a folder of images, camera:N or a GStreamer pipeline)"
            )
        self._cap = cap
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        self._count = count if count > 0 else None
        self._fps = fps if fps > 0 else None

    @property
    def frame_count(self) -> Optional[int]:
        return self._count

    @property
    def native_fps(self) -> Optional[float]:
        return self._fps

    def nominal_timestamps(self) -> Optional[np.ndarray]:
        if self._count is None or self._fps is None:
            return None
        return np.arange(self._count) / self._fps

    def frames(self, keep: Optional[set[int]] = None) -> Iterator[Frame]:
        import cv2

        cap = self._cap
        last = max(keep) if keep else None
        index = decoded = 0
        while last is None or index <= last:
            with _quiet_opencv():
                wanted = keep is None or index in keep
                ok = cap.grab()
                if ok and wanted:
                    ok, bgr = cap.retrieve()
            if not ok:
                break
            if wanted:
                t_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC))
                t = index / self._fps if self._fps else t_ms / 1000.0
                decoded += 1
                yield to_rgb(bgr, self.max_side, f"frame {index} of {self.path.name}"), t
            index += 1
        if index == 0:
            raise Loc3rError(f"no decodable frames in {self.path}")
        # The header promised more frames than decoded: the file is cut or damaged.
        # (Headers can be off by a frame or two, so allow a small slack.)
        expected = self._count if last is None else last + 1
        if expected is not None and index < expected - 2 and index < 0.95 * expected:
            raise Loc3rError(
                f"corrupt or truncated video: {self.path} (decoding stopped at frame {index} "
                f"of {expected})"
            )

    def close(self) -> None:
        self._cap.release()


class ImageFolderSource(VideoSource):
    """Every image in a folder, in natural order; timestamps ``i / fps``."""

    def __init__(self, folder: Path, fps: float = 1.0, max_side: int = DEFAULT_MAX_SIDE):
        self.folder = folder
        self.max_side = max_side
        self.fps = fps
        self.description = f"{folder}/ (images)"
        self.files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: _natural_key(p.name),
        )
        if not self.files:
            raise Loc3rError(
                f"no images in folder {folder} (looked for {' '.join(IMAGE_EXTENSIONS)})"
            )

    @property
    def frame_count(self) -> Optional[int]:
        return len(self.files)

    @property
    def native_fps(self) -> Optional[float]:
        return self.fps

    def nominal_timestamps(self) -> Optional[np.ndarray]:
        return np.arange(len(self.files)) / self.fps

    def frames(self, keep: Optional[set[int]] = None) -> Iterator[Frame]:
        for i, path in enumerate(self.files):
            if keep is None or i in keep:
                yield read_image(path, self.max_side), i / self.fps


class SingleImageSource(ImageFolderSource):
    """One image file as a one-frame video."""

    def __init__(self, path: Path, max_side: int = DEFAULT_MAX_SIDE):
        self.folder = path.parent
        self.max_side = max_side
        self.fps = 1.0
        self.description = str(path)
        self.files = [path]


class CaptureSource(VideoSource):
    """A live OpenCV capture: a camera index or a GStreamer pipeline."""

    def __init__(self, cap, description: str, max_side: int = DEFAULT_MAX_SIDE):
        self._cap = cap
        self.description = description
        self.max_side = max_side

    def frames(self, keep: Optional[set[int]] = None) -> Iterator[Frame]:
        t0 = None
        index = 0
        while True:
            with _quiet_opencv():
                ok, bgr = self._cap.read()
            if not ok:
                break
            now = time.monotonic()
            t0 = now if t0 is None else t0
            yield to_rgb(bgr, self.max_side, f"frame {index} of {self.description}"), now - t0
            index += 1
        if index == 0:
            raise Loc3rError(f"no frames from {self.description}")

    def close(self) -> None:
        self._cap.release()


def read_image(path: Path, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """One image file as RGB uint8; unreadable files raise, naming the file."""
    import cv2

    with _quiet_opencv():
        # COLOR applies the EXIF orientation (phone photos) and gives 3 channels;
        # ANYDEPTH keeps 16-bit images 16-bit for to_rgb to reduce.
        data = np.fromfile(str(path), np.uint8) if path.is_file() else None
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
        img = None if data is None or data.size == 0 else cv2.imdecode(data, flags)
    if img is None:
        where = f" in {path.parent}" if path.parent != Path(".") else ""
        raise Loc3rError(f"cannot read image {path.name}{where} (corrupt or not an image)")
    return to_rgb(img, max_side, f"image {path.name}")


def open_video(spec: str, options: SamplingOptions = SamplingOptions()) -> VideoSource:
    """The source for a ``VIDEO`` argument; see the module docstring."""
    import cv2

    spec = str(spec)
    if not spec.strip():
        raise Loc3rError("no video given")
    m = re.fullmatch(r"camera:(\d+)", spec.strip())
    if m:
        index = int(m.group(1))
        with _quiet_opencv():
            cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            raise Loc3rError(f"cannot open camera {index} (no such device, or it is busy)")
        return CaptureSource(cap, f"camera {index}", options.max_side)
    if "!" in spec:
        if not gstreamer_available():
            raise Loc3rError(
                "this OpenCV was built without GStreamer, so it cannot open a pipeline "
                "(on Jetson use JetPack's python3-opencv)"
            )
        with _quiet_opencv():
            cap = cv2.VideoCapture(spec, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            raise Loc3rError("cannot open the GStreamer pipeline (does it end in an appsink of BGR frames?)")
        return CaptureSource(cap, "GStreamer pipeline", options.max_side)
    path = Path(spec).expanduser()
    if not path.exists():
        raise Loc3rError(f"video not found: {path}")
    if path.is_dir():
        return ImageFolderSource(path, options.fps or 1.0, options.max_side)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return SingleImageSource(path, options.max_side)
    if path.stat().st_size == 0:
        raise Loc3rError(f"not a video: {path} is empty")
    return FileSource(path, options.max_side)


def gstreamer_available() -> bool:
    import cv2

    info = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\S+)", info)
    return bool(m) and m.group(1).upper() != "NO"


def selected_indices(source: VideoSource, options: SamplingOptions) -> Optional[list[int]]:
    """The frame indices to keep, when the source's length is known up front; else None."""
    stamps = source.nominal_timestamps()
    if stamps is None:
        return None
    if isinstance(source, ImageFolderSource):
        kept = list(range(len(stamps)))  # --fps sets a folder's timestamps; keep every image
    else:
        kept = fps_sample(stamps, options.fps)
    n = options.max_frames
    if n is not None and len(kept) > n:
        picks = np.unique(np.round(np.linspace(0, len(kept) - 1, n)).astype(int))
        kept = [kept[i] for i in picks]
    return kept


def fps_sample(timestamps: np.ndarray, fps: Optional[float]) -> list[int]:
    """Indices kept by fps sampling: a frame is kept when it reaches the next sample time."""
    if fps is None or len(timestamps) == 0:
        return list(range(len(timestamps)))
    period = 1.0 / fps
    kept, next_t = [], float(timestamps[0])
    eps = 1e-9
    for i, t in enumerate(timestamps):
        if t + eps >= next_t:
            kept.append(i)
            # The next sample time after t, on the grid anchored at the first frame.
            steps = int(np.floor((t - timestamps[0]) / period + eps)) + 1
            next_t = float(timestamps[0]) + steps * period
    return kept


def sample_frames(source: VideoSource, options: SamplingOptions = SamplingOptions()) -> Iterator[Frame]:
    """The sampled ``(rgb, t)`` frames of ``source`` (see the module docstring)."""
    kept = selected_indices(source, options)
    if kept is not None:
        yield from source.frames(keep=set(kept))
        return
    # Unknown length: sample on the fly; --max-frames takes the first N.
    period = None if options.fps is None else 1.0 / options.fps
    next_t: Optional[float] = None
    count = 0
    for rgb, t in source.frames():
        if period is not None:
            if next_t is not None and t + 1e-9 < next_t:
                continue
            next_t = t + period if next_t is None else next_t + period
            if next_t <= t:  # the source lagged by more than a period: restart the grid
                next_t = t + period
        yield rgb, t
        count += 1
        if options.max_frames is not None and count >= options.max_frames:
            return


def expected_frames(source: VideoSource, options: SamplingOptions) -> Optional[int]:
    """How many frames :func:`sample_frames` will yield, when known (for progress bars)."""
    kept = selected_indices(source, options)
    return None if kept is None else len(kept)


def _looks_like_video(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(189)
    except OSError:
        return False

    def at(off: int, sig: bytes) -> bool:
        return head[off : off + len(sig)] == sig

    return any(all(at(sig[i], sig[i + 1]) for i in range(0, len(sig), 2)) for sig in _VIDEO_SIGNATURES)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
