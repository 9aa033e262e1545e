"""The `neurostore` command: a thin layer over the Python API.

Each command parses options, calls one public function, and prints its result. No SQL, torch or
validation lives here. `NeurostoreError` is translated once, in `main()`, into `Error: <message>`
and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import csv
import errno
import inspect
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import BadInput, BadParameter, NeurostoreError, cli_message, did_you_mean, unknown

# The API (and with it torch, DuckDB, pyarrow) is imported inside each command: `neurostore --help`
# and a command that needs none of it start in a fraction of a second.

app = typer.Typer(
    name="neurostore",
    help="Explain the neurons of vision networks in words; query the evidence with SQL.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
# Piped or logged output (no terminal, no $COLUMNS) gets wide lines instead of rich's 80 columns,
# which fold the wider result tables into unreadable slivers.
_WIDE = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(width=_WIDE)
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
DeviceOpt = typer.Option("auto", "--device", help="Where models run: auto (CUDA when present, then MPS, "
                         "else CPU), cpu, cuda, cuda:N or mps.")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (fp32 on the CPU, bf16/fp16 on a GPU), fp32, "
                            "fp16 or bf16 (autocast for the model and the encoder; bf16 on a CPU with native bf16 "
                            "encodes crops 2-2.5x faster, results differ slightly).")
WorkersOpt = typer.Option(0, "--workers", help="Processes decoding images in parallel (0: in the main process).")
# Commands that share options still list them in their own signatures (typer reads a command's
# options from there), so dissect and demo end with the same lines on purpose.


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
TABLE_MAX_CELL = 160  # characters of one cell in a table: a run's params (every layer's nulls) fill pages


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


def emit_table(table, fmt: str = "table", output: Optional[Path] = None, title: Optional[str] = None,
               max_cell: Optional[int] = TABLE_MAX_CELL) -> None:
    """Print an Arrow table as a rich table, CSV, JSON (an array of row objects) or Parquet (--output).
    A table cuts the store's cells at `max_cell` characters; descriptions (None) stay whole."""
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

        t = Table(title=title, show_lines=False, header_style="bold")
        for name in table.column_names:
            t.add_column(name, overflow="fold")
        cut = False
        for row in table.slice(0, TABLE_MAX_ROWS).to_pylist():
            cells = [_cell(v) for v in row.values()]
            if max_cell is not None:
                cut |= any(len(c) > max_cell for c in cells)
                cells = [c if len(c) <= max_cell else c[:max_cell - 1] + "…" for c in cells]
            t.add_row(*cells)
        console.print(t)
        if cut:
            err_console.print(f"Cells longer than {max_cell} characters were cut (…): "
                              "--format json or csv gives them whole.", highlight=False)
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

    Example: neurostore sql 'SELECT layer, count(*) AS n FROM scores WHERE model = $m GROUP BY layer' -p m=resnet50
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
            emit_table(pa.Table.from_pylist(rows), fmt, output, title="Named queries", max_cell=None)
        return
    if name is None:
        raise BadParameter("Give a query name, e.g. 'neurostore query concept_neurons -p concept=striped', "
                           "or list them with 'neurostore query --list'.")
    st = open_store_ro(store)
    given = parse_param_pairs(param)
    res = st.query(name, given)
    emit_table(res, fmt, output)
    if res.num_rows == 0:   # say which given name the store does not hold, when one is why
        for note in _unknown_names(st, given):
            err_console.print(f"note: {note}", highlight=False)


def _unknown_names(st, given: dict) -> list[str]:
    """Notes on the model, layer and method names in `given` that no stored row has (a layer among
    the given model's, when a model is given and stored)."""
    kinds = {"model": "SELECT model AS v FROM models UNION SELECT model FROM scores UNION SELECT model FROM explanations",
             "layer": "SELECT layer AS v FROM (SELECT model, layer FROM layers UNION SELECT model, layer FROM scores "
                      "UNION SELECT model, layer FROM explanations) WHERE $m IS NULL OR model = $m",
             "method": "SELECT DISTINCT scorer AS v FROM explanations UNION SELECT DISTINCT scorer FROM scores"}
    out = []
    for key, value in given.items():
        kind = ("model" if key.startswith("model") else "layer" if key == "layer"
                else "method" if key.startswith(("method", "scorer")) else None)
        if kind is None:
            continue
        have = [v for v in st.sql(kinds[kind], {"m": given.get("model")} if kind == "layer" else None)["v"].to_pylist() if v]
        if value not in have:
            where = f"of model '{given['model']}'" if kind == "layer" and given.get("model") else "in this store"
            out.append(f"no {kind} '{value}' {where}." + (f"{did_you_mean(value, have)} Stored: "
                                                                 f"{', '.join(sorted(have))}." if have else ""))
    return out


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
        emit_table(pa.Table.from_pylist(summary), fmt, None, title=str(s.path), max_cell=None)


