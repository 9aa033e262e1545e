"""What the pages show, as plain dicts: shared by the static report and the web app.

Every function takes `run(sql, params) -> pyarrow.Table` — the Store's own `store.sql` for the
report, the locked snapshot's `SafeDB.run` for the web app — so the same SQL feeds both.
Values are always bound; identifiers come from fixed sets.
"""

from __future__ import annotations

import difflib
from typing import Callable

import numpy as np
import pyarrow as pa

from ..errors import NeurostoreError

Run = Callable[..., pa.Table]


class NoSuchPage(NeurostoreError):
    """A model, layer or unit that is not in the store (the web app answers 404)."""

TOP_PATCHES = 12
TOP_CONCEPTS = 8
# The scorer whose best concepts the depth plots and unit lists use, when a model has it.
PREFERRED_SCORERS = ("patch", "soft_wpmi", "iou", "wpmi", "cos_cubed")
AUDIT_PREFIXES = ("audit",)
COMPARE_PREFIXES = ("compar", "unit_match", "model_match")


def rows(run: Run, sql: str, params: dict | None = None) -> list[dict]:
    return run(sql, params).to_pylist()


def _f(v):
    """Float for display (None stays None)."""
    return None if v is None else float(v)


# ---- index, models, layers ----------------------------------------------------------------------

def overview(run: Run) -> dict:
    """Models -> layers with unit counts and how many units have concepts / explanations."""
    models = {r["model"]: r for r in rows(run, """
        SELECT model, any_value(spec) AS spec, any_value(arch) AS arch, any_value(n_params) AS n_params,
               any_value(input_size) AS input_size
        FROM models GROUP BY model""")}
    layer_rows = rows(run, """
        WITH l AS (SELECT model, layer, any_value(kind) AS kind, max(n_units) AS n_units, min(depth) AS depth,
                          min(depth_frac) AS depth_frac FROM layers GROUP BY model, layer),
             u AS (SELECT model, layer, count(DISTINCT unit) AS n_recorded FROM units GROUP BY model, layer),
             s AS (SELECT model, layer, count(DISTINCT unit) AS n_scored, list(DISTINCT scorer ORDER BY scorer) AS scorers
                   FROM scores WHERE rank = 0 GROUP BY model, layer),
             e AS (SELECT model, layer, count(DISTINCT unit) FILTER (WHERE summary IS NOT NULL) AS n_summaries
                   FROM explanations GROUP BY model, layer),
             keys AS (SELECT model, layer FROM l UNION SELECT model, layer FROM u UNION SELECT model, layer FROM s)
        SELECT k.model, k.layer, l.kind, coalesce(l.n_units, u.n_recorded) AS n_units, l.depth, l.depth_frac,
               coalesce(u.n_recorded, 0) AS n_recorded, coalesce(s.n_scored, 0) AS n_scored,
               coalesce(s.scorers, []) AS scorers, coalesce(e.n_summaries, 0) AS n_summaries
        FROM keys k LEFT JOIN l USING (model, layer) LEFT JOIN u USING (model, layer)
        LEFT JOIN s USING (model, layer) LEFT JOIN e USING (model, layer)
        ORDER BY k.model, l.depth NULLS LAST, k.layer""")
    out: dict[str, dict] = {}
    for m in sorted(set(models) | {r["model"] for r in layer_rows}):
        info = models.get(m, {})
        out[m] = {"model": m, "spec": info.get("spec"), "arch": info.get("arch"), "n_params": info.get("n_params"),
                  "input_size": info.get("input_size"), "layers": []}
    for r in layer_rows:
        out[r["model"]]["layers"].append(r)
    for m in out.values():
        m["n_units"] = sum(int(r["n_units"] or 0) for r in m["layers"])
        m["n_scored"] = sum(int(r["n_scored"] or 0) for r in m["layers"])
    return {"models": list(out.values())}


def model_names(run: Run) -> list[str]:
    return [m["model"] for m in overview(run)["models"]]


def preferred_scorer(run: Run, model: str) -> str | None:
    have = [r["scorer"] for r in rows(run, "SELECT DISTINCT scorer FROM scores WHERE model = $m AND rank = 0",
                                      {"m": model})]
    for s in PREFERRED_SCORERS:
        if s in have:
            return s
    return sorted(have)[0] if have else None


