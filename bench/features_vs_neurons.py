"""Benchmark: are dictionary features more monosemantic than the neurons of the same layer?

On the probe world (the truth of every pixel is known) it fits a dictionary (default: a JumpReLU
sparse autoencoder, 2 features per unit, BatchTopK k 4 then thresholds keeping each feature
active on features.BAND of all positions; `--method batchtopk-sae` for the better reconstruction
without the band) on each hidden layer of the CNN,
dissects the neurons and the features in one run (the ground-truth-free scorers and `iou`), and
compares, per layer, neurons with features, for each rule of what a unit's explanation is
(RULES: the product's headline, the `headlines` table, first; then each scorer's top concept):

    agree        fraction of units whose explanation (no ground truth) equals the per-pixel truth
                 (the `iou` scorer's top concept, with IoU >= evaluation.REFERENCE_MIN_IOU)
    agree_fid    the same, counting only units whose fidelity is >= --fidelity: Pearson
                 correlation, on held-out images (every 5th image), between the unit's pooled
                 max activation and the explained concept's mask area
    by_activity  [units, reaching the reference's IoU, agree_fid] per band of the fraction of all
                 probe positions a unit is active on (ACTIVITY_BANDS): what decides a feature
    ratio        features' agree_fid / neurons' agree_fid (the issue's target: >= 1.5); fractions
                 of each side's own units, so a 2x dictionary's twice as many units do not count twice;
                 `ratio` is the first rule's (--rules), `ratio_by_rule` every rule's

and the dictionary's quality (FVE, L0, dead features on held-out samples).

    .venv/bin/python bench/features_vs_neurons.py                   # fast world, conv2-conv4
    .venv/bin/python bench/features_vs_neurons.py --method topk-sae --width 8 --k 8   # another dictionary
    .venv/bin/python bench/features_vs_neurons.py --active 1        # fitted on all samples
    .venv/bin/python bench/features_vs_neurons.py --seed 1 --cache DIR   # a second world (built in DIR)
    .venv/bin/python bench/features_vs_neurons.py --fit-seed 1      # another fit of the dictionaries
    .venv/bin/python bench/features_vs_neurons.py --rules patch     # the `patch` scorer's top concept alone (faster)

Ends by printing one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurostore import features  # noqa: E402
from neurostore.evaluation import REFERENCE_MIN_IOU  # noqa: E402
from neurostore.pipeline import dissect  # noqa: E402
from neurostore.store import Store  # noqa: E402


def pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson of [n, e] with [n, e] (0 where a column is constant)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return np.where(den > 0, (a * b).sum(0) / np.maximum(den, 1e-300), 0.0)


ACTIVITY_BANDS = (0.0, 0.002, 0.005, 0.02, 1.0)   # fraction of all probe positions a unit is active on


def activity(spec: str, store: Store, world, layers: list[str]) -> dict:
    """layer -> [units] the fraction of all probe positions where each unit is > 0 (the `iou`
    reference takes each unit's top 0.5%: a unit active on less has its whole support taken)."""
    import torch

    from neurostore.images import probe_source
    from neurostore.models import load_target
    from neurostore.record import hooks

    target = load_target(spec)
    features.attach(target, store)
    on = {layer: 0.0 for layer in layers}

    def take(layer, m):                                          # m: [b, units, h, w]
        on[layer] = on[layer] + (m > 0).float().mean((2, 3)).sum(0)

    source = probe_source(None, world)
    with torch.no_grad(), hooks(target, layers, take):
        for b in source.batches(target.preprocess, 64):
            target.module(b.pixels)
    return {layer: (v / len(source)).numpy() for layer, v in on.items()}


RULES = ("headline", "patch", "soft_wpmi", "wpmi", "cos_cubed")   # what a unit's explanation is


def explained(store: Store, model: str, layer: str, rule: str):
    """A unit's explanation under `rule`: the product's headline (the `headlines` table: one
    concept per unit across the ground-truth-free scorers, chosen by held-out fidelity), or one
    scorer's top concept. DataFrame (unit, label)."""
    if rule == "headline":
        return store.df("SELECT unit, concept AS label FROM headlines WHERE model = $m AND layer = $l",
                        {"m": model, "l": layer})
    return store.df("SELECT unit, label FROM explanations WHERE model = $m AND layer = $l AND scorer = $s",
                    {"m": model, "l": layer, "s": rule})


def layer_figures(store: Store, model: str, layer: str, fid_min: float, active: np.ndarray | None = None,
                  rule: str = "headline") -> dict:
    ref = store.df("SELECT unit, concept AS ref, score AS ref_iou FROM scores WHERE model = $m AND layer = $l "
                   "AND scorer = 'iou' AND rank = 0", {"m": model, "l": layer})
    head = explained(store, model, layer, rule)
    pooled = store.df("SELECT image_id, act_max FROM pooled WHERE model = $m AND layer = $l ORDER BY image_id",
                      {"m": model, "l": layer})
    held = np.arange(len(pooled)) % 5 == 4
    ids = pooled["image_id"][held].tolist()
    acts = np.stack(pooled["act_max"][held].to_numpy()).astype(np.float64)       # [n_held, units]
    area = store.df("SELECT image_id, concept, sum(area) AS area FROM masks JOIN (SELECT unnest($ids) AS image_id) "
                    "USING (image_id) GROUP BY ALL", {"ids": ids})
    amount = area.pivot(index="image_id", columns="concept", values="area").reindex(ids).fillna(0.0)
    d = head.merge(ref, on="unit", how="left")
    d["agree"] = (d["label"] == d["ref"]) & (d["ref_iou"] >= REFERENCE_MIN_IOU)
    has = d["label"].isin(amount.columns)
    fid = np.zeros(len(d))
    if has.any():
        cols = amount[d.loc[has, "label"]].to_numpy(np.float64)                   # [n_held, e]
        fid[has.to_numpy()] = pearson_cols(acts[:, d.loc[has, "unit"].to_numpy()], cols)
    d["fidelity"] = fid
    n = len(d)
    good = d["agree"] & (d["fidelity"] >= fid_min)
    bands = {}
    if active is not None:  # units, reaching IoU 0.04, agreeing, per band of activity
        band = np.digitize(active[d["unit"].to_numpy()], ACTIVITY_BANDS[1:-1])
        ok = (d["ref_iou"] >= REFERENCE_MIN_IOU).to_numpy()
        bands = {f"{lo:g}-{hi:g}": [int((band == i).sum()), int(ok[band == i].sum()), int(good[band == i].sum())]
                 for i, (lo, hi) in enumerate(zip(ACTIVITY_BANDS, ACTIVITY_BANDS[1:]))}
    return {"units": n, "interpretable": float((d["ref_iou"] >= REFERENCE_MIN_IOU).mean()), "by_activity": bands,
            "agree": float(d["agree"].mean()), "agree_fid": float(good.mean()), "n_agree_fid": int(good.sum()),
            "mean_fidelity_agree": float(d.loc[d["agree"], "fidelity"].mean()) if d["agree"].any() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", default=["conv2", "conv3", "conv4"])
    ap.add_argument("--method", default="jumprelu-sae", choices=features.METHODS)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--fidelity", type=float, default=0.2, help="fidelity threshold (Pearson)")
    ap.add_argument("--active", type=float, default=features.ACTIVE_FRACTION,
                    help="fit on this fraction of samples farthest from the mean (features.fit's active)")
    ap.add_argument("--seed", type=int, default=0, help="the probe world's seed (a second world: --seed 1)")
    ap.add_argument("--fit-seed", type=int, default=0, help="the dictionaries' seed (features.fit's seed)")
    ap.add_argument("--full", action="store_true", help="the default world instead of the fast one")
    ap.add_argument("--cache", default=os.environ.get("NEUROSTORE_TEST_CACHE"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES,
                    help="what a unit's explanation is; the first gives `ratio` (default: the product's headline)")
    args = ap.parse_args()
    import torch

    from neurostore.world import WorldConfig, build_world

    torch.set_num_threads(args.threads)
    t0 = time.time()
    config = WorldConfig(seed=args.seed) if args.full else WorldConfig.fast(seed=args.seed)
    world = build_world(config, args.cache, progress=False)
    spec = f"probe:cnn@{world.root}"
    store = Store.open(Path(tempfile.mkdtemp(prefix="bench-features-")) / "store")
    dicts, names = {}, []
    for layer in args.layers:
        s = features.fit(store, spec, layer, args.method, args.width, args.k, steps=args.steps, seed=args.fit_seed,
                         active=args.active, progress=False, log=lambda *a: None)
        dicts[layer] = {m: s[m] for m in ("layer", "n_features", "fve", "l0", "dead_fraction", "fit_seconds")}
        names.append(s["layer"])
    # Neurons and features in one run: a layer's patches and scores depend on that layer alone
    # (the `patch` contrast is over the layer's own patches, a box merges only with its own
    # layer's; tests/test_features.py checks both).
    from neurostore.trust import HEADLINE_SCORERS

    scorers = sorted({s for r in args.rules for s in (HEADLINE_SCORERS if r == "headline" else (r,))}) + ["iou"]
    dissect(store, spec, world=world, layers=args.layers + names, vocabulary="probe", scorers=scorers,
            progress=False, evaluate=False, log=lambda *a: None)
    model = "probe-cnn"
    act = activity(spec, store, world, args.layers + names)
    by_rule = {}
    for rule in args.rules:
        per_layer, tot = {}, {"neurons": [0, 0], "features": [0, 0]}
        for layer, name in zip(args.layers, names):
            nf = layer_figures(store, model, layer, args.fidelity, act[layer], rule)
            ff = layer_figures(store, model, name, args.fidelity, act[name], rule)
            ratio = ff["agree_fid"] / nf["agree_fid"] if nf["agree_fid"] > 0 else None
            per_layer[layer] = {"neurons": nf, "features": ff, "ratio": ratio, "dictionary": dicts[layer]}
            for key, f in (("neurons", nf), ("features", ff)):
                tot[key][0] += f["n_agree_fid"]
                tot[key][1] += f["units"]
        frac = {k: v[0] / v[1] for k, v in tot.items()}
        by_rule[rule] = {"neurons_agree_fid": round(frac["neurons"], 4),
                         "features_agree_fid": round(frac["features"], 4),
                         "ratio": round(frac["features"] / frac["neurons"], 3) if frac["neurons"] else None,
                         "layers": per_layer}
    main_rule = by_rule[args.rules[0]]
    out = {"bench": "features_vs_neurons", "world": world.id, "model": model, "method": args.method,
           "width": args.width, "k": args.k if args.method in features.SAES else None, "steps": args.steps,
           "fit_seed": args.fit_seed, "active": args.active, "fidelity_min": args.fidelity, "rule": args.rules[0],
           "neurons_agree_fid": main_rule["neurons_agree_fid"], "features_agree_fid": main_rule["features_agree_fid"],
           "ratio": main_rule["ratio"], "target_ratio": 1.5,
           "ratio_by_rule": {r: v["ratio"] for r, v in by_rule.items()},
           "agree_fid_by_rule": {r: [v["neurons_agree_fid"], v["features_agree_fid"]] for r, v in by_rule.items()},
           "by_rule": by_rule, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
