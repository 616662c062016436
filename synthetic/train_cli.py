"""`loc3r train`: train the loc3r-tiny demo model on synthetic rooms (run by hand, never in CI)."""

from __future__ import annotations

from pathlib import Path

import click

from loc3r.errors import Loc3rError


@click.command("train")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoints, log.json, loss_curves.png.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default="/work/runs/data/train",
              show_default=True, help="Training split from `loc3r synth --split train`.")
@click.option("--val-data", type=click.Path(exists=True, file_okay=False), default="/work/runs/data/val",
              show_default=True, help="Validation split from `loc3r synth --split val`.")
@click.option("--stage", type=click.Choice(["1", "2", "all", "eval"]), default="all", show_default=True,
              help="1: vision tower + pose prior; 2: projector, f_cam, LLM, heads; eval: score OUT/checkpoint.")
@click.option("--minutes", type=float, default=75.0, show_default=True,
              help="Wall-clock budget of the stages run (split by --stage1-share with --stage all).")
@click.option("--steps", type=int, default=None,
              help="Stage 2: a budget of this many steps instead of --minutes (learning-rate schedule and curricula "
                   "follow step / N), to compare runs at equal steps on a shared machine.")
@click.option("--stage1-share", type=float, default=0.25, show_default=True,
              help="Share of the budget spent on stage 1 with --stage all.")
@click.option("--scenes", type=int, default=None, help="Use only the first N training scenes (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation and batch order.")
@click.option("--no-camera-tokens", is_flag=True, help="Ablation: no pose prior and no camera tokens.")
@click.option("--no-bev-loss", is_flag=True, help="Ablation: train stage 2 without L_BEV.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint whose vision tower / pose prior the run starts from (stage 2 default: OUT/stage1).")
@click.option("--resume", is_flag=True,
              help="Stage 2: continue --init's whole model (default OUT/checkpoint) instead of starting the LLM "
                   "and heads fresh.")
@click.option("--stage1-parts", type=click.Choice(["both", "vision", "pose"]), default="both", show_default=True,
              help="What stage 1 trains; the other encoder keeps its --init (or initial) weights.")
@click.option("--pose-clips", type=int, default=8, show_default=True, help="Stage 1: clips per pose-prior step.")
@click.option("--pose-curriculum", type=float, default=0.8, show_default=True,
              help="Stage 1: share of its budget over which the longest pose clip grows from 2 frames to 16; "
                   "each step draws its length up to that (0: always 16).")
@click.option("--frame-curriculum", type=float, default=0.0, show_default=True,
              help="Stage 2: share of its budget over which the frames a step sees grow from 1 to the whole clip "
                   "(0: whole clips from the first step, as the paper).")
@click.option("--drills", type=int, default=0, show_default=True,
              help="Stage 2: situation drills per scene and step (localization about objects the step's frames "
                   "show; see loc3r.synthetic.train_drills).")
@click.option("--questions-min-frames", type=int, default=None,
              help="Stage 2 with --frame-curriculum: the split's questions join steps of at least this many "
                   "frames (default: whole clips only).")
@click.option("--lr", "stage2_lr", type=float, default=1e-3, show_default=True,
              help="Stage 2: peak learning rate (linear warmup, then cosine to a tenth of it).")
@click.option("--bev-weight", type=float, default=0.05, show_default=True, help="Stage 2: weight of L_BEV.")
@click.option("--loc-weight", type=float, default=0.075, show_default=True,
              help="Stage 2: weight of (L_pos + 3.5 L_ori).")
@click.option("--grounding-weight", type=float, default=0.0, show_default=True,
              help="Stage 2: weight of the supervised grounding attention (object names attend to their "
                   "tokens, <Pos>/<Ori> to the names; see loc3r.synthetic.train_grounding). 0: off, as the paper.")
