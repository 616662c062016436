"""A stand-in for loc3r.runtime.session (written by the export work) to test the CLIs' flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.backends import resolve_backend
from loc3r.runtime.bev_plot import BevScene
from loc3r.runtime.package import load_package
from loc3r.runtime.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    position: Optional[tuple[float, float]]
    position_sigma: Optional[float]
    orientation_deg: Optional[float]
    frames: int
    timings_ms: dict = field(default_factory=dict)


class FakeSession:
    def __init__(self, profiler, frame_policy="uniform"):
        self.profiler = profiler
        self.frame_policy = frame_policy
        self.frames: list[tuple[tuple, float, float]] = []  # (shape, mean, t)
        self.asked: list[tuple[str, Optional[str], int]] = []

    def add_frame(self, rgb, t):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        for stage in ("preprocess", "pose_prior", "vision", "frame_prefill"):
            with self.profiler.stage(stage):
                pass
        if self.frame_policy == "stop" and len(self.frames) >= 4:  # a budget of 4, for live tests
            return False
        self.frames.append((rgb.shape, float(rgb.mean()), float(t)))
        return True

    def ask(self, question, situation=None, max_new_tokens=64):
        if not question.strip():
            raise Loc3rError("the question is empty")
        self.asked.append((question, situation, max_new_tokens))
        with self.profiler.stage("question_prefill"):
            pass
        self.profiler.add_first_token(0.001)
        for _ in range(3):
            with self.profiler.stage("token_decode"):
                pass
        self.profiler.add_tokens(3)
        n = len(self.frames)
        loc = situation is not None
        return Answer(
            question=question,
            answer=f"saw {n} frames",
            position=(1.5, -0.25) if loc else None,
            position_sigma=0.5 if loc else None,
            orientation_deg=90.0 if loc else None,
            frames=n,
            timings_ms={"question_prefill": 1.0, "token_decode": 2.0},
        )

    def bev_scene(self, answer):
        n = max(1, len(self.frames)) * 4
        rng = np.random.default_rng(0)
        return BevScene(
            token_xy=rng.uniform(-2, 2, (n, 2)),
            token_rgb=np.full((n, 3), (0, 180, 0), np.uint8),
            trajectory_xy=np.cumsum(np.full((len(self.frames), 2), 0.1), axis=0),
            agent_xy=None if answer is None else answer.position,
            agent_heading_deg=None if answer is None else answer.orientation_deg,
            agent_sigma=None if answer is None else answer.position_sigma,
        )


class FakePipeline:
    sessions: list = []

    def __init__(self, pkg_dir, backend):
        self.package = load_package(pkg_dir)
        self.manifest = self.package.manifest
        self.tokenizer = PromptTokenizer.from_package(self.package)
        self.backend = resolve_backend(backend)

    @classmethod
    def load(cls, pkg_dir, backend):
        return cls(pkg_dir, backend)

    def new_session(self, profiler=None, frame_policy="stop", reserve_tokens=128):
        s = FakeSession(profiler, frame_policy)
        s.reserve_tokens = reserve_tokens
        FakePipeline.sessions.append(s)
        return s
