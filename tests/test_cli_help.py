"""Every command (and sub-command) explains itself: help text with an example."""

import pytest
import typer
from typer.testing import CliRunner

from neurostore.cli import app


def _commands():
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
        else:
            out.append(path)

    walk(root, [])
    return out


COMMANDS = _commands()


def test_the_expected_commands_exist():
    names = {" ".join(c) for c in COMMANDS}
    for want in ("sql", "query", "tables", "schema", "export", "runs", "layers", "dissect", "eval",
                 "demo", "find", "compare", "audit", "ablate", "report", "serve", "world build",
                 "world info", "world ls", "vocab list", "vocab show", "vocab generate"):
        assert want in names, want


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help_with_an_example(path):
    r = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "Example: neurostore" in text, f"'neurostore {' '.join(path)} --help' has no example"


SUMMARY_COMMANDS = ["demo", "dissect", "eval", "world build", "find", "compare", "audit", "ablate",
                    "report"]


@pytest.mark.parametrize("cmd", SUMMARY_COMMANDS)
def test_summary_commands_take_json(cmd):
    r = CliRunner().invoke(app, [*cmd.split(), "--help"], terminal_width=200)
    assert "--json" in r.output


def test_a_usage_error_is_clicks_message_not_a_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "neurostore.cli", "tables", "--store", str(tmp_path), "extra"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "unexpected extra argument" in r.stderr


def test_help_paragraphs_are_reflowed_to_the_terminal():
    """A docstring's line breaks are the source's, not the terminal's: each help paragraph is one
    line that rich wraps, so `neurostore --help` at 80 columns has no half-empty lines."""
    root = typer.main.get_command(app)
    for path in COMMANDS:
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        assert cmd.help and all("\n" not in p for p in cmd.help.split("\n\n")), path
    out = CliRunner().invoke(app, ["--help"], terminal_width=80).output
    line = next(x for x in out.splitlines() if "which ones" in x)   # the source breaks the line after it
    assert "which ones dissect records" in line, line
