"""`loc3r eval`: the paper's localization and QA metrics on a labelled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from loc3r.errors import Loc3rError


def model_predictions(model: str, labels: list[dict], data: Path, backend: str = "auto",
                      max_new_tokens: int = 16, progress: bool = True) -> dict[str, dict]:
    """Run a model package through the runtime over every label's video and situation/question.

    One streaming session per video: its frames are ingested once, then every
    question about it is asked in order (the session rewinds after each), as
    ``loc3r-run VIDEO --ask ... --ask ...`` would. Any backend or precision
    the runtime loads can be judged this way.
    """
    from tqdm import tqdm

    from loc3r.runtime.session import Pipeline
    from loc3r.runtime.video import open_video, sample_frames

    root = data if data.is_dir() else data.parent
    pipeline = Pipeline.load(model, backend)
    by_video: dict[str, list[dict]] = {}
    for lab in labels:
        if not lab.get("video"):
            raise Loc3rError(f"label {lab['id']} has no video (made with --no-video?); --model needs the videos")
        by_video.setdefault(lab["video"], []).append(lab)
    preds: dict[str, dict] = {}
    bar = tqdm(total=len(labels), desc="eval", unit="q", disable=not progress)
    for video, labs in by_video.items():
        session = pipeline.new_session(frame_policy="uniform", on_notice=lambda msg: None)
        for rgb, t in sample_frames(open_video(str(root / video))):
            session.add_frame(rgb, t)
        for lab in labs:
            ans = session.ask(lab["question"], situation=lab.get("situation") or None,
                              max_new_tokens=max_new_tokens)
            preds[lab["id"]] = {"id": lab["id"], "answer": ans.answer,
                                "position": list(ans.position) if ans.position is not None else None,
                                "heading": ans.orientation_deg}
            bar.update(1)
    bar.close()
    return preds


def evaluate_files(data: Path, predictions: Optional[Path], baseline: bool, train_data: Optional[Path],
                   model: Optional[str] = None, backend: str = "auto", write_predictions: Optional[Path] = None):
    """Score a predictions file, a model package or the blind baselines against a dataset directory."""
    from loc3r.synthetic.baselines import baseline_predictions
    from loc3r.synthetic.label_files import read_labels, read_predictions
    from loc3r.synthetic.metrics import score

    labels = read_labels(data)
    if model is not None:
        preds = model_predictions(model, labels, data, backend)
        if write_predictions is not None:
            with open(write_predictions, "w") as f:
                for row in preds.values():
                    f.write(json.dumps(row) + "\n")
    elif baseline:
        train = read_labels(train_data) if train_data is not None else None
        preds = baseline_predictions(labels, data if data.is_dir() else data.parent, train)
    else:
        preds = read_predictions(predictions)
        known = {lab["id"] for lab in labels}
        unknown = [k for k in preds if k not in known]
        if unknown:
            raise Loc3rError(f"{len(unknown)} predictions name ids not in the labels, e.g. '{unknown[0]}'")
    return score(labels, preds)


@click.command("eval")
@click.option("--data", type=click.Path(exists=True), required=True,
              help="Dataset directory from `loc3r synth` (or its labels.jsonl).")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Predictions JSONL: {\"id\", \"answer\", \"position\": [x, y], \"heading\": deg} per line.")
@click.option("--model", "model", default=None,
              help="Model package directory to run through the runtime ('default': the embedded one).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="Runtime backend for --model.")
@click.option("--save-predictions", type=click.Path(dir_okay=False), default=None,
              help="With --model, also write its predictions as JSONL.")
@click.option("--baseline", is_flag=True,
              help="Score the blind baselines: room centre, prior heading, answer prior.")
@click.option("--train-data", type=click.Path(exists=True), default=None,
              help="Training dataset for the heading and answer priors of --baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(data, predictions, model, backend, save_predictions, baseline, train_data, as_json, debug):
    """Score predictions against labels: Acc@0.5m/1.0m, Acc@15/30deg, exact match by type, MRA."""
    from loc3r.cli import run_cli_command

    def body():
        from loc3r.synthetic.metrics import format_report

        sources = sum(x is not None and x is not False for x in (predictions, model, baseline or None))
        if sources != 1:
            raise Loc3rError("give exactly one of --predictions, --model or --baseline")
        if train_data is not None and not baseline:
            raise Loc3rError("--train-data only applies to --baseline")
        if save_predictions is not None and model is None:
            raise Loc3rError("--save-predictions only applies to --model")
        model_dir = model
        if model == "default":
            from loc3r.runtime.package import default_package_dir

            model_dir = str(default_package_dir())
        report = evaluate_files(Path(data), Path(predictions) if predictions else None, baseline,
                                Path(train_data) if train_data else None, model_dir, backend,
                                Path(save_predictions) if save_predictions else None)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=1))
        else:
            click.echo(format_report(report, title="baseline" if baseline else str(model or predictions)))

    run_cli_command(body, debug)
