"""Stage 2 for a from-scratch LLM: supervised grounding attention.

To localize "I am standing next to the pink plant, facing the white chair"
the LLM must (1) find the tokens of the pink plant among the clip's ~270
video tokens and (2) carry what it found to ``<Pos>`` / ``<Ori>``. A
pretrained video LLM arrives able to do both; loc3r-tiny's LLM starts from
random weights, and from a uniform attention over T keys the gradient that
would sharpen it onto the right key is diluted about 1/T. In the retrieval
proxy (``docs/experiments/retrieval_proxy.py``) neither hop started in the
CPU budget among 248 tokens; supervising the attention of both hops does
(README, "Grounding attention").

So this module adds an auxiliary term (off by default: the paper's recipe
has none), from truth the synthetic data already has:

- **Object hop** (decoder layer ``object_layer``, default 1): the last token of each
  object name in the situation ("plant" of "pink plant") should attend to
  the video tokens that show that object. Target tokens: the object covers
  at least ``min_coverage`` of the token's pixels (or, for an object that
  is small in every frame, at least half its best coverage), from the
  ``instance`` maps of ``loc3r synth``'s ``scenes/<id>.npz``.
- **Readout hop** (layer ``readout_layer``, default 2): ``<Pos>`` should attend to the
  anchor names (every name but the last: "next to the A", "between the A
  and the B"); ``<Ori>`` to the anchors with half of its heads and to the
  last name (what the speaker faces or has behind them) with the other half.

- **Facing direction** (``direction_weight``, off by default): ``<Ori>``'s
  final state predicts, through the same position head, the vector from the
  speaker to the object named last (negated for "... behind me"), whose
  angle is the true heading. Session 5's best model held the heading in its
  name tokens (the direction between their predicted positions was within
  30 deg of the truth for half the val situations) while ``<Ori>`` stayed at
  chance: L_ori alone, a classification over heading bins, never taught the
  readout to subtract one position from the other.

- **Answer hop** (``answer_weight``, off by default; layer ``answer_layer``,
  default 3): the names in a situated question ("Is the red chair on my
  left ...") join the object hop and the named objects' L_pos, and the token
  that predicts the answer attends to those names with half of its heads and
  to ``<Pos>``/``<Ori>`` with the other half. Its final state predicts,
  through the position head, where the first named object lies in the
  speaker's own frame (x ahead, y to the left, metres): left/right is the sign
  of y, "which is closer" and "how far" compare lengths. Session 6's model
  answered situated questions no better than the answer prior although a
  geometric readout of its own localization would have reached twice that
  (``docs/experiments/situated_ceiling.py``): nothing asked the answer to use
  the localization.

Each hop's loss is ``-log`` of the attention mass (mean over heads) on its
targets. The name token's final hidden state also predicts the object's
centre through the ``<Pos>`` position head (L_pos of the named object), so
that what the object hop reads is a position the readout hop can carry. Nothing changes at inference: the same graphs, the same runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from loc3r.errors import Loc3rError
from loc3r.model.losses import position_loss
from loc3r.model.qwen2 import apply_rope
from loc3r.synthetic.train_data import IGNORE
from loc3r.synthetic.train_drills import read_scene_files


@dataclass(frozen=True)
class GroundingOptions:
    weight: float = 0.0  # 0: off (the paper's recipe)
    object_layer: int = 1  # the proxy learned with layers 1 and 2 (one layer left after the readout),
    readout_layer: int = 2  # not with 2 and 3 (README, "Grounding attention")
    min_coverage: float = 0.2
    # The faced direction: <Ori>'s final state predicts, through the <Pos> position head, the vector from
    # the speaker towards what they face (0: off). Without it no run learned the heading (README).
    direction_weight: float = 0.0
    # The answer hop: question names join the object hop; the answer token attends to them and to <Pos>/<Ori>
    # and predicts the first named object's position in the speaker's frame (0: off).
    answer_weight: float = 0.0
    answer_layer: int = 3

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def token_coverage(instance: np.ndarray, objects: int, grid: int) -> np.ndarray:
    """instance (F, S, S) uint8 (0 = none, i + 1 = object i) -> (F, grid*grid, objects) share of each
    token's pixels that show each object (tokens in row-major grid order)."""
    f, s, s2 = instance.shape
    if s != s2 or s % grid:
        raise Loc3rError(f"instance maps of {s}x{s2} do not split into a {grid}x{grid} token grid")
    p = s // grid
    cells = instance.reshape(f, grid, p, grid, p).transpose(0, 1, 3, 2, 4).reshape(f, grid * grid, p * p)
    onehot = cells[..., None] == np.arange(1, objects + 1, dtype=cells.dtype)  # (F, n, p*p, O)
    return onehot.mean(axis=2).astype(np.float32)


