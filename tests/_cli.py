"""Run the real CLI entry point in-process, as the tests of several commands do."""

import sys


def run_cli(capsys, monkeypatch, *args):
    """`neurostore ARGS...` through cli.main() (which turns API errors into one 'Error:' line).
    Returns (exit code, stdout, stderr)."""
    from neurostore import cli

    monkeypatch.setattr(sys, "argv", ["neurostore", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
