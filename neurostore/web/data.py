"""What the pages show, as plain dicts: shared by the static report and the web app.

Every function takes `run(sql, params) -> pyarrow.Table` — the Store's own `store.sql` for the
report, the locked snapshot's `SafeDB.run` for the web app — so the same SQL feeds both.
Values are always bound; identifiers come from fixed sets.
"""

from __future__ import annotations

import difflib
import os
from typing import Callable

import numpy as np
import pyarrow as pa

from .. import plots
from ..errors import BadParameter, NeurostoreError, unknown
from ..patches import to_image_box
from ..textembed import embed_texts

Run = Callable[..., pa.Table]


class NoSuchPage(NeurostoreError):
    """A model, layer or unit that is not in the store (the web app answers 404)."""

TOP_PATCHES = 12
TOP_CONCEPTS = 8
# The scorer whose best concepts the depth plots and unit lists use, when a model has it.
PREFERRED_SCORERS = ("patch", "encoder_iou", "top_images", "soft_wpmi", "iou", "wpmi", "cos_cubed")
AUDIT_PREFIXES = ("audit",)
COMPARE_PREFIXES = ("compar", "unit_match", "model_match")


def rows(run: Run, sql: str, params: dict | None = None) -> list[dict]:
    return run(sql, params).to_pylist()


def has_table(run: Run, name: str) -> bool:
    """Stores written before a table existed lack it: pages then leave its section out."""
    return bool(rows(run, "SELECT 1 FROM information_schema.tables WHERE table_schema = 'main' AND table_name = $t",
                     {"t": name}))


def _f(v):
    """Float for display (None stays None)."""
    return None if v is None else float(v)


# ---- index, models, layers ----------------------------------------------------------------------