def depth_profile(run: Run, model: str, scorer: str | None = None, top: int = 6) -> dict:
    """Share of a model's units whose best concept falls in each concept category (or, without
    categories, is each of the most common concepts), per layer in depth order."""
    scorer = scorer or preferred_scorer(run, model)
    layer_rows = rows(run, """
        SELECT layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers WHERE model = $m
        GROUP BY layer ORDER BY depth NULLS LAST, layer""", {"m": model})
    counts = rows(run, """
        SELECT s.layer, s.concept, c.category, count(*) AS n
        FROM scores s
        LEFT JOIN (SELECT concept, any_value(category) AS category FROM concepts GROUP BY concept) c USING (concept)
        WHERE s.model = $m AND s.scorer = $s AND s.rank = 0
        GROUP BY ALL""", {"m": model, "s": scorer})
    layers = [r["layer"] for r in layer_rows]
    for r in counts:  # layers with scores but missing from the layers table still get a point
        if r["layer"] not in layers:
            layers.append(r["layer"])
    depths = [r["depth_frac"] for r in layer_rows] if len(layer_rows) == len(layers) else None
    total = {l: 0 for l in layers}
    for r in counts:
        total[r["layer"]] += r["n"]
    n_cat = sum(r["n"] for r in counts if r["category"])
    by = "category" if counts and n_cat >= 0.5 * sum(r["n"] for r in counts) else "concept"
    agg: dict[str, dict[str, int]] = {}
    for r in counts:
        key = (r["category"] or "other") if by == "category" else r["concept"]
        agg.setdefault(key, {}).setdefault(r["layer"], 0)
        agg[key][r["layer"]] += r["n"]
    keys = sorted(agg, key=lambda k: -sum(agg[k].values()))[:top]
    series = {k: [(agg[k].get(l, 0) / total[l]) if total[l] else None for l in layers] for k in keys}
    return {"model": model, "scorer": scorer, "by": by, "layers": layers, "depths": depths, "series": series}


def layer_page(run: Run, model: str, layer: str) -> dict:
    """A layer's units (best concept per scorer, stats, top patch) and its concept counts."""
    units = rows(run, """
        WITH u AS (SELECT unit, any_value(act_max) AS act_max, any_value(frac_active) AS frac_active,
                          any_value(act_mean) AS act_mean FROM units WHERE model = $m AND layer = $l GROUP BY unit),
             -- best concept per scorer, and the label of every method without scores (imported ones)
             s AS (SELECT unit, list({'scorer': scorer, 'concept': concept, 'confidence': confidence}
                                     ORDER BY scorer) AS best
                   FROM (SELECT unit, scorer, concept, confidence FROM scores WHERE model = $m AND layer = $l AND rank = 0
                         UNION ALL
                         SELECT unit, scorer, label, confidence FROM explanations WHERE model = $m AND layer = $l
                           AND scorer NOT IN (SELECT DISTINCT scorer FROM scores WHERE model = $m AND layer = $l))
                   GROUP BY unit),
             e AS (SELECT unit, any_value(summary) FILTER (WHERE summary IS NOT NULL) AS summary
                   FROM explanations WHERE model = $m AND layer = $l GROUP BY unit),
             a AS (SELECT unit, arg_min(patch_id, rank) AS top_patch, max(act_value) AS top_act
                   FROM activations WHERE model = $m AND layer = $l AND patch_id IS NOT NULL GROUP BY unit),
             keys AS (SELECT unit FROM u UNION SELECT unit FROM s UNION SELECT unit FROM a)
        SELECT k.unit, u.act_max, u.act_mean, u.frac_active, coalesce(s.best, []) AS best, e.summary,
               a.top_patch, a.top_act
        FROM keys k LEFT JOIN u USING (unit) LEFT JOIN s USING (unit) LEFT JOIN e USING (unit)
        LEFT JOIN a USING (unit)
        ORDER BY k.unit""", {"m": model, "l": layer})
    if not units:
        from ..errors import UnknownLayer, unknown

        have = [r["layer"] for m in overview(run)["models"] if m["model"] == model for r in m["layers"]]
        if not have:
            raise UnknownLayer(unknown("model", model, model_names(run), "See the index page for the models."))
        raise UnknownLayer(unknown("layer", layer, have, f"See the model page of {model}."))
    concepts = rows(run, """
        SELECT scorer, concept, count(*) AS n_units FROM scores
        WHERE model = $m AND layer = $l AND rank = 0 GROUP BY scorer, concept
        ORDER BY scorer, n_units DESC, concept""", {"m": model, "l": layer})
    info = rows(run, "SELECT any_value(kind) AS kind, max(n_units) AS n_units, min(depth) AS depth, "
                     "min(depth_frac) AS depth_frac, max(grid_h) AS grid_h, max(grid_w) AS grid_w "
                     "FROM layers WHERE model = $m AND layer = $l", {"m": model, "l": layer})
    by_scorer: dict[str, list] = {}
    for r in concepts:
        by_scorer.setdefault(r["scorer"], []).append({"concept": r["concept"], "n_units": r["n_units"]})
    return {"model": model, "layer": layer, "info": info[0] if info else {}, "units": units,
            "concept_counts": by_scorer, "profile": depth_profile(run, model)}


