"""Per-stage latency profiling: p50/p95/max after warm-up, throughput, memory, Chrome traces.

The session records its stages through :meth:`StageProfiler.stage`; the CLI
records ``decode`` (reading the next frame) itself. Stages:

    decode, preprocess, pose_prior, vision, frame_prefill,   (per frame)
    question_prefill, token_decode                            (per question / token)

Statistics drop each stage's first ``warmup`` samples (first runs pay for
allocation and kernel selection); a stage with no more samples than that
keeps them all. Every sample, warm-up included, goes into the Chrome trace
(``chrome://tracing`` or https://ui.perfetto.dev).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

STAGES = (
    "decode",
    "preprocess",
    "pose_prior",
    "vision",
    "frame_prefill",
    "question_prefill",
    "token_decode",
)


@dataclass(frozen=True)
class StageStats:
    count: int  # samples used (after warm-up)
    p50_ms: float
    p95_ms: float
    max_ms: float
    mean_ms: float


@dataclass(frozen=True)
class ProfileReport:
    stages: dict[str, StageStats]
    frames: int
    frames_per_s: Optional[float]  # ingest: frames / seconds spent ingesting them
    tokens: int
    tokens_per_s: Optional[float]  # generated tokens / token_decode seconds
    time_to_first_token_ms: Optional[float]  # median over questions: ask() start -> first token
    peak_rss_mb: float
    backend: str = ""
    extra: dict[str, Union[str, float, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        """A fixed-width text table."""
        lines = []
        if self.backend:
            lines.append(f"backend: {self.backend}")
        lines.append(f"{'stage':<18}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
        for name in list(STAGES) + sorted(set(self.stages) - set(STAGES)):
            s = self.stages.get(name)
            if s is None:
                continue
            lines.append(f"{name:<18}{s.count:>6}{s.p50_ms:>10.2f}{s.p95_ms:>10.2f}{s.max_ms:>10.2f}")
        lines.append(f"frames ingested: {self.frames}" + _rate(self.frames_per_s, "frames/s"))
        lines.append(f"tokens generated: {self.tokens}" + _rate(self.tokens_per_s, "tokens/s"))
        if self.time_to_first_token_ms is not None:
            lines.append(f"time to first token: {self.time_to_first_token_ms:.1f} ms")
        lines.append(f"peak RSS: {self.peak_rss_mb:.1f} MB")
        for k, v in self.extra.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


def _rate(value: Optional[float], unit: str) -> str:
    return "" if value is None else f" ({value:.2f} {unit})"


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class StageProfiler:
    """Collects stage durations; cheap enough to leave on (one perf_counter pair per stage)."""

    def __init__(self, warmup: int = 1, enabled: bool = True):
        if warmup < 0:
            raise ValueError("warmup must be >= 0")
        self.warmup = warmup
        self.enabled = enabled
        self._samples: dict[str, list[float]] = {}
        self._events: list[tuple[str, float, float, dict]] = []  # (name, start_s, dur_s, args)
        self._t0 = time.perf_counter()
        self._frames = 0
        self._ingest_s = 0.0
        self._tokens = 0
        self._ttft_s: list[float] = []

    @contextmanager
    def stage(self, name: str, args: Optional[dict] = None) -> Iterator[None]:
        """Time the enclosed block as one sample of ``name``."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - start, start=start, args=args)

    def record(
        self, name: str, seconds: float, start: Optional[float] = None, args: Optional[dict] = None
    ) -> None:
        """Add one sample (seconds); ``start`` is a perf_counter value, for the trace; ``args`` too."""
        if not self.enabled:
            return
        self._samples.setdefault(name, []).append(seconds)
        begin = (time.perf_counter() - seconds) if start is None else start
        self._events.append((name, begin, seconds, dict(args or {})))

    def add_frames(self, count: int, seconds: float) -> None:
        """``count`` frames fully ingested (decode to prefill) in ``seconds``."""
        self._frames += count
        self._ingest_s += seconds

    def add_tokens(self, count: int) -> None:
        self._tokens += count

    def add_first_token(self, seconds: float) -> None:
        """Time from the start of ``ask`` to the first answer token."""
        self._ttft_s.append(seconds)

    def samples(self, name: str) -> list[float]:
        return list(self._samples.get(name, []))

    def stats(self, name: str) -> Optional[StageStats]:
        xs = self._samples.get(name)
        if not xs:
            return None
        if len(xs) > self.warmup:
            xs = xs[self.warmup :]
        ms = np.asarray(xs, np.float64) * 1000.0
        return StageStats(
            count=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            max_ms=float(ms.max()),
            mean_ms=float(ms.mean()),
        )

    def report(self, backend: str = "", extra: Optional[dict] = None) -> ProfileReport:
        stages = {name: s for name in self._samples if (s := self.stats(name)) is not None}
        decode_s = sum(self._samples.get("token_decode", []))
        return ProfileReport(
            stages=stages,
            frames=self._frames,
            frames_per_s=self._frames / self._ingest_s if self._frames and self._ingest_s > 0 else None,
            tokens=self._tokens,
            tokens_per_s=self._tokens / decode_s if self._tokens and decode_s > 0 else None,
            time_to_first_token_ms=float(np.median(self._ttft_s)) * 1000.0 if self._ttft_s else None,
            peak_rss_mb=peak_rss_mb(),
            backend=backend,
            extra=dict(extra or {}),
        )

    def chrome_trace(self) -> dict:
        """The samples as Chrome trace events (complete events, microseconds)."""
        pid = os.getpid()
        base = min([self._t0] + [start for _, start, _, _ in self._events])
        events = [
            {
                "name": name,
                "cat": "loc3r",
                "ph": "X",
                "ts": round((start - base) * 1e6, 3),
                "dur": round(dur * 1e6, 3),
                "pid": pid,
                "tid": 0 if name in ("decode", "preprocess", "pose_prior", "vision", "frame_prefill") else 1,
                "args": args,
            }
            for name, start, dur, args in self._events
        ]
        meta = [
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "frames"}},
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": "questions"}},
        ]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path
