"""Activation ranges of a graph over calibration inputs (onnxruntime's calibrators).

:func:`calibrated_ranges` is what export calls: it returns the cached ranges
for (graph sha256, calibration digest, method) when present, and otherwise
runs the calibrator over the feeds and stores the result.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from loc3r.calibration.range_cache import RangeCache, RangeKey, Ranges
from loc3r.errors import Loc3rError

Feeds = Mapping[str, np.ndarray]
CALIBRATED_OPS = ("MatMul", "Conv")


@dataclass(frozen=True)
class RangeMethod:
    """How activation ranges are computed: ``minmax``, ``percentile`` or ``entropy``."""

    name: str = "percentile"
    percentile: float = 99.999
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if self.name not in ("minmax", "percentile", "entropy"):
            raise Loc3rError(f"unknown calibration method '{self.name}'; known: minmax, percentile, entropy")
        if not 50.0 < self.percentile <= 100.0:
            raise Loc3rError(f"calibration percentile must be in (50, 100], got {self.percentile}")

    @property
    def tag(self) -> str:
        if self.name == "percentile":
            return f"percentile-{self.percentile:g}-{self.num_bins}"
        return self.name if self.name == "minmax" else f"entropy-{self.num_bins}"


class _Reader:
    """onnxruntime CalibrationDataReader over an iterable of feeds."""

    def __init__(self, feeds: Iterable[Feeds], total: Optional[int], progress: bool):
        from tqdm import tqdm

        self._it = iter(tqdm(feeds, desc="calibrating", total=total, disable=not progress, file=sys.stderr,
                             unit="input"))
        self.count = 0

    def get_next(self):
        item = next(self._it, None)
        if item is not None:
            self.count += 1
            return dict(item)
        return None


def collect_ranges(
    graph: Path, feeds: Iterable[Feeds], method: RangeMethod = RangeMethod(),
    total: Optional[int] = None, progress: bool = True, op_types: Sequence[str] = CALIBRATED_OPS,
) -> Ranges:
    """``{tensor: (lo, hi)}`` for the inputs and outputs of every node of ``op_types`` (MatMul, Conv) in ``graph``."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    kinds = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}
    extra = {"symmetric": True}
    if method.name != "minmax":
        extra["num_bins"] = method.num_bins
    if method.name == "percentile":
        extra["percentile"] = method.percentile
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="loc3r-calib-") as tmp:
            cal = create_calibrator(Path(graph), list(op_types),
                                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                    calibrate_method=kinds[method.name], extra_options=extra)
            reader = _Reader(feeds, total, progress)
            with contextlib.redirect_stdout(sys.stderr if progress else None):  # the calibrator print()s
                cal.collect_data(reader)
                if reader.count == 0:
                    raise Loc3rError(f"calibration of {Path(graph).name} got no inputs")
                data = cal.compute_data()
            del cal
    finally:
        root.setLevel(level)
    out: Ranges = {}
    for name, td in data.data.items():
        lo, hi = td.range_value
        out[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    return out


def calibrated_ranges(
    graph: Path,
    model_sha256: str,
    calibration_sha256: str,
    feeds: Callable[[], Iterable[Feeds]],
    method: RangeMethod = RangeMethod(),
    cache: Optional[RangeCache] = None,
    total: Optional[int] = None,
    progress: bool = True,
) -> tuple[Ranges, bool]:
    """``(ranges, from_cache)``; ``feeds`` is only called on a cache miss."""
    cache = cache or RangeCache()
    key = RangeKey(Path(graph).stem, model_sha256, calibration_sha256, method.tag)
    hit = cache.load(key)
    if hit is not None:
        return hit, True
    ranges = collect_ranges(graph, feeds(), method, total, progress)
    cache.store(key, ranges)
    return ranges, False
