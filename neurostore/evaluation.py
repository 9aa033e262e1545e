"""Explanations measured against the probe world's truth, written to the evaluations table.

Metrics, per model, layer and scorer:

    top1, top5        final layer only: a logit unit's truth is its class name; is it the top
                      concept (top1) or among the top five (top5)? A combined class ("red
                      circle", the shape-colour world) is named by the combined concept or by
                      both its parts: the top two concepts (top1), both among the top five (top5)
    iou_agreement     hidden layers: the fraction of units whose top concept equals the
                      Network Dissection reference label (the `iou` scorer's top concept, from
                      per-pixel masks), over units the reference finds interpretable
                      (IoU >= REFERENCE_MIN_IOU, the threshold Network Dissection uses)
    minilm_cosine     hidden layers: mean MiniLM cosine between the unit's top concept and the
                      reference label over the same units (partial credit for near misses)
    interpretable     hidden layers, scorer `iou`: the fraction of units with IoU >= threshold
    set_precision,    units whose truth is a SET of concepts (the world's `truth_sets`: the
    set_recall,       polysemantic units), scorers `patch` and `iou`: the explanation set
    set_f1            (`explanation_sets`: a greedy cover of the unit's top patches, or of its top
                      images' masks) against the truth set, mean over units

`evaluate` measures what the store holds and commits a run of its own (`neurostore eval`), with
the explanation sets of every layer that has patches (table `explanation_sets`); a probe-world
dissect measures its own tables with `evaluate_run` and writes the rows in its run (no sets: they
are made from the stored patch and concept vectors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .encoding import cached_vectors
from .errors import BadInput
from .results import EvaluationResult
from .scorers import cover_sets, greedy_cover
from .store import Store
from .world import World, generate

REFERENCE_MIN_IOU = 0.04
REFERENCE_SCORER = "iou"   # Network Dissection's label from the truth's masks is the reference
SET_SCORER = "patch"       # explanation sets cover the top patches, as the patch method reads them
SET_PARAMS = {"temperature": 0.05, "min_gain": 0.25, "max_size": 4}
ACTIVE = 0.8               # a unit's active region in an image: its map >= 80% of the map's range


def evaluate(store: Store | str, model: str | None = None, dataset: str | None = None,
             write: bool = True) -> EvaluationResult:
    """Evaluate the stored explanations of `model` (every dissected model when None) on
    `dataset`; write the figures to `evaluations` in one run (with `write`) and return them
    (`.to_dict()`: {model: {layer: {scorer: {metric: value}}}})."""
    if not isinstance(store, Store):
        store = Store.open(store)
    models = store.df("SELECT DISTINCT model FROM explanations ORDER BY model")["model"].tolist()
    if model is not None:
        if model not in models:
            from .errors import UnknownModel, unknown

            raise UnknownModel(unknown("model", model, models, "Dissect it first with 'neurostore dissect'."))
        models = [model]
    if not models:
        raise BadInput(f"Store '{store.path}' has no explanations to evaluate. Run 'neurostore dissect' or "
                       "'neurostore demo' first.")
    figures, rows, sets = {}, [], []
    for m in models:
        expl = store.df("""
            SELECT e.layer, e.unit, e.scorer, e.label, e.concepts, l.kind
            FROM explanations e JOIN layers l USING (model, layer)
            WHERE e.model = $m""", {"m": m})
        if expl.empty:
            continue
        classes = store.df("SELECT classes FROM models WHERE model = $m", {"m": m})["classes"]
        classes = list(classes.iloc[0]) if len(classes) and classes.iloc[0] is not None else None
        ds = dataset or store.df("SELECT any_value(dataset) AS d FROM activations WHERE model = $m",
                               {"m": m})["d"].iloc[0]
        figures[m], mine = _model_figures(expl, _stored_reference(store, m), classes, m, ds)
        rows += mine
        found = _world(store, m)
        mine_sets = explanation_sets(store, m, world=found[0] if found else None)
        sets.append(mine_sets)
        for (layer, scorer), res in _set_figures(mine_sets, truth_sets(store, m)).items():
            figures[m].setdefault(layer, {}).setdefault(scorer, {}).update(res["figures"])
            rows += [{"layer": layer, "scorer": scorer, "metric": k, "value": v, "n": res["n"],
                      "dataset": ds, "model": m} for k, v in res["figures"].items()]
    if model is not None and not rows:
        raise BadInput(f"{model} has no truth to measure its explanations against here (no probe-world masks, no "
                       "class units it knows). For a classifier's class layer give the class names: neurostore eval "
                       f"--model {model} --layer fc --classes imagenet.")
    result = EvaluationResult(figures, rows)
    if write and rows:
        with store.run("eval", {"models": models, "dataset": dataset, "sets": SET_PARAMS}) as run:
            write_rows(run, rows)
            for t in sets:
                for layer in sorted(set(t.column("layer").to_pylist())):
                    run.write("explanation_sets", t.filter(pc.equal(t["layer"], layer)), key=f"sets:{layer}")
        result.run_id = run.run_id
    return result


def evaluate_run(store: Store, model: str, dataset: str, classes: list[str] | None, explanations: pa.Table,
                 layers: list[dict], scores: pa.Table) -> EvaluationResult:
    """The figures of a dissect before it commits, from its own tables: `explanations` and
    `scores` rows of `model` and its `layers` rows. The reference is the run's own iou labels;
    for layers the run did not score with iou, the store's (as `evaluate` would find them).
    Nothing is written: the dissect writes `.rows` with `write_rows` in its own run."""
    kinds = pd.DataFrame(layers)[["layer", "kind"]]
    expl = explanations.select(["layer", "unit", "scorer", "label", "concepts"]).to_pandas().merge(kinds, on="layer")
    ref = _reference(scores.to_pandas())
    stored = _stored_reference(store, model)
    stored = stored[~stored["layer"].isin(set(ref["layer"]))]
    if len(stored):
        ref = pd.concat([ref, stored], ignore_index=True)
    figures, rows = _model_figures(expl, ref, classes, model, dataset)
    return EvaluationResult({model: figures}, rows)


def explanation_sets(store: Store, model: str, layers: list[str] | None = None, world: World | None = None) -> pa.Table:
    """Every unit's explanation SET, for each layer of `model` with a `patch` explanation ->
    rows of schema/explanation_sets.sql (no run_id). Two kinds, both a `scorers.greedy_cover` of
    the unit's top-k items:
      patch  its top patches, by the patch method (scorers.cover_sets: the stored patch and
             concept vectors of the encoder and vocabulary its `patch` explanation used);
      iou    its top images, where a concept describes an image by the IoU of its mask with the
             unit's active region there (stored map >= ACTIVE of its range, upsampled), relative
             to the image's best concept (Network Dissection's evidence; needs the `world`)."""
    cols = ["unit", "scorer", "concepts", "gains", "coverage", "n_patches", "method", "vocabulary",
            "encoder", "model", "layer"]
    out: dict[str, list] = {c: [] for c in cols}
    method = {"patch": ("greedy cover of the unit's top patches: a concept describes a patch by exp((s - the "
                        "patch's best s) / {temperature}), s = cos minus the concept's mean cos over the layer's "
                        "patches; add while gain >= {min_gain} x coverage, at most {max_size}").format(**SET_PARAMS),
              "iou": ("greedy cover of the unit's top images: a concept describes an image by IoU(mask, map >= "
                      f"{ACTIVE} of its range) / the image's best IoU; add while gain >= {SET_PARAMS['min_gain']} "
                      f"x coverage, at most {SET_PARAMS['max_size']}")}
    src = store.df("""
        SELECT DISTINCT layer, vocabulary, encoder FROM explanations
        WHERE model = $m AND scorer = $s AND encoder IS NOT NULL""", {"m": model, "s": SET_SCORER})
    masks = None
    if world is not None and len(src):  # the masks of the model's top images, read once
        top = set(store.df("SELECT DISTINCT image_id FROM activations WHERE model = $m", {"m": model})["image_id"])
        masks = world.masks().to_pandas()
        masks = masks[masks["image_id"].isin(top)]
    for layer, vocabulary, encoder in src.itertuples(index=False):
        if layers is not None and layer not in layers:
            continue
        acts = store.df("""
            SELECT unit, rank, image_id, patch_id, act_map FROM activations
            WHERE model = $m AND layer = $l AND patch_id IS NOT NULL ORDER BY unit, rank""",
                        {"m": model, "l": layer})
        concepts = store.df("SELECT concept FROM concepts WHERE vocabulary = $v ORDER BY concept",
                            {"v": vocabulary})["concept"].tolist()
        if acts.empty or not concepts:
            continue
        found = {"patch": _patch_sets(store, acts, concepts, encoder)}
        if masks is not None:
            found["iou"] = _mask_sets(masks, acts, concepts)
        for scorer, (units, names, results, sizes) in found.items():
            for u, (chosen, gains, coverage), size in zip(units, results, sizes):
                out["unit"].append(int(u))
                out["scorer"].append(scorer)
                out["concepts"].append([names[c] for c in chosen])
                out["gains"].append(gains)
                out["coverage"].append(coverage)
                out["n_patches"].append(size)
                out["method"].append(method[scorer])
                out["vocabulary"].append(vocabulary)
                out["encoder"].append(encoder if scorer == "patch" else None)
                out["model"].append(model)
                out["layer"].append(layer)
    types = {"unit": pa.int32(), "scorer": pa.string(), "concepts": pa.list_(pa.string()),
             "gains": pa.list_(pa.float32()), "coverage": pa.float32(), "n_patches": pa.int32(),
             "method": pa.string(), "vocabulary": pa.string(), "encoder": pa.string(),
             "model": pa.string(), "layer": pa.string()}
    return pa.table({c: pa.array(out[c], types[c]) for c in cols})


def _patch_sets(store: Store, acts: pd.DataFrame, concepts: list[str], encoder: str):
    """(units, concept names, scorers.cover_sets results, patches per unit) from stored vectors."""
    pvec = cached_vectors(store, encoder, "patch", acts["patch_id"].tolist())
    tvec = cached_vectors(store, encoder, "concept", concepts)
    names = [c for c in concepts if c in tvec]
    if not pvec or not names:
        return [], names, [], []
    ids = sorted(pvec)
    pos = {p: i for i, p in enumerate(ids)}
    groups = [(int(u), [pos[p] for p in g["patch_id"] if p in pos]) for u, g in acts.groupby("unit", sort=True)]
    up = torch.full((len(groups), max(len(g) for _, g in groups)), -1, dtype=torch.long)  # [u, k] into ids
    for j, (_, got) in enumerate(groups):
        up[j, : len(got)] = torch.tensor(got, dtype=torch.long)
    P = torch.from_numpy(np.stack([pvec[p] for p in ids]))       # [P, d]
    T = torch.from_numpy(np.stack([tvec[c] for c in names]))     # [c, d]
    return [u for u, _ in groups], names, cover_sets(P, T, up, **SET_PARAMS), [len(g) for _, g in groups]


def _mask_sets(masks: pd.DataFrame, acts: pd.DataFrame, concepts: list[str]):
    """(units, concept names, greedy_cover results, images per unit) from the world's masks
    (rows of schema/masks.sql)."""
    masks = masks[masks["image_id"].isin(set(acts["image_id"])) & masks["concept"].isin(set(concepts))]
    names = sorted(set(masks["concept"]))
    index = {c: j for j, c in enumerate(names)}
    by_image: dict[str, list] = {}
    for r in masks.itertuples(index=False):
        by_image.setdefault(r.image_id, []).append((index[r.concept], generate.rle_decode(r.rle, r.height, r.width)))
    units, results, sizes = [], [], []
    for u, g in acts.groupby("unit", sort=True):
        rows = []
        for image_id, amap in zip(g["image_id"], g["act_map"]):
            if amap is None or image_id not in by_image:
                continue
            grid = np.array([list(r) for r in amap], np.float32)  # [h, w], 0..100 of the map's range
            m = by_image[image_id][0][1]
            active = np.kron(grid >= 100 * ACTIVE, np.ones((m.shape[0] // grid.shape[0], m.shape[1] // grid.shape[1]), bool))
            iou = np.zeros(len(names), np.float32)
            for j, mask in by_image[image_id]:
                iou[j] = (active & mask).sum() / max(1, (active | mask).sum())
            rows.append(iou / max(iou.max(), 1e-6))
        if rows:
            units.append(int(u))
            results.append(greedy_cover(torch.from_numpy(np.stack(rows)), SET_PARAMS["min_gain"], SET_PARAMS["max_size"]))
            sizes.append(len(rows))
    return units, names, results, sizes


def _world(store: Store, model: str) -> tuple[World, str] | None:
    """(the probe world, target name) a probe-world model was loaded from; None for others."""
    spec = store.df("SELECT any_value(spec) AS s FROM models WHERE model = $m", {"m": model})["s"]
    spec = spec.iloc[0] if len(spec) else None
    if not spec or not spec.startswith("probe:") or "@" not in spec:
        return None
    target, folder = spec[len("probe:"):].split("@", 1)
    return (World(folder), target) if (Path(folder) / "world.json").exists() else None


def truth_sets(store: Store, model: str) -> dict[str, dict[int, list[str]]]:
    """{layer: {unit: [concepts]}} of a probe-world model whose world knows units with a truth
    SET (the polysemantic units); {} for any other model."""
    found = _world(store, model)
    if found is None:
        return {}
    world, target = found
    return {layer: {int(u): list(c) for u, c in units.items()}
            for layer, units in world.truth_sets.get(target, {}).items()}


def _set_figures(sets: pa.Table, truth: dict[str, dict[int, list[str]]]) -> dict:
    """{(layer, scorer): {"figures": {set_precision, set_recall, set_f1}, "n": units}}: each unit's
    set against its truth set, averaged over the layer's units that have one."""
    out = {}
    df = sets.to_pandas()
    for layer, units in truth.items():
        for scorer, g in df[df["layer"] == layer].groupby("scorer"):
            got = {int(u): set(c) for u, c in g[["unit", "concepts"]].itertuples(index=False)}
            p, r, f = [], [], []
            for u, t in units.items():
                s, t = got.get(u, set()), set(t)
                hit = len(s & t)
                p.append(hit / len(s) if s else 0.0)
                r.append(hit / len(t))
                f.append(2 * hit / (len(s) + len(t)))
            out[(layer, scorer)] = {"figures": {"set_precision": float(np.mean(p)), "set_recall": float(np.mean(r)),
                                                "set_f1": float(np.mean(f))}, "n": len(units)}
    return out


