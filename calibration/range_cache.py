"""Activation-range caches: JSON files keyed by the model and calibration-set hashes.

A key is the sha256 of the fp32 graph file, the calibration set's digest and
the range method (with its parameters); the file is
``<cache_dir>/<graph stem>-<key[:20]>.json``::

    {"version": 1, "model_sha256": ..., "calibration_sha256": ..., "method": ...,
     "ranges": {"tensor name": [lo, hi], ...}}

A second export of the same graph with the same calibration set and method
reads the ranges back instead of running calibration again. Any change to the
graph, the frames/prompts or the method gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loc3r.errors import Loc3rError

CACHE_VERSION = 1
Ranges = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class RangeKey:
    graph: str  # graph file stem, for readable cache names
    model_sha256: str
    calibration_sha256: str
    method: str  # e.g. "percentile-99.999"

    @property
    def digest(self) -> str:
        text = f"{CACHE_VERSION}\0{self.model_sha256}\0{self.calibration_sha256}\0{self.method}"
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.graph}-{self.digest[:20]}.json"


def default_cache_dir() -> Path:
    """``$LOC3R_CACHE_DIR/calibration``, else ``~/.cache/loc3r/calibration``."""
    base = os.environ.get("LOC3R_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "loc3r") / "calibration"


class RangeCache:
    """Ranges stored as JSON in ``cache_dir``."""

    def __init__(self, cache_dir: Optional[Path] = None):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def path(self, key: RangeKey) -> Path:
        return self.dir / key.file_name

    def load(self, key: RangeKey) -> Optional[Ranges]:
        """The cached ranges, or None when absent or written for another key."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged cache is recomputed, not trusted
        if (raw.get("version") != CACHE_VERSION or raw.get("model_sha256") != key.model_sha256
                or raw.get("calibration_sha256") != key.calibration_sha256 or raw.get("method") != key.method):
            return None
        return {str(k): (float(v[0]), float(v[1])) for k, v in raw["ranges"].items()}

    def store(self, key: RangeKey, ranges: Ranges) -> Path:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Loc3rError(f"cannot create calibration cache dir {self.dir}: {exc.strerror}") from None
        payload = {
            "version": CACHE_VERSION, "model_sha256": key.model_sha256,
            "calibration_sha256": key.calibration_sha256, "method": key.method,
            "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(ranges.items())},
        }
        path = self.path(key)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
        return path