def untrained(run: Run) -> set[str]:
    """Models dissected with random weights (the untrained_models macro): every page of one says
    its rows are a baseline, not findings."""
    if not (has_table(run, "runs") and has_table(run, "models")):
        return set()
    return {r["model"] for r in rows(run, "SELECT model FROM untrained_models()")}


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
             -- units explained, by neurostore's scorers or by imported methods (explanations only)
             s AS (SELECT model, layer, count(DISTINCT unit) AS n_scored, list(DISTINCT scorer ORDER BY scorer) AS scorers
                   FROM (SELECT model, layer, unit, scorer FROM scores WHERE rank = 0
                         UNION ALL SELECT model, layer, unit, scorer FROM explanations) GROUP BY model, layer),
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
    random = untrained(run)
    for m in sorted(set(models) | {r["model"] for r in layer_rows}):
        info = models.get(m, {})
        out[m] = {"model": m, "spec": info.get("spec"), "arch": info.get("arch"), "n_params": info.get("n_params"),
                  "input_size": info.get("input_size"), "untrained": m in random, "layers": []}
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
    categories, is each of the most common concepts), per layer in depth order. A model with no
    scores (only imported from field results) is profiled by an imported method's labels, Network
    Dissection's Broden categories first (its paper's figure)."""
    scorer = scorer or preferred_scorer(run, model)
    layer_rows = rows(run, """
        SELECT layer, min(depth) AS depth, min(depth_frac) AS depth_frac, any_value(kind) AS kind FROM layers
        WHERE model = $m GROUP BY layer ORDER BY depth NULLS LAST, layer""", {"m": model})
    method = None
    if scorer is None and has_table(run, "explanation_candidates"):
        method = next(iter(rows(run, """
            SELECT method FROM explanation_candidates WHERE model = $m AND rank = 0
            GROUP BY method ORDER BY count(category) DESC, count(*) DESC, method LIMIT 1""", {"m": model})),
            {}).get("method")
    if method is not None:   # the hidden layers: a method's labels of the class logits are the classes
        layer_rows = [r for r in layer_rows if r["kind"] != "logits"]
        counts = rows(run, """
            SELECT layer, label AS concept, category, count(*) AS n FROM explanation_candidates
            WHERE model = $m AND method = $s AND rank = 0 AND list_contains($l, layer) GROUP BY ALL""",
            {"m": model, "s": method, "l": [r["layer"] for r in layer_rows]})
    else:
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
    return {"model": model, "scorer": method or scorer, "imported": method is not None, "by": by, "layers": layers,
            "depths": depths, "series": series}


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
            "concept_counts": by_scorer, "profile": depth_profile(run, model), "untrained": model in untrained(run)}


# ---- neuron cards -------------------------------------------------------------------------------

def top_activations(run: Run, model: str, layer: str, unit: int | None = None, k: int = TOP_PATCHES,
                    rank: int | None = None) -> list[dict]:
    """The top images of a layer's units (or one unit, or one rank) as the card draws them: the
    activation, the grid cell of its max and the map (act_map), the image (its key, size, whether
    its file is there) and the cut box."""
    grid = rows(run, "SELECT max(grid_h) AS h, max(grid_w) AS w FROM layers WHERE model = $m AND layer = $l",
                {"m": model, "l": layer})
    gh, gw = (grid[0]["h"], grid[0]["w"]) if grid else (None, None)
    model_row = rows(run, "SELECT any_value(input_size) AS s, any_value(crop_fraction) AS cf FROM models WHERE model = $m",
                     {"m": model})  # crop_fraction reads NULL in stores written before it existed
    size, crop = (model_row[0]["s"], model_row[0]["cf"]) if model_row else (None, None)
    out = rows(run, """
            SELECT a.unit, a.rank, a.act_value, a.act_mean, a.dataset, a.image_id, a.loc_y, a.loc_x, a.act_map, a.patch_id,
                   substr(md5(a.dataset || '/' || a.image_id), 1, 16) AS image_key, i.label AS image_label, i.caption, i.width, i.height, i.path AS image_path,
                   (p.patch_id IS NOT NULL) AS has_image, p.x0, p.y0, p.x1, p.y1
            FROM activations a
            LEFT JOIN (SELECT patch_id, any_value(x0) AS x0, any_value(y0) AS y0, any_value(x1) AS x1,
                              any_value(y1) AS y1 FROM patches GROUP BY patch_id) p ON p.patch_id = a.patch_id
            LEFT JOIN (SELECT dataset, image_id, any_value(label) AS label, any_value(caption) AS caption,
                              any_value(width) AS width, any_value(height) AS height, any_value(path) AS path
                       FROM images GROUP BY dataset, image_id) i ON i.dataset = a.dataset AND i.image_id = a.image_id
            WHERE a.model = $m AND a.layer = $l AND ($u IS NULL OR a.unit = $u) AND a.rank < $k
              AND ($r IS NULL OR a.rank = $r)
            ORDER BY a.unit, a.rank""", {"m": model, "l": layer, "u": unit, "k": k, "r": rank})
    for r in out:
        r["grid_h"], r["grid_w"] = gh, gw
        path = r.pop("image_path")
        r["has_full"] = bool(path) and os.path.isfile(path)  # else the card draws the crop in its box alone
        # A heatmap where a map was kept and says something: not a 1x1 grid, not flat.
        m = r["act_map"]
        r["has_map"] = bool(m) and len(m) * len(m[0]) > 1 and any(v for row in m for v in row)
        r["seen"] = _seen_region(r, size, crop)
    return out


def _seen_region(top: dict, size: int | None, crop: float | None) -> tuple[int, int, int, int]:
    """The part of the image the model's input showed (x0, y0, x1, y1): the whole image, or the
    central square of a resize + centre crop. The map and its max cell lie over this region,
    exactly as the cut box was placed (patches.to_image_box)."""
    W, H = top.get("width") or top.get("x1") or 1, top.get("height") or top.get("y1") or 1
    if not size or crop is None or crop >= 1.0 and W == H:
        return 0, 0, W, H
    return to_image_box((0, 0, size, size), size, W, H, crop)


def neuron_cards(run: Run, model: str, layer: str, unit: int | None = None, top_patches: int = TOP_PATCHES,
                 top_concepts: int = TOP_CONCEPTS) -> dict[int, dict]:
    """Cards for every unit of a layer (or one unit): patches with activations, concepts per
    scorer, explanations with summaries, activation statistics and histogram, effects."""
    p = {"m": model, "l": layer, "u": unit}
    cards: dict[int, dict] = {}
    random = model in untrained(run)
    # recorded here (not only imported): groups, audits and ablations can run on it
    dissected = bool(rows(run, "SELECT 1 FROM units WHERE model = $m LIMIT 1", {"m": model})) if has_table(run, "units") else False

    def card(u: int) -> dict:
        if u not in cards:
            cards[u] = {"id": f"{model}/{layer}/{u}", "model": model, "layer": layer, "unit": int(u),
                        "untrained": random, "dissected": dissected, "stats": None,
                        "patches": [], "scorers": {}, "summaries": [], "effects": [], "headline": None,
                        "classes": [], "prev": None, "next": None, "group": None,
                        "quantiles": [], "links": {}, "wiring": None}
        return cards[u]

    for r in rows(run, """
            SELECT unit, any_value(dataset) AS dataset, any_value(n_images) AS n_images, any_value(act_mean) AS act_mean,
                   any_value(act_std) AS act_std, any_value(act_max) AS act_max, any_value(frac_active) AS frac_active,
                   any_value(q50) AS q50, any_value(q90) AS q90, any_value(q99) AS q99,
                   any_value(hist_edges) AS hist_edges, any_value(hist_counts) AS hist_counts
            FROM units WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) GROUP BY unit""", p):
        card(r.pop("unit"))["stats"] = r
    for r in top_activations(run, model, layer, unit, top_patches):
        card(r.pop("unit"))["patches"].append(r)
    if has_table(run, "headlines"):
        for r in rows(run, """
                SELECT unit, concept, scorer, confidence, fidelity, auprc, candidates, vocabulary,
                       runner_up, runner_up_scorer, runner_up_confidence FROM headlines
                WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u)""", p):
            card(r.pop("unit"))["headline"] = r
    if has_table(run, "audit_units"):  # the classes a unit pushes (gradient x activation toward the logit)
        for r in rows(run, """
                SELECT unit, class, grad_x_act, share, ablation_effect FROM audit_units
                WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u)
                QUALIFY row_number() OVER (PARTITION BY unit ORDER BY abs(grad_x_act) DESC NULLS LAST) <= 8
                ORDER BY unit, grad_x_act DESC""", p):
            card(r.pop("unit"))["classes"].append(r)
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
    if unit is not None and unit in cards:  # the report asks per layer, under a size guard (report.py)
        cards[unit]["quantiles"] = quantile_examples(run, model, layer, [unit]).get(unit, [])
        cards[unit]["links"] = coactivation(run, model, layer, [unit]).get(unit, {})
    if has_table(run, "unit_edges"):
        wiring(run, model, layer, cards, unit)
    if has_table(run, "groups") and has_table(run, "group_edges"):
        circuit(run, model, layer, cards, unit)
    # Previous / next recorded unit of the layer, for the card's arrows.
    order = [r["unit"] for r in rows(run, "SELECT DISTINCT unit FROM units WHERE model = $m AND layer = $l "
                                          "UNION SELECT DISTINCT unit FROM activations WHERE model = $m AND layer = $l "
                                          "ORDER BY 1", {"m": model, "l": layer})]
    pos = {u: i for i, u in enumerate(order)}
    for u, c in cards.items():
        i = pos.get(u)
        if i is not None:
            c["prev"] = order[i - 1] if i > 0 else None
            c["next"] = order[i + 1] if i + 1 < len(order) else None
    for c in cards.values():
        c["scorers"] = list(c["scorers"].values())
        c["summary"] = next((s["summary"] for s in c["summaries"] if s["summary"]), None)
    return dict(sorted(cards.items()))


QUANTILE_BANDS, PER_BAND = 5, 4
# Quantile examples read pooled (images x units of a layer); past this many cells a report skips them.
MAX_QUANTILE_CELLS = 20_000_000


def quantile_examples(run: Run, model: str, layer: str, units: list[int], bands: int = QUANTILE_BANDS,
                      per_band: int = PER_BAND) -> dict[int, list[dict]]:
    """Examples from across each unit's activation range (as Neuronpedia's quantile intervals):
    the probe images split into `bands` equal-count bands by the unit's spatial max (pooled), and
    `per_band` images of each, a fixed pseudo-random pick (md5 of the image id)."""
    if not units or not has_table(run, "pooled"):
        return {}
    out: dict[int, list[dict]] = {}
    for r in rows(run, """
            WITH v AS (SELECT p.dataset, p.image_id, u.unit, p.act_max[u.unit + 1] AS act
                       FROM pooled p, (SELECT unnest($units) AS unit) u WHERE p.model = $m AND p.layer = $l),
                 b AS (SELECT *, ntile($bands) OVER (PARTITION BY unit ORDER BY act) AS band FROM v WHERE act IS NOT NULL),
                 r AS (SELECT *, min(act) OVER w AS lo, max(act) OVER w AS hi FROM b
                       WINDOW w AS (PARTITION BY unit, band)
                       QUALIFY row_number() OVER (PARTITION BY unit, band ORDER BY md5(image_id)) <= $per)
            SELECT r.unit, r.band, r.lo, r.hi, r.dataset, r.image_id, r.act,
                   substr(md5(r.dataset || '/' || r.image_id), 1, 16) AS image_key, i.path, i.label
            FROM r LEFT JOIN (SELECT dataset, image_id, any_value(path) AS path, any_value(label) AS label
                              FROM images GROUP BY ALL) i USING (dataset, image_id)
            ORDER BY r.unit, r.band DESC, r.act DESC""",
            {"m": model, "l": layer, "units": [int(u) for u in units], "bands": bands, "per": per_band}):
        path = r.pop("path")
        if not (path and os.path.isfile(path)):  # no crop exists outside the top-k: the whole image or nothing
            continue
        bands_of = out.setdefault(r.pop("unit"), [])
        if not bands_of or bands_of[-1]["band"] != r["band"]:
            bands_of.append({"band": r["band"], "lo": r["lo"], "hi": r["hi"], "images": []})
        bands_of[-1]["images"].append({k: r[k] for k in ("dataset", "image_id", "act", "image_key", "label")})
    return out


def circuit(run: Run, model: str, layer: str, cards: dict[int, dict], unit: int | None = None) -> None:
    """What a unit feeds and is fed by, at the granularity the store attributes (neurostore groups):
    the unit's group with its strongest edges in (from the previous layer's groups) and out (to the
    next layer's groups and to the classes), by gradient x activation."""
    groups = rows(run, """
        SELECT group_id, units, label, n_units FROM groups WHERE model = $m AND layer = $l""", {"m": model, "l": layer})
    if not groups:
        return
    edges = rows(run, """
        SELECT e.kind, e.src_layer, e.src_group, e.dst_layer, e.dst_group, e.class, e.weight,
               s.label AS src_label, d.label AS dst_label
        FROM group_edges e
        LEFT JOIN groups s ON s.model = e.model AND s.layer = e.src_layer AND s.group_id = e.src_group
        LEFT JOIN groups d ON d.model = e.model AND d.layer = e.dst_layer AND d.group_id = e.dst_group
        WHERE e.model = $m AND (e.src_layer = $l OR e.dst_layer = $l)
        ORDER BY abs(e.weight) DESC NULLS LAST""", {"m": model, "l": layer})
    for g in groups:
        for u in g["units"] or []:
            if u in cards and (unit is None or u == unit):
                mine = lambda e, side: e[f"{side}_layer"] == layer and e[f"{side}_group"] == g["group_id"]
                cards[u]["group"] = {**{k: g[k] for k in ("group_id", "label", "n_units")}, "layer": layer,
                                     "fed_by": [e for e in edges if mine(e, "dst")][:5],
                                     "feeds": [e for e in edges if mine(e, "src") and e["kind"] == "group"][:5],
                                     "classes": [e for e in edges if mine(e, "src") and e["kind"] == "class"][:5]}


N_WIRED = 5  # units (and classes) shown per side of a card's wiring


def wiring(run: Run, model: str, layer: str, cards: dict[int, dict], unit: int | None = None,
           top: int = N_WIRED) -> None:
    """What each unit of a layer (or one unit) is fed by, feeds and pushes, by gradient x
    activation (unit_edges, written by neurostore groups): its strongest `top` edges per side by
    |weight|, each other unit with its headline label. A model with edges gives every card of its
    layers a `wiring` dict (empty lists where a side has none); a model without leaves it None."""
    if not rows(run, "SELECT 1 FROM unit_edges WHERE model = $m LIMIT 1", {"m": model}):
        return
    # A unit's label: its headline concept, else its most confident explanation.
    label = ("SELECT layer, unit, concept AS label FROM headlines WHERE model = $m" if has_table(run, "headlines") else
             "SELECT NULL::VARCHAR AS layer, NULL::INTEGER AS unit, NULL::VARCHAR AS label WHERE false")
    edges = rows(run, f"""
        WITH h AS ({label}),
             x AS (SELECT layer, unit, arg_max(label, confidence) AS label FROM explanations WHERE model = $m GROUP BY ALL),
             e AS (SELECT CASE WHEN kind = 'class' THEN 'classes' WHEN src_layer = $l THEN 'feeds' ELSE 'fed_by' END AS side,
                          CASE WHEN src_layer = $l THEN src_unit ELSE dst_unit END AS unit,
                          CASE WHEN src_layer = $l THEN dst_layer ELSE src_layer END AS other_layer,
                          CASE WHEN src_layer = $l THEN dst_unit ELSE src_unit END AS other_unit,
                          class, weight, n_images
                   FROM unit_edges
                   WHERE model = $m AND (src_layer = $l OR (kind = 'unit' AND dst_layer = $l))
                     AND ($u IS NULL OR (src_layer = $l AND src_unit = $u) OR (dst_layer = $l AND dst_unit = $u))
                   QUALIFY row_number() OVER (PARTITION BY side, unit ORDER BY abs(weight) DESC, other_unit, class) <= $k)
        SELECT e.*, coalesce(h.label, x.label) AS label
        FROM e LEFT JOIN h ON h.layer = e.other_layer AND h.unit = e.other_unit
        LEFT JOIN x ON x.layer = e.other_layer AND x.unit = e.other_unit
        ORDER BY e.side, e.unit, abs(e.weight) DESC, e.other_unit, e.class""",
        {"m": model, "l": layer, "u": unit, "k": top})
    adjacent = {r["side"]: r["layer"] for r in rows(run, """
        SELECT DISTINCT CASE WHEN src_layer = $l THEN 'feeds' ELSE 'fed_by' END AS side,
               CASE WHEN src_layer = $l THEN dst_layer ELSE src_layer END AS layer
        FROM unit_edges WHERE model = $m AND kind = 'unit' AND (src_layer = $l OR dst_layer = $l)""",
        {"m": model, "l": layer})}
    # covered: the layer has edges (groups leaves logits and feature layers out); layers: the
    # adjacent layers with edges (none: the first / last layer).
    covered = bool(adjacent) or bool(rows(run, "SELECT 1 FROM unit_edges WHERE model = $m AND src_layer = $l LIMIT 1",
                                          {"m": model, "l": layer}))
    for c in cards.values():
        c["wiring"] = {"fed_by": [], "feeds": [], "classes": [], "n_images": None, "layers": adjacent,
                       "covered": covered}
    for e in edges:
        c = cards.get(e.pop("unit"))
        if c is not None:
            c["wiring"][e.pop("side")].append(e)
            if e["other_unit"] is not None:
                c["wiring"]["n_images"] = e["n_images"]
    for c in cards.values():
        for side in ("fed_by", "feeds", "classes"):  # bars scaled to the list's strongest |weight|
            big = max((abs(e["weight"]) for e in c["wiring"][side]), default=0) or 1.0
            for e in c["wiring"][side]:
                e["scale"] = abs(e["weight"]) / big


def imported_labels(run: Run, model: str, layer: str, unit: int | None = None) -> list[dict]:
    """Every label imported methods gave the units of a layer (or one unit): raw beside normalised,
    the method's own score, Network Dissection's runner-up per Broden category (rank > 0)."""
    return rows(run, """
        SELECT unit, method, rank, category, label, label_raw, score, source FROM explanation_candidates
        WHERE model = $m AND layer = $l AND ($u IS NULL OR unit = $u) ORDER BY unit, method, rank""",
        {"m": model, "l": layer, "u": unit})


def image_paths(run: Run, keys: list[str]) -> dict[str, str]:
    """The files of whole probe images by key (md5 of 'dataset/image_id', first 16 hex)."""
    return {r["key"]: r["path"] for r in rows(run, """
        SELECT substr(md5(dataset || '/' || image_id), 1, 16) AS key, any_value(path) AS path FROM images
        WHERE path IS NOT NULL AND list_contains($keys, substr(md5(dataset || '/' || image_id), 1, 16))
        GROUP BY key""", {"keys": list(keys)})}


def open_image(run: Run, key: str, path: str | None = None):
    """The whole probe image `key` as an RGB PIL image, read from the file the images table names
    (or `path`, already looked up with image_paths); None when that file is gone or unreadable."""
    from PIL import Image

    path = path or image_paths(run, [key]).get(key)
    if not path:
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError):  # moved, deleted or not an image: the card draws the box alone
        return None


