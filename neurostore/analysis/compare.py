"""Model vs model: concept coverage per layer, concepts one model has and the other lacks, and
unit matching across the two models by activations and by explanations.

    from neurostore.analysis import compare
    res = compare("store/", "probe-cnn", "probe-vit")
    res.summary        # coverage totals, concept differences, matching agreement
    res.matches        # Arrow rows of schema/unit_matches.sql (both directions)
    res.table          # Arrow rows of schema/comparisons.sql (both directions)

Definitions (all stored with the rows, so a query later reads exactly what was computed):

coverage      per layer: units whose explanation (the chosen scorer's top concept) has
              confidence >= `min_confidence` (default 0.9: the calibrated chance that the
              label is right, see trust.py; a random network's units stay near 0), and the
              number of distinct labels among them.
concepts      the labels (confidence >= min_confidence, any layer) of A that no unit of B has,
              of B that A lacks, and shared ones, with unit counts.
activation    Pearson correlation of every unit of A with every unit of B over the probe images
  matching    both models saw (pooled act_mean, joined on dataset and image_id), then one-to-one
              assignment maximising total correlation (scipy linear_sum_assignment on -corr),
              between ALL units of the two models at once (not layer pairs), as in Convergent
              Learning's one-to-one matching and Rosetta Neurons: the depth of each partner
              shows which layers correspond. Bounded by `max_units` per model (default 4096;
              pick layers with layers_a/layers_b beyond that).
explanation   each unit's explanation as one MiniLM vector, the confidence-weighted mean of its
  matching    top-3 concepts, then the same one-to-one assignment on cosine similarity.
agreement     partner: the fraction of matched units of A whose two partners coincide (chance ~
              1/units of B); label: the fraction of activation-matched pairs whose labels are
              identical, next to its chance level sum_l p_A(l) p_B(l) (random pairing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment

from ..errors import BadInput, BadParameter, UnknownLayer, UnknownScorer, listed, unknown
from ..store import Store
from ._common import check_models, matrix, minilm, model_layers, open_store, untrained

MIN_CONFIDENCE = 0.9
MAX_UNITS = 4096
FEW_IMAGES = 200   # below it the notes say the correlations are not yet stable
TOP_CONCEPTS = 3
# patch first (the audits were measured with its labels), then the best by agreement with the probe
# world's truth on hidden units (README, "Confidence and fidelity")
SCORER_PREFERENCE = ("patch", "encoder_iou", "top_images", "iou", "soft_wpmi", "wpmi", "cos_cubed")


@dataclass
class CompareResult:
    """What `compare` returned: per-layer coverage, concepts one model has and the other lacks,
    the unit matches (pyarrow) and the layer correspondence table; to_dict() is `compare --json`."""
    model_a: str
    model_b: str
    scorer: str
    min_confidence: float
    summary: dict
    coverage: list[dict]
    concepts: dict
    matches: pa.Table
    table: pa.Table
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)   # what a reader should know before trusting the figures

    def to_dict(self) -> dict:
        return {"model_a": self.model_a, "model_b": self.model_b, "scorer": self.scorer,
                "min_confidence": self.min_confidence, "run_id": self.run_id, "notes": self.notes, "summary": self.summary,
                "coverage": self.coverage, "concepts": self.concepts,
                "matches": [r for r in self.matches.to_pylist() if r["model"] == self.model_a]}


def pick_scorer(st: Store, models: Sequence[str], scorer: str | None) -> str:
    """The scorer whose explanations are used: the given one (checked), else the first of
    SCORER_PREFERENCE that every model has."""
    have = st.sql("SELECT model, list(DISTINCT scorer) AS s FROM explanations WHERE list_contains($m, model) "
                  "GROUP BY model", {"m": list(models)}).to_pylist()
    by = {r["model"]: set(r["s"]) for r in have}
    common = set.intersection(*(by.get(m, set()) for m in models)) if models else set()
    if scorer is not None:
        if scorer not in common:
            raise UnknownScorer(unknown(f"scorer with explanations for {' and '.join(models)}", scorer, common,
                                        "Dissect with that scorer first."))
        return scorer
    for s in SCORER_PREFERENCE:
        if s in common:
            return s
    if common:
        return sorted(common)[0]
    missing = [m for m in models if not by.get(m)]
    raise BadInput(f"No scorer has explanations for {' and '.join(models)} "
                   f"({'none for ' + ', '.join(missing) if missing else 'no scorer in common'}). "
                   "Dissect both models with a common scorer, e.g. --scorer patch.")


def explanations(st: Store, model: str, scorer: str) -> dict[tuple[str, int], dict]:
    """(layer, unit) -> {label, confidence, concepts, confidences}, the newest run's row."""
    rows = st.sql("""SELECT layer, unit, label, confidence, concepts, confidences FROM explanations
                     WHERE model = $m AND scorer = $s
                     QUALIFY row_number() OVER (PARTITION BY layer, unit ORDER BY run_id DESC) = 1""",
                  {"m": model, "s": scorer}).to_pylist()
    return {(r["layer"], r["unit"]): r for r in rows}


