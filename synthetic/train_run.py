"""The loc3r-tiny training run: data caches, stage 1, stage 2, checkpoints, log and curves.

Output directory::

    tokenizer.json, chat_template.json   the prompt format the model is trained on
    stage1/                              checkpoint after stage 1 (our format, model/checkpoint.py)
    checkpoint/                          the final checkpoint (+ tokenizer.json, chat_template.json)
    last/                                the latest periodic stage-2 checkpoint
    log.json, loss_curves.png            every logged loss, train and val

Both stages run for a wall-clock budget: the learning rate warms up over the
first steps and then follows a cosine over the elapsed share of the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from loc3r.errors import Loc3rError
from loc3r.synthetic.train_data import (CHAT_TEMPLATE_FILE, CachedSplit, build_cache, model_config_with_tokens,
                                        prompt_tokenizer, special_ids, write_tokenizer_files)
from loc3r.synthetic.train_drills import DrillSource, curriculum_frames, step_split
from loc3r.synthetic.train_grounding import GroundingSource, check_layers
from loc3r.synthetic.train_log import TrainLog
from loc3r.synthetic.train_stage1 import PoseProbe, Stage1Options, VisionProbe, stage1_parameters, stage1_step
from loc3r.synthetic.train_stage2 import (FrozenFeatures, Stage2Options, pack_questions, stage2_losses,
                                          stage2_trainable)


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    data: Path
    val_data: Path
    stage: str = "all"  # "1", "2" or "all"
    minutes: float = 75.0  # wall-clock budget of the stages run
    steps: Optional[int] = None  # stage 2: a budget of steps instead of minutes
    stage1_share: float = 0.25  # of the budget, with --stage all
    scenes: Optional[int] = None  # training scenes used (None: all)
    val_scenes: int = 16
    seed: int = 0
    camera_tokens: bool = True
    bev_loss: bool = True
    init: Optional[Path] = None  # checkpoint to start stage 2 from (default OUT/stage1)
    name_tokens: bool = False  # one token per object name (loc3r.synthetic.tokenizer)
    resume: bool = False  # stage 2 continues init's whole model, not only its encoders
    preset: str = "loc3r-tiny"
    threads: int = 1
    val_every_s: float = 300.0
    checkpoint_every_s: float = 600.0
    warmup_steps: int = 30
    stage1: Stage1Options = field(default_factory=Stage1Options)
    stage2: Stage2Options = field(default_factory=Stage2Options)


def init_language_weights(model) -> None:
    """GPT-style init for the from-scratch LLM and projector: normal(0, 0.02), zero biases."""
    for mod in [model.language_model, model.projector]:
        for m in mod.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(m.weight, std=0.02)


def build_model(options: TrainOptions, special: dict[str, int]):
    from loc3r.model.config import get_config
    from loc3r.model.loc3r_vlm import Loc3RVLM

    cfg = model_config_with_tokens(get_config(options.preset), special)
    if not options.camera_tokens:
        cfg = cfg.replace(name=cfg.name + "-nocam", pose_prior=None, use_camera_tokens=False)
    torch.manual_seed(options.seed)
    model = Loc3RVLM(cfg)
    init_language_weights(model)
    return model


def cache_for(data: Path, cfg, tokenizer_dir: Path, scenes: Optional[int]) -> CachedSplit:
    """The split's tensor cache (built on first use) under DATA/cache/."""
    pose = "nopose" if cfg.pose_prior is None else f"pose{cfg.pose_prior.img_height}x{cfg.pose_prior.img_width}"
    # Question ids depend on the tokenizer: one cache per vocabulary.
    vocab = hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:8]
    path = Path(data) / "cache" / f"v{cfg.vision.image_size}-{pose}-{scenes or 'all'}-tok{vocab}.npz"
    if not path.is_file():
        build_cache(Path(data), path, cfg, tokenizer_dir, max_scenes=scenes)
    return CachedSplit(path)