# ---- neuron cards -------------------------------------------------------------------------------

def neuron_cards(run: Run, model: str, layer: str, unit: int | None = None, top_patches: int = TOP_PATCHES,
                 top_concepts: int = TOP_CONCEPTS) -> dict[int, dict]:
    """Cards for every unit of a layer (or one unit): patches with activations, concepts per
    scorer, explanations with summaries, activation statistics and histogram, effects."""
    p = {"m": model, "l": layer, "u": unit}
    cards: dict[int, dict] = {}

    def card(u: int) -> dict:
        if u not in cards:
            cards[u] = {"id": f"{model}/{layer}/{u}", "model": model, "layer": layer, "unit": int(u), "stats": None,
                        "patches": [], "scorers": {}, "summaries": [], "effects": []}
        return cards[u]

    for r in rows(run, """
            SELECT unit, any_value(dataset) AS dataset, any_value(n_images) AS n_images, any_value(act_mean) AS act_mean,
                   any_value(act_std) AS act_std, any_value(act_max) AS act_max, any_value(frac_active) AS frac_active,
                   any_value(q50) AS q50, any_value(q90) AS q90, any_value(q99) AS q99,
                   any_value(hist_edges) AS hist_edges, any_value(hist_counts) AS hist_counts
            FROM units WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) GROUP BY unit""", p):
        card(r.pop("unit"))["stats"] = r
    for r in rows(run, """
            SELECT a.unit, a.rank, a.act_value, a.act_mean, a.dataset, a.image_id, a.loc_y, a.loc_x, a.patch_id,
                   i.label AS image_label, i.caption, (p.patch_id IS NOT NULL) AS has_image
            FROM activations a
            LEFT JOIN (SELECT DISTINCT patch_id FROM patches) p ON p.patch_id = a.patch_id
            LEFT JOIN (SELECT dataset, image_id, any_value(label) AS label, any_value(caption) AS caption
                       FROM images GROUP BY dataset, image_id) i ON i.dataset = a.dataset AND i.image_id = a.image_id
            WHERE a.model = $m AND a.layer = $l AND ($u IS NULL OR a.unit = $u) AND a.rank < $k
            ORDER BY a.unit, a.rank""", {**p, "k": top_patches}):
        card(r.pop("unit"))["patches"].append(r)
    for r in rows(run, """
            SELECT unit, scorer, rank, concept, score, confidence, vocabulary, encoder FROM scores
            WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) AND rank < $k
            ORDER BY unit, scorer, rank""", {**p, "k": top_concepts}):
        c = card(r.pop("unit"))
        c["scorers"].setdefault(r["scorer"], {"scorer": r["scorer"], "vocabulary": r["vocabulary"],
                                              "encoder": r["encoder"], "concepts": []})
        c["scorers"][r["scorer"]]["concepts"].append(
            {"rank": r["rank"], "concept": r["concept"], "score": _f(r["score"]), "confidence": _f(r["confidence"])})
    for r in rows(run, """
            SELECT unit, scorer, label, confidence, summary, summary_by, vocabulary, encoder, run_id FROM explanations
            WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) ORDER BY unit, scorer""", p):
        c = card(r.pop("unit"))
        r["candidates"] = []
        c["summaries"].append(r)
    for r in imported_labels(run, model, layer, unit):  # raw labels, scores and runners-up of imported methods
        for s in card(r.pop("unit"))["summaries"]:
            if s["scorer"] == r["method"]:
                s["candidates"].append(r)
    for r in rows(run, """
            SELECT unit, class, kind, value, baseline, ablated, n_images FROM effects
            WHERE model = $m AND layer = $l AND unit IS NOT NULL AND ($u IS NULL OR unit = $u)
            QUALIFY row_number() OVER (PARTITION BY unit ORDER BY abs(value) DESC NULLS LAST) <= 10
            ORDER BY unit, abs(value) DESC""", p):
        card(r.pop("unit"))["effects"].append(r)
    for c in cards.values():
        c["scorers"] = list(c["scorers"].values())
        c["summary"] = next((s["summary"] for s in c["summaries"] if s["summary"]), None)
    return dict(sorted(cards.items()))


