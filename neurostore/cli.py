"""The `neurostore` command: a thin layer over the Python API.

Each command parses options, calls one public function, and prints its result. No SQL, torch or
validation lives here. `NeurostoreError` is translated once, in `main()`, into `Error: <message>`
and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from .errors import NeurostoreError

app = typer.Typer(
    name="neurostore",
    help="Explain the neurons of vision networks in words; query the evidence with SQL.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# ---- shared options (defined once, reused by every command) ---------------------------------

DEFAULT_STORE = "./neurostore-store"


def default_store() -> Path:
    return Path(os.environ.get("NEUROSTORE_STORE", DEFAULT_STORE))


StoreOpt = typer.Option(
    None, "--store", "-s", help="Store folder. Default: $NEUROSTORE_STORE or ./neurostore-store.",
    show_default=False,
)
JsonOpt = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout.")
FormatOpt = typer.Option("table", "--format", "-f", help="Output format: table, csv, json or parquet.")
OutputOpt = typer.Option(None, "--output", "-o", help="File to write (required for --format parquet).")


def store_path(store: Optional[Path]) -> Path:
    return store if store is not None else default_store()


def print_json(obj: Any) -> None:
    """One JSON object on stdout, nothing else (scripts read it)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def version() -> None:
    """Print neurostore's version.  Example: neurostore version"""
    from . import __version__

    console.print(__version__)


# ---- store and query commands ---------------------------------------------------------------

# ---- world commands ---------------------------------------------------------------------------

# ---- pipeline commands ------------------------------------------------------------------------

# ---- analysis commands ------------------------------------------------------------------------

# ---- report and web commands ------------------------------------------------------------------


def main() -> None:
    """Console entry point: run the app, translating neurostore errors into one line."""
    try:
        app(standalone_mode=False)
    except NeurostoreError as e:
        err_console.print(f"Error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("Aborted.")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
