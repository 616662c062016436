"""A markdown table of training runs' test results (``eval_test.json``) beside the blind baselines.

    python -m loc3r.synthetic.train_report RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from loc3r.errors import Loc3rError

COLUMNS = (("Acc@0.5m", "localization", "acc@0.5m"), ("Acc@1.0m", "localization", "acc@1m"),
           ("Acc@15deg", "localization", "acc@15deg"), ("Acc@30deg", "localization", "acc@30deg"),
           ("EM situated", "summary", "situated_em"), ("EM general", "summary", "general_em"),
           ("MRA numeric", "summary", "numeric_mra"))


def row(name: str, report: dict) -> str:
    cells = []
    for _, section, key in COLUMNS:
        value = report.get(section, {}).get(key)
        cells.append("-" if value is None else f"{value:.1f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def results_table(run_dirs: list[Path]) -> str:
    """Markdown: one row per run, then the baselines of the first run's test set."""
    results = []
    for d in run_dirs:
        path = Path(d) / "eval_test.json"
        if not path.is_file():
            raise Loc3rError(f"no test results at {path} (run `loc3r train --stage eval --test-data ...`)")
        results.append((Path(d).name, json.loads(path.read_text())))
    head = "| run | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, res in results:
        lines.append(row(f"{name} ({res['scenes']} scenes)", res["model"]))
    lines.append(row("blind baselines (room centre, prior heading, answer prior)", results[0][1]["baseline"]))
    return "\n".join(lines)


def type_table(run_dir: Path) -> str:
    """Markdown: exact match (and MRA) by question type, model vs baseline."""
    res = json.loads((Path(run_dir) / "eval_test.json").read_text())
    lines = ["| question type | n | EM model | EM baseline | MRA model | MRA baseline |", "|---|---|---|---|---|---|"]
    for t, cell in res["model"]["by_type"].items():
        base = res["baseline"]["by_type"].get(t, {})
        mra = f"{cell['mra']:.1f}" if "mra" in cell else "-"
        bmra = f"{base['mra']:.1f}" if "mra" in base else "-"
        lines.append(f"| {t} | {cell['n']} | {cell['em']:.1f} | {base.get('em', 0):.1f} | {mra} | {bmra} |")
    return "\n".join(lines)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def main(run_dirs):
    """Print the results table of RUN_DIRS (each with eval_test.json)."""
    from loc3r.cli import run_cli_command

    def body():
        click.echo(results_table([Path(d) for d in run_dirs]))
        click.echo("")
        click.echo(type_table(Path(run_dirs[0])))

    run_cli_command(body, False)


if __name__ == "__main__":
    main()