def names_class(concepts: list[str], cls: str, top: int) -> bool:
    """Do the first `top` concepts name class `cls`: the class name itself in the first `top`, or,
    for a combined class ("red circle"), both its parts in the first max(top, 2)?"""
    if cls in concepts[:top]:
        return True
    parts = cls.split(" ")
    return len(parts) > 1 and set(parts) <= set(concepts[: max(top, len(parts))])


def write_rows(run, rows: list[dict]) -> None:
    """Stage evaluation rows in `run`, keyed per (dataset, layer): re-evaluating replaces
    exactly the figures it recomputes."""
    for key in dict.fromkeys((r["model"], r["dataset"], r["layer"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["dataset"], r["layer"]) == key]
        run.write("evaluations", pa.Table.from_pylist(mine), key=f"eval:{key[1]}:{key[2]}")


def _reference(scores: pd.DataFrame) -> pd.DataFrame:
    """layer, unit, ref (the reference scorer's top concept), ref_iou (its score)."""
    top = scores[(scores["scorer"] == REFERENCE_SCORER) & (scores["rank"] == 0)]
    return top[["layer", "unit", "concept", "score"]].rename(columns={"concept": "ref", "score": "ref_iou"})


def _stored_reference(store: Store, model: str) -> pd.DataFrame:
    if "scores" not in store.tables():
        return pd.DataFrame(columns=["layer", "unit", "ref", "ref_iou"])
    return store.df("""
        SELECT layer, unit, concept AS ref, score AS ref_iou FROM scores
        WHERE model = $m AND scorer = $s AND rank = 0""", {"m": model, "s": REFERENCE_SCORER})


def _model_figures(expl: pd.DataFrame, ref: pd.DataFrame, classes: list[str] | None, model: str,
                   dataset: str) -> tuple[dict, list[dict]]:
    """One model's figures {layer: {scorer: {metric: value}}} and their `evaluations` rows.
    expl: layer, unit, scorer, label, concepts, kind; ref: layer, unit, ref, ref_iou."""
    from .textembed import get_text_embedder

    rows, out = [], {}
    # units in order whatever the source (the MiniLM batches and float sums see the same order)
    expl = expl.sort_values(["layer", "scorer", "unit"], kind="stable")
    for (layer, scorer), g in expl.groupby(["layer", "scorer"], sort=True):
        res = out.setdefault(layer, {}).setdefault(scorer, {})
        if g["kind"].iloc[0] == "logits" and classes:
            truth = [classes[u] if 0 <= u < len(classes) else None for u in g["unit"]]
            res["top1"] = float(np.mean([t is not None and names_class(list(cs), t, 1)
                                         for t, cs in zip(truth, g["concepts"])]))
            res["top5"] = float(np.mean([t is not None and names_class(list(cs), t, 5)
                                         for t, cs in zip(truth, g["concepts"])]))
            n = len(g)
        else:
            r = g.merge(ref[ref["layer"] == layer], on=["layer", "unit"], how="inner")
            good = r[r["ref_iou"] >= REFERENCE_MIN_IOU]
            n = len(good)
            if scorer == REFERENCE_SCORER:
                res["interpretable"] = n / len(r) if len(r) else 0.0
                n = len(r)
            elif n:
                res["iou_agreement"] = float(np.mean(good["label"].to_numpy() == good["ref"].to_numpy()))
                embedder = get_text_embedder()
                a, b = embedder.encode(good["label"].tolist()), embedder.encode(good["ref"].tolist())
                res["minilm_cosine"] = float(np.mean(np.sum(a * b, axis=1)))
        for metric, value in res.items():
            rows.append({"layer": layer, "scorer": scorer, "metric": metric, "value": value,
                         "n": int(n), "dataset": dataset, "model": model})
    return out, rows