def imported_labels(run: Run, model: str, layer: str, unit: int | None = None) -> list[dict]:
    """Every label imported methods gave the units of a layer (or one unit): raw beside normalised,
    the method's own score, Network Dissection's runner-up per Broden category (rank > 0)."""
    return rows(run, """
        SELECT unit, method, rank, category, label, label_raw, score, source FROM explanation_candidates
        WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) ORDER BY unit, method, rank""",
        {"m": model, "l": layer, "u": unit})


def neuron_card(run: Run, model: str, layer: str, unit: int, **kw) -> dict:
    cards = neuron_cards(run, model, layer, unit, **kw)
    if unit not in cards:
        page = layer_page(run, model, layer)  # raises UnknownLayer/model with the valid names
        have = [u["unit"] for u in page["units"]]
        rng = f"{min(have)}..{max(have)}" if have else "none"
        raise NoSuchPage(f"No unit {unit} recorded in {model}/{layer} (units recorded: {rng}). "
                       f"See the layer page of {model}/{layer}.")
    return cards[unit]


# ---- search -------------------------------------------------------------------------------------

SEARCH_MODES = ("exact", "semantic", "open")


def all_concepts(run: Run) -> list[str]:
    return [r["concept"] for r in rows(run, """
        SELECT DISTINCT concept FROM concept_units WHERE concept IS NOT NULL
        UNION SELECT DISTINCT item_id FROM embeddings WHERE kind = 'concept'
        ORDER BY 1""")]


def units_for_concepts(run: Run, concepts: list[str], per_concept: int = 8) -> list[dict]:
    return rows(run, """
        SELECT concept, model, layer, unit, scorer, score, confidence, rank
        FROM concept_units WHERE list_contains($cs, concept)
        QUALIFY row_number() OVER (PARTITION BY concept ORDER BY confidence DESC NULLS LAST, score DESC) <= $k
        ORDER BY concept, confidence DESC NULLS LAST, score DESC""", {"cs": concepts, "k": per_concept})


def search_exact(run: Run, phrase: str, k: int = 50) -> dict:
    c = phrase.strip().lower()
    hits = rows(run, """
        SELECT model, layer, unit, scorer, rank AS rank_in_model, concept, score, confidence
        FROM concept_units WHERE concept = $c
        ORDER BY confidence DESC NULLS LAST, score DESC, model, layer, unit LIMIT $k""", {"c": c, "k": k})
    out = {"mode": "exact", "q": phrase, "concept": c, "units": hits}
    if not hits:
        out["did_you_mean"] = difflib.get_close_matches(c, all_concepts(run), n=5, cutoff=0.6)
    return out


