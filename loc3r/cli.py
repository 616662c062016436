"""The ``loc3r`` command group.

Each subcommand lives in the subpackage that owns it and is imported only
when it is invoked, so ``loc3r --help`` is instant and needs no torch. A
command whose optional dependency is missing says what to install instead of
crashing on import.

Every command runs under :func:`run_cli_command`: a :class:`Loc3rError` (bad
input) becomes one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

import click

from loc3r import __version__
from loc3r.errors import Loc3rError

# name -> (module:attribute, one-line help). The help is kept here so that
# listing commands imports none of them.
LAZY_COMMANDS = {
    "export": ("loc3r.export.cli:export", "Convert checkpoints and build model packages (needs loc3r[export])."),
    "profile": ("loc3r.runtime.profile_cli:profile", "Per-stage latency, tokens/s and peak memory on a video."),
    "eval": ("loc3r.synthetic.eval_cli:eval_command", "The paper's localization and QA metrics on a labelled set."),
    "synth": ("loc3r.synthetic.cli:synth", "Generate synthetic rooms, videos and labelled questions."),
    "train": ("loc3r.synthetic.train_cli:train", "Train the loc3r-tiny demo model on synthetic rooms (needs torch)."),
}

# Optional dependency -> what to install, for commands imported lazily.
_EXTRA_FOR_MODULE = {
    "torch": "loc3r[export]",
    "onnx": "loc3r[export]",
    "onnxscript": "loc3r[export]",
    "safetensors": "loc3r[export]",
    "transformers": "loc3r[dev]",
    "triton": "loc3r[dev]",
    "tensorrt": "TensorRT 10 (JetPack on Jetson, or NVIDIA's wheels)",
}


def missing_dependency_message(exc: ModuleNotFoundError, what: str) -> str:
    root = (exc.name or "").split(".")[0]
    extra = _EXTRA_FOR_MODULE.get(root)
    if extra:
        return f"{what} needs the Python package '{root}', which is not installed: pip install '{extra}'"
    return f"{what} needs the Python package '{root}', which is not installed"


def run_cli_command(fn: Callable[[], object], debug: bool) -> None:
    """Run ``fn``; turn user errors into one stderr line and an exit code."""
    try:
        fn()
    except Loc3rError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        if debug:
            raise
        click.echo(f"error: {missing_dependency_message(exc, 'this command')}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use.

    ``lazy_commands`` maps a name to ``("module:attribute", "one-line help")``;
    the help is kept in the table so that listing commands imports nothing.
    """

    lazy_commands: dict[str, tuple[str, str]] = LAZY_COMMANDS

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in self.lazy_commands:
            return cmd
        module_name, attr = self.lazy_commands[name][0].split(":")
        what = f"'{ctx.command_path} {name}'"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("loc3r"):
                raise click.ClickException(f"{what} is not available in this build")
            raise click.ClickException(missing_dependency_message(exc, what))
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Lazy commands from their static help (importing nothing), plus any added eagerly.
        rows = {name: help_ for name, (_, help_) in self.lazy_commands.items()}
        for name in super().list_commands(ctx):
            rows.setdefault(name, super().get_command(ctx, name).get_short_help_str())
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loc3r")
def main() -> None:
    """loc3r: run Loc3R-VLM, a 3D-aware video language model, on the edge.

    Ask questions about a video and localize the speaker from a situation:
    `loc3r-run VIDEO --ask "..."`. The commands below convert checkpoints,
    build model packages, profile, evaluate and make synthetic data.
    """
