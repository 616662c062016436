"""Stage-2 training step of loc3r-tiny: fp32 against bf16 autocast (`loc3r train --bf16`), same process.

Synthesizes a few scenes at the loc3r-tiny input size (or uses --data), builds the
tensor cache, then times forward + backward + AdamW of whole-clip packed rows, as
the second half of a `--frame-curriculum 0.5` run sees them. Weights start at the
same random init for both precisions. Prints ms/step and the bf16/fp32 ratio.

    python bench/train_step.py --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a `loc3r synth` split (default: synthesize --scenes)")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per precision (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes-per-step", type=int, default=4)
    args = ap.parse_args()

    from loc3r.model.config import get_config
    from loc3r.model.losses import LossWeights
    from loc3r.synthetic.dataset import SynthOptions, synthesize
    from loc3r.synthetic.train_data import CachedSplit, build_cache, model_config_with_tokens, write_tokenizer_files
    from loc3r.synthetic.train_run import init_language_weights, optimizer_step, stage2_autocast
    from loc3r.synthetic.train_stage2 import frozen_inputs, pack_questions, split_inputs, stage2_losses, \
        stage2_trainable
    from loc3r.model.loc3r_vlm import Loc3RVLM

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="loc3r_train_step_"))
    data = args.data
    if data is None:
        data = work / "data"
        synthesize(data, "train", 0, args.scenes, SynthOptions(write_video=False), progress=False)
    special = write_tokenizer_files(work / "tok", name_tokens=True)
    cfg = model_config_with_tokens(get_config("loc3r-tiny"), special)
    build_cache(data, work / "cache.npz", cfg, work / "tok", max_scenes=args.scenes, progress=False)
    split = CachedSplit(work / "cache.npz")
    scenes = np.arange(min(args.scenes_per_step, split.num_scenes))
    batch = pack_questions(split, scenes, None, 16, special["pos"], special["ori"], special["pad"])
    inp = split_inputs(split, scenes)
    prefix = torch.from_numpy(split["prefix_ids"].astype(np.int64))

    def run(bf16: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        model = Loc3RVLM(cfg)
        init_language_weights(model)
        feats, cams = frozen_inputs(model, inp["vision"], inp["pose"])
        params = stage2_trainable(model)
        optim = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        times, loss = [], float("nan")
        for i in range(3 + args.steps):
            t0 = time.perf_counter()
            with stage2_autocast(bf16):
                out = stage2_losses(model, prefix, feats, cams, batch, inp["bev_targets"], inp["bev_valid"],
                                    LossWeights(bev=0.5, loc=1.0), early_bev_layer=1)
            loss = optimizer_step(optim, params, out, None, 2, i)["loss"]
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return 1000 * float(np.median(times)), loss

    t = batch.suffix_ids.shape[1]
    print(f"loc3r-tiny stage-2 step: {len(scenes)} scenes x {split['vision'].shape[1]} frames, packed suffix {t} "
          f"tokens, {args.threads} threads, median of {args.steps} steps")
    fp32_ms, fp32_loss = run(False)
    bf16_ms, bf16_loss = run(True)
    print(f"  fp32            {fp32_ms:8.1f} ms/step   loss after {3 + args.steps} steps {fp32_loss:.3f}")
    print(f"  bf16 autocast   {bf16_ms:8.1f} ms/step   loss after {3 + args.steps} steps {bf16_loss:.3f}")
    print(f"  speed-up        {fp32_ms / bf16_ms:8.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
