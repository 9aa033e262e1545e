"""Concept -> neurons: which units of which models detect a phrase, and where in each network
the concept lives.

    from neurostore.analysis import find
    res = find("store/", "striped")              # exact + semantic + open vocabulary
    res.units        # Arrow: model, layer, unit, depth_frac, method, concept, similarity, score, confidence, ...
    res.profile      # Arrow: best evidence per (model, layer, method), with depth_frac

Three methods, each answered from the store without re-dissecting:

exact     the phrase is a stored concept: its units by the `concept_neurons` SQL macro (over
          `concept_units`, the top units per model, concept and scorer the store derives from `scores`).
semantic  stored concepts whose MiniLM similarity to the phrase is at least `min_similarity`
          (default 0.6; the best `max_concepts`), and their units. `similarity` is kept on
          every row: it is the relatedness the match used.
open      open vocabulary: for every encoder whose patch embeddings are stored, the phrase is
          embedded with that encoder and each unit is scored and calibrated exactly as the
          `patch` scorer would have done had the phrase been in the vocabulary
          (`trust.phrase_explanations`): the activation-weighted mean cosine of the unit's top-k
          patches minus the mean over the layer's patches, and the confidence every stored
          explanation has (the layer's stored null, the margin over the unit's best concept,
          held-out fidelity), so a phrase and a stored concept read on one scale.
label     every method's explanation labels (imported ones such as clip-dissect, milan and
          netdissect, and neurostore's scorers): units whose label is the phrase or holds it as
          whole words (the `label_neurons` SQL macro). Each method is its own `label:<method>`
          in the results and the depth profile, `scorer` names it; `similarity` is 1 for a label
          that is the phrase, else the MiniLM similarity of phrase and label (also `score` and
          `confidence`: imported labels carry no calibrated confidence).

The depth profile is the best confidence (and raw score) per model, layer and method, with
the layer's depth_frac (0 = input end, 1 = output): where in each network the concept lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import trust
from ..encoders import load_encoder
from ..errors import BadParameter, NeurostoreError, UnknownLayer, UnknownScorer, listed, unknown
from ..sqlfuncs import MINILM_ID
from ..store import Store
from ..world import worlds_in_store
from ._common import check_models, matrix, minilm, open_store, resolve, untrained

METHODS = ("exact", "semantic", "open", "label")
MIN_SIMILARITY = 0.6
MAX_CONCEPTS = 5
PROFILE_CONFIDENT = 0.5  # units counted as "confident" in the depth profile

UNIT_COLUMNS = ("model", "layer", "unit", "depth_frac", "method", "concept", "similarity", "score", "confidence",
                "scorer", "encoder", "headline", "rank")


@dataclass
class FindResult:
    """What `find` returned: the units that detect the phrase per method (pyarrow), the depth
    profile per model and layer, the concepts matched, and notes on what to trust; to_dict() is
    `neurostore find --json`."""
    phrase: str
    units: pa.Table                      # top units per method (UNIT_COLUMNS)
    profile: pa.Table                    # model, layer, depth_frac, method, best_score, best_confidence, ...
    concepts: list[dict]                 # concepts matched: concept, similarity, method
    encoders: list[str]                  # encoders used for the open-vocabulary search
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "concepts": self.concepts, "encoders": self.encoders, "notes": self.notes,
                "units": self.units.to_pylist(), "profile": self.profile.to_pylist()}


def _layer_depths(st: Store) -> dict[tuple[str, str], tuple[int, float]]:
    rows = st.sql("SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers "
                  "GROUP BY model, layer").to_pylist()
    return {(r["model"], r["layer"]): (r["depth"], r["depth_frac"]) for r in rows}


def _concept_rows(st: Store, concepts: Sequence[str], scorer, models, layers) -> list[dict]:
    """Every stored unit of each concept: the concept_neurons macro (queries/_macros.sql)."""
    if not concepts:
        return []
    return st.sql("""SELECT n.model, n.layer, n.unit, n.concept, n.scorer, n.score, n.confidence, n.encoder, n.headline
                     FROM unnest($concepts) AS c(name),
                          concept_neurons(c.name, top_n := NULL, scorer_name := $scorer, model_ids := $models,
                                          layer_names := $layers) n
                     ORDER BY n.concept, n.rank""",
                  {"concepts": list(concepts), "scorer": scorer or None, "models": list(models) if models else None,
                   "layers": list(layers) if layers else None}).to_pylist()


def _semantic_concepts(st: Store, phrase: str, models, min_similarity: float, max_concepts: int) -> list[dict]:
    """Stored concepts nearest the phrase by MiniLM cosine (stored vectors when present)."""
    names = st.sql("SELECT DISTINCT concept FROM concept_units WHERE concept IS NOT NULL "
                   "AND ($models IS NULL OR list_contains($models, model))",
                   {"models": list(models) if models else None}).column("concept").to_pylist()
    if not names:
        return []
    stored = st.sql("SELECT item_id, any_value(vector) AS vector FROM embeddings WHERE kind = 'concept' "
                    "AND encoder = $e AND list_contains($names, item_id) GROUP BY item_id",
                    {"e": MINILM_ID, "names": names})
    vecs = dict(zip(stored.column("item_id").to_pylist(), matrix(stored.column("vector")))) if stored.num_rows else {}
    missing = [n for n in names if n not in vecs]
    if missing:
        vecs.update(zip(missing, minilm(missing)))
    m = np.stack([vecs[n] for n in names]).astype(np.float32)
    sims = m @ minilm([phrase])[0]
    order = np.argsort(-sims, kind="stable")
    out = []
    for i in order:
        if sims[i] < min_similarity or len(out) >= max_concepts:
            break
        if names[i] != phrase:
            out.append({"concept": names[i], "similarity": float(sims[i]), "method": "semantic"})
    return out


def _open_vocabulary(st: Store, phrase: str, encoder_id: str, models, layers, notes: list[str],
                     device=None, precision: str | None = None) -> list[dict]:
    """Every unit with stored patches, scored for the phrase with `encoder_id` (module doc)."""
    try:
        enc = load_encoder(encoder_id, worlds=worlds_in_store(st), device=device, precision=precision)
    except NeurostoreError as e:
        notes.append(f"open vocabulary: encoder '{encoder_id}' could not be loaded, skipped ({e})")
        return []
    except (OSError, RuntimeError, ValueError, ImportError) as e:  # weights missing offline, etc.
        notes.append(f"open vocabulary: encoder '{encoder_id}' could not be loaded, skipped ({type(e).__name__}: {e})")
        return []
    with torch.no_grad():
        q = enc.encode_texts([phrase]).float().numpy()[0]
    have = st.sql("SELECT DISTINCT model FROM scores WHERE scorer = 'patch' AND encoder = $e ORDER BY model",
                  {"e": encoder_id}).column("model").to_pylist()
    out, missing = [], 0
    for model in have:
        if models and model not in models:
            continue
        r = trust.phrase_explanations(st, model, phrase, q, encoder_id, layers)
        missing = max(missing, r.attrs.get("files_missing", 0))
        if r.attrs.get("layers_without_null"):
            notes.append(f"open vocabulary: {model}'s layers {', '.join(r.attrs['layers_without_null'])} have no "
                         "stored null (a store written before confidences were calibrated), so they are left out; "
                         "neurostore.trust.assess(store) computes it")
        out += [{"model": model, "layer": x.layer, "unit": int(x.unit), "concept": phrase, "scorer": "patch",
                 "score": float(x.score), "confidence": float(x.confidence), "encoder": encoder_id, "similarity": None}
                for x in r.itertuples(index=False)]
    if missing:
        notes.append(f"open vocabulary: {missing} held-out probe images could not be read, so their fidelity is "
                     "missing from the confidence (it counts as no evidence)")
    return out


def _label_rows(st: Store, phrase: str, scorer, models, layers) -> dict[str, list[dict]]:
    """{'label:<method>': rows} of units whose explanation label names the phrase (module doc)."""
    rows = st.sql("SELECT * FROM label_neurons($p, method_name := $s)", {"p": phrase, "s": scorer}).to_pylist()
    rows = [r for r in rows if (not models or r["model"] in models) and (not layers or r["layer"] in layers)]
    near = sorted({r["label"] for r in rows if not r["exact"]})
    sim = dict(zip(near, (minilm(near) @ minilm([phrase])[0]).tolist())) if near else {}
    out: dict[str, list[dict]] = {}
    for r in rows:
        s = 1.0 if r["exact"] else float(sim[r["label"]])
        out.setdefault(f"label:{r['method']}", []).append(
            {"model": r["model"], "layer": r["layer"], "unit": r["unit"], "concept": r["label"], "similarity": s,
             "score": s, "confidence": None, "scorer": r["method"], "encoder": None})   # a label has no calibrated confidence
    return dict(sorted(out.items()))


def _rank(rows: list[dict], method: str, depths: dict, top: int) -> list[dict]:
    # units whose headline (one answer per unit, neurostore.trust) is the concept lead, as in
    # concept_neurons; then the calibrated confidence, weighed by how near the concept is
    def key(r):
        sim = 1.0 if r.get("similarity") is None else r["similarity"]
        return (not r.get("headline"), -(r["confidence"] or 0.0) * sim, -(r["score"] or 0.0), r["model"], r["layer"],
                r["unit"])

    best: dict[tuple, dict] = {}
    for r in sorted(rows, key=key):  # one row per unit and method: its best concept/scorer
        best.setdefault((r["model"], r["layer"], r["unit"]), r)
    out = []
    for i, r in enumerate(list(best.values())[:top]):
        d = depths.get((r["model"], r["layer"]), (None, None))[1]
        out.append({"model": r["model"], "layer": r["layer"], "unit": r["unit"], "depth_frac": d, "method": method,
                    "concept": r["concept"], "similarity": r.get("similarity"), "score": r["score"],
                    "confidence": r["confidence"], "scorer": r.get("scorer"), "encoder": r.get("encoder"),
                    "headline": bool(r.get("headline")), "rank": i})
    return out


def _profile(all_rows: dict[str, list[dict]], depths: dict, models) -> list[dict]:
    """Best evidence per (model, layer, method); every stored layer of the models appears for
    each method that found anything in that model (0 units where the concept is absent)."""
    out = []
    for method, rows in all_rows.items():
        agg: dict[tuple, dict] = {}
        for r in rows:
            a = agg.setdefault((r["model"], r["layer"]), {"best_confidence": -1.0, "best_score": None, "best_unit": None,
                                                          "n_confident": 0, "units": set()})
            # a label match has no confidence: its profile reads how near the label is to the phrase
            conf = r["confidence"] if r["confidence"] is not None else (r.get("similarity") or 0.0)
            if conf > a["best_confidence"]:
                a.update(best_confidence=conf, best_score=r["score"], best_unit=r["unit"], concept=r["concept"])
            if conf >= PROFILE_CONFIDENT and r["unit"] not in a["units"]:
                a["units"].add(r["unit"])
                a["n_confident"] += 1
        found_models = {m for m, _ in agg}
        for (m, layer), (depth, frac) in sorted(depths.items(), key=lambda kv: (kv[0][0], kv[1][0] or 0)):
            if m not in found_models or (models and m not in models):
                continue
            a = agg.get((m, layer))
            out.append({"model": m, "layer": layer, "depth": depth, "depth_frac": frac, "method": method,
                        "best_confidence": a["best_confidence"] if a else 0.0,
                        "best_score": a["best_score"] if a else None,
                        "best_unit": a["best_unit"] if a else None,
                        "concept": a.get("concept") if a else None,
                        "n_confident": a["n_confident"] if a else 0})
    return out


_UNIT_SCHEMA = pa.schema([("model", pa.string()), ("layer", pa.string()), ("unit", pa.int32()),
                          ("depth_frac", pa.float32()), ("method", pa.string()), ("concept", pa.string()),
                          ("similarity", pa.float32()), ("score", pa.float32()), ("confidence", pa.float32()),
                          ("scorer", pa.string()), ("encoder", pa.string()), ("headline", pa.bool_()),
                          ("rank", pa.int32())])
_PROFILE_SCHEMA = pa.schema([("model", pa.string()), ("layer", pa.string()), ("depth", pa.int32()),
                             ("depth_frac", pa.float32()), ("method", pa.string()), ("best_confidence", pa.float32()),
                             ("best_score", pa.float32()), ("best_unit", pa.int32()), ("concept", pa.string()),
                             ("n_confident", pa.int32())])


def find(store: Store | str | Path, phrase: str, *, models: Sequence[str] | None = None,
         layers: Sequence[str] | None = None, scorer: str | None = None, top: int = 20,
         methods: Sequence[str] = METHODS, min_similarity: float = MIN_SIMILARITY,
         max_concepts: int = MAX_CONCEPTS, encoders: Sequence[str] | None = None, device=None,
         precision: str | None = None) -> FindResult:
    """Units that detect `phrase`, by exact concept, semantic match and open vocabulary (module
    doc), best `top` per method, and the depth profile. Reads the store only. The open-vocabulary
    encoder runs on `device` (default auto: CUDA when present) at `precision` (default auto)."""
    if not isinstance(phrase, str):   # None read as the phrase 'none'
        raise BadParameter(f"phrase={phrase!r} must be a word or phrase, e.g. find(store, 'striped').")
    phrase_in = phrase
    phrase = " ".join(str(phrase).lower().split())
    if not phrase:
        raise BadParameter("The phrase is empty. Pass a word or phrase, e.g. neurostore find striped.")
    models, layers, encoders = listed(models, "models"), listed(layers, "layers"), listed(encoders, "encoders")
    methods = listed(methods, "methods") or METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BadParameter(unknown("method", bad[0], METHODS, "Pass e.g. methods=['exact', 'open']."))
    if top < 1:
        raise BadParameter(f"top={top} must be at least 1.")
    if not -1 <= min_similarity <= 1:
        raise BadParameter(f"min_similarity={min_similarity} is a cosine similarity: give one from -1 to 1.")
    if "open" in methods:
        device, precision = resolve(device, precision)
    st = open_store(store, read_only=True)
    if models:
        check_models(st, models)
    if layers:  # a layer no model has would otherwise read as 'nothing found for the phrase'
        have = st.sql("SELECT DISTINCT layer FROM layers" + (" WHERE list_contains($m, model)" if models else ""),
                      {"m": list(models)} if models else None).column("layer").to_pylist()
        for layer in layers:
            if layer not in have:
                raise UnknownLayer(unknown(f"dissected layer{' of ' + ', '.join(models) if models else ''}",
                                           layer, sorted(have)))
    if scorer:
        have = st.sql("SELECT DISTINCT scorer FROM scores UNION SELECT DISTINCT scorer FROM explanations") \
            .column("scorer").to_pylist()
        if scorer not in have:
            raise UnknownScorer(unknown("scorer in this store", scorer, [h for h in have if h]))
    depths = _layer_depths(st)
    notes: list[str] = []
    concepts: list[dict] = []
    found: dict[str, list[dict]] = {}
    if "exact" in methods:
        rows = _concept_rows(st, [phrase], scorer, models, layers)
        for r in rows:
            r["similarity"] = 1.0
        found["exact"] = rows
        if rows:
            concepts.append({"concept": phrase, "similarity": 1.0, "method": "exact"})
    if "semantic" in methods:
        sem = _semantic_concepts(st, phrase, models, min_similarity, max_concepts)
        concepts += sem
        sim_of = {c["concept"]: c["similarity"] for c in sem}
        rows = _concept_rows(st, list(sim_of), scorer, models, layers)
        for r in rows:
            r["similarity"] = sim_of[r["concept"]]
        found["semantic"] = rows
    used: list[str] = []
    if "open" in methods:
        have = st.sql("SELECT DISTINCT encoder FROM embeddings WHERE kind = 'patch' ORDER BY encoder") \
            .column("encoder").to_pylist()
        pick = [e for e in have if e and (encoders is None or e in encoders)]
        if encoders:
            missing = [e for e in encoders if e not in have]
            if missing:
                raise BadParameter(unknown("patch encoder in this store", missing[0], [h for h in have if h]))
        rows = []
        for enc in pick:
            got = _open_vocabulary(st, phrase, enc, models, layers, notes, device, precision)
            if got:
                used.append(enc)
            rows += got
        found["open"] = rows
        if not have:
            notes.append("open vocabulary: the store holds no patch embeddings (dissect with patches first)")
    if "label" in methods:
        found.update(_label_rows(st, phrase, scorer, models, layers))
    unit_rows = [r for m in found for r in _rank(found[m], m, depths, top)]
    for m in untrained(st, sorted({r["model"] for r in unit_rows})):
        notes.append(f"{m} was dissected with untrained (random) weights: its units explain nothing, so its "
                     "rows are a baseline to compare with, not findings")
    profile = _profile(found, depths, models)
    if not any(found.values()):   # why, method by method: only those that ran
        why = []
        if "exact" in methods:
            stored = st.sql("SELECT count(*) AS n FROM concepts WHERE concept = $c", {"c": phrase})["n"][0].as_py()
            why.append("no unit of the models, layers or scorer asked has the stored concept" if stored
                       else "not a stored concept")
        if "semantic" in methods:
            why.append(f"no stored concept within MiniLM similarity {min_similarity}")
        if "open" in methods:
            why.append("no patch embeddings to search" if not pick else
                       "no unit of the models or layers asked in the open vocabulary")
        if "label" in methods:
            why.append("no explanation's label names it")
        notes.append(f"nothing found for '{phrase_in}': " + ", ".join(why[:-1]) + (" and " if len(why) > 1 else "")
                     + why[-1])
    return FindResult(phrase, pa.Table.from_pylist(unit_rows, schema=_UNIT_SCHEMA),
                      pa.Table.from_pylist(profile, schema=_PROFILE_SCHEMA), concepts, used, notes)
