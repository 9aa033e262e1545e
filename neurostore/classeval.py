"""Explanations of a class layer measured against the class names.

When a layer's units are a model's classes (ResNet-50's `fc`: unit i is ImageNet class i), a good
explanation of unit i names class i. For every method with explanations of that layer (imported
ones such as `netdissect` and `milan`, and neurostore's own scorers) this computes, as the
CLIP-Dissect paper does:

top1            share of units whose label equals the class name or one of its synonyms, both
                sides normalised alike (`fieldresults.normalise_label`)
class_cosine    mean cosine similarity between each unit's label and its class name (the class's
                whole line, synonyms included, as the papers embed it) in a sentence-transformers
                space: the bundled MiniLM, or any local model folder (`text_model`); the papers
                report it in all-mpnet-base-v2

    from neurostore.classeval import evaluate_classes
    res = evaluate_classes("store/", model="resnet50", layer="fc", classes="imagenet")

Class lists: `imagenet` (ImageNet-1k in logit order, synonyms separated by ", "), `places365`
(the Places365 categories), or a file: one class per line with ", " between synonyms, or the
Places365 categories format (`/a/airfield 0`). Results go to `evaluations` (metrics `class_top1`
and `class_cosine:<text model>`, dataset = the class list), replacing an earlier evaluation of
the same model, layer, class list and text model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput, BadParameter, UnknownLayer, unknown
from .fieldresults import normalise_label, schema_table
from .store import Store

DATA = Path(__file__).resolve().parent / "data"
BUILTIN = {"imagenet": DATA / "imagenet_labels.txt", "places365": DATA / "places365_categories.txt"}
PLACES_LINE = re.compile(r"/[a-z]/(\S+)\s+(\d+)")


@dataclass
class ClassEvalResult:
    """What `evaluate_classes` returned: per method, top-1 against the class names and the mean
    label/class cosine; to_dict() is `neurostore eval --classes ... --json`."""
    model: str
    layer: str
    classes: str                      # 'imagenet', 'places365' or the file's path
    text_model: str                   # the embedding space of class_cosine
    methods: list[dict]               # method, n, top1, class_cosine
    run_id: str

    def to_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "classes": self.classes, "text_model": self.text_model,
                "methods": self.methods, "run_id": self.run_id}


def load_classes(classes: str | Path) -> tuple[str, list[list[str]]]:
    """(id, [synonyms per class, in unit order]) for a built-in name or a file (module doc)."""
    path = BUILTIN.get(str(classes)) or Path(classes)
    if not path.is_file():
        raise BadInput(f"--classes '{classes}': not a built-in class list ({', '.join(BUILTIN)}) and no such file. "
                       "Pass imagenet, places365 or a file with one class per line.")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a UTF-8 text file; pass one class name per line.") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise BadInput(f"{path}: no class names in the file.")
    places = [PLACES_LINE.fullmatch(ln) for ln in lines]
    if all(places):
        index = {int(m.group(2)): m.group(1) for m in places}
        if sorted(index) != list(range(len(lines))):
            raise BadInput(f"{path}: the Places365-format indices are not 0..{len(lines) - 1}, each once.")
        # '/a/apartment_building/outdoor 8' -> 'apartment building outdoor'
        out = [[index[i].replace("/", " ").replace("_", " ")] for i in range(len(lines))]
    elif any(places):
        bad = next(i for i, m in enumerate(places) if not m)
        raise BadInput(f"{path} line {bad + 1}: '{lines[bad]}' is not in the Places365 format ('/a/airfield 0') "
                       "of the other lines.")
    else:
        out = [[s.strip() for s in ln.split(", ") if s.strip()] for ln in lines]
    return (str(classes) if str(classes) in BUILTIN else str(path)), out


def _text_model_name(text_model: str | None) -> str:
    if text_model is None:
        return "all-MiniLM-L6-v2"
    return Path(text_model).name or str(text_model)


def evaluate_classes(store: Store | str | Path, model: str | None, layer: str | None, classes: str | Path = "imagenet",
                     text_model: str | None = None) -> ClassEvalResult:
    """top1 and class_cosine per method for a class layer (module doc); writes `evaluations`."""
    if not model or not layer:
        raise BadParameter("Class evaluation needs a model and its class layer, e.g. --model resnet50 --layer fc.")
    st = store if isinstance(store, Store) else Store.open(store, create=False)
    models = st.sql("SELECT DISTINCT model FROM explanations ORDER BY model").column("model").to_pylist()
    if model not in models:
        raise BadParameter(unknown("model with explanations", model, models,
                                   "Import results ('neurostore import') or dissect the model first."))
    layers = st.sql("SELECT DISTINCT layer FROM explanations WHERE model = $m ORDER BY layer", {"m": model}) \
        .column("layer").to_pylist()
    if layer not in layers:
        raise UnknownLayer(unknown(f"layer with explanations of {model}", layer, layers,
                                   "Class evaluation needs the layer whose units are the classes, e.g. fc."))
    class_id, names = load_classes(classes)
    if text_model is not None and not Path(text_model).is_dir():
        raise BadInput(f"--text-model '{text_model}': no such folder. Pass a local sentence-transformers model "
                       "folder (e.g. all-mpnet-base-v2), or leave it out for the bundled MiniLM.")
    # the layer as the store knows it (a dissect or an import with the architecture): its kind and width
    known = st.sql("SELECT any_value(kind) AS kind, max(n_units) AS n FROM layers WHERE model = $m AND layer = $l",
                   {"m": model, "l": layer}).to_pylist()[0]
    if known["kind"] is not None and known["kind"] != "logits":
        raise BadInput(f"{model} {layer} is a {known['kind']} layer, not the class logits: class evaluation needs "
                       "the layer whose units are the classes, e.g. --layer fc.")
    if known["kind"] == "logits" and known["n"] != len(names):
        raise BadInput(f"{model} {layer} has {known['n']} units but the class list '{class_id}' has {len(names)} "
                       "classes: pass the model's own class list (a file, one class per line).")
    rows = st.sql("SELECT scorer, unit, label FROM explanations WHERE model = $m AND layer = $l AND label IS NOT NULL "
                  "ORDER BY scorer, unit", {"m": model, "l": layer}).to_pylist()
    top_unit = max(r["unit"] for r in rows)
    if top_unit >= len(names):
        raise BadInput(f"{model} {layer} has unit {top_unit} but the class list '{class_id}' has {len(names)} "
                       f"classes: are the units of {layer} these classes? Pass the model's own class list.")
    from .textembed import get_text_embedder

    emb = get_text_embedder(text_model or "minilm")
    class_text = [", ".join(syn) for syn in names]
    class_sets = [{normalise_label(s) for s in syn} for syn in names]
    if class_id == "imagenet":
        # neurostore's own 'imagenet' vocabulary names classes as torchvision does, which
        # disambiguates two repeated names ('crane bird', 'maillot tank suit'): they count too.
        from .vocab import imagenet

        for syn, name in zip(class_sets, imagenet().meta["logit_order"]):
            syn.add(normalise_label(name))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["scorer"], []).append(r)
    out, evals = [], []
    metric_cos = f"class_cosine:{_text_model_name(text_model)}"
    for method, rs in sorted(by_method.items()):
        units = np.array([r["unit"] for r in rs])
        top1 = float(np.mean([normalise_label(r["label"]) in class_sets[r["unit"]] for r in rs]))
        L = emb.encode([r["label"] for r in rs])          # [n, dim] unit rows
        C = emb.encode([class_text[u] for u in units])    # [n, dim]
        cos = float(np.einsum("ij,ij->i", L, C).mean())
        out.append({"method": method, "n": len(rs), "top1": top1, "class_cosine": cos})
        for metric, value in (("class_top1", top1), (metric_cos, cos)):
            evals.append({"layer": layer, "scorer": method, "metric": metric, "value": value, "n": len(rs),
                          "dataset": class_id, "model": model})
    params = {"model": model, "layer": layer, "classes": class_id, "text_model": emb.id}
    key = f"classeval:{model}:{layer}:{class_id}:{emb.id}"
    with st.run("eval classes", params, work_key=key) as run:
        run.write("evaluations", schema_table(st, "evaluations", evals), key=key)
    return ClassEvalResult(model, layer, class_id, emb.id, out, run.run_id)
