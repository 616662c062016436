"""loc3r.calibration: calibration frames and prompts, graph inputs, activation ranges and their caches.

- :mod:`loc3r.calibration.dataset`: :class:`CalibrationSet` sampled from a folder of
  videos (+ ``labels.jsonl``) with the runtime's video sources.
- :mod:`loc3r.calibration.readers`: per-graph inputs through the runtime's preprocessing.
- :mod:`loc3r.calibration.ranges`: activation ranges (onnxruntime's calibrators), cached.
- :mod:`loc3r.calibration.range_cache`: the JSON range cache keyed by model and set hashes.
"""

from loc3r.calibration.dataset import CalibrationOptions, CalibrationSet, build_calibration_set

__all__ = ["CalibrationOptions", "CalibrationSet", "build_calibration_set"]