def lr_at(step: int, frac: float, base: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base`` to base/10 over the budget share ``frac``."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def timed_loop(budget_s: float, desc: str, step_fn: Callable[[int, float], dict], on_val: Callable[[int], None],
               on_checkpoint: Callable[[int], None], val_every_s: float, checkpoint_every_s: float,
               max_steps: Optional[int] = None) -> int:
    """Call ``step_fn(step, budget_fraction)`` until the budget is spent; returns the number of steps.

    With ``max_steps`` the budget is that many steps instead of ``budget_s`` seconds (the fraction is
    step / max_steps), so that runs sharing a machine can be compared at equal steps."""
    from tqdm import tqdm

    start = time.time()
    last_val = last_ckpt = start
    step = 0
    total, unit = (max_steps, "step") if max_steps else (int(budget_s), "s")
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) as bar:
        while True:
            now = time.time()
            frac = step / max_steps if max_steps else (now - start) / budget_s
            if frac >= 1.0:
                break
            out = step_fn(step, frac)
            step += 1
            bar.n = step if max_steps else min(int(time.time() - start), int(budget_s))
            bar.set_postfix({k: f"{v:.3f}" for k, v in out.items() if k in ("loss", "ce", "pos_err_m", "ori_err_deg",
                                                                            "vision", "pose")}, refresh=True)
            if time.time() - last_val >= val_every_s:
                on_val(step)
                last_val = time.time()
            if time.time() - last_ckpt >= checkpoint_every_s:
                on_checkpoint(step)
                last_ckpt = time.time()
    on_val(step)
    return step


def scalars(out: dict) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items()}


def optimizer_step(optim, params, out: dict, log: Optional[TrainLog], stage: int, step: int) -> dict[str, float]:
    """One update from ``out["loss"]`` (gradient norm clipped at 1), logged (unless ``log`` is None) as
    train scalars of ``stage``."""
    optim.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    values = scalars(out)
    if log is not None:
        log.add(stage, "train", step, values)
    return values


def run_stage1(model, train: CachedSplit, val: CachedSplit, options: TrainOptions, log: TrainLog,
               budget_s: float) -> None:
    opts = options.stage1
    probe = VisionProbe(model.cfg.vision.hidden_size)
    pose_probe = PoseProbe(model.pose_prior.cfg.dec_embed_dim) if model.pose_prior is not None else None
    params = stage1_parameters(model, probe, opts.parts, pose_probe)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    rng = np.random.default_rng(options.seed)
    model.train()

    def step_fn(step, frac):
        for g in optim.param_groups:
            g["lr"] = lr_at(step, frac, opts.lr, options.warmup_steps)
        out = stage1_step(model, probe, train, rng, opts, frac, pose_probe)
        return optimizer_step(optim, params, out, log, 1, step)

    def on_val(step):
        model.eval()
        vrng = np.random.default_rng(12345)
        acc: dict[str, list[float]] = {}
        with torch.no_grad():
            for _ in range(4):
                for k, v in scalars(stage1_step(model, probe, val, vrng, opts, 1.0, pose_probe)).items():
                    acc.setdefault(k, []).append(v)
        model.train()
        log.add(1, "val", step, {k: float(np.mean(v)) for k, v in acc.items()})
        log.write()

    steps = timed_loop(budget_s, "stage 1", step_fn, on_val, lambda s: None, options.val_every_s, 1e18)
    log.write({"stage1_steps": steps})


