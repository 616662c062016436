"""Does a checkpoint know the heading without saying it? A diagnostic for supervised grounding runs.

For every situated question of a split, compares three headings with the truth:

- the ``<Ori>`` head's (what the model answers);
- the direction between the positions that the situation's *name tokens*
  give for their objects (their final states through the ``<Pos>`` head,
  which the grounding term trains): from the anchors' mean to the object
  named last, turned by 180 deg for "... behind me";
- the same direction between the objects' true centres (an oracle).

And three positions: ``<Pos>``'s, the anchor names' mean, and the anchors'
true centres. If the name tokens' direction beats ``<Ori>``, the model
holds the heading but its readout does not compute it.

    python docs/experiments/heading_report.py runs/v4/names_early/checkpoint --data runs/data/val

Not a test: a research tool (under a minute on one thread for 60 val scenes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from loc3r.model.checkpoint import load_checkpoint
    from loc3r.model.config import get_config
    from loc3r.synthetic.metrics import heading_error_deg as angle_error
    from loc3r.synthetic.train_data import prompt_tokenizer, special_ids
    from loc3r.synthetic.train_grounding import GroundingSource, find_mentions
    from loc3r.synthetic.train_run import cache_for
    from loc3r.synthetic.train_stage2 import FrozenFeatures, pack_questions, packed_hidden, video_block_embeddings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="a `loc3r synth` split (val)")
    ap.add_argument("--scenes", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint)
    split = cache_for(args.data, get_config("loc3r-tiny"), args.checkpoint, None)
    tok = prompt_tokenizer(args.checkpoint)
    sp = special_ids(args.checkpoint)
    source = GroundingSource(args.data, split.summary["scenes"], model.cfg.vision.pooled_grid, tok)
    frozen = FrozenFeatures(model, split, progress=False)
    prefix = torch.from_numpy(split["prefix_ids"].astype(np.int64))
    behind = set(tok._tok.encode(" behind", add_special_tokens=False).ids)
    rows = []  # heading errors (names, <Ori>, oracle), position errors (<Pos>, anchor names, true anchors)
    n = min(args.scenes, split.num_scenes)
    for s in range(0, n, 4):
        scenes = np.arange(s, min(s + 4, n))
        batch = pack_questions(split, scenes, None, 16, sp["pos"], sp["ori"], sp["pad"])
        feats, cams = frozen(scenes)
        with torch.no_grad():
            video = video_block_embeddings(model, prefix, feats, cams)
            hidden = packed_hidden(model, video, batch)
        v = video.shape[1]
        ids, offset, segment = batch.suffix_ids.numpy(), batch.offset.numpy(), batch.segment.numpy()
        for b in range(len(scenes)):
            scene = int(batch.scene[b])
            for p in np.flatnonzero(ids[b] == sp["pos"]):
                start = p - int(offset[b, p])
                mentions = find_mentions(ids[b, start:p], source.names[scene])
                slot = int(segment[b, p])
                if len(mentions) < 2 or not bool(batch.loc_valid[b, slot]):
                    continue
                with torch.no_grad():
                    named = model.position_head(hidden[b, [v + start + at for at, _ in mentions]])[:, :2].numpy()
                    pos = model.position_head(hidden[b, v + p])[:2].numpy()
                    _, ori = model.orientation_head(hidden[b, v + p + 1][None])
                centres = source.centres[scene][[obj for _, obj in mentions]]
                turn = 180.0 if behind & set(ids[b, start:p].tolist()) else 0.0

                def direction(points: np.ndarray) -> float:
                    d = points[-1] - points[:-1].mean(0)
                    return float(np.degrees(np.arctan2(d[1], d[0]))) + turn

                truth_h = float(np.degrees(batch.heading[b, slot]))
                truth_p = batch.position[b, slot].numpy()
                rows.append((angle_error(direction(named), truth_h), angle_error(float(np.degrees(ori[0])), truth_h),
                             angle_error(direction(centres), truth_h), np.linalg.norm(pos - truth_p),
                             np.linalg.norm(named[:-1].mean(0) - truth_p),
                             np.linalg.norm(centres[:-1].mean(0) - truth_p)))
    r = np.asarray(rows)
    print(f"{args.checkpoint}: {len(r)} situated questions in {n} scenes")
    for i, label in enumerate(("names' direction", "<Ori>", "true centres' direction")):
        print(f"  heading from {label:24s} Acc@15deg {100 * (r[:, i] < 15).mean():5.1f}  "
              f"Acc@30deg {100 * (r[:, i] < 30).mean():5.1f}  mean {r[:, i].mean():5.1f} deg")
    for i, label in enumerate(("<Pos>", "anchor names", "true anchor centres")):
        e = r[:, 3 + i]
        print(f"  position from {label:23s} Acc@0.5m {100 * (e < 0.5).mean():5.1f}  "
              f"Acc@1.0m {100 * (e < 1.0).mean():5.1f}  mean {e.mean():5.2f} m")


if __name__ == "__main__":
    main()