@click.option("--grounding-layers", type=str, default="1,2", show_default=True,
              help="Stage 2: decoder layers of the object hop and the readout hop, 'OBJECT,READOUT', and "
                   "optionally the answer hop's, 'OBJECT,READOUT,ANSWER' (default: READOUT + 1).")
@click.option("--grounding-direction", type=float, default=0.0, show_default=True,
              help="Stage 2 with --grounding-weight: weight of the facing-direction term (<Ori>'s final state "
                   "predicts the vector towards what the speaker faces). 0: off.")
@click.option("--grounding-answer", type=float, default=0.0, show_default=True,
              help="Stage 2 with --grounding-weight: weight of the answer hop (the token that predicts a situated "
                   "answer attends to the question's object names and to <Pos>/<Ori>, and predicts the first "
                   "named object's position in the speaker's frame). 0: off.")
@click.option("--early-bev-layer", type=int, default=None,
              help="Stage 2: also apply L_BEV to the vision tokens at this decoder layer's input (e.g. the "
                   "object hop's, 1), so that they hold their position where names look them up. Default: off.")
@click.option("--name-tokens", is_flag=True,
              help="One token per object name ('pink plant'): the LLM looks an object up with one query token "
                   "instead of combining colour and category (the tokenizer ships in the checkpoint).")
@click.option("--bf16", is_flag=True,
              help="Stage 2: bf16 autocast of the training forward (weights, gradients and optimizer stay fp32). "
                   "1.7-2.2x faster whole-clip steps measured on an AVX512-BF16 CPU (bench/train_step.py); "
                   "slower where bf16 is emulated.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--test-data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Test split to score the final checkpoint on (PyTorch model, synthetic metrics).")