def image_png(run: Run, key: str, side: int = 320, path: str | None = None) -> bytes | None:
    """The whole probe image `key` as a PNG at most `side` px; None when its file is gone.
    `path`: its file, already looked up with image_paths (a caller writing many)."""
    import io

    from PIL import Image

    im = open_image(run, key, path)
    if im is None:
        return None
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=plots.PNG_LEVEL)
    return buf.getvalue()


def heatmap_jpeg(run: Run, top: dict, image=None) -> bytes | None:
    """A top image of a card (a `top_activations` row) with the unit's map over it as a heatmap
    (plots.heatmap_jpeg); None where it has no map worth drawing. The map is stretched over the
    region of the image the model saw (`seen`: all of it, or a centre crop's square), as the max cell is.
    Without the image file, the crop stands in its box on the frame's grey, as the card draws it.
    `image`: the image already open (`open_image`), for a caller drawing many maps on it."""
    import io

    from PIL import Image

    if not top.get("has_map"):
        return None
    im = image if image is not None else open_image(run, top["image_key"]) if top.get("has_full") else None
    if im is None:
        W, H = top.get("width") or top.get("x1") or 64, top.get("height") or top.get("y1") or 64
        im = Image.new("RGB", (W, H), (228, 231, 236))
        thumb = rows(run, "SELECT thumbnail FROM patches WHERE patch_id = $p AND thumbnail IS NOT NULL LIMIT 1",
                     {"p": top.get("patch_id")}) if top.get("x1") is not None else []
        if thumb:
            x0, y0, x1, y1 = top["x0"], top["y0"], top["x1"], top["y1"]
            with Image.open(io.BytesIO(bytes(thumb[0]["thumbnail"]))) as crop:
                im.paste(crop.convert("RGB").resize((max(1, x1 - x0), max(1, y1 - y0))), (x0, y0))
    return plots.heatmap_jpeg(im.crop(top.get("seen") or (0, 0, *im.size)), top["act_map"])


