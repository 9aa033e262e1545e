"""Explanations from the field: import CLIP-Dissect, MILAN and Network Dissection results (or any
tool's CSV/JSONL) as explanation rows beside neurostore's own.

    from neurostore.fieldresults import import_results
    res = import_results("store/", "netdissect", ["netdissect_resnet50_imagenet_layer4.csv"], model="resnet50")

Formats (what each tool distributes; see shared/data/field-results/README.md):

clip-dissect  layer,unit,description,similarity      units 0-based
milan         layer,unit,description                 units 0-based, free text (CSV-quoted when it has commas)
netdissect    unit,category,label,score,<cat>-label,<cat>-truth,<cat>-activation,<cat>-intersect,<cat>-iou...
              one file per layer (the layer comes from --layer or the file name's last '_' part),
              units 1-based, scene labels end in '-s', colours in '-c'
csv, jsonl    any tool: `columns` maps layer, unit, label (and optionally score, category) to the
              file's column names; `unit_base=1` for tools that count from 1

The method name stands where neurostore's scorer name stands (`explanations.scorer`); the raw label
sits beside the normalised one in `explanation_candidates`, with Network Dissection's runner-up
label of every Broden category and its IoU. All files of one call are one run, recorded with each
file's path, SHA-256 and format, so nothing half-imported is ever visible; re-importing a method
replaces its earlier rows for the layers it covers, other methods stay. A bad line is skipped and
recorded in `rejects`; a file that is mostly bad (another format, another model) fails as a whole
with one line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .classnames import normalise
from .errors import BadInput, BadParameter, UnknownLayer, UnknownModel, UnknownScorer, listed, unknown
from .store import Store

FORMATS = ("clip-dissect", "milan", "netdissect", "csv", "jsonl")
# Columns each fixed format's header must have.
HEADERS = {"clip-dissect": ("layer", "unit", "description", "similarity"),
           "milan": ("layer", "unit", "description"),
           "netdissect": ("unit", "category", "label", "score")}
BRODEN = ("color", "object", "part", "material", "scene", "texture")
VOCABULARY = {"clip-dissect": "clip-dissect:20k", "netdissect": "broden"}
COLUMN_KEYS = ("layer", "unit", "label", "score", "category")
MODEL_ID = re.compile(r"[a-z0-9][a-z0-9_.-]*")
METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_.:+-]*")
MAX_BAD_FRACTION = 0.5  # a file with more bad lines than this is the wrong file, not a file with bad lines


@dataclass
class ImportResult:
    """What `import_results` wrote: the files read (with hashes), rows per table, rejected lines
    and the units of earlier imports it replaced; to_dict() is `neurostore import --json`."""
    format: str
    method: str
    model: str
    run_id: str
    files: list[dict]                       # path, sha256, layers, lines, rows, rejects
    rows: dict[str, int]                    # rows written per table
    rejects: list[dict] = field(default_factory=list)  # path, reason (first 20)
    replaced: dict[str, int] = field(default_factory=dict)  # layer -> this method's earlier units there, now replaced
    dropped: dict[str, int] = field(default_factory=dict)   # layer -> of those, units these files do not describe

    def to_dict(self) -> dict:
        return {"format": self.format, "method": self.method, "model": self.model, "run_id": self.run_id,
                "files": self.files, "rows": self.rows, "rejects": self.rejects, "replaced": self.replaced,
                "dropped": self.dropped}


def normalise_label(text: str | None, format: str | None = None) -> str:
    """The form labels are compared in: lowercase, no surrounding quotes, '_' and '-' as spaces,
    no trailing full stop, single spaces. Network Dissection's '-s' (scene) and '-c' (colour)
    suffixes are dropped first. Class names go through the same function (classeval)."""
    s = (text or "").strip()
    if format == "netdissect" and re.search(r"-[sc]$", s):
        s = s[:-2]
    return normalise(s.strip().strip("\"'").strip()).rstrip(".").strip()


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """'layer=Layer,unit=neuron,label=desc' -> {'layer': 'Layer', ...} (keys checked)."""
    if spec is None or isinstance(spec, dict):
        out = dict(spec or {})
    else:
        out = {}
        for part in [p for p in spec.split(",") if p.strip()]:
            k, sep, v = part.partition("=")
            if not sep or not k.strip() or not v.strip():
                raise BadParameter(f"--columns: '{part}' is not KEY=COLUMN. Example: "
                                   "--columns layer=layer,unit=neuron,label=description,score=similarity")
            out[k.strip()] = v.strip()
    bad = [k for k in out if k not in COLUMN_KEYS]
    if bad:
        raise BadParameter(f"--columns: unknown key '{bad[0]}'. Valid keys: {', '.join(COLUMN_KEYS)}.")
    return out


# ---- reading one file into records ----------------------------------------------------------

@dataclass
class _Record:
    line: int
    layer: str | None
    unit: int
    candidates: list[dict]   # category, label_raw, score, truth_px, active_px, intersect_px; [0] is the chosen one


class _Bad(Exception):
    """One bad line (recorded as a reject unless most of the file is bad)."""


def _text_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise BadInput(f"{path}: no such file. Pass the path of a result file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not a UTF-8 text file (byte {e.start}); pass the CSV/JSONL the tool wrote.") from None
    if not text.strip():
        raise BadInput(f"{path}: the file is empty.")
    return text.splitlines(keepends=True)  # csv needs the line ends inside quoted fields


def _int(v, what: str) -> int:
    try:
        f = float(str(v).strip())
    except (TypeError, ValueError):
        raise _Bad(f"{what} '{v}' is not a number") from None
    if f != int(f):
        raise _Bad(f"{what} '{v}' is not an integer")
    return int(f)


def _float(v, what: str) -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        return float(str(v).strip())
    except ValueError:
        raise _Bad(f"{what} '{v}' is not a number") from None


def _csv_rows(path: Path, lines: list[str], need: Sequence[str], fmt: str):
    """(line number, dict) per data line; the header must name every column in `need`."""
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise BadInput(f"{path} line 1: unreadable CSV header ({e}).") from None
    missing = [c for c in need if c not in header]
    if fmt in ("clip-dissect", "milan") and not missing and len(header) != len(need):
        like = _sniff(header)
        raise BadInput(f"{path} line 1: a {fmt} file has the columns {', '.join(need)}, this one has "
                       f"{', '.join(header[:8])}{', …' if len(header) > 8 else ''}"
                       f"{f'; it looks like a {like} file' if like else ''}.")
    if missing:
        like = _sniff(header)
        raise BadInput(f"{path} line 1: the header has no '{missing[0]}' column (it has: {', '.join(header[:8])}"
                       f"{', …' if len(header) > 8 else ''}); "
                       + (f"it looks like a {like} file." if like else f"is this a {fmt} file?"))
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            vals = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((reader.line_num, _Bad(f"unreadable CSV ({e})")))
            continue
        line = reader.line_num  # the last physical line of the record (a quoted field may span lines)
        if not vals or not any(v.strip() for v in vals):
            continue
        # A quoted field may span lines ("Dogs,\nin grass"); one that holds whole records is a quote
        # never closed, and every line it swallowed is lost: each is a reject of its own.
        if line > start and any(len(part.split(",")) >= len(header) for v in vals for part in v.split("\n")[1:]):
            rows += [(n, _Bad(f"inside a quote opened on line {start} and not closed until line {line}"))
                     for n in range(start, line + 1)]
            continue
        if len(vals) != len(header):
            rows.append((line, _Bad(f"{len(vals)} fields, the header has {len(header)}")))
            continue
        rows.append((line, dict(zip(header, vals))))
    return header, rows


def _sniff(header: list[str]) -> str | None:
    """The fixed format whose header this is, if any."""
    for fmt, cols in HEADERS.items():
        if header == list(cols) or (fmt == "netdissect" and header[:4] == list(cols)):
            return fmt
    return None


def _jsonl_rows(path: Path, lines: list[str]):
    rows = []
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append((i, _Bad(f"not JSON ({e.msg})")))
            continue
        rows.append((i, obj if isinstance(obj, dict) else _Bad("not a JSON object")))
    return rows


def _netdissect_candidates(row: dict, header: list[str]) -> list[dict]:
    """The chosen label first, then the best label of every other category by IoU."""
    chosen = {"category": row["category"].strip() or None, "label_raw": row["label"],
              "score": _float(row["score"], "score")}
    others = []
    for cat in [h[:-len("-label")] for h in header if h.endswith("-label")]:
        raw = row.get(f"{cat}-label", "")
        if not raw.strip():
            continue  # the category had no label for this unit
        cand = {"category": cat, "label_raw": raw, "score": _float(row.get(f"{cat}-iou"), f"{cat}-iou"),
                "truth_px": _int(row[f"{cat}-truth"], f"{cat}-truth") if row.get(f"{cat}-truth") else None,
                "active_px": _int(row[f"{cat}-activation"], f"{cat}-activation") if row.get(f"{cat}-activation") else None,
                "intersect_px": _int(row[f"{cat}-intersect"], f"{cat}-intersect") if row.get(f"{cat}-intersect") else None}
        if cat == chosen["category"] and raw == chosen["label_raw"]:
            chosen.update({k: v for k, v in cand.items() if k != "score"})
        else:
            others.append(cand)
    others.sort(key=lambda c: -(c["score"] if c["score"] is not None else -1.0))
    return [chosen] + others


def _read(path: Path, fmt: str, layer: str | None, columns: dict[str, str], unit_base: int) -> list:
    """[(line, _Record | _Bad)] for one file; file-level problems raise BadInput."""
    lines = _text_lines(path)
    if fmt == "jsonl":
        rows, header = _jsonl_rows(path, lines), None
    else:
        need = HEADERS.get(fmt) or tuple(v for k, v in columns.items() if k in ("unit", "label")) + \
            ((columns["layer"],) if "layer" in columns and layer is None else ())
        header, rows = _csv_rows(path, lines, need, fmt)
    if fmt in ("clip-dissect", "milan"):
        columns = {"layer": "layer", "unit": "unit", "label": "description"} | (
            {"score": "similarity"} if fmt == "clip-dissect" else {})
    out = []
    for line, row in rows:
        if isinstance(row, _Bad):
            out.append((line, row))
            continue
        try:
            if fmt == "netdissect":
                rec = _Record(line, layer, _int(row["unit"], "unit") - 1, _netdissect_candidates(row, header))
            else:
                missing = [c for c in (columns["unit"], columns["label"]) if c not in row]
                if missing:
                    raise _Bad(f"no '{missing[0]}' field")
                lay = layer if layer is not None or "layer" not in columns else str(row.get(columns["layer"], "")).strip()
                cand = {"category": (str(row.get(columns["category"]) or "").strip() or None) if "category" in columns else None,
                        "label_raw": row[columns["label"]] if row[columns["label"]] is None else str(row[columns["label"]]),
                        "score": _float(row.get(columns["score"]), columns["score"]) if "score" in columns else None}
                rec = _Record(line, lay, _int(row[columns["unit"]], "unit") - unit_base, [cand])
            if not rec.layer:
                raise _Bad("no layer")
            if rec.unit < 0:
                raise _Bad(f"unit {rec.unit + (1 if fmt == 'netdissect' else unit_base)} is below the first unit "
                           f"({1 if fmt == 'netdissect' else unit_base})")
            if not normalise_label(rec.candidates[0]["label_raw"], fmt):
                raise _Bad("empty label")
            out.append((line, rec))
        except _Bad as e:
            out.append((line, e))
    return out


# ---- the model's layers ---------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _architecture(spec: str, model: str):
    """(target, {layer: units}) of an architecture; built once per process (a dummy forward pass)."""
    from .models import list_layers, load_target

    target = load_target(spec, id=model)
    return target, {li.layer: li.n_units for li in list_layers(target)}


class _Layers:
    """Layers and unit counts of the model: from its torchvision architecture (random weights,
    nothing downloaded) when the model id names one or `spec` is given; else, for a model the
    store holds from a dissect, its stored layers (`dissected`: {layer: units}); else from the data."""

    def __init__(self, model: str, spec: str | None, dissected: dict[str, int] | None = None):
        self.target = None
        self.spec = spec
        self.units: dict[str, int] | None = None
        self.name = model
        if spec is None:
            import torchvision

            if model in torchvision.models.list_models():
                self.spec = f"torchvision:{model}@random"
        if self.spec is not None:
            self.target, self.units = _architecture(self.spec, model)
            self.name = self.target.id
        elif dissected:
            self.units = dissected

    def check_layer(self, name: str) -> None:
        if self.units is not None and name not in self.units:
            if self.target is not None:
                from .models import resolve_layer

                resolve_layer(self.target, name)  # raises UnknownLayer with the close matches
                raise UnknownLayer(f"Layer '{name}' of {self.name} has no unit outputs to explain.")
            raise UnknownLayer(unknown(f"dissected layer of {self.name}", name, self.units))

    def problem(self, rec: _Record) -> str | None:
        if self.units is None:
            return None
        if rec.layer not in self.units:
            return f"layer '{rec.layer}' is not a layer of {self.name}"
        if rec.unit >= self.units[rec.layer]:
            return f"unit {rec.unit} is out of range: {self.name} {rec.layer} has {self.units[rec.layer]} units"
        return None

    def rows(self, model: str, layers: list[str], max_unit: dict[str, int]) -> list[dict]:
        if self.target is not None:
            from .models import layers_table_rows

            return layers_table_rows(self.target, layers)
        n = max(len(layers) - 1, 1)  # order of first appearance in the files
        return [{"layer": name, "kind": None, "n_units": max_unit[name] + 1, "grid_h": None, "grid_w": None,
                 "depth": i, "depth_frac": i / n, "model": model} for i, name in enumerate(layers)]


def _dissected_layers(store: Store | str | Path, model: str) -> dict[str, int]:
    """{layer: units} of `model` where the store holds it from a dissect (its spec and layer kinds
    are known); {} for a model only imported, or no store yet."""
    q = ("SELECT l.layer, max(l.n_units) AS n FROM layers l JOIN models m USING (model) WHERE "
         "l.model = $m AND m.spec IS NOT NULL AND l.kind IS NOT NULL GROUP BY l.layer")
    if isinstance(store, Store):
        t = store.sql(q, {"m": model})
    elif (Path(store).expanduser() / "store.json").exists():
        with Store.open(store, read_only=True) as st:   # closed here: the import opens it for writing
            t = st.sql(q, {"m": model})
    else:
        return {}
    return dict(zip(t["layer"].to_pylist(), t["n"].to_pylist()))


def _layer_from_name(path: Path) -> str:
    """netdissect_resnet50_imagenet_layer4.csv -> 'layer4' (the tool writes one file per layer)."""
    return path.stem.rsplit("_", 1)[-1]


def schema_table(st: Store, table: str, rows: list[dict]) -> pa.Table:
    """Rows as an Arrow table with the table's declared types; columns the rows do not set
    (NULL-able, e.g. confidence of an imported label) are NULL."""
    schema = st.schemas[table].arrow_schema()
    names = [n for n in schema.names if n != "run_id"]
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows],
                                schema=pa.schema([schema.field(n) for n in names]))


# ---- the import -----------------------------------------------------------------------------

def import_results(store: Store | str | Path, format: str, paths: Sequence[str | Path], *, model: str,
                   layer: str | None = None, columns: str | dict | None = None, method: str | None = None,
                   unit_base: int = 0, spec: str | None = None) -> ImportResult:
    """Import result files of one method for one model as one run (module doc). Returns what was
    written; raises BadInput/BadParameter/UnknownLayer (nothing written) for a bad file or option."""
    if format not in FORMATS:
        raise BadParameter(unknown("format", format, FORMATS, "Use csv or jsonl with --columns for other tools."))
    paths = listed(paths, "paths") or []
    if not paths:
        raise BadParameter("No files given. Example: neurostore import milan milan-base_resnet50_imagenet.csv --model resnet50")
    if not MODEL_ID.fullmatch(model or ""):
        raise BadParameter(f"--model '{model}' is not a model id: use lowercase letters, digits and '_.-', "
                           "e.g. resnet50.")
    generic = format in ("csv", "jsonl")
    method = method or (None if generic else format)
    if not method:
        raise BadParameter(f"Format '{format}' needs --method NAME (the tool's name, e.g. falcon), "
                           "which stands where the scorer name stands.")
    if not METHOD_NAME.fullmatch(method):
        raise BadParameter(f"--method '{method}': use lowercase letters, digits and '_.:+-'.")
    cols = parse_columns(columns) if generic else {}
    if generic:
        need = [k for k in ("unit", "label") + (() if layer else ("layer",)) if k not in cols]
        if need:
            raise BadParameter(f"--columns must map {', '.join(need)} for format {format} "
                               f"(e.g. --columns layer=layer,unit=neuron,label=description,score=similarity)"
                               + ("; or pass --layer" if "layer" in need else "") + ".")
    elif columns:
        raise BadParameter(f"--columns is for the csv and jsonl formats; {format} files have fixed columns.")
    if unit_base not in (0, 1):
        raise BadParameter(f"--unit-base must be 0 or 1, got {unit_base}.")
    if unit_base and not generic:
        raise BadParameter(f"--unit-base is for the csv and jsonl formats; {format} files number units their own "
                           "way (Network Dissection from 1, the others from 0).")
    paths = [Path(p) for p in paths]
    arch = _Layers(model, spec, _dissected_layers(store, model))
    if layer is not None:
        arch.check_layer(layer)

    records: list[tuple[Path, _Record]] = []
    rejects: list[dict] = []
    files = []
    for path in paths:
        file_layer = layer
        if format == "netdissect" and file_layer is None:
            file_layer = _layer_from_name(path)
            if arch.units is not None and file_layer not in arch.units:
                raise BadInput(f"{path}: Network Dissection files hold one layer; the file name does not end in a "
                               f"layer of {model} ('{file_layer}'). Pass --layer, e.g. --layer layer4.")
        parsed = _read(path, format, file_layer, cols, 1 if format == "netdissect" else unit_base)
        good, bad, seen = [], [], {}
        for line, r in parsed:
            if isinstance(r, _Record):
                why = arch.problem(r)
                if why is None and (r.layer, r.unit) in seen:
                    why = f"unit {r.unit} of {r.layer} again (first on line {seen[(r.layer, r.unit)]})"
                if why is None:
                    seen[(r.layer, r.unit)] = line
                    good.append(r)
                    continue
                r = _Bad(why)
            bad.append((line, str(r)))
        if not good or len(bad) > MAX_BAD_FRACTION * (len(good) + len(bad)):
            line, why = bad[0] if bad else (1, "no data lines")
            raise BadInput(f"{path} line {line}: {why} ({len(bad)} of {len(good) + len(bad)} lines are bad; "
                           f"is this a {format} file for {model}?). Nothing was imported.")
        files.append({"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "format": format, "layers": sorted({r.layer for r in good}), "rows": len(good),
                      "rejects": len(bad)})
        records += [(path, r) for r in good]
        rejects += [{"dataset": f"import:{method}:{model}", "path": str(path), "reason": f"line {line}: {why}"}
                    for line, why in bad]
    dup = {}
    for path, r in records:  # the same unit in two files of one import
        if (r.layer, r.unit) in dup:
            raise BadInput(f"{path} line {r.line}: {r.layer} unit {r.unit} is also in {dup[(r.layer, r.unit)]}; "
                           "import one file per layer.")
        dup[(r.layer, r.unit)] = f"{path} line {r.line}"

    expl, cands = [], []
    for path, r in records:
        labels = []
        for rank, c in enumerate(r.candidates):
            lab = normalise_label(c["label_raw"], format)
            labels.append(lab)
            cands.append({"unit": r.unit, "method": method, "rank": rank, "category": c.get("category"),
                          "label": lab, "label_raw": c["label_raw"], "score": c.get("score"),
                          "truth_px": c.get("truth_px"), "active_px": c.get("active_px"),
                          "intersect_px": c.get("intersect_px"), "source": path.name, "line": r.line,
                          "model": model, "layer": r.layer})
        expl.append({"unit": r.unit, "scorer": method, "label": labels[0], "confidence": None,
                     "concepts": labels, "confidences": None, "summary": None, "summary_by": None,
                     "vocabulary": VOCABULARY.get(format), "encoder": None, "model": model, "layer": r.layer})
    order = list(dict.fromkeys(r.layer for _, r in records))
    max_unit: dict[str, int] = {}
    for _, r in records:
        max_unit[r.layer] = max(max_unit.get(r.layer, -1), r.unit)

    st = store if isinstance(store, Store) else Store.open(store)
    have_layers = set(st.sql("SELECT DISTINCT layer FROM layers WHERE model = $m", {"m": model}).column("layer").to_pylist())
    have_model = st.sql("SELECT count(*) AS n FROM models WHERE model = $m", {"m": model}).column("n")[0].as_py() > 0
    key = f"import:{method}:{model}"
    # a re-import replaces the method's rows of each layer it holds: say how many (a truncated file
    # would otherwise silently take a layer's 1,000 units down to 9)
    earlier = st.sql("SELECT layer, list(unit) AS units FROM explanations WHERE model = $m AND scorer = $s "
                     "AND list_contains($l, layer) GROUP BY layer ORDER BY layer",
                     {"m": model, "s": method, "l": order}).to_pylist()
    replaced = {r["layer"]: len(r["units"]) for r in earlier}
    new_units: dict[str, set[int]] = {}
    for _, r in records:
        new_units.setdefault(r.layer, set()).add(r.unit)
    # units these files do not describe again: a results file split in two and imported in two commands
    dropped = {r["layer"]: n for r in earlier if (n := len(set(r["units"]) - new_units.get(r["layer"], set())))}
    params = {"format": format, "method": method, "model": model, "layer": layer, "columns": cols or None,
              "unit_base": unit_base, "spec": arch.spec, "files": files}
    with st.run("import", params, work_key=key) as run:
        run.write("explanations", schema_table(st, "explanations", expl), key=key)
        run.write("explanation_candidates", schema_table(st, "explanation_candidates", cands), key=key)
        if rejects:
            run.write("rejects", schema_table(st, "rejects", rejects), key=f"{key}:{','.join(sorted(order))}")
        new_layers = [name for name in order if name not in have_layers]
        if new_layers:  # so depth questions work for a model neurostore never dissected
            for row in arch.rows(model, [n for n in order], max_unit):
                if row["layer"] in new_layers:
                    run.write("layers", schema_table(st, "layers", [row]), key=f"layers:{model}:{row['layer']}")
        if not have_model:
            t = arch.target
            run.write("models", schema_table(st, "models", [{
                "model": model, "spec": arch.spec.removesuffix("@random") if arch.spec else None,
                "arch": t.arch if t is not None else None, "n_params": t.n_params if t is not None else None,
                "input_size": t.input_size if t is not None else None,
                "crop_fraction": t.crop_fraction if t is not None else None,
                "random_weights": False}]), key=f"model:{model}")  # published results: trained weights
    rows = {k: v for k, v in run.rows.items()}
    return ImportResult(format, method, model, run.run_id, files, rows,
                        [{"path": r["path"], "reason": r["reason"]} for r in rejects[:20]], replaced, dropped)


# ---- comparing methods on one model ---------------------------------------------------------

@dataclass
class MethodComparison:
    model: str
    method_a: str
    method_b: str
    layers: list[dict]           # per layer: units, same_label, agreement, mean_similarity (query method_agreement)
    disagreements: list[dict]    # the units whose labels are least alike (query method_disagreements)

    def to_dict(self) -> dict:
        return {"model": self.model, "method_a": self.method_a, "method_b": self.method_b, "layers": self.layers,
                "disagreements": self.disagreements}


def compare_methods(store: Store | str | Path, model: str, method_a: str, method_b: str,
                    top: int = 20) -> MethodComparison:
    """Two explanation methods (imported or neurostore's scorers) on one model: per layer how often
    they give the same label and how alike their labels are (MiniLM), and where they disagree most.
    The named queries method_agreement and method_disagreements answer it; this checks the names."""
    if not method_a or not method_b:
        raise BadParameter("Compare two methods, e.g. --methods clip-dissect,netdissect.")
    st = store if isinstance(store, Store) else Store.open(store, read_only=True, create=False)
    models = st.sql("SELECT DISTINCT model FROM explanations ORDER BY model").column("model").to_pylist()
    if model not in models:
        raise UnknownModel(unknown("model with explanations", model, models, "Import or dissect it first."))
    have = st.sql("SELECT DISTINCT scorer FROM explanations WHERE model = $m ORDER BY scorer", {"m": model}) \
        .column("scorer").to_pylist()
    for m in (method_a, method_b):
        if m not in have:
            raise UnknownScorer(unknown(f"method with explanations of {model}", m, have))
    if method_a == method_b:
        raise BadParameter(f"Compare two different methods; got '{method_a}' twice.")
    p = {"model": model, "method_a": method_a, "method_b": method_b}
    layers = st.query("method_agreement", p).to_pylist()
    if not layers:
        raise BadInput(f"{method_a} and {method_b} explain no unit of {model} in common.")
    worst = st.query("method_disagreements", {**p, "top": top}).to_pylist()
    return MethodComparison(model, method_a, method_b, layers, worst)