def target_tokens(coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    """coverage (F, n) of one object -> bool (F, n): tokens that show it."""
    best = float(coverage.max()) if coverage.size else 0.0
    if best <= 0:
        return np.zeros(coverage.shape, bool)
    return coverage >= min(min_coverage, 0.5 * best)


def find_mentions(ids: np.ndarray, names: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(index of the name's last token, object) for each object name in ``ids``, in text order."""
    out = []
    n = len(ids)
    for obj, name in enumerate(names):
        k = len(name)
        if k == 0 or k > n:
            continue
        for start in range(n - k + 1):
            if ids[start] == name[0] and np.array_equal(ids[start:start + k], name):
                out.append((start + k - 1, obj))
    return sorted(out)


class GroundingSource:
    """Token coverage and name tokens of every scene of one split (rows in the split's scene order)."""

    def __init__(self, data_dir: Path, scene_ids: Sequence[str], grid: int, tokenizer):
        from tqdm import tqdm

        self.coverage: list[np.ndarray] = []  # per scene (F, n, O)
        self.names: list[list[np.ndarray]] = []  # per scene, per object: token ids of " <name>"
        self.centres: list[np.ndarray] = []  # per scene (O, 2) BEV metres
        cache: dict[str, np.ndarray] = {}
        for sid in tqdm(scene_ids, desc="grounding truth", unit="scene", leave=False):
            objects, instance = read_scene_files(data_dir, sid, "grounding targets")
            self.coverage.append(token_coverage(instance, len(objects), grid))
            self.centres.append(np.asarray([o["center"] for o in objects], np.float32).reshape(len(objects), 2))
            names = []
            for o in objects:
                if o["name"] not in cache:
                    cache[o["name"]] = np.asarray(
                        tokenizer._tok.encode(" " + o["name"], add_special_tokens=False).ids, np.int64)
                names.append(cache[o["name"]])
            self.names.append(names)


@dataclass
class GroundingTargets:
    """One step's supervision, in absolute positions of the packed sequence (video + suffix)."""

    object_rows: list[tuple[int, int]]  # (batch row, query position): a name's last token
    object_keys: list[np.ndarray]  # per object query: key positions of the tokens showing it
    object_centres: list[np.ndarray]  # per object query: the object's centre (2,), BEV metres
    readout_rows: list[tuple[int, int]]  # (batch row, query position): <Pos> or <Ori>
    readout_keys: list[tuple[np.ndarray, np.ndarray]]  # keys for heads [0, H/2) and [H/2, H)
    direction_rows: list[tuple[int, int]] = field(default_factory=list)  # (batch row, position of <Ori>)
    direction_vectors: list[np.ndarray] = field(default_factory=list)  # (2,) metres, along the true heading
    answer_rows: list[tuple[int, int]] = field(default_factory=list)  # (batch row, the answer-predicting token)
    answer_keys: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # question names; <Pos>, <Ori>
    ego_rows: list[tuple[int, int]] = field(default_factory=list)  # (batch row, the answer-predicting token)
    ego_vectors: list[np.ndarray] = field(default_factory=list)  # (2,) first question object, speaker's frame


def grounding_targets(source: GroundingSource, batch, pos_id: int, ori_id: int, video_len: int,
                      video_offset: int, frames: int, per_frame: int, options: GroundingOptions) -> GroundingTargets:
    """Supervision for a :class:`loc3r.synthetic.train_stage2.PackedBatch` after a video block of
    ``video_len`` positions whose first frame starts at ``video_offset`` (after the prefix): ``frames``
    frames of ``per_frame`` positions each (camera token first when there is one; vision tokens last)."""
    ids = batch.suffix_ids.numpy()
    offset = batch.offset.numpy()
    v = video_len  # suffix index i sits at position v + i
    out = GroundingTargets([], [], [], [], [])
    for b, scene in enumerate(np.asarray(batch.scene)):
        cov = source.coverage[int(scene)][:frames]  # (f, n, O)
        n = cov.shape[1]
        token_pos = (video_offset + np.arange(frames)[:, None] * per_frame + (per_frame - n)
                     + np.arange(n)[None, :])  # (f, n)
        for p in np.flatnonzero(ids[b] == pos_id):
            if p + 1 >= ids.shape[1] or ids[b, p + 1] != ori_id:
                continue
            start = p - int(offset[b, p])
            mentions = find_mentions(ids[b, start:p], source.names[int(scene)])
            if len(mentions) < 2:
                continue
            rows = []
            for at, obj in mentions:
                add_object_hop(out, cov, obj, token_pos, source, int(scene), b, v + start + at, options)
                rows.append(v + start + at)
            if options.answer_weight > 0:
                answer_targets(out, batch, ids, b, p, v, cov, token_pos, source, int(scene), options)
            anchors, last = np.asarray(rows[:-1]), np.asarray(rows[-1:])
            out.readout_rows.append((b, v + p))
            out.readout_keys.append((anchors, anchors))
            out.readout_rows.append((b, v + p + 1))
            out.readout_keys.append((anchors, last))
            if options.direction_weight <= 0:
                continue
            vector = facing_vector(batch, b, p, source.centres[int(scene)][mentions[-1][1]])
            if vector is not None:
                out.direction_rows.append((b, v + p + 1))
                out.direction_vectors.append(vector)
    return out


def add_object_hop(out: GroundingTargets, cov: np.ndarray, obj: int, token_pos: np.ndarray,
                   source: GroundingSource, scene: int, b: int, query: int, options: GroundingOptions) -> None:
    """Object-hop supervision (and the named object's L_pos) for the name token at ``query`` of row ``b``,
    when some video token shows object ``obj``."""
    mask = target_tokens(cov[:, :, obj], options.min_coverage)
    if mask.any():
        out.object_rows.append((b, query))
        out.object_keys.append(token_pos[mask])
        out.object_centres.append(source.centres[scene][obj])


def answer_targets(out: GroundingTargets, batch, ids: np.ndarray, b: int, p: int, v: int, cov: np.ndarray,
                   token_pos: np.ndarray, source: GroundingSource, scene: int, options: GroundingOptions) -> None:
    """Answer-hop supervision for the question that follows the situation whose ``<Pos>`` is suffix index
    ``p`` of row ``b``: nothing when the block has no answer or its question names no object."""
    slot = int(batch.segment[b, p])
    if slot < 0:
        return
    block = np.flatnonzero((batch.segment[b].numpy() == slot) & (batch.labels[b].numpy() != IGNORE))
    if block.size == 0 or block[0] <= p + 2:
        return
    query = int(block[0]) - 1  # the token whose next-token prediction is the answer's first
    mentions = find_mentions(ids[b, p + 2:query + 1], source.names[scene])
    if not mentions:
        return
    names = np.asarray([v + p + 2 + at for at, _ in mentions])
    for (at, obj), row in zip(mentions, names):
        add_object_hop(out, cov, obj, token_pos, source, scene, b, int(row), options)
    out.answer_rows.append((b, v + query))
    out.answer_keys.append((names, np.asarray([v + p, v + p + 1])))
    vector = ego_vector(batch, b, p, source.centres[scene][mentions[0][1]])
    if vector is not None:
        out.ego_rows.append((b, v + query))
        out.ego_vectors.append(vector)


def _offset_from_speaker(batch, b: int, p: int, point: np.ndarray):
    """(``point`` minus the speaker's true position (2,) float64, their true heading in radians) for the
    situation whose ``<Pos>`` is suffix index ``p`` of row ``b``; None when the situation has no truth."""
    slot = int(batch.segment[b, p])
    if slot < 0 or not bool(batch.loc_valid[b, slot]):
        return None
    d = np.asarray(point, np.float64) - batch.position[b, slot].numpy().astype(np.float64)
    return d, float(batch.heading[b, slot])


def ego_vector(batch, b: int, p: int, point: np.ndarray):
    """``point`` (2,) BEV metres in the frame of the speaker of the situation whose ``<Pos>`` is suffix index
    ``p`` of row ``b``: x ahead, y to the left; None when the situation has no truth."""
    found = _offset_from_speaker(batch, b, p, point)
    if found is None:
        return None
    d, heading = found
    c, s = np.cos(heading), np.sin(heading)
    return np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1]], np.float32)