def heatmap_of(run: Run, model: str, layer: str, unit: int, rank: int) -> bytes | None:
    """`heatmap_jpeg` of one unit's top image `rank` (the web app's /heatmap route)."""
    top = top_activations(run, model, layer, unit, k=rank + 1, rank=rank)
    return heatmap_jpeg(run, top[0]) if top else None


N_LINKED = 5  # co-activated units shown per side


# Rows of one co-activation join (images x units asked x units of the other layer), at most:
# a report asks for a layer's units in chunks under it.
MAX_PAIR_ROWS = 5_000_000


def coactivation(run: Run, model: str, layer: str, units: list[int], top: int = N_LINKED) -> dict[int, dict]:
    """For each of `units`, the units of the previous and next recorded layer of the same model
    that co-activate most with it: Pearson r, over the probe images both layers were recorded on,
    between the unit's and each other unit's per-image spatial max (pooled.act_max), strongest |r|
    first -> {unit: {"fed_by"|"feeds": {"layer", "n_images", "units": [{"unit", "r"}]}}}.
    Correlation, not causation: the cheapest honest link the store holds per unit (the gradient x
    activation edges of group_edges are per group; the card's circuit shows them)."""
    if not units or not has_table(run, "pooled"):
        return {}
    order = rows(run, """
        SELECT l.layer, min(l.depth) AS depth FROM layers l
        WHERE l.model = $m AND l.layer IN (SELECT DISTINCT layer FROM pooled WHERE model = $m)
        GROUP BY l.layer ORDER BY depth, l.layer""", {"m": model})
    names = [r["layer"] for r in order]
    if layer not in names:
        return {}
    i = names.index(layer)
    out: dict[int, dict] = {}
    for side, other in (("fed_by", names[i - 1] if i > 0 else None),
                        ("feeds", names[i + 1] if i + 1 < len(names) else None)):
        if other is None:
            continue
        size = rows(run, "SELECT count(*) AS n, max(len(act_max)) AS w FROM pooled WHERE model = $m AND layer = $o",
                    {"m": model, "o": other})[0]
        chunk = max(1, MAX_PAIR_ROWS // max(1, (size["n"] or 0) * (size["w"] or 0)))
        for c in range(0, len(units), chunk):
            for r in rows(run, """
                    WITH me AS (SELECT p.dataset, p.image_id, u.unit, p.act_max[u.unit + 1] AS a
                                FROM pooled p, (SELECT unnest($units) AS unit) u WHERE p.model = $m AND p.layer = $l),
                         o AS (SELECT dataset, image_id, unnest(act_max) AS b, generate_subscripts(act_max, 1) - 1 AS unit
                               FROM pooled WHERE model = $m AND layer = $o)
                    SELECT me.unit, o.unit AS other, corr(me.a, o.b) AS r, count(*) AS n_images
                    FROM me JOIN o ON o.dataset = me.dataset AND o.image_id = me.image_id
                    GROUP BY me.unit, o.unit HAVING r IS NOT NULL AND NOT isnan(r)
                    QUALIFY row_number() OVER (PARTITION BY me.unit ORDER BY abs(r) DESC, o.unit) <= $k
                    ORDER BY me.unit, abs(r) DESC, o.unit""",
                    {"m": model, "l": layer, "o": other, "units": [int(u) for u in units[c:c + chunk]], "k": top}):
                e = out.setdefault(r["unit"], {}).setdefault(side, {"layer": other, "n_images": 0, "units": []})
                e["n_images"] = max(e["n_images"], r["n_images"])
                e["units"].append({"unit": r["other"], "r": float(r["r"])})
    return out


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

SEARCH_MODES = ("all", "exact", "label", "semantic", "open")
FOUND_BY = ("exact", "label", "semantic", "open")  # the merged answer's order: surest first
# Merged search keeps semantic neighbours at least this similar, and within SPREAD of the nearest.
SEMANTIC_FLOOR, SEMANTIC_SPREAD = 0.3, 0.2


def all_concepts(run: Run) -> list[str]:
    return [r["concept"] for r in rows(run, """
        SELECT DISTINCT concept FROM concept_units WHERE concept IS NOT NULL
        UNION SELECT DISTINCT item_id FROM embeddings WHERE kind = 'concept'
        ORDER BY 1""")]


def units_for_concepts(run: Run, concepts: list[str], per_concept: int = 8) -> list[dict]:
    """The best `per_concept` units of each concept: the concept_neurons macro (the one concept search)."""
    return rows(run, """
        SELECT n.concept, n.model, n.layer, n.unit, n.scorer, n.score, n.confidence, n.rank_in_model AS rank
        FROM unnest($cs) AS c(name), concept_neurons(c.name, top_n := $k) n
        ORDER BY n.concept, n.rank""", {"cs": concepts, "k": per_concept})


def search_exact(run: Run, phrase: str, k: int = 50) -> dict:
    c = phrase.strip().lower()
    hits = rows(run, """
        SELECT model, layer, unit, scorer, rank_in_model, concept, score, confidence
        FROM concept_neurons($c, top_n := $k) ORDER BY rank""", {"c": c, "k": k})
    out = {"mode": "exact", "q": phrase, "concept": c, "units": hits}
    if not hits:
        out["did_you_mean"] = difflib.get_close_matches(c, all_concepts(run), n=5, cutoff=0.6)
    return out


def search_label(run: Run, phrase: str, k: int = 50) -> dict:
    """Units whose label from an imported method (field results: clip-dissect, milan, netdissect,
    ...) is the phrase or holds it as whole words (the label_neurons macro); labels that are the
    phrase first. A model only imported has no concept scores, so the other modes cannot find it."""
    hits = rows(run, """
        SELECT model, layer, unit, method AS scorer, label AS concept, exact
        FROM label_neurons($p)
        WHERE method IN (SELECT DISTINCT method FROM explanation_candidates)
        ORDER BY exact DESC, model, depth, layer, unit, method LIMIT $k""", {"p": phrase.strip(), "k": k}) \
        if has_table(run, "explanation_candidates") else []
    return {"mode": "label", "q": phrase, "units": hits}


def search_semantic(run: Run, phrase: str, k: int = 10, per_concept: int = 5) -> dict:
    """Nearest concepts by MiniLM similarity among the store's concepts, with their top units."""
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
    on `find_store` (a Store reading through the locked snapshot, see snapshot_store); the encoder
    runs on `device` at `precision` (default auto: CUDA when present)."""
    from ..analysis.find import find  # here, not above: the only web path that needs torch (fast start)

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
        out["notes"] = list(res.notes)
    return out


def search_all(run: Run, phrase: str, k: int = 50, find_store=None, device=None, precision=None) -> dict:
    """One answer from every mode: units with exactly this concept, then units of the nearest
    concepts (MiniLM), then units whose top patches match the words (open vocabulary); each unit
    once, where it was found first; within a mode by confidence (semantic: by similarity)."""
    notes, found = [], []
    ex = search_exact(run, phrase, k)
    for u in ex["units"]:
        found.append({**u, "found_by": "exact", "similarity": 1.0})
    for u in search_label(run, phrase, k)["units"]:   # published labels carry no calibrated confidence
        exact = u.pop("exact")
        found.append({**u, "found_by": "label", "similarity": 1.0 if exact else None, "score": None,
                      "confidence": None})
    sem = search_semantic(run, phrase, 8, per_concept=k)
    notes += [sem["note"]] if sem.get("note") else []
    # Only concepts near the nearest one: far ones (0.4 for 'green' vs 0.77 for 'striped') are noise here.
    floor = max(SEMANTIC_FLOOR, (sem["concepts"][0]["similarity"] - SEMANTIC_SPREAD) if sem["concepts"] else 0)
    for t in sem["concepts"]:
        for u in t["units"] if t["similarity"] >= floor else []:
            found.append({**u, "found_by": "semantic", "similarity": t["similarity"]})
    if find_store is not None:
        try:
            op = search_open_find(run, find_store, phrase, 20, device, precision)
            notes += op.get("notes", [])[:1]  # why open found nothing; its summary of the other modes is moot here
            for u in op["units"]:
                found.append({"model": u["model"], "layer": u["layer"], "unit": u["unit"], "concept": None,
                              "scorer": "open", "score": u.get("score"), "confidence": u.get("confidence"),
                              "found_by": "open", "similarity": None, "best_patch": u.get("best_patch")})
        except NeurostoreError as e:  # e.g. no patch embeddings: the other modes still answer
            notes.append(f"Open vocabulary: {e}")
    key = {m: i for i, m in enumerate(FOUND_BY)}
    found.sort(key=lambda u: (key[u["found_by"]], -(u["similarity"] or 0), -(u["confidence"] or 0),
                              -(u["score"] or 0)))
    seen, units = set(), []
    for u in found:
        uid = (u["model"], u["layer"], u["unit"])
        if uid not in seen:
            seen.add(uid)
            units.append(u)
    out = {"mode": "all", "q": phrase, "units": units[:k],
           "counts": {m: sum(u["found_by"] == m for u in units) for m in FOUND_BY},
           "nearest": [{"concept": t["concept"], "similarity": t["similarity"]} for t in sem["concepts"]],
           "columns": ["model", "layer", "unit", "concept", "found_by", "similarity", "confidence", "score",
                       "scorer"]}
    if notes:
        out["note"] = " ".join(notes)
    return out


def search(run: Run, phrase: str, mode: str = "all", k: int | None = None, find_store=None, device=None,
           precision=None) -> dict:
    if mode not in SEARCH_MODES:
        raise BadParameter(unknown("search mode", mode, SEARCH_MODES, "Use mode=all, exact, label, semantic or open."))
    if not phrase or not phrase.strip():
        return {"mode": mode, "q": phrase or "", "empty": True}
    if mode == "all":
        return search_all(run, phrase, k or 50, find_store, device, precision)
    if mode == "exact":
        return search_exact(run, phrase, k or 50)
    if mode == "semantic":
        return search_semantic(run, phrase, k or 10)
    if mode == "label":
        return search_label(run, phrase, k or 50)
    if find_store is None:
        raise BadParameter("Open-vocabulary search needs the snapshot store (see snapshot_store).")
    return search_open_find(run, find_store, phrase, k or 30, device, precision)


def snapshot_store(run: Run, path):
    """A Store whose every query goes to `run` (the web app's locked snapshot) instead of a
    connection that can read files: lets API functions written against Store (e.g.
    analysis.find) serve the web app without opening another door."""
    from ..store import Store

    return Store.reading_through(path, run)


def schema_sidebar() -> list[dict]:
    """The console's sidebar: every table of schema/ with its columns, types and comments."""
    from ..schema import load_schemas

    return [{"table": t.name, "description": t.description,
             "columns": [{"name": c.name, "type": c.type, "comment": c.comment} for c in t.columns]}
            for t in sorted(load_schemas().values(), key=lambda t: t.name)]


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
    if kind == "audit":
        out["verdicts"] = audit_verdicts(run)
        # The evidence: the columns that make the case first; every column stays in the JSON and the console.
        lead = {"audit_findings": ["model", "class", "concept", "verified", "headline", "ablation", "direction_layer",
                                   "n_units", "neurons", "contribution", "relatedness", "cue_flip_before",
                                   "cue_flip_after", "reliance_drop", "accuracy_before", "accuracy_after"],
                "audit_units": ["model", "class", "rank", "layer", "unit", "label", "label_confidence", "flagged",
                                "relatedness", "selectivity", "cue_effect", "grad_x_act", "share", "ablation_effect"]}
        for t in out["tables"]:
            if t["table"] in lead and set(lead[t["table"]][:5]) <= set(t["columns"]):  # the schema's table
                t["shown"] = [c for c in lead[t["table"]] if c in t["columns"]]  # (older stores lack some)
    return out


def audit_verdicts(run: Run) -> list[dict]:
    """One line per audited (model, class), the answer before the evidence: the concept it relies on
    (verified or only suspected) with the cue flip rate before and after removing it (its units
    zeroed, or its residual-stream direction projected out), or none."""
    if not has_table(run, "audit_units"):
        return []
    have = set(run("SELECT * FROM audit_findings LIMIT 0").column_names) if has_table(run, "audit_findings") else set()
    how = ", ".join(f"b.{c}" if c in have else f"NULL::VARCHAR AS {c}" for c in ("ablation", "direction_layer"))
    return rows(run, f"""
        WITH c AS (SELECT DISTINCT model, class FROM audit_units),
             f AS ({"SELECT * FROM audit_findings" if has_table(run, "audit_findings") else
                    "SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS class, NULL::VARCHAR AS concept, "
                    "NULL::INTEGER AS rank, NULL::BOOLEAN AS verified, NULL::BOOLEAN AS headline, "
                    "NULL::INTEGER AS n_units, NULL::VARCHAR AS ablation, NULL::VARCHAR AS direction_layer, "
                    "NULL::FLOAT AS cue_flip_before, NULL::FLOAT AS cue_flip_after, "
                    "NULL::FLOAT AS accuracy_before, NULL::FLOAT AS accuracy_after WHERE false"}),
             best AS (SELECT * FROM f QUALIFY row_number() OVER (PARTITION BY model, class
                                                                 ORDER BY verified DESC NULLS LAST, rank) = 1)
        SELECT c.model, c.class, b.concept, b.verified, coalesce(b.headline, false) AS headline, b.n_units, {how},
               b.cue_flip_before, b.cue_flip_after, b.accuracy_before, b.accuracy_after,
               (SELECT count(*) FROM f WHERE f.model = c.model AND f.class = c.class) AS n_findings,
               CASE WHEN b.verified THEN 'relies on a spurious concept'
                    WHEN b.concept IS NOT NULL THEN 'suspected, not verified'
                    ELSE 'no spurious concept found' END AS verdict
        FROM c LEFT JOIN best b USING (model, class)
        ORDER BY c.model, b.verified DESC NULLS LAST, b.concept IS NULL, c.class""")