def _pooled(st: Store, model: str, dataset: str, layers: Sequence[str] | None):
    """[images, units] act_mean over the dataset, column keys (layer, unit), image ids."""
    p = {"m": model, "d": dataset}
    extra = ""
    if layers:
        extra = " AND list_contains($layers, layer)"
        p["layers"] = list(layers)
    t = st.sql(f"""SELECT layer, image_id, act_mean FROM pooled WHERE model = $m AND dataset = $d{extra}
                   QUALIFY row_number() OVER (PARTITION BY layer, image_id ORDER BY run_id DESC) = 1
                   ORDER BY layer, image_id""", p)
    by_layer: dict[str, tuple[list[str], np.ndarray]] = {}
    layer_col = t.column("layer").to_pylist()
    for layer in dict.fromkeys(layer_col):
        sub = t.filter(pa.compute.equal(t.column("layer"), layer))
        by_layer[layer] = (sub.column("image_id").to_pylist(), matrix(sub.column("act_mean")))
    return by_layer


def _shared_dataset(st: Store, a: str, b: str) -> tuple[str, int]:
    rows = st.sql("""SELECT pa.dataset, count(DISTINCT pa.image_id) AS n FROM pooled pa
                     JOIN (SELECT DISTINCT dataset, image_id FROM pooled WHERE model = $b) pb
                       ON pa.dataset = pb.dataset AND pa.image_id = pb.image_id
                     WHERE pa.model = $a GROUP BY pa.dataset ORDER BY n DESC, pa.dataset""",
                  {"a": a, "b": b}).to_pylist()
    if not rows:
        raise BadInput(f"Models '{a}' and '{b}' share no probe images (pooled activations joined on dataset and "
                       "image_id), so their units cannot be matched by activation. Dissect both on the same images.")
    return rows[0]["dataset"], int(rows[0]["n"])


def _matrix_for(by_layer, images: list[str], layer_order: list[str]):
    cols, keys = [], []
    for layer in layer_order:
        if layer not in by_layer:
            continue
        ids, m = by_layer[layer]
        pos = {iid: i for i, iid in enumerate(ids)}
        cols.append(m[[pos[i] for i in images]])
        keys += [(layer, u) for u in range(m.shape[1])]
    X = np.concatenate(cols, axis=1).astype(np.float64) if cols else np.zeros((len(images), 0))
    return X, keys


def _zscore(X: np.ndarray) -> np.ndarray:
    X = np.nan_to_num(X)
    sd = X.std(0)
    Z = (X - X.mean(0)) / np.where(sd > 1e-8, sd, 1.0)
    Z[:, sd <= 1e-8] = 0.0  # a dead unit correlates with nothing
    return Z


def _explanation_vectors(expl: dict, keys: list) -> np.ndarray:
    """One MiniLM vector per unit: the confidence-weighted mean of its top concepts (module doc)."""
    texts, weights = [], []
    for k in keys:
        e = expl[k]
        cs = [c for c in (e.get("concepts") or [e.get("label")]) if c][:TOP_CONCEPTS] or [e.get("label") or ""]
        ws = list(e.get("confidences") or [e.get("confidence") or 0.0])[: len(cs)]
        ws += [0.0] * (len(cs) - len(ws))
        ws = [max(float(w or 0.0), 0.0) for w in ws]
        if sum(ws) <= 0:
            ws = [1.0] * len(cs)
        texts.append(cs)
        weights.append(ws)
    vocab = sorted({c for cs in texts for c in cs})
    emb = dict(zip(vocab, minilm(vocab))) if vocab else {}
    V = np.stack([sum(w * emb[c] for c, w in zip(cs, ws)) for cs, ws in zip(texts, weights)]) if keys \
        else np.zeros((0, 384))
    return V / np.clip(np.linalg.norm(V, axis=1, keepdims=True), 1e-12, None)


