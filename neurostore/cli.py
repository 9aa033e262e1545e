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

QUERY_FORMATS = ("table", "csv", "json", "parquet")
TABLE_MAX_ROWS = 200  # rich output is for reading; csv/json/parquet give every row


def open_store_ro(store: Optional[Path]):
    """The store for a reading command: never creates one."""
    from .store import Store

    return Store.open(store_path(store), read_only=True)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


def emit_table(table, fmt: str = "table", output: Optional[Path] = None, title: Optional[str] = None) -> None:
    """Print an Arrow table as a rich table, CSV, JSON (an array of row objects) or Parquet (--output)."""
    import pyarrow as pa

    from .errors import BadInput, unknown

    if fmt not in QUERY_FORMATS:
        raise BadInput(unknown("format", fmt, QUERY_FORMATS, "Pass --format table, csv, json or parquet."))
    if fmt == "parquet":
        if output is None:
            raise BadInput("--format parquet writes a file: pass --output FILE.parquet.")
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        err_console.print(f"Wrote {table.num_rows} rows to {output}", highlight=False)
        return
    if fmt == "table":
        if output is not None:
            raise BadInput("--output needs --format csv, json or parquet.")
        from rich.table import Table

        t = Table(title=title, show_lines=False, header_style="bold")
        for name in table.column_names:
            t.add_column(name, overflow="fold")
        for row in table.slice(0, TABLE_MAX_ROWS).to_pylist():
            t.add_row(*[_cell(v) for v in row.values()])
        console.print(t)
        more = table.num_rows - TABLE_MAX_ROWS
        if more > 0:
            err_console.print(f"… {more} more rows (use --format csv or json for all)", highlight=False)
        else:
            err_console.print(f"{table.num_rows} rows", highlight=False)
        return
    rows = table.to_pylist()
    if fmt == "json":
        text = json.dumps(rows, default=str) + "\n"
    else:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.column_names)
        for r in rows:
            w.writerow([json.dumps(v, default=str) if isinstance(v, (list, dict)) else ("" if v is None else v)
                        for v in r.values()])
        text = buf.getvalue()
    if output is not None:
        Path(output).write_text(text)
        err_console.print(f"Wrote {len(rows)} rows to {output}", highlight=False)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


ParamOpt = typer.Option(None, "--param", "-p", help="A parameter as key=value; repeat for more.")


@app.command("sql")
def sql_cmd(
    query: str = typer.Argument(..., help="DuckDB SQL over the store's tables, macros and text functions."),
    param: Optional[list[str]] = ParamOpt,
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    output: Optional[Path] = OutputOpt,
) -> None:
    """Run SQL over the store; values passed with --param are bound to $key, never pasted in.

    Example: neurostore sql "SELECT layer, count(*) AS n FROM scores WHERE model = $m GROUP BY layer" -p m=resnet50
    """
    from .queries import parse_sql_params

    emit_table(open_store_ro(store).sql(query, parse_sql_params(param)), fmt, output)


@app.command("query")
def query_cmd(
    name: Optional[str] = typer.Argument(None, help="Named query (a file in queries/); see --list."),
    param: Optional[list[str]] = ParamOpt,
    list_: bool = typer.Option(False, "--list", "-l", help="List the named queries and their parameters."),
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    output: Optional[Path] = OutputOpt,
) -> None:
    """Run a named query with typed, bound parameters.

    Example: neurostore query concept_neurons --param concept=striped --param top=20
    """
    from .errors import BadParameter
    from .queries import list_queries, parse_param_pairs

    if list_:
        import pyarrow as pa

        qs = [q.to_dict() for q in list_queries().values()]
        rows = [{"name": q["name"], "description": q["description"],
                 "params": "; ".join(f"{p['name']} {p['type']}" + ("" if p["required"] else
                                     f" = {'NULL' if p['default'] is None else p['default']}") + f": {p['help']}"
                                     for p in q["params"])} for q in qs]
        if fmt == "json":
            print_json({"queries": qs})
        else:
            emit_table(pa.Table.from_pylist(rows), fmt, output, title="Named queries")
        return
    if name is None:
        raise BadParameter("Give a query name, e.g. 'neurostore query concept_neurons -p concept=striped', "
                           "or list them with 'neurostore query --list'.")
    emit_table(open_store_ro(store).query(name, parse_param_pairs(param)), fmt, output)