def stage2_autocast(bf16: bool):
    """The training forward's precision context: bf16 autocast on the CPU (matmuls and linears in bf16;
    softmax, norms and losses stay fp32, as do the weights, gradients and AdamW state), or a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def run_stage2(model, train: CachedSplit, val: CachedSplit, options: TrainOptions, log: TrainLog,
               budget_s: float, save: Callable[[str], None]) -> None:
    opts = options.stage2
    weights = opts.weights if options.bev_loss else dataclasses.replace(opts.weights, bev=0.0)
    params = stage2_trainable(model)
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    rng = np.random.default_rng(options.seed + 1)
    special = (model.cfg.pos_token_id, model.cfg.ori_token_id)
    pad = special_ids(options.out)["pad"]
    prefix = torch.from_numpy(train["prefix_ids"].astype(np.int64))
    order = rng.permutation(train.num_scenes)
    cursor = [0]
    # The encoders are frozen: run them once per split instead of once per step.
    model.eval()
    frozen = {id(train): FrozenFeatures(model, train, desc="frozen features (train)"),
              id(val): FrozenFeatures(model, val, desc="frozen features (val)")}

    total_frames = int(train["vision"].shape[1])
    drills = tok = None
    if opts.uses_drills:
        drills = DrillSource(options.data, train.summary["scenes"])
        tok = prompt_tokenizer(options.out)
    questions_from = opts.questions_min_frames or total_frames
    ground = None
    if opts.grounding.enabled:
        tok = tok or prompt_tokenizer(options.out)
        grid = model.cfg.vision.pooled_grid
        ground = {id(split): (GroundingSource(data, split.summary["scenes"], grid, tok), opts.grounding)
                  for split, data in ((train, options.data), (val, options.val_data))}

    def losses(split, scenes, r, frames=None):
        frames = frames or total_frames
        if split is train and drills is not None:
            with_questions = frames >= questions_from
            step_drills = drills.drills(scenes, frames, opts.drills, r)
            if not step_drills and not with_questions:  # nothing shown yet: take the whole clips
                frames, with_questions = total_frames, True
            source = step_split(split, scenes, step_drills, tok, with_questions, pad)
        else:
            source = split
        batch = pack_questions(source, scenes, r, opts.max_questions, special[0], special[1], pad)
        feats, cams = frozen[id(split)](scenes)
        feats = feats[:, :frames]
        cams = cams[:, :frames] if cams is not None else None
        bev_targets = torch.from_numpy(split["bev_targets"][scenes][:, :frames])
        bev_valid = torch.from_numpy(split["bev_valid"][scenes][:, :frames])
        return stage2_losses(model, prefix, feats, cams, batch, bev_targets, bev_valid, weights,
                             ground[id(split)] if ground is not None else None, opts.early_bev_layer)

    def step_fn(step, frac):
        nonlocal order
        for g in optim.param_groups:
            g["lr"] = lr_at(step, frac, opts.lr, options.warmup_steps)
        if cursor[0] + opts.scenes_per_step > len(order):
            order, cursor[0] = rng.permutation(train.num_scenes), 0
        scenes = order[cursor[0]:cursor[0] + opts.scenes_per_step]
        cursor[0] += opts.scenes_per_step
        frames = curriculum_frames(frac, opts.frame_curriculum, total_frames, rng)
        model.train()
        with stage2_autocast(opts.bf16):
            out = losses(train, scenes, rng, frames)
        out["frames"] = torch.tensor(float(frames))
        return optimizer_step(optim, params, out, log, 2, step)

    def on_val(step):
        model.eval()
        acc: dict[str, list[float]] = {}
        n = min(options.val_scenes, val.num_scenes)
        with torch.no_grad():
            for s in range(0, n, opts.scenes_per_step):
                for k, v in scalars(losses(val, np.arange(s, min(s + opts.scenes_per_step, n)), None)).items():
                    acc.setdefault(k, []).append(v)
        log.add(2, "val", step, {k: float(np.mean(v)) for k, v in acc.items()})
        log.write()

    steps = timed_loop(budget_s, "stage 2", step_fn, on_val, lambda s: save("last"), options.val_every_s,
                       options.checkpoint_every_s, max_steps=options.steps)
    log.write({"stage2_steps": steps})


def load_encoders(model, init: Path, pose_prior_optional: bool = False) -> None:
    """Copy the vision tower and the pose prior (when ``model`` has one) from checkpoint ``init``.

    With ``pose_prior_optional`` (stage 1 retraining the pose prior), a pose prior of another
    shape in ``init`` is skipped and the model's own starts fresh.
    """
    from loc3r.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(init)
    model.vision_tower.load_state_dict(loaded.vision_tower.state_dict())
    if model.pose_prior is None:
        return
    mine = model.pose_prior.state_dict()
    theirs = None if loaded.pose_prior is None else loaded.pose_prior.state_dict()
    fits = theirs is not None and all(k in theirs and theirs[k].shape == v.shape for k, v in mine.items())
    if fits:
        model.pose_prior.load_state_dict(theirs)
    elif pose_prior_optional:
        print(f"{init}: no pose prior of this shape; stage 1 trains the pose prior from scratch", file=sys.stderr)
    elif theirs is None:
        raise Loc3rError(f"{init} has no pose prior; this run needs one (or use --no-camera-tokens)")
    else:
        raise Loc3rError(f"{init} has a pose prior of another shape than {model.cfg.name}'s")


def load_full(model, init: Path) -> None:
    """Copy every weight of checkpoint ``init`` into ``model`` (same preset and options)."""
    from loc3r.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(init)
    if loaded.cfg.to_dict() != model.cfg.to_dict():
        raise Loc3rError(f"--resume: {init} is a {loaded.cfg.name} checkpoint of another configuration than "
                         f"this run's {model.cfg.name}")
    model.load_state_dict(loaded.state_dict())


def train(options: TrainOptions) -> Path:
    """Run the requested stages; return the final checkpoint directory."""
    from loc3r.model.checkpoint import save_checkpoint

    if options.stage not in ("1", "2", "all"):
        raise Loc3rError(f"--stage must be 1, 2 or all, got '{options.stage}'")
    if options.minutes <= 0:
        raise Loc3rError("--minutes must be positive")
    torch.set_num_threads(options.threads)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer_files(out, options.name_tokens)
    model = build_model(options, special)
    cfg = model.cfg
    if options.stage != "1" and options.stage2.grounding.enabled:
        check_layers(options.stage2.grounding, cfg.text.num_layers)
    early = options.stage2.early_bev_layer
    if options.stage != "1" and early is not None and not 0 <= early < cfg.text.num_layers:
        raise Loc3rError(f"--early-bev-layer must be in [0, {cfg.text.num_layers - 1}], got {early}")
    from loc3r.model.config import get_config

    # Caches always hold the pose-prior inputs, so the no-camera ablation shares them.
    data_cfg = get_config(options.preset)
    train_split = cache_for(options.data, data_cfg, out, options.scenes)
    val_split = cache_for(options.val_data, data_cfg, out, None)
    meta = {"options": json.loads(json.dumps(asdict(options), default=str)), "threads": options.threads,
            "train_scenes": train_split.num_scenes, "train_questions": train_split.num_questions,
            "config": cfg.name}
    log = TrainLog(out, meta)

    def save(name: str) -> Path:
        d = out / name
        save_checkpoint(model, d)
        for f in ("tokenizer.json", CHAT_TEMPLATE_FILE):
            shutil.copy(out / f, d / f)
        return d

    budget = options.minutes * 60.0
    if options.stage in ("1", "all"):
        if options.init is not None:  # continue from a checkpoint's encoders
            load_encoders(model, options.init, pose_prior_optional=options.stage1.parts != "vision")
        share = 1.0 if options.stage == "1" else options.stage1_share
        run_stage1(model, train_split, val_split, options, log, budget * share)
        final = save("stage1")
        if options.stage == "1":
            return final
        budget *= 1.0 - share
    elif options.resume:
        # Continue an earlier stage 2: every weight from the checkpoint (a fresh optimizer and schedule).
        load_full(model, options.init or out / "checkpoint")
    else:
        # Stage 2 reuses only the frozen encoders; projector, f_cam, LLM and heads start fresh.
        load_encoders(model, options.init or out / "stage1")
    run_stage2(model, train_split, val_split, options, log, budget, save)
    final = save("checkpoint")
    log.write({"checkpoint": str(final)})
    return final
