"""Streaming benchmark: time to answer after N frames, Session (ORT fp32) vs PyTorch recompute.

    python bench/streaming.py [--preset loc3r-tiny] [--frames 8,16,32,64] [--max-new-tokens 8] [--threads 1]

Builds a random-weight checkpoint of ``--preset`` and its fp32 package
(through ``loc3r export onnx``) in a temporary folder, then in the same run:

1. Streams frames into a :class:`loc3r.runtime.session.Session`; after N
   frames it asks one question with a situation (heads + greedy answer) and
   times ``ask`` (the cache is rewound after each question, so asking at
   N = 8, 16, ... on one stream is fair).
2. The research-code way: at question time, recompute everything with the
   PyTorch model (vision tower and pose prior over all N frames, prefill of
   the whole sequence, heads, greedy decode).
3. Per-frame ingest per stage: ORT fp32 (the session's profiler) against torch
   eager doing the same work (pose step, vision + f_cam, frame-block prefill).

Both paths produce the same tokens (checked). Not a test: timings vary by machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loc3r.export.default_model import make_random_checkpoint
from loc3r.export.package_writer import ExportOptions, write_package
from loc3r.model.checkpoint import load_checkpoint
from loc3r.model.loc3r_vlm import first_token_index, gather_positions
from loc3r.runtime.preprocess import preprocess_pose, preprocess_vision
from loc3r.runtime.profiler import StageProfiler
from loc3r.runtime.session import Pipeline

QUESTION = "what is on my left?"
SITUATION = "i am sitting on the bed facing the table"
INGEST_STAGES = ("preprocess", "pose_prior", "vision", "frame_prefill")


def synthetic_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


class TorchReference:
    """The PyTorch model used the research-code way, plus per-stage eager timings for ingest."""

    def __init__(self, model, manifest, tokenizer):
        self.model, self.m, self.tok = model, manifest, tokenizer

    def tensors(self, rgbs):
        m = self.m
        pixels = torch.from_numpy(np.stack([preprocess_vision(f, m.vision.image_size, m.vision.mean, m.vision.std)
                                            for f in rgbs]))[None]  # (1, F, 3, S, S)
        pose = None
        if m.camera_tokens:
            p = m.pose_prior
            pose = torch.from_numpy(np.stack([preprocess_pose(f, p.img_height, p.img_width, p.mean, p.std,
                                                              p.patch_size) for f in rgbs]))[None]
        return pixels, pose

    @torch.no_grad()
    def recompute_answer(self, rgbs, max_new_tokens: int) -> list[int]:
        """Everything from the frames at question time: embeddings, prefill, heads, greedy decode."""
        model = self.model
        pixels, pose = self.tensors(rgbs)
        prefix = torch.from_numpy(self.tok.encode_prefix())[None]
        suffix_ids = torch.from_numpy(self.tok.encode_suffix(QUESTION, SITUATION).ids)[None]
        embeds, _ = model.sequence_embeddings(prefix, pixels, suffix_ids, pose)
        t = embeds.shape[1]
        pk, pv = model.empty_cache(1, t + max_new_tokens)
        hidden, pk, pv = model.prefill(embeds, pk, pv, torch.arange(t))
        start = t - suffix_ids.shape[1]
        model.position_head(gather_positions(hidden, start + first_token_index(suffix_ids, self.m.special_tokens.pos)))
        model.orientation_head(gather_positions(hidden, start + first_token_index(suffix_ids,
                                                                                  self.m.special_tokens.ori)))
        tokens = [int(model.logits(hidden[:, -1:]).argmax(-1))]
        while len(tokens) < max_new_tokens and tokens[-1] != self.m.special_tokens.eos:
            logits, _, pk, pv = model.decode_step(torch.tensor([[tokens[-1]]]), pk, pv,
                                                  torch.tensor([t + len(tokens) - 1]))
            tokens.append(int(logits[0, -1].argmax()))
        return tokens

    @torch.no_grad()
    def ingest_stage_ms(self, rgbs) -> dict[str, float]:
        """Median eager ms per frame for preprocess, pose step, vision (+f_cam) and the frame-block prefill."""
        model, m = self.model, self.m
        times = {s: [] for s in INGEST_STAGES}
        state = memory = None
        if model.uses_camera_tokens:
            state, memory = model.initial_pose_state(1)
        capacity = m.text.max_context
        pk, pv = model.empty_cache(1, capacity)
        filled = 0
        for i, rgb in enumerate(rgbs):
            t0 = time.perf_counter()
            pixels, pose = self.tensors([rgb])
            times["preprocess"].append(time.perf_counter() - t0)
            cam = None
            if model.uses_camera_tokens:
                t0 = time.perf_counter()
                cam_tok, _, state, memory = model.pose_prior(pose[:, 0], state, memory, torch.tensor([float(i == 0)]))
                times["pose_prior"].append(time.perf_counter() - t0)
                cam = cam_tok
            t0 = time.perf_counter()
            block = model.vision_tokens(pixels[:, 0])
            if cam is not None:
                block = torch.cat((model.f_cam(cam).unsqueeze(1), block), dim=1)
            times["vision"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = block.shape[1]
            _, pk, pv = model.prefill(block, pk, pv, torch.arange(filled, filled + n))
            filled += n
            times["frame_prefill"].append(time.perf_counter() - t0)
        return {s: statistics.median(v[1:] or v) * 1e3 for s, v in times.items() if v}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="loc3r-tiny")
    ap.add_argument("--frames", default="8,16,32,64")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per N (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for both onnxruntime and torch (1 = robust on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = sorted(int(x) for x in args.frames.split(","))

    with tempfile.TemporaryDirectory(prefix="loc3r-bench-") as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / "ckpt", preset=args.preset, seed=0)
        print(f"exporting {args.preset} (fp32) ...", file=sys.stderr)
        write_package(ckpt, Path(tmp) / "pkg", ExportOptions(progress=False))
        model = load_checkpoint(ckpt, dtype=torch.float32)
        pipeline = Pipeline.load(Path(tmp) / "pkg", "cpu", threads=args.threads)
        m = pipeline.manifest
        ref = TorchReference(model, m, pipeline.tokenizer)
        rgbs = synthetic_frames(max(counts))
        profiler = StageProfiler(warmup=1)
        session = pipeline.new_session(profiler=profiler)
        print(f"model {args.preset}: {m.tokens_per_frame} tokens/frame, context {m.text.max_context}; "
              f"{args.threads} thread(s) for ORT and torch; {args.max_new_tokens} new tokens max\n")
        print(f"{'N':>4} {'tokens':>7} {'session ms':>11} {'recompute ms':>13} {'ratio':>7}")
        added = 0
        for n in counts:
            while added < n:
                session.add_frame(rgbs[added], added / 10)
                added += 1
            s_times, r_times = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ans = session.ask(QUESTION, situation=SITUATION, max_new_tokens=args.max_new_tokens)
                s_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tokens = ref.recompute_answer(rgbs[:n], args.max_new_tokens)
                r_times.append(time.perf_counter() - t0)
            same = "" if list(ans.token_ids) == tokens else "  (tokens differ!)"
            s_ms, r_ms = statistics.median(s_times) * 1e3, statistics.median(r_times) * 1e3
            print(f"{n:>4} {len(ans.token_ids):>7} {s_ms:>11.1f} {r_ms:>13.1f} {r_ms / s_ms:>6.1f}x{same}")

        eager = ref.ingest_stage_ms(rgbs[:16])
        print(f"\nper-frame ingest, median ms (ORT over {added} frames, torch eager over 16)")
        print(f"{'stage':<15} {'ORT fp32':>9} {'torch':>9} {'speedup':>8}")
        for stage in INGEST_STAGES:
            st = profiler.stats(stage)
            if st is None or stage not in eager:
                continue
            print(f"{stage:<15} {st.p50_ms:>9.2f} {eager[stage]:>9.2f} {eager[stage] / st.p50_ms:>7.1f}x")


if __name__ == "__main__":
    main()