def search_semantic(run: Run, phrase: str, k: int = 10, per_concept: int = 5) -> dict:
    """Nearest concepts by MiniLM similarity among the store's concepts, with their top units."""
    from ..sqlfuncs import embed_texts

    names = all_concepts(run)
    if not names:
        return {"mode": "semantic", "q": phrase, "concepts": [], "note": "The store has no scored concepts yet."}
    vecs = embed_texts(names)
    q = embed_texts([phrase.strip()])[0]
    sims = vecs @ q
    order = np.argsort(-sims)[:k]
    top = [{"concept": names[i], "similarity": float(sims[i])} for i in order]
    units = units_for_concepts(run, [t["concept"] for t in top], per_concept)
    for t in top:
        t["units"] = [u for u in units if u["concept"] == t["concept"]]
    return {"mode": "semantic", "q": phrase, "encoder": "minilm:all-MiniLM-L6-v2", "concepts": top}


def search_open_find(run: Run, find_store, phrase: str, k: int = 30, device=None, precision=None) -> dict:
    """Open vocabulary through neurostore.analysis.find (its calibrated 'patch'-scorer ranking),
    on `find_store` (a Store whose sql() is the locked snapshot, see SnapshotStore); the encoder
    runs on `device` at `precision` (default auto: CUDA when present)."""
    from ..analysis.find import find

    res = find(find_store, phrase, methods=["open"], top=k, device=device, precision=precision)
    units = res.units.to_pylist()
    if units:
        tops = {(r["model"], r["layer"], r["unit"]): r["top_patch"] for r in rows(run, """
            SELECT model, layer, unit, arg_min(patch_id, rank) AS top_patch FROM activations
            WHERE patch_id IS NOT NULL AND list_contains($keys, model || '/' || layer || '/' || unit)
            GROUP BY model, layer, unit""", {"keys": [f"{u['model']}/{u['layer']}/{u['unit']}" for u in units]})}
        for u in units:
            u["best_patch"] = tops.get((u["model"], u["layer"], u["unit"]))
    out = {"mode": "open", "q": phrase, "units": units, "encoder": ", ".join(res.encoders) or None,
           "columns": ["model", "layer", "unit", "best_patch", "depth_frac", "score", "confidence", "encoder"]}
    if res.notes:
        out["note"] = " ".join(res.notes)
    return out


def search(run: Run, phrase: str, mode: str = "exact", k: int | None = None, find_store=None, device=None,
           precision=None) -> dict:
    from ..errors import BadParameter, unknown

    if mode not in SEARCH_MODES:
        raise BadParameter(unknown("search mode", mode, SEARCH_MODES, "Use mode=exact, semantic or open."))
    if not phrase or not phrase.strip():
        return {"mode": mode, "q": phrase or "", "empty": True}
    if mode == "exact":
        return search_exact(run, phrase, k or 50)
    if mode == "semantic":
        return search_semantic(run, phrase, k or 10)
    if find_store is None:
        raise BadParameter("Open-vocabulary search needs the snapshot store (see snapshot_store).")
    return search_open_find(run, find_store, phrase, k or 30, device, precision)


def snapshot_store(run: Run, path):
    """A Store whose every query goes to `run` (the web app's locked snapshot) instead of a
    connection that can read files: lets API functions written against Store (e.g.
    analysis.find) serve the web app without opening another door."""
    from ..store import Store

    class SnapshotStore(Store):
        def sql(self, query, params=None):
            return run(query, params or None)

        def close(self):
            pass

    from pathlib import Path

    return SnapshotStore(Path(path), True, {})


# ---- findings (audit, compare) ------------------------------------------------------------------

def finding_tables(run: Run, prefixes: tuple[str, ...]) -> list[str]:
    names = [r["table_name"] for r in rows(run, """
        SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY table_name""")]
    return [n for n in names if n.startswith(prefixes)]


def findings(run: Run, kind: str, limit: int = 500) -> dict:
    """Every table of audit (or comparison) findings, rendered generically."""
    prefixes = AUDIT_PREFIXES if kind == "audit" else COMPARE_PREFIXES
    out = {"kind": kind, "tables": []}
    for name in finding_tables(run, prefixes):
        # `name` comes from the catalog listing above, never from the request.
        t = run(f'SELECT * FROM "{name}" LIMIT {int(limit) + 1}')
        out["tables"].append({"table": name, "columns": t.column_names,
                              "rows": t.slice(0, limit).to_pylist(), "truncated": t.num_rows > limit})
    out["empty"] = not any(t["rows"] for t in out["tables"])
    return out