@app.command("tables")
def tables_cmd(
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List the store's tables with committed row counts.  Example: neurostore tables --store ./my-store"""
    import pyarrow as pa

    s = open_store_ro(store)
    summary = s.table_summary()
    if as_json:
        print_json({"store": str(s.path), "tables": summary})
    else:
        emit_table(pa.Table.from_pylist(summary), fmt, None, title=str(s.path))


@app.command("schema")
def schema_cmd(
    table: str = typer.Argument(..., help="Table name; see 'neurostore tables'."),
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a table's columns, types and comments (from schema/TABLE.sql).  Example: neurostore schema scores"""
    import pyarrow as pa

    d = open_store_ro(store).describe(table)
    if as_json:
        print_json(d)
        return
    title = f"{d['table']}: {d['description']} ({d['rows']} rows"
    title += f"; partitioned by {', '.join(d['partition'])}" if d["partition"] else ""
    title += f"; sorted by {', '.join(d['sort'])})" if d["sort"] else ")"
    emit_table(pa.Table.from_pylist(d["columns"]), fmt, None, title=title)


@app.command("export")
def export_cmd(
    to: Path = typer.Option(..., "--to", help="Empty folder to write the Parquet files and load.sql into."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in the folder."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write every table as plain Parquet plus a load.sql that recreates the views in any DuckDB.

    Example: neurostore export --store ./my-store --to ./my-export && cd my-export && duckdb -c ".read load.sql"
    """
    out = open_store_ro(store).export(to, overwrite=overwrite)
    if as_json:
        print_json(out)
    else:
        console.print(f"Exported {out['rows']} rows in {out['files']} files to {out['to']} "
                      f"(views: {out['to']}/load.sql)", highlight=False)


@app.command("runs")
def runs_cmd(
    limit: int = typer.Option(20, "--limit", "-n", help="How many runs, newest first."),
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    output: Optional[Path] = OutputOpt,
) -> None:
    """Show recent runs: command, status, rows written, time taken.  Example: neurostore runs -n 5"""
    emit_table(open_store_ro(store).query("runs", {"limit": limit}), fmt, output)


# ---- world commands ---------------------------------------------------------------------------

# ---- pipeline commands ------------------------------------------------------------------------


@app.command("layers")
def layers_cmd(
    model: str = typer.Argument(..., help="Model spec: torchvision:NAME[@WEIGHTS], timm:NAME, "
                                "open_clip:MODEL/TAG, probe:cnn, a checkpoint path or pkg.mod:factory."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side of the input in pixels."),
    as_json: bool = JsonOpt,
) -> None:
    """List a model's hookable layers (module paths) with kind, output shape and units.

    Example: neurostore layers torchvision:resnet18@random
    """
    from .models import layers

    rows = layers(model, input_size=input_size)
    if as_json:
        print_json({"model": model, "layers": rows})
        return
    from rich.table import Table

    table = Table("layer", "kind", "output shape", "units", box=None)
    for r in rows:
        table.add_row(r["layer"], r["kind"], "x".join(str(s) for s in r["shape"]), str(r["n_units"]))
    console.print(table)

# ---- analysis commands ------------------------------------------------------------------------

# ---- report and web commands ------------------------------------------------------------------


@app.command("report")
def report_cmd(
    out: Path = typer.Option(Path("neurostore-report"), "--out", "-o", help="Folder to write the HTML report into."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Only this model; repeat for more."),
    max_units: Optional[int] = typer.Option(None, "--max-units", help="Only the first N units of each layer."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write a static HTML report (models, layers, neuron cards with patches, findings) that works
    opened from disk.

    Example: neurostore report --store ./neurostore-store --out ./neurostore-report
    """
    from .report import build_report

    summary = build_report(store_path(store), out, models=model or None, max_units=max_units, progress=not as_json)
    if as_json:
        print_json(summary)
    else:
        console.print(f"Wrote {summary['pages']} pages ({summary['neurons']} neuron cards, {summary['layers']} layers, "
                      f"{summary['models']} models) and {summary['images']} patch images in {summary['seconds']} s. "
                      f"Open {summary['index']}", highlight=False)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(8765, "--port", "-p", help="Port to listen on (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default is this machine only."),
    timeout: float = typer.Option(5.0, "--timeout", help="Time limit per query, in seconds."),
    max_rows: int = typer.Option(1000, "--max-rows", help="Rows a console query returns at most."),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Browse the store in a local, read-only web app: models, neuron cards, concept search, SQL console.

    Example: neurostore serve --store ./neurostore-store --port 8765
    """
    from .web import serve

    def ready(server):
        err_console.print(f"Serving {store_path(store)} read-only at {server.url}  (Ctrl-C to stop)", highlight=False)
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()

    serve(store_path(store), host=host, port=port, timeout=timeout, max_rows=max_rows, on_ready=ready)


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
