"""TensorRT int8 calibration caches written from our activation ranges.

TensorRT's calibration-cache text format::

    TRT-<version number>-EntropyCalibration2
    <tensor name>: <scale as big-endian IEEE-754 float32, 8 hex digits>
    ...

where ``scale = max(|lo|, |hi|) / 127`` (symmetric int8) and the version
number is ``major*10000 + minor*100 + patch`` from TensorRT 10 on (10.3.0 ->
100300) and ``major*1000 + minor*100 + patch`` before. TensorRT 10 rejects a
cache whose header names another version, so the header is written for the
TensorRT that builds the engine. Tensor names are the ONNX tensor names,
which the ONNX parser keeps.
"""

from __future__ import annotations

import struct
from typing import Mapping

from loc3r.errors import Loc3rError

ALGORITHM = "EntropyCalibration2"
MIN_SCALE = 1e-8  # a constant-zero tensor still needs a positive scale


def trt_version_number(version: str) -> int:
    """``"10.3.0.30"`` -> 100300; ``"8.6.1"`` -> 8601."""
    try:
        parts = [int(p) for p in version.split(".")[:3]]
    except ValueError:
        raise Loc3rError(f"cannot read TensorRT version '{version}'") from None
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def scale_hex(scale: float) -> str:
    return struct.pack(">f", float(scale)).hex()


def calibration_cache_text(ranges: Mapping[str, tuple[float, float]], trt_version: str) -> str:
    """The cache for ``ranges`` ({tensor: (lo, hi)}), tensors sorted by name."""
    lines = [f"TRT-{trt_version_number(trt_version)}-{ALGORITHM}"]
    for name in sorted(ranges):
        lo, hi = ranges[name]
        amax = max(abs(float(lo)), abs(float(hi)))
        lines.append(f"{name}: {scale_hex(max(amax / 127.0, MIN_SCALE))}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(text: str) -> tuple[str, dict[str, float]]:
    """``(header, {tensor: scale})`` of a cache (names may contain ': ', so split on the last one)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise Loc3rError("not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for ln in lines[1:]:
        name, _, hexval = ln.rpartition(": ")
        if not name or len(hexval) != 8:
            raise Loc3rError(f"malformed calibration cache line: {ln!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval))[0]
    return lines[0], scales
