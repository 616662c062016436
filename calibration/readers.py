"""Graph inputs from a calibration set, through the runtime's own preprocessing.

- Vision tower: each sampled frame through
  :func:`loc3r.runtime.preprocess.preprocess_vision`, one frame per input,
  with the camera token (when the graph takes one) from the fp32 pose prior
  run over the clip.
- Pose prior: each clip's frames through
  :class:`loc3r.runtime.preprocess.PoseStream` (the session's own path), fed in order with the
  recurrent ``state``/``memory`` that the fp32 pose prior graph itself
  produced on the previous frame (run with onnxruntime), so the quantized
  graph is calibrated on the states it will see in a stream.

Graph inputs are found from the manifest's :class:`GraphSpec`, by role: the
image is the rank-4 float input, a recurrent input is a float input that has
an output of the same shape named after it (``new_state`` for ``state``,
``memory_out`` for ``memory``, ...), and a rank-0/1 input is the
first-frame flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from loc3r.calibration.dataset import CalibrationSet
from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, PosePriorSpec, TensorSpec, VisionSpec
from loc3r.runtime.preprocess import PoseStream, preprocess_vision

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}


def image_input(spec: GraphSpec) -> TensorSpec:
    """The graph's rank-4 float input (pixels)."""
    found = [t for t in spec.inputs if len(t.shape) == 4 and t.dtype in ("float32", "float16")]
    if len(found) != 1:
        raise Loc3rError(f"graph {spec.file}: expected one rank-4 image input, found {len(found)}")
    return found[0]


def _fixed_shape(t: TensorSpec, batch: int = 1) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else batch for d in t.shape)


def vision_feeds(
    calib: CalibrationSet,
    vision: VisionSpec,
    spec: GraphSpec,
    pose: Optional[PosePriorSpec] = None,
    pose_spec: Optional[GraphSpec] = None,
    pose_graph: Optional[Path] = None,
) -> Iterator[dict]:
    """One feed per sampled frame: ``{pixels: (1, 3, S, S), ...}``.

    Inputs besides the pixels (the camera token) must be outputs of the pose
    prior: they are taken from the fp32 ``pose_graph`` run over each clip, as
    in a stream.
    """
    inp = image_input(spec)
    extra = [t for t in spec.inputs if t is not inp]
    if extra and (pose is None or pose_spec is None or pose_graph is None):
        raise Loc3rError(f"graph {spec.file} needs {', '.join(t.name for t in extra)} from the pose prior, "
                         "but the package has none")
    steps = (pose_prior_steps(calib, pose, pose_spec, pose_graph, [t.name for t in extra]) if extra
             else ((None, {}) for _ in calib.frames))
    for rgb, (_, outs) in zip(calib.frames, steps):
        x = preprocess_vision(rgb, vision.image_size, vision.mean, vision.std)[None]  # (1, 3, S, S)
        feeds = {inp.name: x.astype(_NP[inp.dtype])}
        for t in extra:
            feeds[t.name] = np.asarray(outs[t.name], _NP[t.dtype])
        yield feeds


@dataclass(frozen=True)
class RecurrentIO:
    image: TensorSpec
    pairs: tuple[tuple[str, str], ...]  # (input, the output that feeds it next frame)
    flag: Optional[TensorSpec]  # the first-frame flag, if any


def recurrent_io(spec: GraphSpec) -> RecurrentIO:
    """Image input, (state input, state output) pairs and the first-frame flag of a step graph."""
    image = image_input(spec)
    outputs = {o.name: o for o in spec.outputs}
    pairs, flag = [], None
    for t in spec.inputs:
        if t is image:
            continue
        if len(t.shape) <= 1:
            flag = t
            continue
        names = (f"new_{t.name}", f"{t.name}_out", f"next_{t.name}", f"updated_{t.name}", f"{t.name}_next")
        match = next((outputs[n] for n in names if n in outputs), None)
        if match is None:
            match = next((o for o in spec.outputs if t.name in o.name and len(o.shape) == len(t.shape)), None)
        if match is None:
            raise Loc3rError(f"graph {spec.file}: no output carries recurrent input '{t.name}' to the next frame")
        pairs.append((t.name, match.name))
    return RecurrentIO(image=image, pairs=tuple(pairs), flag=flag)


def pose_prior_steps(
    calib: CalibrationSet,
    pose: PosePriorSpec,
    spec: GraphSpec,
    fp32_graph: Path,
    want: Sequence[str] = (),
    initial: Optional[Mapping[str, np.ndarray]] = None,
) -> Iterator[tuple[dict, dict]]:
    """``(feeds, outputs)`` per frame, clip by clip: the fp32 pose prior run as a stream.

    ``outputs`` holds the recurrent outputs and the names in ``want``.
    ``initial`` maps recurrent input names to their start-of-stream values
    (the session's initial state); without it they start at zero, with the
    first-frame flag set (the graph blends in its learned initial state).
    """
    import onnxruntime as ort

    io = recurrent_io(spec)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(fp32_graph), opts, providers=["CPUExecutionProvider"])
    by_name = {t.name: t for t in spec.inputs}
    names = [o for _, o in io.pairs] + [w for w in want if w not in {o for _, o in io.pairs}]
    for clip in calib.clips:
        state = {}
        for name, _ in io.pairs:
            t = by_name[name]
            start = None if initial is None else initial.get(name)
            state[name] = (np.zeros(_fixed_shape(t), _NP[t.dtype]) if start is None
                           else np.asarray(start, _NP[t.dtype]).reshape(_fixed_shape(t)))
        stream = PoseStream(pose)
        for i, rgb in enumerate(clip.frames):
            x = stream(rgb)  # (1, 3 or 6, H, W)
            feeds = {io.image.name: x.astype(_NP[io.image.dtype]), **state}
            if io.flag is not None:
                feeds[io.flag.name] = np.full(_fixed_shape(io.flag), 1 if i == 0 else 0, _NP[io.flag.dtype])
            outs = dict(zip(names, sess.run(names, feeds)))
            yield feeds, outs
            state = {name: outs[out] for name, out in io.pairs}


def pose_prior_feeds(
    calib: CalibrationSet,
    pose: PosePriorSpec,
    spec: GraphSpec,
    fp32_graph: Path,
    initial: Optional[Mapping[str, np.ndarray]] = None,
) -> Iterator[dict]:
    """One feed per frame, clip by clip, with the state the fp32 graph produced on the previous frame."""
    for feeds, _ in pose_prior_steps(calib, pose, spec, fp32_graph, (), initial):
        yield feeds
