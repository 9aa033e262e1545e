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

`evaluate` measures what the store holds and commits a run of its own (`neurostore eval`); a
probe-world dissect measures its own tables with `evaluate_run` and writes the rows in its run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import BadInput
from .results import EvaluationResult
from .store import Store

REFERENCE_MIN_IOU = 0.04
REFERENCE_SCORER = "iou"   # Network Dissection's label from the truth's masks is the reference


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
    figures, rows = {}, []
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
    result = EvaluationResult(figures, rows)
    if write and rows:
        with store.run("eval", {"models": models, "dataset": dataset}) as run:
            write_rows(run, rows)
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
            res["top1"] = float(np.mean([t == lab for t, lab in zip(truth, g["label"])]))
            res["top5"] = float(np.mean([t in list(cs)[:5] for t, cs in zip(truth, g["concepts"])]))
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
