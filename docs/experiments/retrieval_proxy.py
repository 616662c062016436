"""How fast does loc3r-tiny's from-scratch LLM learn to look up a named object? A clean proxy.

Each example is a sequence of object tokens, then a query, then a read-out
token: ``[obj_1 .. obj_N, background_1 .. background_M, colour word, category
word, <read>]``. An object token embeds (one-hot colour, one-hot category, x,
y) through a learned linear map; background tokens carry only a random (x, y)
(like wall and floor patches). The model must output the (x, y) of the object
the query names, read from the last token's final hidden state by a 2-layer
MLP, trained with squared error. The LLM is ``loc3r-tiny``'s (4 Qwen2 layers of
256, RoPE, causal attention, GPT-style init) or, with ``--reference``,
``torch.nn.TransformerEncoder`` of the same width and depth.

    python docs/experiments/retrieval_proxy.py --objects 8 --unique-colours   # one word names the object
    python docs/experiments/retrieval_proxy.py --objects 8                    # colour AND category needed
    python docs/experiments/retrieval_proxy.py --objects 8 --unique-colours --background 240 --batch 8
    python docs/experiments/retrieval_proxy.py --objects 16 --curriculum 0.5      # 2 objects growing to 16
    python docs/experiments/retrieval_proxy.py --objects 16 --compound           # one token per colour+category
    # supervised attention (as loc3r.synthetic.train_grounding): the query word attends to its object
    # in layer 1, the read-out token to the query word in layer 2
    python docs/experiments/retrieval_proxy.py --objects 8 --unique-colours --background 240 --batch 8 \
        --supervise-word 1 --supervise-read 2

It prints the mean distance error (metres; coordinates are uniform in a 8 m
square, so guessing the centre gives about 3 m) every 100 steps. Numbers from
these commands are in the README ("Why localization does not emerge"). Not a
test: a research tool, one thread, minutes per run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

COLOURS, CATEGORIES = 10, 8


def make_llm(reference: bool):
    from loc3r.model.config import get_config
    from loc3r.model.qwen2 import Qwen2Decoder

    text = get_config("loc3r-tiny").text
    if reference:
        layer = nn.TransformerEncoderLayer(text.hidden_size, text.num_heads, text.intermediate_size, dropout=0.0,
                                           batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, text.num_layers, enable_nested_tensor=False), text
    lm = Qwen2Decoder(text)
    for m in lm.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return lm, text


def batch(rng: np.random.Generator, size: int, objects: int, unique_colours: bool, background: int,
          compound: bool = False):
    """Object/background features (B, N, C), target xy (B, 2), query words (B, 3) and the target's
    index among the N tokens (B,)."""
    feats = np.zeros((size, objects + background, COLOURS + CATEGORIES + 3), np.float32)
    target = np.zeros((size, 2), np.float32)
    words = np.zeros((size, 3), np.int64)
    where = np.zeros(size, np.int64)
    for b in range(size):
        if unique_colours:
            pairs = [(int(c), int(rng.integers(CATEGORIES))) for c in rng.permutation(COLOURS)[:objects]]
        else:
            cells = rng.permutation(COLOURS * CATEGORIES)[:objects]
            pairs = [(int(c) // CATEGORIES, int(c) % CATEGORIES) for c in cells]
        xy = rng.uniform(-4, 4, (objects + background, 2))
        for i, (c, k) in enumerate(pairs):
            feats[b, i, c] = feats[b, i, COLOURS + k] = 1.0
        feats[b, :, -3:-1] = xy / 4
        feats[b, :, -1] = 1.0
        j = int(rng.integers(objects))
        target[b] = xy[j]
        c, k = pairs[j]
        if unique_colours:
            words[b] = (100 + c, 100 + c, 5)
        elif compound:  # one token names colour AND category ("red chair" as one word)
            words[b] = (300 + c * CATEGORIES + k, 300 + c * CATEGORIES + k, 5)
        else:
            words[b] = (100 + c, 200 + k, 5)
        order = rng.permutation(objects + background) if background else np.arange(objects)
        feats[b] = feats[b, order]  # objects among the background, in random order
        where[b] = int(np.flatnonzero(order == j)[0])
    return torch.from_numpy(feats), torch.from_numpy(target), torch.from_numpy(words), torch.from_numpy(where)


def attention_mass(layer, x, cos, sin, row: int, keys: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the attention that query ``row`` pays to key ``keys`` (B,) in ``layer``."""
    from loc3r.model.qwen2 import apply_rope

    at = layer.self_attn
    b, t, _ = x.shape
    xn = layer.input_layernorm(x)
    q = apply_rope(at.q_proj(xn[:, row:row + 1]).view(b, 1, at.num_heads, at.head_dim).transpose(1, 2),
                   cos[:, :, row:row + 1], sin[:, :, row:row + 1])
    k = apply_rope(at.k_proj(xn).view(b, t, at.num_kv_heads, at.head_dim).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(at.num_heads // at.num_kv_heads, dim=1)[:, :, :row + 1]
    probs = torch.softmax((q @ k.transpose(-1, -2)).squeeze(2) * at.head_dim**-0.5, dim=-1).mean(1)  # (B, row+1)
    return probs.gather(1, keys[:, None]).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--unique-colours", action="store_true", help="one query word (the colour) names the object")
    ap.add_argument("--compound", action="store_true",
                    help="colour and category needed, but named by one token (a compound word per pair)")
    ap.add_argument("--summed", action="store_true",
                    help="with --compound: the name token's embedding is the sum of its colour's and its "
                         "category's word embeddings (shared parameters), not a table row of its own")
    ap.add_argument("--background", type=int, default=0, help="background tokens besides the objects")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reference", action="store_true", help="torch.nn.TransformerEncoder instead of loc3r's Qwen2")
    ap.add_argument("--curriculum", type=float, default=0.0,
                    help="share of the steps over which the objects grow from 2 and the background from 0 "
                         "to --objects / --background (0: full size from the first step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--supervise-word", type=int, default=None, metavar="LAYER",
                    help="supervise the last query word's attention in LAYER onto the named object")
    ap.add_argument("--supervise-read", type=int, default=None, metavar="LAYER",
                    help="supervise the read-out token's attention in LAYER onto the last query word")
    ap.add_argument("--supervise-previous", type=int, default=None, metavar="LAYER",
                    help="supervise the last query word's attention in LAYER onto the word before it "
                         "(the colour, for a colour-and-category query)")
    ap.add_argument("--supervision-weight", type=float, default=1.0, help="weight of each -log(mass) term")
    ap.add_argument("--read-from", choices=["read", "word"], default="read",
                    help="regress the target from the read-out token or from the last query word")
    args = ap.parse_args()
    if args.summed and not args.compound:
        ap.error("--summed needs --compound")
    if args.unique_colours and args.objects > COLOURS:
        ap.error(f"--unique-colours allows at most {COLOURS} objects")
    supervised = any(v is not None for v in (args.supervise_word, args.supervise_read, args.supervise_previous))
    if args.reference and supervised:
        ap.error("attention supervision needs loc3r's Qwen2 (not --reference)")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    llm, text = make_llm(args.reference)
    h = text.hidden_size
    embed = nn.Embedding(text.vocab_size, h)
    nn.init.normal_(embed.weight, std=0.02)
    obj = nn.Linear(COLOURS + CATEGORIES + 3, h)
    head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 2))
    params = [*llm.parameters(), *embed.parameters(), *obj.parameters(), *head.parameters()]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)

    read_row = -1 if args.read_from == "read" else -2

    def embed_words(words):
        e = embed(words)
        if args.summed:
            pair = words[:, 0] - 300
            summed = embed(100 + pair // CATEGORIES) + embed(200 + pair % CATEGORIES)  # (B, H)
            e = torch.cat((summed[:, None].expand(-1, 2, -1), e[:, 2:]), dim=1)
        return e

    def forward(feats, words, where):
        """-> predicted xy (B, 2) and the attention supervision term (0 without)."""
        x = torch.cat((obj(feats), embed_words(words)), dim=1)
        t = x.shape[1]
        if args.reference:
            out = llm(x, mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
            return head(out[:, read_row]), x.new_zeros(())
        from loc3r.model.qwen2 import rope_cos_sin

        b = x.shape[0]
        cos, sin = rope_cos_sin(torch.arange(t), text.head_dim, text.rope_theta)
        cos, sin = cos.view(1, 1, t, -1).expand(b, 1, t, -1), sin.view(1, 1, t, -1).expand(b, 1, t, -1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min).view(1, 1, 1, t, t)
        zeros = x.new_zeros(b, text.num_kv_heads, t, text.head_dim)
        supervision = x.new_zeros(())
        word = torch.full((b,), t - 2, dtype=torch.long)
        for i, layer in enumerate(llm.layers):
            if i == args.supervise_word:
                supervision = supervision - torch.log(attention_mass(layer, x, cos, sin, t - 2, where) + 1e-6).mean()
            if i == args.supervise_previous:
                before = torch.full((b,), t - 3, dtype=torch.long)
                supervision = supervision - torch.log(attention_mass(layer, x, cos, sin, t - 2, before) + 1e-6).mean()
            if i == args.supervise_read:
                supervision = supervision - torch.log(attention_mass(layer, x, cos, sin, t - 1, word) + 1e-6).mean()
            x, _, _ = layer(x, cos, sin, zeros, zeros, torch.arange(t), mask)
        return head(llm.norm(x)[:, read_row]), supervision

    start = time.time()
    recent, recent_sup = [], []
    for step in range(args.steps):
        for g in optim.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 30)
        grow = min(1.0, (step + 1) / (args.curriculum * args.steps)) if args.curriculum > 0 else 1.0
        objects = max(2, round(2 + (args.objects - 2) * grow))
        background = round(args.background * grow)
        feats, target, words, where = batch(rng, args.batch, objects, args.unique_colours, background,
                                             args.compound)
        pred, supervision = forward(feats, words, where)
        loss = (pred - target).pow(2).sum(-1).mean() + args.supervision_weight * supervision
        optim.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        recent.append(float((pred.detach() - target).norm(dim=-1).mean()))
        recent_sup.append(float(supervision.detach()))
        if (step + 1) % 100 == 0:
            sup = f"  supervision {np.mean(recent_sup):.3f}" if supervised else ""
            print(f"step {step + 1:5d}  {time.time() - start:6.0f} s  error {np.mean(recent):.2f} m"
                  f"  ({objects} objects, {background} background){sup}", flush=True)
            recent, recent_sup = [], []


if __name__ == "__main__":
    main()
