"""`loc3r eval`: the paper's localization and QA metrics on a labelled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from loc3r.errors import Loc3rError


def model_predictions(model: str, labels: list[dict], data: Path) -> dict[str, dict]:
    """Run a model package over every label's video and situation/question (needs the runtime)."""
    raise Loc3rError("--model needs the loc3r runtime, which this build does not have yet; use --predictions")


def evaluate_files(data: Path, predictions: Optional[Path], baseline: bool, train_data: Optional[Path],
                   model: Optional[str] = None):
    """Score a predictions file, a model package or the blind baselines against a dataset directory."""
    from loc3r.synthetic.baselines import baseline_predictions
    from loc3r.synthetic.label_files import read_labels, read_predictions
    from loc3r.synthetic.metrics import score

    labels = read_labels(data)
    if model is not None:
        preds = model_predictions(model, labels, data)
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
@click.option("--model", "model", default=None, help="Model package to run (needs the runtime).")
@click.option("--baseline", is_flag=True,
              help="Score the blind baselines: room centre, prior heading, answer prior.")
@click.option("--train-data", type=click.Path(exists=True), default=None,
              help="Training dataset for the heading and answer priors of --baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(data, predictions, model, baseline, train_data, as_json, debug):
    """Score predictions against labels: Acc@0.5m/1.0m, Acc@15/30deg, exact match by type, MRA."""
    from loc3r.cli import run_cli_command

    def body():
        from loc3r.synthetic.metrics import format_report

        sources = sum(x is not None and x is not False for x in (predictions, model, baseline or None))
        if sources != 1:
            raise Loc3rError("give exactly one of --predictions, --model or --baseline")
        if train_data is not None and not baseline:
            raise Loc3rError("--train-data only applies to --baseline")
        report = evaluate_files(Path(data), Path(predictions) if predictions else None, baseline,
                                Path(train_data) if train_data else None, model)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=1))
        else:
            click.echo(format_report(report, title="baseline" if baseline else str(predictions)))

    run_cli_command(body, debug)
