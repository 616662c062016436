"""Where does a trained checkpoint's object hop look? A diagnostic for supervised grounding runs.

For every object name in the validation situations, the attention (mean over
heads) that the name's last token pays in the object-hop layer is split into:
the named object's tokens, tokens of *another* object of the same category,
of another object of the same colour, of any other object, and the rest
(walls, floor, camera tokens, text). Names are also counted by what tells the
object apart in its room: the category alone, the colour alone, or only both.
If the hop matches the category but not the colour, its mass on the target
splits with same-category objects and stays near 0.5 where a second object of
the category is shown.

    python docs/experiments/object_hop_report.py runs/v4/names_early/checkpoint --data runs/data/val

Not a test: a research tool (about a minute on one thread).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from loc3r.model.checkpoint import load_checkpoint
    from loc3r.model.config import get_config
    from loc3r.synthetic.train_data import prompt_tokenizer, special_ids
    from loc3r.synthetic.train_grounding import (GroundingOptions, GroundingSource, attention_rows,
                                                 grounding_targets, target_tokens)
    from loc3r.synthetic.train_run import cache_for
    from loc3r.synthetic.train_stage2 import FrozenFeatures, pack_questions, packed_hidden, video_block_embeddings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="a `loc3r synth` split (val)")
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--layer", type=int, default=1, help="the object-hop layer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint)
    cfg = get_config("loc3r-tiny")
    split = cache_for(args.data, cfg, args.checkpoint, None)
    tok = prompt_tokenizer(args.checkpoint)
    special = special_ids(args.checkpoint)
    grid = model.cfg.vision.pooled_grid
    scenes = np.arange(min(args.scenes, split.num_scenes))
    source = GroundingSource(args.data, split.summary["scenes"], grid, tok)
    objects = [json.loads((args.data / "scenes" / f"{sid}.json").read_text())["objects"]
               for sid in split.summary["scenes"]]
    frozen = FrozenFeatures(model, split, progress=False)
    opts = GroundingOptions(weight=1.0, object_layer=args.layer)
    prefix = torch.from_numpy(split["prefix_ids"].astype(np.int64))
    head_mass: list[np.ndarray] = []  # per name, the target mass of each head
    sums = {k: [] for k in ("target", "same category", "same colour", "other object", "rest")}
    by_kind: dict[str, list[float]] = {"category alone": [], "colour alone": [], "only both": []}
    for s in range(0, len(scenes), 4):
        rows = scenes[s:s + 4]
        batch = pack_questions(split, rows, None, 16, special["pos"], special["ori"], special["pad"])
        feats, cams = frozen(rows)
        with torch.no_grad():
            video = video_block_embeddings(model, prefix, feats, cams)
            captured: dict = {}
            packed_hidden(model, video, batch, captured)
            per_frame = model.cfg.vision.tokens_per_frame + (1 if cams is not None else 0)
            targets = grounding_targets(source, batch, model.cfg.pos_token_id, model.cfg.ori_token_id,
                                        video.shape[1], prefix.shape[-1], feats.shape[1], per_frame, opts)
            if not targets.object_rows:
                continue
            probs_h = attention_rows(model.language_model.layers[args.layer], captured[args.layer], captured["cos"],
                                     captured["sin"], captured["mask"], targets.object_rows)  # (M, H, T)
            probs = probs_h.mean(1)
            for i, keys in enumerate(targets.object_keys):
                head_mass.append(probs_h[i][:, keys].sum(-1).numpy())
        n = model.cfg.vision.tokens_per_frame
        f = feats.shape[1]
        token_pos = (prefix.shape[-1] + np.arange(f)[:, None] * per_frame + (per_frame - n)
                     + np.arange(n)[None, :])
        for i, ((b, _), keys) in enumerate(zip(targets.object_rows, targets.object_keys)):
            scene = int(batch.scene[b])
            objs = objects[scene]
            centre = targets.object_centres[i]
            named = int(np.argmin([np.hypot(*(np.asarray(o["center"]) - centre)) for o in objs]))
            colour, category = objs[named]["name"].split()
            p = probs[i].numpy()
            used = np.zeros(p.shape[0], bool)
            used[keys] = True
            out = {"target": float(p[keys].sum())}
            for label, match in (("same category", lambda o: o["name"].split()[1] == category),
                                 ("same colour", lambda o: o["name"].split()[0] == colour),
                                 ("other object", lambda o: True)):
                sel = np.zeros(p.shape[0], bool)
                for j, o in enumerate(objs):
                    if j != named and match(o):
                        mask = target_tokens(source.coverage[scene][:f, :, j], opts.min_coverage)
                        sel[token_pos[mask]] = True
                sel &= ~used
                out[label] = float(p[sel].sum())
                used |= sel
            out["rest"] = float(p[~used].sum())
            for k, v in out.items():
                sums[k].append(v)
            others = [o["name"].split() for j, o in enumerate(objs) if j != named]
            cat_unique = all(c != category for _, c in others)
            col_unique = all(c != colour for c, _ in others)
            kind = "category alone" if cat_unique else "colour alone" if col_unique else "only both"
            by_kind[kind].append(out["target"])
    print(f"{args.checkpoint}: layer {args.layer}, {len(sums['target'])} names in {len(scenes)} scenes")
    for k, v in sums.items():
        print(f"  mass on {k:14s} {np.mean(v):.3f}")
    print("  mass on target by head", np.round(np.mean(head_mass, axis=0), 3))
    for k, v in by_kind.items():
        if v:
            print(f"  names told apart by {k:15s} {len(v):4d}  mass on target {np.mean(v):.3f}")


if __name__ == "__main__":
    main()
