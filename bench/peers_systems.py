"""The systems ``bench/peers.py`` measures, each driven the way its users drive it.

Every system answers the same operations (seconds, measured inside the
worker process that loaded it, so peak RSS is the system's own):

- ``prefill(n)``: a prompt of ``n`` tokens into an empty cache, up to the
  next token's logits; returns the seconds;
- ``decode(steps)``: right after ``prefill``, ``steps`` greedy tokens, one
  at a time; returns seconds per token (the context is the prefill length);
- ``vision()``: the vision tower (+ projector and pooling) on one frame;
- ``prepare_video(frames)`` then ``answer(max_new_tokens)``: a question about
  a video. loc3r streams: ``prepare_video`` ingests the frames (reported as
  ingest ms/frame, not part of the answer time) and ``answer`` is
  ``Session.ask``. Peers have no streaming state: ``answer`` processes the
  whole video at question time, as research code does.

Systems: ``loc3r-fp32|int8|int4`` (onnxruntime CPU, :class:`Loc3rSystem`),
``ort-genai-fp32|int4`` (:class:`GenaiSystem`), ``torch-fp32``
(:class:`TorchHFSystem` on the Hugging Face LLaVA for a LLaVA shape,
:class:`TorchLoc3rSystem` on the PyTorch reference model for a loc3r preset).
An operation a system cannot do raises :class:`NotSupported`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

QUESTION = "what is on my left?"
SITUATION = "i am sitting on the bed facing the table"
SYSTEMS = ("loc3r-fp32", "loc3r-int8", "loc3r-int4", "ort-genai-fp32", "ort-genai-int4", "torch-fp32")


class NotSupported(Exception):
    """The system has no way to do this operation (reported as n/a)."""


def synthetic_frames(n: int, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 frames of a panning noise texture, (size, size, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def random_token_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(n,) int64 ids away from the special tokens at the start of the vocabulary."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(16, vocab - 1), vocab, n).astype(np.int64)


class Loc3rSystem:
    """A loc3r model package on onnxruntime CPU, through :class:`loc3r.runtime.session.Pipeline`.

    Prefill and decode call the session's own steps (``_embed``, ``_prefill``
    with the KV cache bound in place, ``_logits``): exactly what ``ask`` runs,
    on a raw prompt, which the public API does not take.
    """

    def __init__(self, pkg_dir: Path, threads: int):
        from loc3r.runtime.session import Pipeline

        self.pipeline = Pipeline.load(pkg_dir, "cpu", threads=threads)
        self.m = self.pipeline.manifest
        self.session = self.pipeline.new_session()
        self._video_session = None

    def prefill(self, n: int) -> float:
        s = self.session
        s.cache.rewind_to(0)
        embeds = s.embed_tokens(random_token_ids(n, self.m.text.vocab_size))  # (1, n, H), not timed: prompt lookup
        t0 = time.perf_counter()
        hidden = s.prefill(embeds)
        self.last_logits = s.next_logits(hidden[:, -1:]).reshape(-1)
        self._next = int(np.argmax(self.last_logits))
        return time.perf_counter() - t0

    def decode(self, steps: int) -> float:
        """The token loop of ``Session.ask``: embed, decoder (in-place KV), lm_head, argmax."""
        s, token = self.session, self._next
        tokens = [token]
        t0 = time.perf_counter()
        for _ in range(steps):
            hidden = s.prefill(s.embed_tokens(np.array([token])))
            token = int(np.argmax(s.next_logits(hidden)))
            tokens.append(token)
        elapsed = time.perf_counter() - t0
        self.last_tokens = tokens
        return elapsed / steps

    def _vision_feed(self) -> dict:
        from loc3r.runtime.preprocess import preprocess_vision

        v = self.m.vision
        feed = {"pixel_values": preprocess_vision(synthetic_frames(1)[0], v.image_size, v.mean, v.std)[None]}
        for t in self.m.graph("vision").inputs:
            if t.name not in feed:  # the camera token: its declared shape, batch 1
                feed[t.name] = np.zeros([d if isinstance(d, int) else 1 for d in t.shape], np.float32)
        return feed

    def vision(self) -> float:
        feed = self._vision_feed()
        t0 = time.perf_counter()
        self.session.run_graph("vision", feed, ["frame_embeds"])
        return time.perf_counter() - t0

    def prepare_video(self, frames: int) -> dict:
        session = self.pipeline.new_session()
        t0 = time.perf_counter()
        for i, rgb in enumerate(synthetic_frames(frames)):
            session.add_frame(rgb, i / 2.0)
        self._video_session = session
        return {"ingest_ms_per_frame": (time.perf_counter() - t0) * 1e3 / frames, "frames": session.frames}

    def answer(self, max_new_tokens: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ans = self._video_session.ask(QUESTION, situation=SITUATION, max_new_tokens=max_new_tokens)
        return time.perf_counter() - t0, len(ans.token_ids)


class GenaiSystem:
    """An onnxruntime-genai model folder (its model builder's output), decoder only."""

    def __init__(self, model_dir: Path, vocab: int):
        import onnxruntime_genai as og

        self.og, self.vocab = og, vocab
        self.model = og.Model(str(model_dir))
        self.generator = None

    def prefill(self, n: int, extra: int = 64) -> float:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=n + extra, min_length=n + extra, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        ids = random_token_ids(n, self.vocab).astype(np.int32)
        t0 = time.perf_counter()
        self.generator.append_tokens(ids)  # runs the prompt through the model
        return time.perf_counter() - t0

    def decode(self, steps: int) -> float:
        """The first call only picks the token from the prefill's logits; each later one runs the model once."""
        g = self.generator
        g.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(steps):
            g.generate_next_token()
        elapsed = time.perf_counter() - t0
        self.last_tokens = [int(t) for t in g.get_sequence(0)[-(steps + 1):]]
        return elapsed / steps

    def vision(self) -> float:
        raise NotSupported("onnxruntime-genai's model builder has no LLaVA-OneVision/SigLIP vision tower")

    def prepare_video(self, frames: int) -> dict:
        raise NotSupported("onnxruntime-genai's model builder has no LLaVA-OneVision/SigLIP vision tower")

    def answer(self, max_new_tokens: int):
        raise NotSupported("no vision tower")


class TorchHFSystem:
    """transformers ``LlavaOnevisionForConditionalGeneration`` in eager PyTorch, fp32 (default sdpa attention)."""

    def __init__(self, hf_dir: Path, threads: int):
        import torch
        from tokenizers import Tokenizer
        from transformers import LlavaOnevisionForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.cfg = self.model.config
        self.tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
        self.cache = None
        self.frames = 0

    def prefill(self, n: int) -> float:
        torch = self.torch
        ids = torch.from_numpy(random_token_ids(n, self.cfg.text_config.vocab_size))[None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._next = out.logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - t0
        self.cache = out.past_key_values
        return elapsed

    def decode(self, steps: int) -> float:
        torch = self.torch
        token, cache = self._next, self.cache
        tokens = [int(token)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(steps):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
            elapsed = time.perf_counter() - t0
        self.last_tokens = tokens
        return elapsed / steps

    def _pixels(self, frames: int):
        """(1, F, 3, S, S) pixels, normalised as the SigLIP processor does (mean = std = 0.5)."""
        torch, s = self.torch, self.cfg.vision_config.image_size
        import cv2

        rgbs = [cv2.resize(f, (s, s), interpolation=cv2.INTER_CUBIC) for f in synthetic_frames(frames)]
        x = np.stack(rgbs).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return torch.from_numpy((x - 0.5) / 0.5)[None]

    def vision(self) -> float:
        pixels = self._pixels(1)
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model.model.get_video_features(pixel_values_videos=pixels)
            return time.perf_counter() - t0

    def prepare_video(self, frames: int) -> dict:
        self.frames = frames  # nothing to keep: the video is processed at question time
        return {"frames": frames}

    def _prompt_ids(self, frames: int):
        """Chat prompt with the video tokens (frames x pooled patches + the newline) and the question."""
        grid = self.cfg.vision_config.image_size // self.cfg.vision_config.patch_size
        video_tokens = frames * ((grid + 1) // 2) ** 2 + 1
        video = [self.cfg.video_token_index] * video_tokens
        prefix = self.tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                                 add_special_tokens=False).ids
        suffix = self.tok.encode(f"\n{SITUATION} {QUESTION}<|im_end|>\n<|im_start|>assistant\n",
                                 add_special_tokens=False).ids
        return self.torch.tensor([prefix + video + suffix])

    def answer(self, max_new_tokens: int) -> tuple[float, int]:
        """Everything at question time: vision over all frames, prefill, greedy decode."""
        torch = self.torch
        t0 = time.perf_counter()
        ids = self._prompt_ids(self.frames)
        pixels = self._pixels(self.frames)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, int(out.shape[1] - ids.shape[1])


class TorchLoc3rSystem:
    """The PyTorch reference model (``loc3r.model``) of a loc3r checkpoint, eager fp32: research code.

    ``answer`` is ``bench/streaming.py``'s recompute: vision tower and pose
    prior over every frame, prefill of the whole sequence, heads, greedy decode.
    """

    def __init__(self, ckpt_dir: Path, pkg_dir: Path, threads: int):
        import torch
        from streaming import TorchReference

        from loc3r.model.checkpoint import load_checkpoint
        from loc3r.runtime.package import load_package
        from loc3r.runtime.tokenizer import PromptTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_checkpoint(ckpt_dir, dtype=torch.float32).eval()
        package = load_package(pkg_dir)
        self.m = package.manifest
        self.ref = TorchReference(self.model, self.m, PromptTokenizer.from_package(package))
        self.frames = 0

    def prefill(self, n: int) -> float:
        torch, model = self.torch, self.model
        ids = torch.from_numpy(random_token_ids(n, self.m.text.vocab_size))[None]
        with torch.inference_mode():
            embeds = model.embed_tokens(ids)  # (1, n, H)
            pk, pv = model.empty_cache(1, n + 256)
            t0 = time.perf_counter()
            hidden, pk, pv = model.prefill(embeds, pk, pv, torch.arange(n))
            token = model.logits(hidden[:, -1:]).argmax(-1)  # (1, 1)
            elapsed = time.perf_counter() - t0
        self._state = (token, pk, pv, n)
        return elapsed

    def decode(self, steps: int) -> float:
        torch = self.torch
        token, pk, pv, pos = self._state
        tokens = [int(token)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for i in range(steps):
                logits, _, pk, pv = self.model.decode_step(token.reshape(1, 1), pk, pv, torch.tensor([pos + i]))
                token = logits[0, -1].argmax()
                tokens.append(int(token))
            elapsed = time.perf_counter() - t0
        self.last_tokens = tokens
        return elapsed / steps

    def vision(self) -> float:
        pixels, _ = self.ref.tensors(synthetic_frames(1))  # (1, 1, 3, S, S)
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model.vision_tokens(pixels[:, 0])
            return time.perf_counter() - t0

    def prepare_video(self, frames: int) -> dict:
        self.frames = frames  # nothing to keep: the video is processed at question time
        return {"frames": frames}

    def answer(self, max_new_tokens: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            tokens = self.ref.recompute_answer(synthetic_frames(self.frames), max_new_tokens)
        return time.perf_counter() - t0, len(tokens)


def open_system(name: str, arts, threads: int):
    """The system called ``name`` (one of :data:`SYSTEMS`) on the built artifacts ``arts``."""
    from loc3r.errors import Loc3rError

    if name.startswith("loc3r-"):
        return Loc3rSystem(arts.package(name.split("-", 1)[1]), threads)
    if name.startswith("ort-genai-"):
        from peers_models import qwen2_text_kwargs

        return GenaiSystem(arts.genai_dir(name.rsplit("-", 1)[1]), qwen2_text_kwargs(arts.shape)["vocab_size"])
    if name == "torch-fp32":
        if arts.shape.is_llava:
            return TorchHFSystem(arts.hf_llava, threads)
        return TorchLoc3rSystem(arts.ckpt, arts.package("fp32"), threads)
    raise Loc3rError(f"unknown system '{name}'; known: {', '.join(SYSTEMS)}")
