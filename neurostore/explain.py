"""Explanations: a unit's ranked concepts per scorer, and optionally one sentence by an LLM.

The ranked concepts come straight from the scores rows (schema/scores.sql); an explanation row
(schema/explanations.sql) folds a unit's top concepts for one scorer into lists, so "what does
model/layer/unit see?" is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import LLMError


def explanations_table(scores: pa.Table, summaries: dict | None = None) -> pa.Table:
    """scores rows (one scorer or several, any units) -> explanation rows, one per (unit, scorer)
    and the constant columns carried along (model, layer, vocabulary, encoder).

    `summaries` maps (unit, scorer) -> (sentence, by)."""
    summaries = summaries or {}
    keep = [c for c in ("vocabulary", "encoder", "model", "layer") if c in scores.column_names]
    # Columnar: a (scorer, unit) group is a run of the sorted rows, its lists slices of them (a
    # pandas groupby took 0.7 s per layer and scorer at 1,536 units)
    t = scores.sort_by([("scorer", "ascending"), ("unit", "ascending"), ("rank", "ascending")])
    scorer = np.asarray(t["scorer"].to_pylist(), dtype=object)
    unit = t["unit"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (scorer[1:] != scorer[:-1]) | (unit[1:] != unit[:-1])]) if len(t) else \
        np.zeros(0, np.int64)
    offsets = pa.array(np.r_[starts, len(t)].astype(np.int32))
    first = pa.array(starts, pa.int64())
    said = [summaries.get((int(u), s), (None, None)) for u, s in zip(unit[starts], scorer[starts])]
    cols = {"unit": t["unit"].take(first).cast(pa.int32()), "scorer": t["scorer"].take(first),
            "label": t["concept"].take(first), "confidence": t["confidence"].take(first).cast(pa.float32()),
            "concepts": pa.ListArray.from_arrays(offsets, t["concept"].combine_chunks()),
            "confidences": pa.ListArray.from_arrays(offsets, t["confidence"].combine_chunks().cast(pa.float32())),
            "summary": pa.array([x[0] for x in said], pa.string()),
            "summary_by": pa.array([x[1] for x in said], pa.string())}
    cols.update({c: t[c].take(first).cast(pa.string()) for c in keep})
    return pa.table(cols)


def summarise(scores: pa.Table, scorer: str, patch_pngs: Callable[[int], Sequence[bytes]] | None = None,
              model: str | None = None, top: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """One LLM sentence per unit from its top concepts of `scorer` (and its top patches when
    `patch_pngs(unit)` is given). Without ANTHROPIC_API_KEY the LLM module warns once and
    returns template sentences, marked summary_by='template'. When the API fails for a unit
    (after its retries), that unit and the rest get template sentences too, with a note to
    `log`: the summaries are optional, the dissect under them is not. Returns
    {(unit, scorer): (s, by)}."""
    from .llm import summarise_unit, template_summary

    t = scores.filter(pc.equal(scores["scorer"], scorer))
    out = {}
    failed = None
    df = t.to_pandas().sort_values(["unit", "rank"])
    for unit, g in df.groupby("unit", sort=True):
        items = list(zip(g["concept"].head(top), g["score"].head(top), g["confidence"].head(top)))
        if failed is None:
            try:
                pngs = patch_pngs(int(unit)) if patch_pngs else None
                out[(int(unit), scorer)] = summarise_unit(items, pngs, model=model, return_source=True)
                continue
            except LLMError as e:
                failed = e
                if log is not None:
                    log(f"note: the LLM summaries stopped at unit {int(unit)} ({e}); it and the units after it "
                        "get template sentences (summary_by 'template'), the rest of the dissect is unchanged")
        out[(int(unit), scorer)] = (template_summary(items), "template")
    return out
