"""The streaming session: frames in, answers and localization out.

:class:`Pipeline` is immutable: the verified package, the backend, one
activated runner per graph and the tokenizer. It hands out :class:`Session`
objects, each holding one stream's mutable state:

- a KV cache preallocated to the package's context budget
  (:class:`~loc3r.runtime.kv_cache.KVCache`) and bound in place as both the
  decoder's ``past_key_values.*`` inputs and ``present.*`` outputs, so
  appending a frame or a token never copies or reallocates it. Engines of
  ``--target tensorrt`` packages write ``present`` as a new tensor, so there
  the cache is two device buffers per layer that swap roles each step
  (:class:`~loc3r.runtime.backends.tensorrt.KVPingPong`);
- the pose prior's recurrent state and memory;
- frame bookkeeping: the stored frame blocks (for re-prefilling under a
  frame policy, see :mod:`loc3r.runtime.frame_policy`), poses, BEV-head
  outputs and patch colours.

Sequence layout (as the PyTorch model's one-shot forward):
``prefix`` tokens, per frame ``[camera token, vision tokens]``, the
``image_newline`` (embedding row ``vocab_size`` of ``embed.onnx``), then the
question suffix. ``ask`` prefills newline + suffix after the frames, reads
the heads at ``<Pos>``/``<Ori>``, decodes greedily, then rewinds the cache to
the end of the last frame, so questions never see each other.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.frame_policy import REBUILDING_POLICIES, FrameSelector
from loc3r.runtime.kv_cache import DeviceKVCache, KVCache, KVCacheShape
from loc3r.runtime.package import Manifest, Package, load_package
from loc3r.runtime.preprocess import PoseStream, preprocess_vision
from loc3r.runtime.tokenizer import PromptTokenizer

# Tokens kept free after the frames by default: newline, a short question and a short answer.
# loc3r-run reserves more (the real question + --max-new-tokens) and stops feeding frames first.
DEFAULT_RESERVE_TOKENS = 64


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    position: Optional[tuple[float, float]]  # metres, with a situation
    position_sigma: Optional[float]
    orientation_deg: Optional[float]
    frames: int  # frames in the context when answering
    timings_ms: dict = field(default_factory=dict)
    token_ids: tuple[int, ...] = ()  # the generated tokens (EOS included when produced)
    orientation_logits: Optional[np.ndarray] = None  # (bins,)


def _stderr_notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Pipeline:
    """An immutable loaded package: backend, manifest, tokenizer and one runner per graph."""

    package: Package
    backend: object  # loc3r.runtime.backends.Backend
    runners: dict
    tokenizer: PromptTokenizer

    @classmethod
    def load(cls, pkg_dir: Union[str, Path], backend: str = "auto", threads: Optional[int] = None) -> "Pipeline":
        """Verify the package, resolve ``backend`` and activate every graph (I/O checked against the manifest)."""
        from loc3r.runtime.backends import open_runner, resolve_backend

        package = load_package(pkg_dir)
        m = package.manifest
        formats = {g.format for g in m.graphs}
        if len(formats) != 1:
            raise Loc3rError(f"model package {package.root} mixes graph formats: {', '.join(sorted(formats))}")
        needed = ["vision", "embed", "decoder", "lm_head", "heads"] + (["pose_prior"] if m.camera_tokens else [])
        for role in needed:
            m.graph(role)  # one clear line when absent
        resolved = resolve_backend(backend, formats.pop())
        if m.target == "tensorrt":
            if resolved.engine != "tensorrt":
                raise Loc3rError(f"model package {package.root} was exported for TensorRT (loc3r::FusedAttention "
                                 "plugin nodes): build engines from it with 'loc3r export tensorrt' and run that "
                                 "package, or export with --target onnxruntime for this backend")
            from loc3r.runtime.backends.tensorrt import import_tensorrt, load_plugin_library, find_plugin_library

            load_plugin_library(import_tensorrt()[0], find_plugin_library())
        runners = {g.role: open_runner(package.path(g.file), resolved, spec=g, threads=threads) for g in m.graphs}
        return cls(package=package, backend=resolved, runners=runners,
                   tokenizer=PromptTokenizer.from_package(package))

    @property
    def manifest(self) -> Manifest:
        return self.package.manifest

    def new_session(self, profiler=None, frame_policy: str = "stop", reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
                    on_notice: Optional[Callable[[str], None]] = None) -> "Session":
        """A fresh stream. ``frame_policy``: see :mod:`loc3r.runtime.frame_policy`."""
        return Session(self, profiler, frame_policy, reserve_tokens, on_notice or _stderr_notice)


@dataclass
class FrameRecord:
    index: int  # position in the stream
    t: float  # seconds
    block: Optional[np.ndarray]  # (P, H) frame embeddings, kept for re-prefill (policies that rebuild only)
    colors: np.ndarray  # (n, 3) uint8 mean patch colours, for the BEV picture
    bev: Optional[np.ndarray] = None  # (n, 4) BEV head at the frame's current place in the context


class Session:
    """One stream's state; see the module docstring. Not thread-safe: callers serialise calls."""

    def __init__(self, pipeline: Pipeline, profiler, frame_policy: str, reserve_tokens: int,
                 notice: Callable[[str], None]):
        self.pipeline = pipeline
        self.profiler = profiler
        m = pipeline.manifest
        self._m = m
        self._r = pipeline.runners
        self._tok = pipeline.tokenizer
        shape = KVCacheShape(m.text.num_layers, 1, m.text.num_kv_heads, m.text.max_context, m.text.head_dim)
        decoder = self._r["decoder"]
        on_host = getattr(decoder, "device", "cpu") == "cpu"
        # The graphs' declared input dtypes (an fp16 package may take fp16 inputs and KV).
        self._dtypes = {g.role: {t.name: np.dtype(t.dtype) for t in g.inputs if t.dtype != "bfloat16"}
                        for g in m.graphs}
        kv_dtype = self._dtypes["decoder"].get("past_key_values.0.key", np.dtype(np.float32))
        self.cache = (KVCache(shape, kv_dtype) if on_host
                      else DeviceKVCache(shape, decoder.device_buffer, kv_dtype))
        self._past, self._present = {}, {}
        for i in range(m.text.num_layers):
            self._past[f"past_key_values.{i}.key"] = self.cache.key(i)
            self._past[f"past_key_values.{i}.value"] = self.cache.value(i)
            self._present[f"present.{i}.key"] = self.cache.key(i)
            self._present[f"present.{i}.value"] = self.cache.value(i)
        self._kv_pingpong = None
        if not hasattr(decoder, "infer_bound") and m.target == "tensorrt":
            # present is ScatterND's output, a new tensor: bind it to a second buffer, swap every step.
            from loc3r.runtime.backends.tensorrt import KVPingPong

            other = DeviceKVCache(shape, decoder.device_buffer, kv_dtype)
            self._kv_pingpong = KVPingPong([
                [(self.cache.key(i), self.cache.value(i)) for i in range(m.text.num_layers)],
                [(other.key(i), other.value(i)) for i in range(m.text.num_layers)]])
        elif not hasattr(decoder, "infer_bound"):  # native TensorRT: bind the KV buffers once
            for name, buf in {**self._past, **self._present}.items():
                decoder.bind_device(name, buf)
        self.newline_id = m.text.vocab_size
        self._first_vision = 1 if m.camera_tokens else 0
        self._frames: list[FrameRecord] = []
        self._poses: list[np.ndarray] = []  # (7,) per stream frame
        self._seen = 0  # frames offered to add_frame
        self._state = self._memory = None
        self._pose_stream = PoseStream(m.pose_prior) if m.camera_tokens else None
        if m.camera_tokens:
            p = m.pose_prior
            self._state = np.zeros((1, p.state_tokens, p.state_dim), np.float32)
            self._memory = np.zeros((1, p.mem_slots, p.mem_dim), np.float32)
        prefix = self._tok.encode_prefix()
        if prefix.size:
            self.prefill(self.embed_tokens(prefix))
        self.prefix_end = self.cache.length
        budget = (m.text.max_context - self.prefix_end - reserve_tokens) // m.tokens_per_frame
        self.selector = FrameSelector(frame_policy, budget, notice)
        self._notice = notice
        self.frames_end = self.cache.length
        self.last_prompt_logits: Optional[np.ndarray] = None  # (V,) logits of the first answer token

    # ---- graph calls (public: benchmarks and tools drive a session step by step) ----
    def run_graph(self, role: str, feed: dict, outputs=None) -> dict:
        """Run graph ``role`` with ``feed`` cast to its declared input dtypes."""
        dtypes = self._dtypes[role]
        feed = {k: np.asarray(v, dtypes[k]) if k in dtypes else v for k, v in feed.items()}
        return self._r[role].infer(feed, outputs)

    def _stage(self, name: str):
        return self.profiler.stage(name) if self.profiler is not None else nullcontext()

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(T,) int64 -> (1, T, H)."""
        return self.run_graph("embed", {"input_ids": np.asarray(ids, np.int64)[None]}, ["embeds"])["embeds"]

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Append (1, T, H) embeddings to the cache in place; returns hidden (1, T, H)."""
        n = embeds.shape[1]
        seqlens_k, total = self.cache.gqa_lengths(n)
        dtype = self._dtypes["decoder"].get("inputs_embeds", np.dtype(np.float32))
        feed = {"inputs_embeds": np.ascontiguousarray(embeds, dtype), "seqlens_k": seqlens_k,
                "total_sequence_length": total}
        decoder = self._r["decoder"]
        if hasattr(decoder, "infer_bound"):
            out = decoder.infer_bound({**feed, **self._past}, in_place=self._present, fetch=["hidden"])
        elif self._kv_pingpong is not None:
            self._kv_pingpong.bind(decoder)
            out = decoder.infer(feed, ["hidden"])
            self._kv_pingpong.swap()
        else:
            out = decoder.infer(feed, ["hidden"])
        self.cache.append(n)
        return out["hidden"]

    def next_logits(self, hidden_row: np.ndarray) -> np.ndarray:
        """(1, 1, H) -> (V,)."""
        return self.run_graph("lm_head", {"hidden": hidden_row}, ["logits"])["logits"][0, -1].astype(np.float32)

    def _bev(self, hidden: np.ndarray) -> Optional[np.ndarray]:
        """BEV head on one block's vision-token rows: hidden (1, P, H) -> (n, 4)."""
        if "bev_head" not in self._r:
            return None
        rows = np.ascontiguousarray(hidden[:, self._first_vision:])
        return self.run_graph("bev_head", {"hidden": rows}, ["bev"])["bev"][0].astype(np.float32)

    # ---- public state ----
    @property
    def frames(self) -> int:
        """Frames in the context now."""
        return len(self._frames)

    @property
    def frame_indices(self) -> tuple[int, ...]:
        """Stream indices of the frames in the context."""
        return tuple(f.index for f in self._frames)

    @property
    def poses(self) -> np.ndarray:
        """(frames seen, 7) pose-prior poses of every frame of the stream (t, qw, qx, qy, qz)."""
        return np.stack(self._poses) if self._poses else np.zeros((0, 7), np.float32)

    # ---- frames ----
    def add_frame(self, rgb: np.ndarray, t: float) -> bool:
        """Ingest one RGB uint8 frame at time ``t`` (s). Returns False when the frame policy left it out."""
        m = self._m
        index = self._seen
        with self._stage("preprocess"):
            pixels = preprocess_vision(rgb, m.vision.image_size, m.vision.mean, m.vision.std)[None]
            pose_image = None
            if m.camera_tokens:
                pose_image = self._pose_stream(rgb)
        self._seen += 1
        feed = {"pixel_values": pixels}
        if m.camera_tokens:
            with self._stage("pose_prior"):
                first = np.array([1.0 if index == 0 else 0.0], np.float32)
                out = self.run_graph("pose_prior",
                    {"pose_image": pose_image, "state": self._state, "memory": self._memory, "is_first": first})
            self._state, self._memory = out["state_out"], out["memory_out"]
            self._poses.append(out["pose"][0])
            feed["camera_token"] = out["camera_token"]
        admission = self.selector.admit(index, self.frame_indices)
        if admission.keep is not None:
            self._rebuild(admission.keep)
        if not admission.add:
            return False
        with self._stage("vision"):
            block = self.run_graph("vision", feed, ["frame_embeds"])["frame_embeds"][0]  # (P, H)
        from loc3r.runtime.bev_plot import patch_colors

        keep_block = self.selector.policy in REBUILDING_POLICIES  # saves P*H floats a frame otherwise
        record = FrameRecord(index=index, t=float(t), block=block if keep_block else None,
                             colors=patch_colors(_rgb3(rgb), m.vision.pooled_grid))
        with self._stage("frame_prefill"):
            hidden = self.prefill(block[None])
        with self._stage("bev_head"):
            record.bev = self._bev(hidden)
        self._frames.append(record)
        self.frames_end = self.cache.length
        return True

    def _rebuild(self, keep: tuple[int, ...]) -> None:
        """Re-prefill the context with the stored blocks of the frames in ``keep``."""
        kept = [f for f in self._frames if f.index in set(keep)]
        self.cache.rewind_to(self.prefix_end)
        with self._stage("frame_prefill"):
            if kept:
                hidden = self.prefill(np.stack([f.block for f in kept])[None].reshape(1, -1, kept[0].block.shape[-1]))
                per = self._m.tokens_per_frame
                for i, f in enumerate(kept):
                    f.bev = self._bev(hidden[:, i * per:(i + 1) * per])
        self._frames = kept
        self.frames_end = self.cache.length

    # ---- questions ----
    def ask(self, question: str, situation: Optional[str] = None, max_new_tokens: int = 64) -> Answer:
        """Answer ``question`` about the frames so far (with position and heading when ``situation`` is given)."""
        if max_new_tokens < 1:
            raise Loc3rError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        enc = self._tok.encode_suffix(question, situation)
        if not self._frames:
            raise Loc3rError("no frames yet: add at least one frame before asking")
        need = 1 + enc.ids.size
        if need >= self.cache.remaining:
            raise Loc3rError(f"the question is too long for the context: it needs {need} tokens and "
                             f"{self.cache.remaining} are free after {self.frames} frames "
                             f"(context {self.cache.capacity})")
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            t0 = time.perf_counter()
            with self._stage("question_prefill"):
                ids = np.concatenate(([self.newline_id], enc.ids)).astype(np.int64)
                hidden = self.prefill(self.embed_tokens(ids))  # (1, 1 + T, H)
                logits = self.next_logits(hidden[:, -1:])
            timings["question_prefill"] = (time.perf_counter() - t0) * 1e3
            self.last_prompt_logits = logits
            position = sigma = heading = ori_logits = None
            if situation is not None:
                t0 = time.perf_counter()
                with self._stage("heads"):
                    out = self.run_graph("heads", {"pos_hidden": hidden[:, 1 + enc.pos_index][:, None],
                                                  "ori_hidden": hidden[:, 1 + enc.ori_index][:, None]})
                pos = out["position"][0, 0]
                position, sigma = (float(pos[0]), float(pos[1])), float(pos[2])
                heading = math.degrees(float(out["orientation"][0, 0]))
                ori_logits = out["orientation_logits"][0, 0]
                timings["heads"] = (time.perf_counter() - t0) * 1e3
            tokens = [int(np.argmax(logits))]
            if self.profiler is not None:
                self.profiler.add_first_token(time.perf_counter() - t_start)
            t0 = time.perf_counter()
            while (len(tokens) < max_new_tokens and not self._tok.is_eos(tokens[-1])
                   and self.cache.remaining > 0):
                with self._stage("token_decode"):
                    hidden = self.prefill(self.embed_tokens(np.array(tokens[-1:])))
                    tokens.append(int(np.argmax(self.next_logits(hidden))))
            timings["token_decode"] = (time.perf_counter() - t0) * 1e3
            if self.cache.remaining == 0 and not self._tok.is_eos(tokens[-1]) and len(tokens) < max_new_tokens:
                self._notice(f"answer cut at {len(tokens)} tokens: the context ({self.cache.capacity} tokens) is full")
        finally:
            self.cache.rewind_to(self.frames_end)
        if self.profiler is not None:
            self.profiler.add_tokens(len(tokens))
        timings["total"] = (time.perf_counter() - t_start) * 1e3
        return Answer(question=question, answer=self._tok.decode(tokens), position=position, position_sigma=sigma,
                      orientation_deg=heading, frames=self.frames, timings_ms=timings, token_ids=tuple(tokens),
                      orientation_logits=ori_logits)

    # ---- pictures ----
    def bev_scene(self, answer: Optional[Answer] = None):
        """What ``--bev`` draws: every vision token at its BEV-head position, the camera path, the agent."""
        from loc3r.runtime.bev_plot import BevScene

        with_bev = [f for f in self._frames if f.bev is not None]
        if with_bev:
            xy = np.concatenate([f.bev[:, :2] for f in with_bev])
            rgb = np.concatenate([f.colors for f in with_bev])
        else:
            xy, rgb = np.zeros((0, 2)), np.zeros((0, 3), np.uint8)
        # Camera path on the ground plane of the first frame's camera (x right, z forward).
        trajectory = self.poses[:, [0, 2]] if self._poses else None
        return BevScene(
            token_xy=xy, token_rgb=rgb, trajectory_xy=trajectory,
            agent_xy=None if answer is None else answer.position,
            agent_heading_deg=None if answer is None else answer.orientation_deg,
            agent_sigma=None if answer is None else answer.position_sigma,
            title=f"{self.frames} frames",
        )


def _rgb3(rgb: np.ndarray) -> np.ndarray:
    """Any accepted frame layout as (H, W, 3) uint8 for patch colours."""
    if rgb.ndim == 2:
        return np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.shape[2] == 1:
        return np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb[:, :, :3])
