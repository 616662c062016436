"""Evaluate a trained checkpoint on a `loc3r synth` split through the PyTorch model.

Per scene the prompt prefix and the video are prefilled once; each question
is then prefilled on that cache right after the video (stale slots of an
earlier question are masked out by the causal cache mask) and answered by
greedy decoding, as the runtime does. Position and heading are read by the
heads at ``<Pos>``/``<Ori>``. Scored with :mod:`loc3r.synthetic.metrics`
beside the blind baselines of :mod:`loc3r.synthetic.baselines`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loc3r.synthetic.train_data import CachedSplit, prompt_tokenizer


@torch.no_grad()
def predict_scene(model, tok, pixels: torch.Tensor, pose: Optional[torch.Tensor], labels: list[dict],
                  max_new_tokens: int = 8) -> dict[str, dict]:
    """Predictions for the questions ``labels`` about one video.

    pixels (1, F, 3, S, S) and pose (1, F, 3, Hp, Wp) are preprocessed
    frames (pose is ignored without camera tokens). Returns label id ->
    {"id", "answer", "position", "position_sigma", "heading"}.
    """
    model.eval()
    prefix = torch.from_numpy(tok.encode_prefix())[None]  # (1, P)
    eos = model.cfg.eos_token_id
    video, _ = model.video_embeddings(pixels, pose if model.uses_camera_tokens else None)
    embeds = torch.cat((model.embed_tokens(prefix), video), dim=1)  # (1, V, H)
    v = embeds.shape[1]
    longest = max(len(tok.encode_suffix(l["question"], l.get("situation")).ids) for l in labels)
    past_key, past_value = model.empty_cache(1, v + longest + max_new_tokens)
    _, past_key, past_value = model.prefill(embeds, past_key, past_value, torch.arange(v))
    out: dict[str, dict] = {}
    for lab in labels:
        enc = tok.encode_suffix(lab["question"], lab.get("situation"))
        ids = torch.from_numpy(enc.ids)[None]
        t = ids.shape[1]
        hidden, k, vv = model.prefill(model.embed_tokens(ids), past_key, past_value, torch.arange(v, v + t))
        pred = {"id": lab["id"], "position": None, "position_sigma": None, "heading": None}
        if enc.pos_index is not None:
            pos = model.position_head(hidden[0, enc.pos_index])
            _, angle = model.orientation_head(hidden[0, enc.ori_index])
            pred["position"] = [float(pos[0]), float(pos[1])]
            pred["position_sigma"] = float(pos[2])
            pred["heading"] = float(math.degrees(float(angle)))
        token = int(model.logits(hidden[:, -1]).argmax(-1))
        answer = []
        for step in range(max_new_tokens):
            if token == eos:
                break
            answer.append(token)
            logits, _, k, vv = model.decode_step(torch.tensor([[token]]), k, vv, torch.tensor([v + t + step]))
            token = int(logits[0, -1].argmax())
        pred["answer"] = tok.decode(answer)
        out[lab["id"]] = pred
    return out


def predict_split(model, split: CachedSplit, tok, labels: list[dict], max_new_tokens: int = 8,
                  progress: bool = True) -> dict[str, dict]:
    """Predictions (label id -> prediction) for every label of the cached split's scenes."""
    from tqdm import tqdm

    scene_index = {sid: i for i, sid in enumerate(split.summary["scenes"])}
    by_scene: dict[int, list[dict]] = {}
    for lab in labels:
        if lab["scene_id"] in scene_index:
            by_scene.setdefault(scene_index[lab["scene_id"]], []).append(lab)
    out: dict[str, dict] = {}
    for s, labs in tqdm(sorted(by_scene.items()), desc="predict", unit="scene", disable=not progress):
        pixels = torch.from_numpy(split["vision"][s:s + 1].astype(np.float32))  # (1, F, 3, S, S)
        pose = torch.from_numpy(split["pose"][s:s + 1].astype(np.float32)) if "pose" in split.arrays else None
        out.update(predict_scene(model, tok, pixels, pose, labs, max_new_tokens))
    return out


def evaluate_checkpoint(checkpoint: Path, data: Path, cache: CachedSplit, train_data: Optional[Path],
                        out_json: Optional[Path] = None, max_scenes: Optional[int] = None) -> dict:
    """Score ``checkpoint`` and the blind baselines on the split; return (and write) the JSON reports."""
    from loc3r.model.checkpoint import load_checkpoint
    from loc3r.synthetic.baselines import baseline_predictions
    from loc3r.synthetic.label_files import read_labels
    from loc3r.synthetic.metrics import format_report, score

    model = load_checkpoint(checkpoint)
    tok = prompt_tokenizer(checkpoint)
    labels = read_labels(data)
    keep = set(cache.summary["scenes"][:max_scenes] if max_scenes else cache.summary["scenes"])
    labels = [lab for lab in labels if lab["scene_id"] in keep]
    preds = predict_split(model, cache, tok, labels)
    report = score(labels, preds)
    train_labels = read_labels(train_data) if train_data is not None else None
    base = score(labels, baseline_predictions(labels, data, train_labels))
    result = {"checkpoint": str(checkpoint), "data": str(data), "scenes": len(keep), "questions": len(labels),
              "model": report.to_dict(), "baseline": base.to_dict()}
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
        with open(Path(out_json).with_suffix(".predictions.jsonl"), "w") as f:
            for p in preds.values():
                f.write(json.dumps(p) + "\n")
    result["table"] = format_report(report, title=f"model {checkpoint}") + "\n\n" + format_report(
        base, title="blind baselines (room centre, prior heading, answer prior)")
    return result