@click.option("--test-scenes", type=int, default=None, help="Score only the first N test scenes.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def train(out, data, val_data, stage, minutes, steps, stage1_share, scenes, seed, no_camera_tokens, no_bev_loss, init,
          resume, stage1_parts, pose_clips, pose_curriculum, frame_curriculum, drills, questions_min_frames,
          stage2_lr, bev_weight, loc_weight, grounding_weight, grounding_layers, grounding_direction, grounding_answer, early_bev_layer, name_tokens, bf16, threads, test_data, test_scenes, debug):
    """Train loc3r-tiny: stage 1 pretrains the vision tower and pose prior on dense synthetic truth;
    stage 2 trains projector, f_cam, LLM and heads with L_CE + 0.05 L_BEV + 0.075 (L_pos + 3.5 L_ori).

    Writes safetensors checkpoints (OUT/stage1, OUT/last, OUT/checkpoint), OUT/log.json and
    OUT/loss_curves.png. With --test-data, also OUT/eval_test.json (model vs blind baselines).
    """
    from loc3r.cli import run_cli_command

    def body():
        import torch

        from loc3r.synthetic.train_run import TrainOptions, cache_for
        from loc3r.synthetic.train_run import train as run_training
        from loc3r.model.losses import LossWeights
        from loc3r.synthetic.train_stage1 import Stage1Options
        from loc3r.synthetic.train_grounding import GroundingOptions
        from loc3r.synthetic.train_stage2 import Stage2Options

        if not 0.0 < stage1_share < 1.0:
            raise Loc3rError(f"--stage1-share must be between 0 and 1, got {stage1_share}")
        if steps is not None and (steps < 1 or stage != "2"):
            raise Loc3rError(f"--steps budgets stage 2: use a positive count with --stage 2, got {steps}")
        if threads < 1:
            raise Loc3rError(f"--threads must be at least 1, got {threads}")
        if resume and stage != "2":
            raise Loc3rError("--resume continues a stage-2 run: use it with --stage 2")
        if pose_clips < 1:
            raise Loc3rError(f"--pose-clips must be at least 1, got {pose_clips}")
        if not 0.0 <= pose_curriculum <= 1.0:
            raise Loc3rError(f"--pose-curriculum must be between 0 and 1, got {pose_curriculum}")
        if not 0.0 <= frame_curriculum <= 1.0:
            raise Loc3rError(f"--frame-curriculum must be between 0 and 1, got {frame_curriculum}")
        if drills < 0:
            raise Loc3rError(f"--drills must be 0 or more, got {drills}")
        if questions_min_frames is not None and questions_min_frames < 1:
            raise Loc3rError(f"--questions-min-frames must be at least 1, got {questions_min_frames}")
        if not stage2_lr > 0:
            raise Loc3rError(f"--lr must be positive, got {stage2_lr}")
        if bev_weight < 0 or loc_weight < 0:
            raise Loc3rError("--bev-weight and --loc-weight must be 0 or more")
        if grounding_weight < 0:
            raise Loc3rError(f"--grounding-weight must be 0 or more, got {grounding_weight}")
        if grounding_direction < 0:
            raise Loc3rError(f"--grounding-direction must be 0 or more, got {grounding_direction}")
        if grounding_direction > 0 and grounding_weight == 0:
            raise Loc3rError("--grounding-direction is part of the grounding term: use it with --grounding-weight")
        if grounding_answer < 0:
            raise Loc3rError(f"--grounding-answer must be 0 or more, got {grounding_answer}")
        if grounding_answer > 0 and grounding_weight == 0:
            raise Loc3rError("--grounding-answer is part of the grounding term: use it with --grounding-weight")
        try:
            layers = [int(x) for x in grounding_layers.split(",")]
            if len(layers) not in (2, 3):
                raise ValueError
        except ValueError:
            raise Loc3rError(f"--grounding-layers must be two or three layer indices 'OBJECT,READOUT[,ANSWER]', "
                             f"got '{grounding_layers}'") from None
        object_layer, readout_layer = layers[:2]
        answer_layer = layers[2] if len(layers) == 3 else readout_layer + 1
        if scenes is not None and scenes < 1:
            raise Loc3rError(f"--scenes must be at least 1, got {scenes}")
        options = TrainOptions(out=Path(out), data=Path(data), val_data=Path(val_data), stage=stage,
                               minutes=minutes, steps=steps, stage1_share=stage1_share, scenes=scenes, seed=seed,
                               camera_tokens=not no_camera_tokens, bev_loss=not no_bev_loss,
                               init=Path(init) if init else None, resume=resume, threads=threads,
                               name_tokens=name_tokens,
                               stage1=Stage1Options(parts=stage1_parts, pose_clips=pose_clips,
                                                    pose_curriculum=pose_curriculum),
                               stage2=Stage2Options(lr=stage2_lr, frame_curriculum=frame_curriculum, drills=drills,
                                                    questions_min_frames=questions_min_frames,
                                                    early_bev_layer=early_bev_layer, bf16=bf16,
                                                    weights=LossWeights(bev=bev_weight, loc=loc_weight),
                                                    grounding=GroundingOptions(weight=grounding_weight,
                                                                               object_layer=object_layer,
                                                                               readout_layer=readout_layer,
                                                                               direction_weight=grounding_direction,
                                                                               answer_weight=grounding_answer,
                                                                               answer_layer=answer_layer)))
        if stage == "eval":
            if test_data is None:
                raise Loc3rError("--stage eval needs --test-data")
            final = Path(out) / "checkpoint"
            if not final.is_dir():
                raise Loc3rError(f"no trained checkpoint at {final}")
            torch.set_num_threads(threads)
        else:
            final = run_training(options)
            click.echo(f"checkpoint: {final}")
        if test_data is not None and stage in ("2", "all", "eval"):
            from loc3r.model.config import get_config
            from loc3r.synthetic.train_eval import evaluate_checkpoint

            cache = cache_for(Path(test_data), get_config(options.preset), final, test_scenes)
            result = evaluate_checkpoint(final, Path(test_data), cache, Path(data), Path(out) / "eval_test.json")
            click.echo(result["table"])

    run_cli_command(body, debug)
