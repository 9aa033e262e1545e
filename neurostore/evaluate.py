"""Explanations measured against the probe world's truth, written to the evaluations table.

Metrics, per model, layer and scorer:

    top1, top5        final layer only: a logit unit's truth is its class name; is it the top
                      concept (top1) or among the top five (top5)?
    iou_agreement     hidden layers: the fraction of units whose top concept equals the
                      Network Dissection reference label (the `iou` scorer's top concept, from
                      per-pixel masks), over units the reference finds interpretable
                      (IoU >= REFERENCE_MIN_IOU, the threshold Network Dissection uses)
    minilm_cosine     hidden layers: mean MiniLM cosine between the unit's top concept and the
                      reference label over the same units (partial credit for near misses)
    interpretable     hidden layers, scorer `iou`: the fraction of units with IoU >= threshold
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import BadInput
from .store import Store

REFERENCE_MIN_IOU = 0.04


def evaluate(store: Store | str, model: str | None = None, dataset: str | None = None,
             write: bool = True) -> dict:
    """Evaluate the stored explanations of `model` (every dissected model when None) on
    `dataset`; write the figures to `evaluations` in one run and return them nested
    {model: {layer: {scorer: {metric: value}}}}."""
    from .textembed import get_text_embedder

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
    rows, out = [], {}
    embedder = None
    for m in models:
        expl = store.df("""
            SELECT e.layer, e.unit, e.scorer, e.label, e.concepts, l.kind, l.depth
            FROM explanations e JOIN layers l USING (model, layer)
            WHERE e.model = $m""", {"m": m})
        if expl.empty:
            continue
        classes = store.df("SELECT classes FROM models WHERE model = $m", {"m": m})["classes"]
        classes = list(classes.iloc[0]) if len(classes) and classes.iloc[0] is not None else None
        ds = dataset or store.df("SELECT any_value(dataset) AS d FROM activations WHERE model = $m",
                               {"m": m})["d"].iloc[0]
        ref = store.df("""
            SELECT layer, unit, concept AS ref, score AS ref_iou FROM scores
            WHERE model = $m AND scorer = 'iou' AND rank = 0""", {"m": m})
        res_m = out.setdefault(m, {})
        for (layer, scorer), g in expl.groupby(["layer", "scorer"], sort=True):
            res = res_m.setdefault(layer, {}).setdefault(scorer, {})
            if g["kind"].iloc[0] == "logits" and classes:
                truth = [classes[u] if 0 <= u < len(classes) else None for u in g["unit"]]
                res["top1"] = float(np.mean([t == lab for t, lab in zip(truth, g["label"])]))
                res["top5"] = float(np.mean([t in list(cs)[:5] for t, cs in zip(truth, g["concepts"])]))
                n = len(g)
            else:
                r = g.merge(ref[ref["layer"] == layer], on=["layer", "unit"], how="inner")
                good = r[r["ref_iou"] >= REFERENCE_MIN_IOU]
                n = len(good)
                if scorer == "iou":
                    res["interpretable"] = n / len(r) if len(r) else 0.0
                    n = len(r)
                elif n:
                    res["iou_agreement"] = float(np.mean(good["label"].to_numpy() == good["ref"].to_numpy()))
                    embedder = embedder or get_text_embedder()
                    a, b = embedder.encode(good["label"].tolist()), embedder.encode(good["ref"].tolist())
                    res["minilm_cosine"] = float(np.mean(np.sum(a * b, axis=1)))
            for metric, value in res.items():
                rows.append({"layer": layer, "scorer": scorer, "metric": metric, "value": value,
                             "n": int(n), "dataset": ds, "model": m})
    if write and rows:
        # Keyed per (dataset, layer): re-evaluating replaces exactly the figures it recomputes.
        with store.run("eval", {"models": models, "dataset": dataset}) as run:
            for key in dict.fromkeys((r["model"], r["dataset"], r["layer"]) for r in rows):
                mine = [r for r in rows if (r["model"], r["dataset"], r["layer"]) == key]
                run.write("evaluations", pa.Table.from_pylist(mine), key=f"eval:{key[1]}:{key[2]}")
    return out