def facing_vector(batch, b: int, p: int, faced: np.ndarray, min_length: float = 0.1):
    """The vector (2,) from the speaker of the situation whose ``<Pos>`` is suffix index ``p`` of row ``b`` to
    the object it names last (``faced``), negated when that object is behind them (so that its angle is the
    true heading); None when the situation has no truth or the speaker stands on that object's centre."""
    found = _offset_from_speaker(batch, b, p, faced)
    if found is None or np.hypot(*found[0]) < min_length:
        return None
    vector, heading = found
    if vector @ np.array([np.cos(heading), np.sin(heading)]) < 0:
        vector = -vector
    return vector.astype(np.float32)


def _index(rows: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(batch row, position)] -> (batch rows, positions) as index tensors."""
    return (torch.as_tensor([r[0] for r in rows], dtype=torch.long),
            torch.as_tensor([r[1] for r in rows], dtype=torch.long))


def attention_rows(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   rows: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Attention probabilities (M, H, T) of query ``rows`` [(batch row, position)] in decoder ``layer``
    given its input x (B, T, D), cos/sin (B, 1, T, hd) and the additive mask (B, 1, 1, T, T)."""
    at = layer.self_attn
    h, kvh, hd = at.num_heads, at.num_kv_heads, at.head_dim
    xn = layer.input_layernorm(x)
    bi, ti = _index(rows)
    m = len(rows)
    q = at.q_proj(xn[bi, ti]).view(m, h, hd)
    q = apply_rope(q, cos[bi, 0, ti].unsqueeze(1), sin[bi, 0, ti].unsqueeze(1))
    b, t = x.shape[:2]
    k = apply_rope(at.k_proj(xn).view(b, t, kvh, hd).transpose(1, 2), cos, sin)  # (B, KVH, T, hd)
    # Query heads of one KV group share its keys (head = group * G + g, as grouped_query_attention).
    scores = torch.einsum("mkgd,mktd->mkgt", q.view(m, kvh, h // kvh, hd), k[bi]).reshape(m, h, t)
    scores = scores * hd ** -0.5 + mask[bi, 0, 0, ti].unsqueeze(1)
    return torch.softmax(scores.float(), dim=-1)


def _mass(probs: torch.Tensor, keys: Sequence[np.ndarray]) -> torch.Tensor:
    """probs (M, H', T), keys per row -> attention mass on them (M,), mean over heads."""
    sel = torch.zeros(probs.shape[0], probs.shape[-1], dtype=probs.dtype)
    for i, k in enumerate(keys):
        sel[i, torch.as_tensor(np.asarray(k, np.int64))] = 1.0
    return (probs.mean(1) * sel).sum(-1)


def _position_fit(model, hidden: torch.Tensor, rows: Sequence[tuple[int, int]],
                  points: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """L_pos of the position head on the final states of ``rows`` against ``points`` (2,) each, and the
    mean error in metres (for logs)."""
    bi, ti = _index(rows)
    pred = model.position_head(hidden[bi, ti])
    truth = torch.from_numpy(np.stack(points)).to(pred.dtype)
    return position_loss(pred, truth), (pred[:, :2].detach() - truth).norm(dim=-1).mean()


def _split_hop(layer, captured: dict, index: int, rows: Sequence[tuple[int, int]],
               keys: Sequence[tuple[np.ndarray, np.ndarray]], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A hop whose first half of heads attends to ``keys[i][0]`` and second half to ``keys[i][1]``: its loss
    (-log mass, mean over rows and both halves) and its mean mass (for logs)."""
    p = attention_rows(layer, captured[index], captured["cos"], captured["sin"], captured["mask"], rows)
    half = p.shape[1] // 2
    first = _mass(p[:, :half], [k[0] for k in keys])
    second = _mass(p[:, half:], [k[1] for k in keys])
    loss = -(torch.log(first + eps) + torch.log(second + eps)).mean() / 2
    return loss, ((first + second) / 2).detach().mean()


def grounding_loss(model, captured: dict, hidden: torch.Tensor, targets: GroundingTargets,
                   options: GroundingOptions) -> dict[str, torch.Tensor]:
    """``ground`` (the loss: object hop + readout hop, each -log mass, + the named objects' L_pos) and,
    for logs, the mean attention mass of each hop (``ground_obj``, ``ground_read``) and the named
    objects' position error (``ground_err_m``); with ``options.direction_weight``, also
    ``direction_weight *`` L_pos of <Ori>'s facing vector and its error (``ground_dir_m``). ``captured`` comes from
    :func:`loc3r.synthetic.train_stage2.packed_hidden`'s ``capture``; ``hidden`` is its output."""
    layers = model.language_model.layers
    zero = captured["cos"].new_zeros(())
    out = {"ground": zero, "ground_obj": zero, "ground_read": zero, "ground_err_m": zero}
    if options.direction_weight > 0:
        out["ground_dir_m"] = zero
    eps = 1e-6
    if targets.object_rows:
        # What a name's token found is where that object is: the same position head as <Pos>.
        loss, out["ground_err_m"] = _position_fit(model, hidden, targets.object_rows, targets.object_centres)
        out["ground"] = out["ground"] + loss
        p = attention_rows(layers[options.object_layer], captured[options.object_layer], captured["cos"],
                           captured["sin"], captured["mask"], targets.object_rows)
        mass = _mass(p, targets.object_keys)
        out["ground"] = out["ground"] - torch.log(mass + eps).mean()
        out["ground_obj"] = mass.detach().mean()
    if targets.readout_rows:
        hop, out["ground_read"] = _split_hop(layers[options.readout_layer], captured, options.readout_layer,
                                             targets.readout_rows, targets.readout_keys)
        out["ground"] = out["ground"] + hop
    if options.answer_weight > 0:
        out["ground_ans"] = out["ground_ego_m"] = zero
        if targets.answer_rows:
            hop, out["ground_ans"] = _split_hop(layers[options.answer_layer], captured, options.answer_layer,
                                                targets.answer_rows, targets.answer_keys)
            out["ground"] = out["ground"] + options.answer_weight * hop
        if targets.ego_rows:
            loss, out["ground_ego_m"] = _position_fit(model, hidden, targets.ego_rows, targets.ego_vectors)
            out["ground"] = out["ground"] + options.answer_weight * loss
    if options.direction_weight > 0 and targets.direction_rows:
        loss, out["ground_dir_m"] = _position_fit(model, hidden, targets.direction_rows, targets.direction_vectors)
        out["ground"] = out["ground"] + options.direction_weight * loss
    return out


def check_layers(options: GroundingOptions, num_layers: int) -> None:
    for name in ("object_layer", "readout_layer") + (("answer_layer",) if options.answer_weight > 0 else ()):
        value = getattr(options, name)
        if not 0 <= value < num_layers:
            raise Loc3rError(f"grounding {name.replace('_', ' ')} must be in [0, {num_layers - 1}], got {value}")

