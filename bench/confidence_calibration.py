"""Benchmark: is the null confidence (neurostore.trust) a number a researcher can trust?

1. Calibration on the probe world: its CNN and ViT are dissected (every scorer; the dissect
   stores the null confidence, fidelity and headlines), and every hidden-unit explanation of the encoder scorers is binned by
   confidence decile; in each bin, the fraction that agrees with the truth (its label is the
   mask-IoU reference label of a unit the reference finds interpretable, IoU >= 0.04) should lie
   within 0.15 of the bin's mean confidence (bins with fewer than --min-bin explanations are
   reported, not judged).
2. Random networks: the probe CNN re-initialised (same architecture, probe images and masks,
   every scorer) and torchvision:resnet18@random layer4 with open_clip:ViT-B-32/random and the
   english-3k vocabulary on the probe images: the fraction of units with confidence >= 0.9 from
   any scorer should be <= 0.05.
3. Fidelity: Spearman correlation, over every stored explanation of the probe world's models,
   between held-out Pearson with encoder presence and with mask presence (target >= 0.8).
4. Headline: hidden-unit agreement of the headline with the mask-IoU reference (target >= 0.90),
   beside the best single scorer's.

No downloads: the fast probe world from the cache, random weights elsewhere.

    .venv/bin/python bench/confidence_calibration.py                # everything
    .venv/bin/python bench/confidence_calibration.py --skip-resnet  # probe world only

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

from neurostore import trust  # noqa: E402
from neurostore.evaluate import REFERENCE_MIN_IOU  # noqa: E402
from neurostore.pipeline import dissect  # noqa: E402
from neurostore.store import Store  # noqa: E402

ENCODER_SCORERS = list(trust.HEADLINE_SCORERS)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def hidden_truth(store: Store, model: str):
    """Per hidden (layer, unit): the reference label and its IoU (the iou scorer's rank 0)."""
    return store.df("""
        SELECT s.layer, s.unit, s.concept AS ref, s.score AS ref_iou
        FROM scores s JOIN layers l USING (model, layer)
        WHERE s.model = $m AND s.scorer = 'iou' AND s.rank = 0 AND l.kind <> 'logits'""", {"m": model})


def calibration(store: Store, models: list[str], min_bin: int):
    rows = []
    for m in models:
        ref = hidden_truth(store, m)
        e = store.df("SELECT layer, unit, scorer, label, confidence FROM explanations WHERE model = $m",
                     {"m": m})
        e = e[e["scorer"].isin(ENCODER_SCORERS)].merge(ref, on=["layer", "unit"])
        e["agree"] = (e["ref_iou"] >= REFERENCE_MIN_IOU) & (e["label"] == e["ref"])
        rows.append(e)
    import pandas as pd

    e = pd.concat(rows, ignore_index=True)
    e["decile"] = np.minimum((e["confidence"] * 10).astype(int), 9)
    out = []
    for d, g in e.groupby("decile"):
        mean_conf, agree = float(g["confidence"].mean()), float(g["agree"].mean())
        out.append({"decile": int(d), "n": int(len(g)), "mean_confidence": round(mean_conf, 3),
                    "agreement": round(agree, 3), "gap": round(abs(agree - mean_conf), 3),
                    "judged": len(g) >= min_bin})
    judged = [b for b in out if b["judged"]]
    return out, max((b["gap"] for b in judged), default=None), e


def headline_calibration(store: Store, models: list[str]) -> list[dict]:
    """The same deciles over the headlines only (one answer per hidden unit)."""
    import pandas as pd

    rows = []
    for m in models:
        h = store.df("SELECT layer, unit, concept, confidence FROM headlines WHERE model = $m", {"m": m})
        h = h.merge(hidden_truth(store, m), on=["layer", "unit"])
        h["agree"] = (h["ref_iou"] >= REFERENCE_MIN_IOU) & (h["concept"] == h["ref"])
        rows.append(h)
    h = pd.concat(rows, ignore_index=True)
    h["decile"] = np.minimum((h["confidence"] * 10).astype(int), 9)
    return [{"decile": int(d), "n": int(len(g)), "mean_confidence": round(float(g["confidence"].mean()), 3),
             "agreement": round(float(g["agree"].mean()), 3)} for d, g in h.groupby("decile")]


def fidelity_spearman(store: Store, models: list[str]) -> float:
    from scipy.stats import spearmanr

    f = store.df("""
        SELECT model, layer, unit, scorer, concept,
               max(value) FILTER (WHERE presence = 'encoder') AS enc,
               max(value) FILTER (WHERE presence = 'masks') AS truth
        FROM explanation_scores WHERE metric = 'pearson' AND list_contains($ms, model)
        GROUP BY ALL""", {"ms": models}).dropna()
    return float(spearmanr(f["enc"], f["truth"]).statistic), int(len(f))


def headline_agreement(store: Store, models: list[str]) -> dict:
    out = {}
    for m in models:
        ref = hidden_truth(store, m)
        ref = ref[ref["ref_iou"] >= REFERENCE_MIN_IOU]
        h = store.df("SELECT layer, unit, concept FROM headlines WHERE model = $m", {"m": m}).merge(ref, on=["layer", "unit"])
        e = store.df("SELECT layer, unit, scorer, label FROM explanations WHERE model = $m", {"m": m}).merge(
            ref, on=["layer", "unit"])
        per = {s: float((g["label"] == g["ref"]).mean()) for s, g in e.groupby("scorer") if s != "iou"}
        out[m] = {"headline": round(float((h["concept"] == h["ref"]).mean()), 3), "n": int(len(h)),
                  "scorers": {s: round(v, 3) for s, v in per.items()}}
    return out


def random_probe_cnn(world, root: Path) -> str:
    """The probe CNN with fresh random weights, saved as a checkpoint (same architecture)."""
    import torch

    torch.manual_seed(0)
    net = world.load_target("cnn")
    for mod in net.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
        if hasattr(mod, "reset_running_stats"):
            mod.reset_running_stats()
    path = root / "cnn-random.pt"
    torch.save(net, path)
    return str(path)


def confident_fraction(store: Store, model: str) -> dict:
    t = store.df("""
        SELECT scorer, avg((confidence >= 0.9)::INT) AS frac FROM explanations
        WHERE model = $m GROUP BY scorer""", {"m": model})
    any_ = store.df("""
        SELECT avg(c::INT) AS frac FROM (SELECT layer, unit, max(confidence) >= 0.9 AS c
        FROM explanations WHERE model = $m GROUP BY layer, unit)""", {"m": model})["frac"].iloc[0]
    return {"any": round(float(any_), 4), **{s: round(float(f), 4) for s, f in zip(t["scorer"], t["frac"])}}


def null_overhead(n=1000, units=512, concepts=3000, dim=512, k=10) -> dict:
    """Seconds of each scorer and of its null (256 directions) on random inputs of a resnet
    layer4's size, in this process: what the null adds to every dissect."""
    import torch

    from neurostore import scorers as S

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(concepts, dim, generator=g), dim=-1)
    acts = torch.randn(n, units, generator=g).relu()
    top = torch.topk(acts, k, dim=0).indices.T.contiguous()          # [u, k] images = patches
    inputs = {"similarity": S.image_text_similarity(img, txt), "pooled": acts, "patch_emb": img,
              "text_emb": txt, "unit_patches": top, "unit_images": top,
              "unit_weights": torch.ones(units, k)}
    out = {}
    for name in ("patch", "soft_wpmi", "wpmi", "cos_cubed"):
        t = time.time()
        res = S.run_scorer(name, inputs)
        t_score = time.time() - t
        t = time.time()
        trust.scored_with_null(res, inputs)
        out[name] = {"score_s": round(t_score, 2), "null_s": round(time.time() - t, 2)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("NEUROSTORE_TEST_CACHE") or os.environ.get("NEUROSTORE_CACHE"),
                    help="probe-world cache (the fast world is built there when missing)")
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one)")
    ap.add_argument("--max-images", type=int, default=None, help="probe images per dissect")
    ap.add_argument("--min-bin", type=int, default=20, help="explanations a decile needs to be judged")
    ap.add_argument("--skip-resnet", action="store_true", help="leave the resnet18@random check out")
    ap.add_argument("--resnet-k", type=int, default=10, help="top images (and patches) per resnet18 unit")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only time each scorer and its null at resnet layer4 size (512 units, 3,000 concepts)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    if args.overhead_only:
        cost = null_overhead()
        log(f"scorer and null seconds: {cost}")
        print(json.dumps({"bench": "confidence_calibration", "null_overhead": cost}))
        return
    from neurostore.world import WorldConfig, build_world

    t0 = time.time()
    world = build_world(WorldConfig.fast(), cache=args.cache, progress=False)
    root = Path(args.store or tempfile.mkdtemp(prefix="ns-calib-"))
    store = Store.open(root / "store")
    quiet = dict(progress=False, log=log, max_images=args.max_images)
    trained = []
    for name in ("cnn", "vit"):
        s = dissect(store, f"probe:{name}@{world.root}", world=world, vocabulary="probe", **quiet)
        trained.append(s["model"])
    rnd = dissect(store, random_probe_cnn(world, root), world=world, vocabulary="probe",
                  evaluate=False, **quiet)["model"]
    models = trained + [rnd]
    resnet = None
    if not args.skip_resnet:
        resnet = dissect(store, "torchvision:resnet18@random",
                         images=str(Path(world.root) / "images" / "probe"), layers=["layer4"],
                         vocabulary="english-3k", encoder="open_clip:ViT-B-32/random", k=args.resnet_k,
                         evaluate=False, **quiet)["model"]
        models.append(resnet)
    t_dissect = time.time() - t0
    bins, worst_gap, _ = calibration(store, trained, args.min_bin)
    rho, n_rho = fidelity_spearman(store, trained)
    head_bins = headline_calibration(store, trained)
    heads = headline_agreement(store, trained)
    random_frac = {"probe-cnn-random": confident_fraction(store, rnd)}
    if resnet:
        random_frac["resnet18-random"] = confident_fraction(store, resnet)
    log("decile  n     mean_conf  agreement")
    for b in bins:
        log(f"{b['decile']:>6}  {b['n']:<5} {b['mean_confidence']:<10} {b['agreement']}"
            + ("" if b["judged"] else "  (too few to judge)"))
    log(f"headlines only: {[(b['decile'], b['n'], b['mean_confidence'], b['agreement']) for b in head_bins]}")
    log(f"random networks, confidence >= 0.9: {random_frac}")
    log(f"fidelity: Spearman(encoder, masks) = {rho:.3f} over {n_rho} explanations")
    log(f"headline agreement: {heads}")
    worst_random = max(v["any"] for v in random_frac.values())
    worst_head = min(v["headline"] for v in heads.values())
    print(json.dumps({
        "bench": "confidence_calibration", "world": world.id, "images": args.max_images,
        "null_units": trust.NULL_UNITS, "deciles": bins, "max_calibration_gap": worst_gap,
        "headline_deciles": head_bins,
        "random_confident_fraction": random_frac, "fidelity_spearman": round(rho, 3),
        "fidelity_n": n_rho, "headline_agreement": heads,
        "seconds": {"dissect": round(t_dissect, 1)},
        "targets": {"max_calibration_gap": 0.15, "random_confident_fraction": 0.05,
                    "fidelity_spearman": 0.8, "headline_agreement": 0.9},
        "meets": {"calibration": worst_gap is not None and worst_gap <= 0.15,
                  "random": worst_random <= 0.05, "fidelity": rho >= 0.8, "headline": worst_head >= 0.9},
    }, default=float))


if __name__ == "__main__":
    main()
