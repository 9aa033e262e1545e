"""Explanations: a unit's ranked concepts per scorer, and optionally one sentence by an LLM.

The ranked concepts come straight from the scores rows (schema/scores.sql); an explanation row
(schema/explanations.sql) folds a unit's top concepts for one scorer into lists, so "what does
model/layer/unit see?" is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc


def explanations_table(scores: pa.Table, summaries: dict | None = None) -> pa.Table:
    """scores rows (one scorer or several, any units) -> explanation rows, one per (unit, scorer)
    and the constant columns carried along (model, layer, vocabulary, encoder).

    `summaries` maps (unit, scorer) -> (sentence, by)."""
    summaries = summaries or {}
    df = scores.to_pandas().sort_values(["scorer", "unit", "rank"], kind="stable")
    keep = [c for c in ("vocabulary", "encoder", "model", "layer") if c in df.columns]
    rows = []
    for (scorer, unit), g in df.groupby(["scorer", "unit"], sort=True):
        concepts = g["concept"].tolist()
        confs = [float(x) for x in g["confidence"].tolist()]
        sentence, by = summaries.get((int(unit), scorer), (None, None))
        row = {"unit": int(unit), "scorer": scorer, "label": concepts[0], "confidence": confs[0],
               "concepts": concepts, "confidences": confs, "summary": sentence, "summary_by": by}
        for c in keep:  # constant per group; pandas turns a None constant into NaN
            v = g[c].iloc[0]
            row[c] = None if v is None or v != v else v
        rows.append(row)
    types = {"unit": pa.int32(), "scorer": pa.string(), "label": pa.string(),
             "confidence": pa.float32(), "concepts": pa.list_(pa.string()),
             "confidences": pa.list_(pa.float32()), "summary": pa.string(), "summary_by": pa.string()}
    types.update({c: pa.string() for c in keep})
    return pa.table({c: pa.array([r[c] for r in rows], t) for c, t in types.items()})


def summarise(scores: pa.Table, scorer: str, patch_pngs: Callable[[int], Sequence[bytes]] | None = None,
              model: str | None = None, top: int = 5) -> dict:
    """One LLM sentence per unit from its top concepts of `scorer` (and its top patches when
    `patch_pngs(unit)` is given). Without ANTHROPIC_API_KEY the LLM module warns once and
    returns template sentences, marked summary_by='template'. Returns {(unit, scorer): (s, by)}."""
    from .llm import summarise_unit

    t = scores.filter(pc.equal(scores["scorer"], scorer))
    out = {}
    df = t.to_pandas().sort_values(["unit", "rank"])
    for unit, g in df.groupby("unit", sort=True):
        items = list(zip(g["concept"].head(top), g["score"].head(top), g["confidence"].head(top)))
        pngs = patch_pngs(int(unit)) if patch_pngs else None
        out[(int(unit), scorer)] = summarise_unit(items, pngs, model=model, return_source=True)
    return out
