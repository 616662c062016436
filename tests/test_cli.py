import subprocess
import sys

import pytest
from click.testing import CliRunner

from loc3r.cli import main, missing_dependency_message, run_cli_command
from loc3r.errors import Loc3rError


def torch_free_help(args: list[str]) -> str:
    """``loc3r ARGS`` in a fresh interpreter: its output, asserting that torch was never imported."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from loc3r.cli import main\n"
        f"r = CliRunner().invoke(main, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.output)\n"
        f"assert 'torch' not in sys.modules, 'loc3r {' '.join(args)} imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_lists_commands_without_importing_torch():
    out = torch_free_help(["--help"])
    for name in ("export", "profile", "eval", "synth"):
        assert name in out


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    assert "loc3r" in r.output


def test_user_error_is_one_line_without_traceback(capsys):
    def boom():
        raise Loc3rError("video not found: x.mp4\n(second line folded)")

    with pytest.raises(SystemExit) as exc:
        run_cli_command(boom, debug=False)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: video not found: x.mp4 (second line folded)\n"


def test_debug_shows_the_exception():
    def boom():
        raise Loc3rError("bad")

    with pytest.raises(Loc3rError):
        run_cli_command(boom, debug=True)


def test_missing_dependency_names_the_extra():
    exc = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert missing_dependency_message(exc, "'loc3r export'") == (
        "'loc3r export' needs the Python package 'torch', which is not installed: pip install 'loc3r[export]'"
    )


def test_export_group_lists_all_subcommands_without_importing_them():
    out = torch_free_help(["export", "--help"])
    for name in ("convert", "onnx", "tensorrt"):
        assert f"  {name} " in out


def test_unknown_subcommand_module_says_not_available(monkeypatch):
    from loc3r import cli

    monkeypatch.setitem(cli.LAZY_COMMANDS, "ghost", ("loc3r.no_such_module:cmd", "a ghost"))
    r = CliRunner().invoke(main, ["ghost"], prog_name="loc3r")
    assert r.exit_code != 0
    assert "Error: 'loc3r ghost' is not available in this build" in r.output