def compare(store: Store | str | Path, model_a: str, model_b: str, *, scorer: str | None = None,
            min_confidence: float = MIN_CONFIDENCE, max_units: int = MAX_UNITS,
            layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
            write: bool = True) -> CompareResult:
    """Compare two dissected models (module doc); write unit_matches and comparisons rows in one
    run (a re-run of the same pair replaces them) unless write=False."""
    if model_a == model_b:
        raise BadParameter(f"Compare two different models; got '{model_a}' twice.")
    if not 0.0 <= min_confidence <= 1.0:
        raise BadParameter(f"min_confidence={min_confidence} is a probability: give one from 0 to 1.")
    layers_a, layers_b = listed(layers_a, "layers_a"), listed(layers_b, "layers_b")
    st = open_store(store, read_only=not write)
    check_models(st, [model_a, model_b])
    lay = {m: model_layers(st, m) for m in (model_a, model_b)}
    for m, chosen in ((model_a, layers_a), (model_b, layers_b)):   # a typo, not 'no pooled activations'
        have = [r["layer"] for r in lay[m]]
        for layer in chosen or ():
            if layer not in have:
                raise UnknownLayer(unknown(f"layer of {m}", layer, have))
    scorer = pick_scorer(st, [model_a, model_b], scorer)
    depth = {m: {r["layer"]: r["depth_frac"] for r in lay[m]} for m in lay}
    expl = {m: explanations(st, m, scorer) for m in (model_a, model_b)}

    # -- coverage and concept differences ------------------------------------------------------
    coverage, labels = [], {}
    for m in (model_a, model_b):
        confident = Counter()
        for r in lay[m]:
            units = [(k, e) for k, e in expl[m].items() if k[0] == r["layer"]]
            lab = [e["label"] for _, e in units if e["label"] and (e["confidence"] or 0) >= min_confidence]
            confident.update(lab)
            coverage.append({"model": m, "layer": r["layer"], "depth_frac": r["depth_frac"], "n_units": r["n_units"],
                             "n_explained": len(units), "n_labelled": len(lab), "n_concepts": len(set(lab)),
                             "concepts": sorted(set(lab))})
        labels[m] = confident
    only_a = sorted(set(labels[model_a]) - set(labels[model_b]), key=lambda c: (-labels[model_a][c], c))
    only_b = sorted(set(labels[model_b]) - set(labels[model_a]), key=lambda c: (-labels[model_b][c], c))
    shared = sorted(set(labels[model_a]) & set(labels[model_b]), key=lambda c: (-labels[model_a][c] - labels[model_b][c], c))
    concepts = {"only_in_a": [{"concept": c, "n_units": labels[model_a][c]} for c in only_a],
                "only_in_b": [{"concept": c, "n_units": labels[model_b][c]} for c in only_b],
                "shared": [{"concept": c, "n_units_a": labels[model_a][c], "n_units_b": labels[model_b][c]}
                           for c in shared]}

    # -- unit matching --------------------------------------------------------------------------
    dataset, n_shared = _shared_dataset(st, model_a, model_b)
    pooled = {model_a: _pooled(st, model_a, dataset, layers_a), model_b: _pooled(st, model_b, dataset, layers_b)}
    images = sorted(set.intersection(*(set(ids) for m in pooled for ids, _ in pooled[m].values())))
    order = {m: [r["layer"] for r in lay[m]] + sorted(set(pooled[m]) - {r["layer"] for r in lay[m]}) for m in pooled}
    XA, keys_a = _matrix_for(pooled[model_a], images, order[model_a])
    XB, keys_b = _matrix_for(pooled[model_b], images, order[model_b])
    for m, keys in ((model_a, keys_a), (model_b, keys_b)):
        if len(keys) > max_units:
            raise BadInput(f"Model '{m}' has {len(keys)} recorded units; matching is bounded to {max_units} per model "
                           "(a dense correlation and assignment). Pick layers with --layers-a/--layers-b or raise "
                           "--max-units.")
        if not keys:
            raise BadInput(f"Model '{m}' has no pooled activations on dataset '{dataset}' for the chosen layers.")
    if len(images) < 3:
        raise BadInput(f"Only {len(images)} shared probe images between '{model_a}' and '{model_b}'; need at least 3.")
    corr = _zscore(XA).T @ _zscore(XB) / len(images)      # [units A, units B]
    ra, rb = linear_sum_assignment(-corr)
    act_partner = {keys_a[i]: keys_b[j] for i, j in zip(ra, rb)}

    # Explanation matching over the units that have both pooled activations and explanations.
    ea = [k for k in keys_a if k in expl[model_a]]
    eb = [k for k in keys_b if k in expl[model_b]]
    VA, VB = _explanation_vectors(expl[model_a], ea), _explanation_vectors(expl[model_b], eb)
    exp_partner, exp_sim = {}, {}
    if ea and eb:
        sim = VA @ VB.T
        ia, ib = linear_sum_assignment(-sim)
        exp_partner = {ea[i]: eb[j] for i, j in zip(ia, ib)}
        exp_sim = {ea[i]: float(sim[i, j]) for i, j in zip(ia, ib)}
    lab_a = {k: e["label"] for k, e in expl[model_a].items()}
    lab_b = {k: e["label"] for k, e in expl[model_b].items()}
    lab_vocab = sorted({v for v in list(lab_a.values()) + list(lab_b.values()) if v})
    lab_emb = dict(zip(lab_vocab, minilm(lab_vocab))) if lab_vocab else {}

    def label_sim(x, y):
        return float(lab_emb[x] @ lab_emb[y]) if x in lab_emb and y in lab_emb else None

    both = [k for k in act_partner if k in exp_partner]
    partner_agree = float(np.mean([act_partner[k] == exp_partner[k] for k in both])) if both else None
    act_pairs = [(k, act_partner[k]) for k in act_partner if k in lab_a and act_partner[k] in lab_b]
    label_agree = float(np.mean([lab_a[a] == lab_b[b] for a, b in act_pairs])) if act_pairs else None
    pa_, pb_ = Counter(lab_a[a] for a, _ in act_pairs), Counter(lab_b[b] for _, b in act_pairs)
    n_pairs = len(act_pairs)
    label_chance = float(sum(pa_[c] * pb_[c] for c in pa_) / n_pairs**2) if n_pairs else None
    sims_pairs = [label_sim(lab_a[a], lab_b[b]) for a, b in act_pairs]
    sims_pairs = [s for s in sims_pairs if s is not None]
    all_a = [lab_emb[lab_a[a]] for a, _ in act_pairs if lab_a[a] in lab_emb]
    all_b = [lab_emb[lab_b[b]] for _, b in act_pairs if lab_b[b] in lab_emb]
    sim_chance = float(np.mean(np.stack(all_a) @ np.stack(all_b).T)) if all_a and all_b else None
    matched_corr = corr[ra, rb]

    # -- per-layer correspondence ----------------------------------------------------------------
    layer_rows = []
    for m, other, keys, partner in ((model_a, model_b, keys_a, act_partner),
                                    (model_b, model_a, keys_b, {v: k for k, v in act_partner.items()})):
        ci = {k: i for i, k in enumerate(keys_a)}
        cj = {k: j for j, k in enumerate(keys_b)}
        for layer in order[m]:
            ks = [k for k in keys if k[0] == layer and k in partner]
            if not ks:
                continue
            cs = [corr[ci[k], cj[partner[k]]] if m == model_a else corr[ci[partner[k]], cj[k]] for k in ks]
            pl = Counter(partner[k][0] for k in ks)
            top_layer, top_n = pl.most_common(1)[0]
            layer_rows.append({"model": m, "other_model": other, "layer": layer, "depth_frac": depth[m].get(layer),
                               "n_matched": len(ks), "mean_corr": float(np.mean(cs)),
                               "partner_depth_frac": float(np.mean([depth[other].get(partner[k][0]) or 0.0 for k in ks])),
                               "top_partner_layer": top_layer, "top_partner_share": top_n / len(ks)})

    summary = {
        "dataset": dataset, "n_images": len(images), "scorer": scorer, "min_confidence": min_confidence,
        "units_a": len(keys_a), "units_b": len(keys_b),
        "labelled_a": sum(labels[model_a].values()), "labelled_b": sum(labels[model_b].values()),
        "concepts_a": len(labels[model_a]), "concepts_b": len(labels[model_b]),
        "only_in_a": len(only_a), "only_in_b": len(only_b), "shared": len(shared),
        "activation_pairs": int(len(ra)), "mean_matched_corr": float(matched_corr.mean()) if len(ra) else None,
        "median_matched_corr": float(np.median(matched_corr)) if len(ra) else None,
        "explanation_pairs": len(exp_partner),
        "mean_explanation_similarity": float(np.mean(list(exp_sim.values()))) if exp_sim else None,
        "partner_agreement": partner_agree,
        "partner_agreement_chance": 1.0 / max(len(keys_b), 1) if both else None,
        "label_agreement": label_agree, "label_agreement_chance": label_chance,
        "matched_label_similarity": float(np.mean(sims_pairs)) if sims_pairs else None,
        "matched_label_similarity_chance": sim_chance,
    }

    # -- rows -----------------------------------------------------------------------------------------
    match_rows = []
    ci = {k: i for i, k in enumerate(keys_a)}
    cj = {k: j for j, k in enumerate(keys_b)}
    for method, pairs in (("activation", list(act_partner.items())), ("explanation", list(exp_partner.items()))):
        for ka, kb in pairs:
            score = float(corr[ci[ka], cj[kb]]) if method == "activation" else exp_sim[ka]
            other_method = exp_partner if method == "activation" else act_partner
            agree = (other_method.get(ka) == kb) if ka in other_method else None
            la, lb = lab_a.get(ka), lab_b.get(kb)
            common = {"method": method, "score": score, "corr": float(corr[ci[ka], cj[kb]]),
                      "label_similarity": label_sim(la, lb) if la and lb else None, "agree": agree,
                      "n_images": len(images), "dataset": dataset, "scorer": scorer}
            match_rows.append({"model": model_a, "layer": ka[0], "unit": ka[1], "depth_frac": depth[model_a].get(ka[0]),
                               "other_model": model_b, "other_layer": kb[0], "other_unit": kb[1],
                               "other_depth_frac": depth[model_b].get(kb[0]), "label": la, "other_label": lb, **common})
            match_rows.append({"model": model_b, "layer": kb[0], "unit": kb[1], "depth_frac": depth[model_b].get(kb[0]),
                               "other_model": model_a, "other_layer": ka[0], "other_unit": ka[1],
                               "other_depth_frac": depth[model_a].get(ka[0]), "label": lb, "other_label": la, **common})
    comp_rows = []

    def add(m, other, section, metric, value, layer=None, concept=None, n=None, d=None):
        comp_rows.append({"model": m, "other_model": other, "section": section, "layer": layer,
                          "depth_frac": d, "concept": concept, "metric": metric,
                          "value": None if value is None else float(value), "n": n, "scorer": scorer,
                          "min_confidence": min_confidence, "dataset": dataset})

    for c in coverage:
        other = model_b if c["model"] == model_a else model_a
        for metric in ("n_units", "n_explained", "n_labelled", "n_concepts"):
            add(c["model"], other, "coverage", metric, c[metric], layer=c["layer"], d=c["depth_frac"], n=c["n_units"])
    for m, other, only in ((model_a, model_b, only_a), (model_b, model_a, only_b)):
        for cpt in only:
            add(m, other, "concept_only", "n_units", labels[m][cpt], concept=cpt)
        for cpt in shared:
            add(m, other, "concept_shared", "n_units", labels[m][cpt], concept=cpt)
    for lr in layer_rows:
        for metric in ("mean_corr", "partner_depth_frac", "top_partner_share"):
            add(lr["model"], lr["other_model"], "layer_match", metric, lr[metric], layer=lr["layer"],
                d=lr["depth_frac"], n=lr["n_matched"], concept=None)
    for m, other in ((model_a, model_b), (model_b, model_a)):
        for metric in ("mean_matched_corr", "median_matched_corr", "mean_explanation_similarity", "partner_agreement",
                       "partner_agreement_chance", "label_agreement", "label_agreement_chance",
                       "matched_label_similarity", "matched_label_similarity_chance"):
            add(m, other, "matching", metric, summary[metric], n=summary["activation_pairs"])
        add(m, other, "concepts", "n_concepts", summary["concepts_a" if m == model_a else "concepts_b"])
        add(m, other, "concepts", "n_only_here", summary["only_in_a" if m == model_a else "only_in_b"])
        add(m, other, "concepts", "n_shared", summary["shared"])

    matches = pa.Table.from_pylist(match_rows) if match_rows else pa.table({})
    table = pa.Table.from_pylist(comp_rows)
    res = CompareResult(model_a, model_b, scorer, min_confidence, summary, coverage, concepts, matches, table)
    res.summary["layer_correspondence"] = [r for r in layer_rows if r["model"] == model_a]
    res.notes = [f"{m} was dissected with untrained (random) weights: its matches are a baseline, not findings"
                 for m in untrained(st, [model_a, model_b])]
    if len(images) < FEW_IMAGES:
        res.notes.append(f"the activation correlations are over {len(images)} images; a few hundred make them stable")
    if write:
        params = {"model_a": model_a, "model_b": model_b, "scorer": scorer, "min_confidence": min_confidence,
                  "dataset": dataset, "n_images": len(images), "layers_a": layers_a, "layers_b": layers_b,
                  "max_units": max_units}
        key = "compare:" + "|".join(sorted((model_a, model_b)))
        with st.run("compare", params) as run:
            if match_rows:
                run.write("unit_matches", matches, key=key)
            run.write("comparisons", table, key=key)
        res.run_id = run.run_id
    return res