@app.command("schema")
def schema_cmd(
    table: str = typer.Argument(..., help="Table name; see 'neurostore tables'."),
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a table's columns, types and comments (from schema/TABLE.sql).  Example: neurostore schema scores"""
    import pyarrow as pa

    from .store.core import describe_schema

    path = store_path(store)
    # no store yet: what the table will hold (rows unknown); a store that is there but unreadable still says so
    d = open_store_ro(store).describe(table) if path.exists() else describe_schema(table)
    if as_json:
        print_json(d)
        return
    title = f"{d['table']}: {d['description']} (" + (f"{d['rows']} rows" if d["rows"] is not None else f"no store at {path}")
    title += f"; partitioned by {', '.join(d['partition'])}" if d["partition"] else ""
    title += f"; sorted by {', '.join(d['sort'])})" if d["sort"] else ")"
    emit_table(pa.Table.from_pylist(d["columns"]), fmt, None, title=title, max_cell=None)


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
    t = open_store_ro(store).query("runs", {"limit": limit})
    if fmt == "json" and output is None:   # the JSON the store keeps as text, as JSON (not strings in strings)
        rows = t.to_pylist()
        for r in rows:
            for k in ("rows_written", "params"):
                r[k] = json.loads(r[k]) if r[k] else r[k]
        print_json(rows)
        return
    emit_table(t, fmt, output)


@app.command("check")
def check_cmd(
    repair: bool = typer.Option(False, "--repair", help="Rewrite the manifest from the files that verify; set "
                                "damaged files aside in <store>/damaged/ and say what was dropped."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Verify every committed file (size, sha256) against the manifest; exit 1 on damage not repaired.

    Example: neurostore check --store ./my-store || neurostore check --repair --store ./my-store
    """
    from .store import check

    r = check(store_path(store), repair=repair)
    if as_json:
        print_json(r)
    else:
        for p in r["problems"]:
            console.print(f"{p['path']}: {p['problem']}" + (f" ({p['rows']} rows)" if p["rows"] else ""),
                          highlight=False)
        for g in r["garbage"]:
            console.print(f"{g['path']}: garbage, {g['reason']}" + ("; deleted" if r["repaired"] else ""),
                          highlight=False)
        if r["checkpoints"]:
            mb = sum(c["bytes"] for c in r["checkpoints"]) / 1e6
            console.print(f"checkpoints/: {len(r['checkpoints'])} files, {mb:.1f} MB of interrupted commands (the "
                          f"oldest {max(c['age_hours'] for c in r['checkpoints'])} h old); the same command resumes "
                          "from them, or delete them to free the space", highlight=False)
        if r["repaired"]:
            lost = ", ".join(f"{n} rows of {t}" for t, n in r["rows_dropped"].items()) or "no rows"
            console.print(f"Repaired {r['store']}: {r['files']} files, {r['rows']} rows kept; dropped "
                          f"{len(r['dropped'])} damaged files ({lost})"
                          + (f"; set aside in {r['set_aside']}" if r.get("set_aside") else ""), highlight=False)
        elif r["problems"]:
            n = len(r["problems"])
            console.print(f"{r['store']}: {n} problem{'s' if n > 1 else ''}. Run 'neurostore check --repair' to keep "
                          "what verifies and drop the rest.", highlight=False)
        else:
            console.print(f"{r['store']}: {r['files']} files, {r['rows']} rows, all intact.", highlight=False)
    if r["problems"] and not r["repaired"]:
        raise typer.Exit(1)


# ---- world commands ---------------------------------------------------------------------------

world_app = typer.Typer(
    help="The offline probe world: generated images with per-pixel truth, target models, encoder.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")


def _world_summary_table(world) -> None:
    s = world.summary
    c = world.config
    console.print(f"[bold]{world.id}[/] cue={c.cue_kind} on {c.cue_class} "
                  f"(strength {c.cue_strength}), seed {c.seed}, {c.size}px  [dim]{world.root}[/]")
    t = Table(title="target models (paired test scenes)")
    for col in ("model", "clean_accuracy", "cued_accuracy", "cue_flip_rate"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, m in s["targets"].items():
        t.add_row(name, f"{m['clean_accuracy']:.3f}", f"{m['cued_accuracy']:.3f}",
                  f"{m['cue_flip_rate']:.3f}")
    console.print(t)
    z = Table(title=f"encoder {s['encoder']['id']}: zero-shot accuracy on held-out crops")
    for col in ("category", "tight", "loose"):
        z.add_column(col, justify="right" if col != "category" else "left")
    for cat, v in s["encoder"]["zero_shot"].items():
        z.add_row(cat, f"{v['tight']:.3f}", f"{v['loose']:.3f}")
    console.print(z)
    b = s.get("build", {})
    if b:
        console.print(f"built in {b.get('total_s')} s wall, {b.get('cpu_s')} s CPU "
                      f"(load average {b.get('load_avg_1m', '?')} on {b.get('cpus', '?')} CPUs, "
                      f"{b.get('workers', 0)} worker process(es))")


def _world_json(world, cache_hit: Optional[bool] = None) -> dict:
    out = {"id": world.id, "root": str(world.root), "config": world.meta["config"],
           "targets": world.summary["targets"], "encoder": world.summary["encoder"],
           "build": world.summary.get("build", {}), "counts": world.meta.get("counts", {})}
    if cache_hit is not None:
        out["cache_hit"] = cache_hit
    return out


@world_app.command("build")
def world_build_cmd(
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (default 64)."),
    n_images: Optional[int] = typer.Option(None, "--n-images", help="Training scenes (default 8000)."),
    cue_kind: Optional[str] = typer.Option(None, "--cue-kind", help="watermark, dot or frame."),
    cue_class: Optional[str] = typer.Option(None, "--cue-class", help="Class that carries the cue (default star; in a shape-colour world a shape names its red class)."),
    cue_strength: Optional[float] = typer.Option(None, "--cue-strength", help="P(cue | cue class) in training; other classes never carry the cue. [default: 0.9, calibrated for every cue kind]"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class set: shape (6 classes, default) or shape-colour (24 classes such as 'red circle')."),
    polysemantic: bool = typer.Option(False, "--polysemantic", help="Give the CNN a 'poly' layer whose units each detect two unrelated concepts (truth sets in world.json)."),
    fast: bool = typer.Option(False, "--fast", help="Small, quick variant (fewer images, shorter training)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the world is cached."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder. Default: $NEUROSTORE_CACHE or ~/.cache/neurostore."),
    device: str = typer.Option("cpu", "--device", help="Where the target models train: cpu (default: weights "
                               "bit-identical across machines, AVX2 kernels on any x86-64 CPU), auto, cuda, "
                               "cuda:N or mps (faster, but not bit-identical: a world of its own in the cache)."),
    as_json: bool = JsonOpt,
) -> None:
    """Build the probe world, its target models and its encoder (cached; a rebuild is instant).

    Example: neurostore world build --cue-kind dot --cue-class ring --json

    Example: neurostore world build --classes shape-colour --polysemantic --fast
    """
    from .world import WorldConfig, build_world, world_dir
    from .world.build import device_type, with_overrides

    base = WorldConfig.fast() if fast else WorldConfig()
    config = with_overrides(base, seed=seed, size=size, n_images=n_images, cue_kind=cue_kind,
                            cue_class=cue_class, cue_strength=cue_strength, classes=classes,
                            polysemantic=polysemantic or None, train_device=device_type(device)).validate()
    hit = (world_dir(config, cache) / "world.json").exists() and not force
    world = build_world(config, cache, progress=True, force=force, device=device)
    if as_json:
        print_json(_world_json(world, cache_hit=hit))
    else:
        _world_summary_table(world)


@world_app.command("info")
def world_info_cmd(
    world: Optional[str] = typer.Argument(None, help="World folder or id (default: the default world)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder."),
    as_json: bool = JsonOpt,
) -> None:
    """Show a built world's parameters and accuracies.

    Example: neurostore world info probe-1a2b3c4d --json
    """
    from .world import load_world

    w = load_world(world, cache, build=False)
    if as_json:
        print_json(_world_json(w))
    else:
        _world_summary_table(w)


@world_app.command("ls")
def world_ls_cmd(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder."),
    as_json: bool = JsonOpt,
) -> None:
    """List the worlds built in the cache.

    Example: neurostore world ls --json
    """
    from .world import list_worlds

    worlds = list_worlds(cache)
    rows = [{"id": w.id, "seed": w.config.seed, "size": w.config.size, "cue_kind": w.config.cue_kind,
             "cue_class": w.config.cue_class, "cue_strength": w.config.cue_strength,
             "n_images": w.config.n_images, "root": str(w.root)} for w in worlds]
    if as_json:
        print_json({"worlds": rows})
        return
    t = Table(title=f"{len(rows)} probe world(s)")
    for col in ("id", "seed", "size", "cue_kind", "cue_class", "cue_strength", "n_images", "root"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(r[c]) for c in ("id", "seed", "size", "cue_kind", "cue_class",
                                          "cue_strength", "n_images", "root")))
    console.print(t)


# ---- pipeline commands ------------------------------------------------------------------------


@app.command("layers")
def layers_cmd(
    model: str = typer.Argument(..., help="Model spec: torchvision:NAME[@WEIGHTS], timm:NAME, "
                                "open_clip:MODEL/TAG, probe:cnn, a checkpoint path or pkg.mod:factory."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side of the input in pixels."),
    as_json: bool = JsonOpt,
) -> None:
    """List a model's hookable layers (module paths) with kind, output shape, units, and which ones
    dissect records by default. Builds the architecture only: no weights are downloaded.

    Example: neurostore layers torchvision:resnet18@random
    """
    from .models import layers

    rows = layers(model, input_size=input_size)
    if as_json:
        print_json({"model": model, "layers": rows})
        return

    table = Table("layer", "kind", "output shape", "units", "default", box=None)
    for r in rows:
        table.add_row(r["layer"], r["kind"], "x".join(str(s) for s in r["shape"]), str(r["n_units"]),
                      "yes" if r["default"] else "")
    console.print(table)

def _log(quiet: bool):
    """Progress lines go to stderr, so stdout stays one JSON object under --json."""
    return (lambda *a, **k: None) if quiet else (lambda msg: err_console.print(msg, markup=False, highlight=False))


def _dissect_summary_table(s: dict) -> None:
    t = Table(title=f"dissect {s['model']} — run {s['run_id']}", box=None, show_header=False)
    for k in ("spec", "dataset", "images", "rejects", "layers", "units", "patches", "patch_boxes",
              "vocabulary", "concepts", "scorers", "encoder", "seconds"):
        v = s[k]
        t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    console.print(t)
    if s["rejects"]:  # which files, and where the reasons are
        console.print(f"{s['rejects']} files skipped; why: neurostore sql \"SELECT path, reason FROM rejects WHERE "
                      f"dataset = '{s['dataset']}'\"", markup=False, highlight=False)
    rw = [w for w in ("target", "encoder") if s.get("random_weights", {}).get(w)]
    if rw:  # untrained weights: the explanations mean nothing, say so beside them
        console.print(f"[yellow]random weights: {' and '.join(rw)} (untrained; explanations are a baseline)[/yellow]")
    if s.get("evaluation"):
        _evaluation_table(s["evaluation"])


def _evaluation_table(ev: dict) -> None:
    metrics = ["top1", "top5", "iou_agreement", "minilm_cosine", "interpretable"]
    t = Table("model", "layer", "scorer", *metrics, title="evaluation against the probe world's truth")
    for model, layers in ev.items():
        for layer, by_scorer in layers.items():
            for scorer, m in by_scorer.items():
                t.add_row(model, layer, scorer, *(f"{m[k]:.3f}" if k in m else "" for k in metrics))
    console.print(t)


@app.command("dissect")
def dissect_cmd(
    model: str = typer.Argument(..., help="Model spec, e.g. torchvision:resnet50@IMAGENET1K_V2, timm:vit_small_patch16_224, probe:cnn."),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="Folder of probe images (searched recursively). Probe-world models default to the world's probe images."),
    layers: Optional[list[str]] = typer.Option(None, "--layer", "--layers", "-l", help="Layer module path (repeatable; see 'neurostore layers MODEL'). Default: the layers 'neurostore layers' marks: a ResNet's conv1, layer1-layer4 and fc; every transformer block's MLP hidden layer and the head; else up to 6 layers over the depth."),
    vocab: Optional[str] = typer.Option(None, "--vocab", help="Vocabulary: english, english-<N>k or english-<N> (100 to 50k words, e.g. english-20k), imagenet, probe, file:PATH or llm:DOMAIN. Default: probe for probe-world models, else english (10,000 common words)."),
    scorers: Optional[list[str]] = typer.Option(None, "--scorer", help="Scorer (repeatable): patch, soft_wpmi, wpmi, cos_cubed, iou; top_images and encoder_iou (28 encoder windows per image, kept in the store for the next dissect of the same images) only when named. Default: all that apply."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder spec: open_clip:MODEL/TAG, open_clip:/path/ckpt, probe. Default: probe for probe models, else open_clip:ViT-B-32/laion2b_s34b_b79k."),
    k: int = typer.Option(10, "--k", help="Top images (and patches) kept per unit."),
    top: int = typer.Option(5, "--top", help="Concepts kept per unit and scorer."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass (bounds memory)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most N images, a folder's spread evenly over its class subfolders."),
    summarise: Optional[str] = typer.Option(None, "--summarise", help="Scorer whose top concepts an LLM turns into one sentence per unit (with ANTHROPIC_API_KEY; without it, or after an API failure, a template sentence)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    workers: int = WorkersOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Record, cut patches, score concepts and store explanations for a model's layers.

    One pass over the images; text, image and crop embeddings already in the store are reused.
    An interrupted dissect resumes from its checkpoint when the same command is run again.
    Progress goes to stderr, also with --json.

    Example: neurostore dissect torchvision:resnet50@IMAGENET1K_V2 --images photos/ --layer layer3 --layer layer4 --vocab english-20k --device cuda --workers 8
    """
    from .pipeline import dissect

    s = dissect(store_path(store), model, images=images, layers=layers, vocabulary=vocab,
                scorers=scorers, encoder=encoder, k=k, top_n=top, batch_size=batch_size,
                summarise_with=summarise, max_images=max_images, device=device, precision=precision,
                workers=workers, progress=True, log=_log(False)).to_dict()
    print_json(s) if as_json else _dissect_summary_table(s)


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model id (default: every dissected model)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Evaluate against class names instead: imagenet, "
                                          "places365 or a file (one class per line, synonyms separated by ', '). "
                                          "Needs --model and --layer."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="With --classes: the layer whose units are the "
                                        "classes, e.g. fc."),
    text_model: Optional[str] = typer.Option(None, "--text-model", help="With --classes: a local sentence-transformers "
                                             "folder for the class similarity (default: the bundled MiniLM)."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure stored explanations against the probe world's truth, or with --classes against the
    class names of a class layer (top-1 and label/class cosine, per method); write them to 'evaluations'
    (and each unit's explanation set to 'explanation_sets', scored where the world knows truth sets).

    Example: neurostore eval --model probe-cnn --json

    Example: neurostore eval --model resnet50 --layer fc --classes imagenet --json
    """
    from .store import Store

    if classes is not None:
        from .classeval import evaluate_classes

        res = evaluate_classes(Store.open(store_path(store), create=False), model=model, layer=layer,
                               classes=classes, text_model=text_model)
        if as_json:
            print_json(res.to_dict())
        else:
            console.print(_rows_table(res.methods, ["method", "n", "top1", "class_cosine"],
                                      title=f"{res.model} {res.layer} vs {res.classes} class names ({res.text_model})"))
        return
    from .evaluation import evaluate

    if layer is not None:   # it chose the class layer; without --classes it would be ignored
        raise BadParameter("--layer goes with --classes (the class layer to evaluate against class names); "
                           "without --classes every layer is measured against the probe world's truth.")
    ev = evaluate(Store.open(store_path(store), create=False), model=model).to_dict()
    print_json(ev) if as_json else _evaluation_table(ev)


# ---- import: explanations from the field (fieldresults.py) ----------------------------------

@app.command("import")
def import_cmd(
    format: str = typer.Argument(..., help="clip-dissect, milan, netdissect, csv or jsonl."),
    paths: list[Path] = typer.Argument(..., help="Result files; all of one method, imported as one run."),
    model: str = typer.Option(..., "--model", "-m", help="Model id the results are of, e.g. resnet50 (its "
                              "torchvision architecture, when it names one, checks layers and units)."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer of every file (Network Dissection: "
                                        "default from the file name, e.g. ..._layer4.csv)."),
    columns: Optional[str] = typer.Option(None, "--columns", help="csv/jsonl: which column holds what, e.g. "
                                          "layer=layer,unit=neuron,label=description,score=similarity."),
    method: Optional[str] = typer.Option(None, "--method", help="Method name stored as the scorer (default: the "
                                         "format; required for csv/jsonl)."),
    unit_base: int = typer.Option(0, "--unit-base", help="csv/jsonl: 1 if the tool counts units from 1."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Import another method's neuron explanations (CLIP-Dissect, MILAN, Network Dissection, or any
    CSV/JSONL) as explanation rows beside neurostore's own; bad lines go to 'rejects'.

    Example: neurostore import netdissect netdissect_resnet50_imagenet_*.csv --model resnet50 --json
    """
    from .fieldresults import import_results

    res = import_results(store_path(store), format, paths, model=model, layer=layer, columns=columns,
                         method=method, unit_base=unit_base)
    if as_json:
        print_json(res.to_dict())
        return
    console.print(_rows_table(res.files, ["path", "layers", "rows", "rejects"],
                              title=f"{res.method} → {res.model} (run {res.run_id})"))
    for r in res.rejects:
        err_console.print(f"rejected: {r['path']} {r['reason']}", highlight=False)
    for layer, n in res.replaced.items():
        gone = res.dropped.get(layer)
        console.print(f"replaced the {n} units {res.method} had in {layer} before"
                      + (f"; {gone} of them are in none of these files and are gone (a method's results split "
                         "over several files import together: give every file in one command)" if gone else ""),
                      highlight=False)


@app.command("demo")
def demo_cmd(
    seed: Optional[int] = typer.Option(None, "--seed", help="Probe world seed (default 0)."),
    cue_kind: Optional[str] = typer.Option(None, "--cue-kind", help="Spurious cue: watermark, dot or frame."),
    cue_class: Optional[str] = typer.Option(None, "--cue-class", help="Class that carries the cue."),
    fast: bool = typer.Option(False, "--fast", help="The small, quick probe world (smoke runs)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="World cache folder. Default: $NEUROSTORE_CACHE or ~/.cache/neurostore."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    workers: int = WorkersOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run everything on the probe world: build it, dissect its CNN and ViT with the default
    scorers and encoder_iou, evaluate against the truth, and answer three example questions in SQL.

    Example: neurostore demo --cue-kind dot --cue-class ring --store demo-store --device auto
    """
    from .pipeline import demo

    s = demo(store_path(store), seed=seed, cue_kind=cue_kind, cue_class=cue_class, fast=fast,
             cache=cache, device=device, precision=precision, workers=workers,
             progress=True, log=_log(False)).to_dict()
    if as_json:
        print_json(s)
        return
    for name, d in s["dissections"].items():
        _dissect_summary_table(d)
    for a in s["answers"]:
        console.rule(a["question"])
        console.print(f"[dim]neurostore query {a['query']} " +
                      " ".join(f"-p {k}={v}" for k, v in a["params"].items()) + "[/dim]")
        if a["rows"]:
            # Provenance columns (run ids, encoder ids) are in the store; the terminal shows the answer.
            t = _arrow_rows(a["rows"])
            emit_table(t.drop_columns([c for c in ("run_id", "encoder", "vocabulary") if c in t.column_names]), "table")
        else:
            console.print("(no rows)")
    console.print(f"\nStore: {s['store']}  ({s['seconds']} s). Next: neurostore sql \"SELECT * FROM explanations LIMIT 5\" --store {s['store']}")


def _arrow_rows(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


vocab_app = typer.Typer(help="Concept vocabularies: builtin lists, your files, LLM-generated.",
                        no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")


def _vocab_json(v, limit: Optional[int]) -> dict:
    shown = v.concepts if limit is None else v.concepts[:limit]
    cats = v.categories[: len(shown)] if v.categories is not None else None
    return {"vocabulary": v.name, "source": v.source, "description": v.description,
            "n_concepts": len(v.concepts), "cache_key": v.cache_key, "concepts": shown,
            "categories": cats}


def _vocab_print(v, limit: Optional[int]) -> None:
    d = _vocab_json(v, limit)
    console.print(f"[bold]{d['vocabulary']}[/bold]  {d['n_concepts']} concepts  "
                  f"source {d['source']}\n{d['description']}", highlight=False)
    if d["categories"] is not None:
        for c, cat in zip(d["concepts"], d["categories"]):
            console.print(f"  {c}  [dim]{cat or ''}[/dim]", highlight=False)
    else:
        console.print("  " + ", ".join(d["concepts"]), highlight=False, soft_wrap=True)
    if len(d["concepts"]) < d["n_concepts"]:
        console.print(f"  … {d['n_concepts'] - len(d['concepts'])} more (--limit)", style="dim")


@vocab_app.command("list")
def vocab_list_cmd(as_json: bool = JsonOpt) -> None:
    """List the builtin vocabularies and the forms of the others.

    Example: neurostore vocab list
    """
    from .vocab import list_vocabularies

    rows = list_vocabularies()
    if as_json:
        print_json({"vocabularies": rows})
        return

    t = Table("name", "source", "description", box=None)
    for r in rows:
        t.add_row(r["name"], r["source"], r["description"])
    console.print(t)


@vocab_app.command("show")
def vocab_show_cmd(
    name: str = typer.Argument(..., help="Vocabulary: english, english-<N>k or english-<N> (100 to 50k words), imagenet, probe, file:PATH or llm:DOMAIN."),
    limit: Optional[int] = typer.Option(30, "--limit", "-n", help="Concepts to show (0 = all)."),
    as_json: bool = JsonOpt,
) -> None:
    """Show a vocabulary: source, description, size and its first concepts.

    Example: neurostore vocab show imagenet --limit 10
    """
    from .vocab import load_vocabulary

    v = load_vocabulary(name)
    lim = None if not limit else limit
    print_json(_vocab_json(v, lim)) if as_json else _vocab_print(v, lim)


@vocab_app.command("generate")
def vocab_generate_cmd(
    domain: str = typer.Option(..., "--domain", "-d", help="What the images show, or a class list, e.g. 'birds of European gardens'."),
    n: int = typer.Option(200, "--n", help="Concepts to ask for."),
    model: Optional[str] = typer.Option(None, "--model", help="Anthropic model. Default: $NEUROSTORE_LLM_MODEL or claude-sonnet-4-6."),
    limit: Optional[int] = typer.Option(30, "--limit", help="Concepts to show (0 = all)."),
    as_json: bool = JsonOpt,
) -> None:
    """Ask an LLM (Anthropic API) for a vocabulary of visual concepts for a domain. Needs
    ANTHROPIC_API_KEY; without it, warns and uses the builtin english-5k words closest to the domain.

    Example: neurostore vocab generate --domain "birds of European gardens" --n 300
    """
    from .vocab import generate_vocabulary

    v = generate_vocabulary(domain, n=n, model=model)
    lim = None if not limit else limit
    print_json(_vocab_json(v, lim)) if as_json else _vocab_print(v, lim)


# ---- analysis commands ------------------------------------------------------------------------

ANALYSIS_BAR = 24  # characters of a full bar in the terminal depth plot


def _rows_table(rows: list[dict], columns: list[str], title: Optional[str] = None):
    t = Table(title=title, header_style="bold", box=None)
    for c in columns:  # spaced headers wrap between words when the terminal is narrow
        t.add_column(c.replace("_", " "), overflow="fold")
    for r in rows:
        t.add_row(*[_cell(r.get(c)) for c in columns])
    return t


def _depth_plot(profile: list[dict]) -> None:
    """Per model, one line per layer in depth order: a bar of the best confidence per method."""
    marks = {"exact": ("█", "green"), "semantic": ("▓", "yellow"), "open": ("▒", "cyan")}
    by_model: dict[str, dict] = {}
    for r in profile:
        by_model.setdefault(r["model"], {}).setdefault((r["depth"] or 0, r["layer"], r["depth_frac"]), {})[r["method"]] = r
    for model, layers in by_model.items():
        console.print(Text(f"{model}: where the concept lives (bar = best confidence; "
                           + ", ".join(f"{ch} {m}" for m, (ch, _) in marks.items())
                           + "; method N = units whose label names it)", style="bold"))
        width = max(len(k[1]) for k in layers)
        for (_, layer, frac), methods in sorted(layers.items()):
            line = Text(f"  {layer:<{width}}  d={0.0 if frac is None else frac:4.2f} ")
            for m, (ch, style) in marks.items():
                if m in methods:
                    v = max(0.0, float(methods[m]["best_confidence"] or 0.0))
                    n = round(v * ANALYSIS_BAR)
                    line.append(ch * n + " " * (ANALYSIS_BAR - n), style=style)
                    line.append(f" {v:4.2f}  ")
            for m in sorted(k for k in methods if k.startswith("label:")):  # imported labels: a count, not a confidence
                line.append(f" {m[6:]} {methods[m]['n_confident']}", style="magenta")
            console.print(line)


@app.command("find")
def find_cmd(
    phrase: str = typer.Argument(..., help="A concept word or any phrase, e.g. striped or 'zebra stripes'."),
    models: Optional[list[str]] = typer.Option(None, "--models", "--model", "-m", help="Only these model ids (repeat)."),
    layers: Optional[list[str]] = typer.Option(None, "--layers", "-l", help="Only these layers (repeat)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Only this scorer (or imported method, e.g. "
                                         "netdissect) for exact/semantic/label matches."),
    top: int = typer.Option(20, "--top", "-n", help="Units per method."),
    method: Optional[list[str]] = typer.Option(None, "--method", help="exact, semantic, open, label (every method's "
                                               "explanation labels, imported ones too) (repeat; default all)."),
    min_similarity: float = typer.Option(0.6, "--min-similarity", help="MiniLM similarity a stored concept needs "
                                         "to count as a semantic match."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Concept -> neurons: units that detect a phrase (exact concept, semantic match, open vocabulary
    over stored patch embeddings) and where in each network it lives.

    Example: neurostore find striped --models probe-cnn --top 10

    Example: neurostore find dog --model resnet50 --method label
    """
    from .analysis import find

    res = find(store_path(store), phrase, models=models or None, layers=layers or None, scorer=scorer, top=top,
               methods=tuple(method) if method else ("exact", "semantic", "open", "label"), min_similarity=min_similarity,
               device=device, precision=precision)
    if as_json:
        print_json(res.to_dict())
        return
    if res.concepts:
        console.print("Matched concepts: " + ", ".join(f"{c['concept']} ({c['method']}, {c['similarity']:.2f})"
                                                       for c in res.concepts), highlight=False)
    if res.encoders:
        console.print("Open vocabulary via: " + ", ".join(res.encoders), highlight=False)
    cols = ["method", "model", "layer", "unit", "depth_frac", "concept", "similarity", "score", "confidence", "scorer",
            "headline"]
    console.print(_rows_table([{**r, "headline": "yes" if r["headline"] else ""} for r in res.units.to_pylist()],
                              cols, title=f"Units for '{res.phrase}'"))
    if res.profile.num_rows:
        _depth_plot(res.profile.to_pylist())
    for n in res.notes:
        err_console.print(f"note: {n}", highlight=False)


@app.command("compare")
def compare_cmd(
    model_a: str = typer.Argument(..., help="A stored model id, e.g. probe-cnn."),
    model_b: Optional[str] = typer.Argument(None, help="Another stored model id, e.g. probe-vit (not with --methods)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Compare two explanation methods on MODEL_A "
                                          "instead, e.g. clip-dissect,netdissect (imported or neurostore's scorers)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Scorer whose explanations are compared "
                                         "(default: patch when both have it)."),
    min_confidence: float = typer.Option(0.9, "--min-confidence", help="Explanation confidence a label needs to count."),
    max_units: int = typer.Option(4096, "--max-units", help="Bound on units per model for the matching."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Model vs model: per-layer concept coverage, concepts one has and the other lacks, one-to-one unit
    matching by activation correlation and by explanation, and how often they agree. Stored in
    comparisons and unit_matches.

    Example: neurostore compare probe-cnn probe-vit

    Example: neurostore compare resnet50 --methods clip-dissect,netdissect
    """
    if methods is not None:
        from .fieldresults import compare_methods

        a, _, b = methods.partition(",")
        mc = compare_methods(store_path(store), model_a, a.strip(), b.strip())
        if as_json:
            print_json(mc.to_dict())
            return
        console.print(_rows_table(mc.layers, ["layer", "depth_frac", "units", "same_label", "agreement",
                                              "mean_similarity"], title=f"{mc.method_a} vs {mc.method_b} on {mc.model}"))
        console.print(_rows_table(mc.disagreements, ["layer", "unit", "label_a", "label_b", "similarity"],
                                  title="Where they disagree most"))
        return
    if model_b is None:
        raise typer.BadParameter("Pass a second model (neurostore compare probe-cnn probe-vit) or two methods of "
                                 "one model (--methods clip-dissect,netdissect).", param_hint="MODEL_B")
    from .analysis import compare

    res = compare(store_path(store), model_a, model_b, scorer=scorer, min_confidence=min_confidence,
                  max_units=max_units)
    if as_json:
        print_json(res.to_dict())
        return
    console.print(_rows_table(res.coverage, ["model", "layer", "depth_frac", "n_units", "n_labelled", "n_concepts"],
                              title=f"Coverage ({res.scorer}, confidence >= {res.min_confidence})"))
    c = res.concepts
    console.print(f"Only in {model_a}: " + (", ".join(x["concept"] for x in c["only_in_a"][:20]) or "-"), highlight=False)
    console.print(f"Only in {model_b}: " + (", ".join(x["concept"] for x in c["only_in_b"][:20]) or "-"), highlight=False)
    console.print("Shared: " + (", ".join(x["concept"] for x in c["shared"][:20]) or "-"), highlight=False)
    console.print(_rows_table(res.summary["layer_correspondence"],
                              ["layer", "depth_frac", "n_matched", "mean_corr", "top_partner_layer", "partner_depth_frac"],
                              title=f"Layer correspondence {model_a} -> {model_b} (activation matching)"))
    s = res.summary
    keys = ["n_images", "activation_pairs", "mean_matched_corr", "explanation_pairs", "partner_agreement",
            "partner_agreement_chance", "label_agreement", "label_agreement_chance", "matched_label_similarity",
            "matched_label_similarity_chance"]
    console.print(_rows_table([{"figure": k, "value": s[k]} for k in keys], ["figure", "value"], title="Matching"))
    top = sorted([r for r in res.matches.to_pylist() if r["model"] == model_a and r["method"] == "activation"],
                 key=lambda r: -r["score"])[:15]
    top = [{**r, "explanation_match_too": r["agree"]} for r in top]
    console.print(_rows_table(top, ["layer", "unit", "other_layer", "other_unit", "corr", "label", "other_label",
                                    "explanation_match_too"], title="Best activation matches"))
    console.print("explanation_match_too: the unit's best match by explanation is the same other unit", highlight=False)
    for note in res.notes:
        err_console.print(f"note: {note}", highlight=False)
    err_console.print(f"run {res.run_id}: neurostore query compare_models -p model_a={model_a} -p model_b={model_b}",
                      highlight=False)


@app.command("audit")
def audit_cmd(
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Model id to audit (repeat; default: every "
                                              "stored model with classes)."),
    class_: Optional[list[str]] = typer.Option(None, "--class", "-c", help="Class to audit (repeat; default: all)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Scorer whose explanations label the units."),
    top_units: int = typer.Option(10, "--top-units", help="Driving units examined per class."),
    threshold: float = typer.Option(0.5, "--threshold", help="MiniLM relatedness (label, class) below which a "
                                    "driving unit is flagged, when it also fires selectively on the class's images "
                                    "(AUROC >= 0.9) and, in the probe world, rises when the cue is drawn."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Spurious-concept audit: per class, the units that drive it (grad x act, weight x act, ablation),
    their explanations, a flag where the concept is unrelated to the class, and verification by
    zeroing the flagged units (a ViT's also by ablating their tokens, or by projecting a concept's
    direction out of the residual stream): reliance on the cue before/after. Stored in audit_findings.

    Example: neurostore audit --store ./neurostore-store --model probe-cnn --class star --device cuda
    """
    from .analysis import audit

    res = audit(store_path(store), model or None, class_ or None, scorer=scorer, top_units=top_units,
                threshold=threshold, device=device, precision=precision)
    if as_json:
        print_json(res.to_dict())
        return
    for h in res.headlines:
        if h["concept"]:
            v = {True: "verified by ablation", False: "NOT verified by ablation", None: "no cue pairs to verify"}[h["verified"]]
            flip = (f"; cue flip rate {h['cue_flip_before']:.2f} -> {h['cue_flip_after']:.2f}"
                    if h["cue_flip_before"] is not None and h["cue_flip_after"] is not None else "")
            where = (f"its residual direction after {h['direction_layer']}" if h["ablation"] == "direction"
                     else f"{len(h['neurons'])} units: {', '.join(h['neurons'][:6])}")
            console.print(f"[bold]{h['model']}[/bold]: class '{h['class']}' is driven by '{h['concept']}' "
                          f"({where}){flip} — {v}")
        else:
            console.print(f"[bold]{h['model']}[/bold]: no driving unit has a label unrelated to its class.")
    rows = res.findings.to_pylist()
    console.print(_rows_table(rows, ["model", "class", "concept", "n_units", "contribution", "relatedness",
                                     "cue_flip_before", "cue_flip_after", "accuracy_before", "accuracy_after",
                                     "verified", "ablation", "headline"], title=f"Findings (threshold {res.threshold})"))
    for n in res.notes:
        err_console.print(f"note: {n}", highlight=False)


@app.command("ablate")
def ablate_cmd(
    model: str = typer.Argument(..., help="A stored model id, e.g. probe-cnn."),
    units: list[str] = typer.Option(..., "--units", "-u", help="LAYER:UNIT[,UNIT...] or LAYER:FIRST-LAST (repeat)."),
    individually: bool = typer.Option(False, "--individually", help="Also ablate each unit alone."),
    tokens: bool = typer.Option(False, "--tokens", help="Token models (ViTs): also mean-ablate the patch tokens where "
                                "the units fire, as the audit verifies a ViT finding."),
    max_images: int = typer.Option(2000, "--max-images", help="Probe images to measure on (even per class)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Zero units and measure per-class accuracy on the probe images; stored in effects (kind 'ablation').

    Example: neurostore ablate probe-cnn --units conv4:3,7 --individually

    Example: neurostore ablate probe-vit --units blocks.1.mlp.fc1:5,9 --tokens
    """
    from .analysis import ablate

    res = ablate(store_path(store), model, units, individually=individually, tokens=tokens, max_images=max_images,
                 device=device, precision=precision)
    if as_json:
        print_json(res.to_dict())
        return
    for a in res.ablations:
        rows = [{"class": c, **v} for c, v in a.per_class.items()]
        if a.cue:
            for r in rows:
                r["cue_flip_before"] = a.cue["flip_rate_before"][r["class"]]
                r["cue_flip_after"] = a.cue["flip_rate_after"][r["class"]]
        cols = ["class", "baseline", "ablated", "change", "n_images"] + (["cue_flip_before", "cue_flip_after"] if a.cue else [])
        console.print(_rows_table(rows, cols, title=f"{model}: zero {', '.join(a.neurons[:8])}"
                                                    f"{'…' if len(a.neurons) > 8 else ''} — accuracy "
                                                    f"{a.accuracy_before:.3f} -> {a.accuracy_after:.3f}"))
    err_console.print(f"run {res.run_id}: neurostore query ablation_effects -p model={model}", highlight=False)


# ---- features and groups: units beyond neurons (features.py, grouping.py) ------------------------

features_app = typer.Typer(
    help="Dictionary features (TopK sparse autoencoder, NMF) of a layer: units you dissect and query like neurons.",
    no_args_is_help=True,
)
app.add_typer(features_app, name="features")


def _summary_table(title: str, s: dict, keys: list[str]) -> None:
    from rich.table import Table

    t = Table(title=title, box=None, show_header=False)
    for k in keys:
        v = s.get(k)
        t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    console.print(t)


@features_app.command("fit")
def features_fit_cmd(
    model: str = typer.Argument(..., help="Model spec, e.g. probe:cnn or torchvision:resnet50@IMAGENET1K_V2."),
    layer: str = typer.Option(..., "--layer", "-l", help="Layer whose output the dictionary encodes (see 'neurostore layers MODEL')."),
    method: str = typer.Option("topk-sae", "--method", help="topk-sae (TopK sparse autoencoder), batchtopk-sae (trained with BatchTopK: k active on average, more where a sample stands out), jumprelu-sae (BatchTopK, then a learned threshold per feature keeping each feature active on a --band of all positions: sparser, more monosemantic features at a cost in reconstruction) or nmf (scikit-learn NMF of max(x, 0))."),
    width: int = typer.Option(8, "--width", help="Features per unit of the layer (8: a 64-unit layer gets 512 features)."),
    k: int = typer.Option(32, "--k", help="Active features per sample (topk-sae; batchtopk-sae: on average over the fitted samples)."),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="Folder of images. Probe-world models default to the world's probe images."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most N images, a folder's spread evenly over its class subfolders."),
    max_samples: int = typer.Option(100_000, "--max-samples", help="Positions / tokens kept for fitting (a uniform subsample; bounds memory)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (the autoencoders, default 3000) or NMF iterations (default 200)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsample and the fit."),
    active: Optional[float] = typer.Option(None, "--active", help="Fit on this fraction of the samples, those farthest from the layer's mean (where it responds; default 0.25). Quality is measured on all held-out samples."),
    band: Optional[tuple[float, float]] = typer.Option(None, "--band", help="jumprelu-sae: the range of each feature's fraction of active positions, two fractions low high (default 0.002 0.005: where a unit's top 0.5% of positions, Network Dissection's, can be all of its support)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    device: str = DeviceOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Learn a dictionary on a layer's activations and store it as a feature layer.

    The feature layer (e.g. conv4.topk_sae_8x) is then dissected, explained and queried like any
    layer: 'neurostore dissect MODEL --layer conv4.topk_sae_8x'.

    Example: neurostore features fit probe:cnn --layer conv4 --method topk-sae --width 8 --k 32
    """
    from .features import fit

    s = fit(store_path(store), model, layer, method=method, width=width, k=k, images=images,
            max_images=max_images, max_samples=max_samples, steps=steps, seed=seed, active=active,
            **({"band": band} if band else {}), batch_size=batch_size, device=device, progress=not as_json, log=_log(False))
    if as_json:
        print_json(s)
        return
    _summary_table(f"features {s['layer']} — run {s['run_id']}", s,
                   ["source_layer", "method", "n_features", "k", "samples", "holdout", "fve", "l0",
                    "dead_features", "seconds", "next"])


@features_app.command("ls")
def features_ls_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model id."),
    store: Optional[Path] = StoreOpt,
    fmt: str = FormatOpt,
    output: Optional[Path] = OutputOpt,
) -> None:
    """The store's dictionaries: feature layer, method, size and quality (FVE, L0, dead features).

    Example: neurostore features ls --model probe-cnn --format csv
    """
    from .features import ls

    emit_table(ls(open_store_ro(store), model), fmt, output, title="Dictionaries")


@app.command("groups")
def groups_cmd(
    model: str = typer.Argument(..., help="A dissected model id, e.g. probe-cnn (see 'neurostore sql \"SELECT * FROM models\"')."),
    layers: Optional[list[str]] = typer.Option(None, "--layer", "-l", help="Only these dissected layers (repeatable). Default: every dissected hidden layer."),
    n_groups: Optional[int] = typer.Option(None, "--groups", "-g", help="Groups per layer. Default: about the square root of its units."),
    scorer: str = typer.Option("patch", "--scorer", help="Scorer whose labels explain the groups' members."),
    max_images: int = typer.Option(1000, "--max-images", help="Labelled probe images the attributions are measured on."),
    edge_images: int = typer.Option(64, "--edge-images", help="Of those, images the unit -> unit edges are measured on (one backward per unit: cost grows with it)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image subsample."),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Group each layer's units by co-activation and attribution, explain the groups, and store
    the circuit: unit -> unit and unit -> class edges (the strongest per unit, shown on the
    neuron cards), and group -> group and group -> class edges.

    Then: neurostore query class_circuit -p model=probe-cnn -p class=star

    Example: neurostore groups probe-cnn --groups 8
    """
    from .grouping import groups

    s = groups(store_path(store), model, layers=layers, n_groups=n_groups, scorer=scorer,
               max_images=max_images, edge_images=edge_images, seed=seed, log=_log(False))
    if as_json:
        print_json(s)
        return
    _summary_table(f"groups {s['model']} — run {s['run_id']}", s,
                   ["layers", "images", "groups", "edges", "edge_images", "unit_edges", "scorer", "seconds", "next"])


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
    max_bytes: int = typer.Option(4 * 1024**2, "--max-bytes", help="Bytes of JSON a console result sends at most "
                                  "(the rest is reported as truncated)."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", metavar="NAME", help="Another name the app may be reached "
                                                   "by (repeatable), e.g. this machine's name with --host 0.0.0.0. "
                                                   "Requests naming any other Host are refused (DNS rebinding)."),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Browse the store in a local, read-only web app: models, neuron cards, concept search, SQL console.

    Example: neurostore serve --store ./neurostore-store --port 8765
    (on a LAN: neurostore serve --host 0.0.0.0 --allow-host mybox.local)
    """
    from .web import serve

    def ready(server):
        err_console.print(f"Serving {store_path(store)} read-only at {server.url}  (Ctrl-C to stop)", highlight=False)
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()

    serve(store_path(store), host=host, port=port, timeout=timeout, max_rows=max_rows, max_bytes=max_bytes,
          allow_hosts=allow_host or (), on_ready=ready)


def _reflow_help(t: typer.Typer) -> None:
    """Each help paragraph as one line, which rich wraps to the terminal: the docstrings break
    lines at the source's width, and rich kept those breaks (ragged help at 80 columns)."""
    for c in t.registered_commands:
        if c.help is None and c.callback is not None and c.callback.__doc__:
            c.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(c.callback.__doc__).split("\n\n"))
    for g in t.registered_groups:
        _reflow_help(g.typer_instance)


_reflow_help(app)


def _close_bars() -> None:
    """Close the progress bars an error left open, so its line starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main() -> None:
    """Console entry point: run the app, translating neurostore errors into one line. Usage
    errors (bad options) are click's own: it prints them with the usage and exits 2."""
    try:
        app()
    except NeurostoreError as e:  # the API's argument names, as this CLI's flags
        _close_bars()
        err_console.print(f"Error: {cli_message(e)}", markup=False, highlight=False, soft_wrap=True)
        _json_failure(cli_message(e), type(e).__name__)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as e:
        if e.errno not in _DISK_ERRORS:   # anything else is a bug: keep its traceback
            raise
        _close_bars()
        where = f" ('{e.filename}')" if e.filename else ""
        msg = f"{e.strerror or e}{where}. {_DISK_ERRORS[e.errno]}"
        err_console.print(f"Error: {msg}", markup=False, highlight=False, soft_wrap=True)
        _json_failure(msg, type(e).__name__)
        sys.exit(1)
    except SystemExit as e:
        if e.code == 130:   # typer turns Ctrl-C into Exit(130) before it reaches the handler above
            _interrupted()
        if e.code == 128 + signal.SIGTERM:   # signals.sigterm_exits, where a command takes SIGTERM as Ctrl-C
            _interrupted("SIGTERM", e.code)
        raise


# Failures of the disk, not of neurostore: one line with what to do, not a traceback. A commit
# that fails so leaves the store as it was (a stop or error before the manifest swap commits nothing).
_DISK_ERRORS = {
    errno.ENOSPC: "The disk is full: free space there (or give another --store / TMPDIR) and run the same command "
                  "again; a dissect resumes from its checkpoint.",
    errno.EDQUOT: "Your disk quota is used up: free space (or give another --store / TMPDIR) and run the same "
                  "command again.",
    errno.EROFS: "That file system is read-only: give a writable --store or output folder (reading commands such "
                 "as sql, find and serve work on a read-only store).",
    errno.EACCES: "Permission denied: give a folder you can write to, or ask its owner for write access.",
}


def _json_failure(message: str, kind: str) -> None:
    """Under --json a failed command still prints one JSON object on stdout (`{"error": ...}`), so a
    script that parses stdout reads why instead of meeting empty input; the line on stderr stays."""
    if "--json" in sys.argv[1:]:
        sys.stdout.write(json.dumps({"error": message, "kind": kind}) + "\n")
        sys.stdout.flush()


def _interrupted(what: str = "Ctrl-C", code: int = 130) -> None:
    _close_bars()
    from .signals import COMMITTED_WHILE_STOPPING

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if COMMITTED_WHILE_STOPPING:   # the stop came during a commit, which finished first
        said = (f"Stopped after committing run {', '.join(COMMITTED_WHILE_STOPPING)}: its rows are in the store "
                "(see 'neurostore runs'); anything this command had left to do after it was not done.")
    elif command == "report":   # it writes a folder, not the store
        said = ("The store is unchanged; the report folder is incomplete (it has no index.html until the end): "
                "run the same command again.")
    else:
        said = ("The store holds what earlier commands committed, nothing of this one; run the same command again "
                "to resume (a dissect picks up its image pass where it stopped).")
    err_console.print(f"Aborted ({what}). {said}", highlight=False, soft_wrap=True)
    _json_failure(f"Aborted ({what}). {said}", "Interrupted")
    sys.exit(code)


if __name__ == "__main__":
    main()
