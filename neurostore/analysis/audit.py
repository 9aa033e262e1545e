"""Spurious-concept audit: for each class, the units that drive it, what they detect, whether
that is unrelated to the class, and whether removing them removes the model's reliance on it.

    from neurostore.analysis import audit
    res = audit("store/")                          # every model with classes, every class
    res.headlines      # per model: the class and concept of the main finding, verified or not
    res.findings       # Arrow rows of schema/audit_findings.sql
    res.units          # Arrow rows of schema/audit_units.sql

Per model and class, on the labelled probe images the model was dissected on:

1. contributions. gradient x (activation - its mean on the probe images) toward the class logit for every unit of every
   dissected layer (the layers table), summed over positions/tokens and averaged over the
   class's images; and, for the layer whose pooled output is the classifier head's input
   (found by comparing tensors, not names), weight x activation (W[class, unit] x input).
2. driving units: the `top_units` units with the largest positive grad x act (all layers).
3. ablation: each driving unit zeroed alone -> change of the class's accuracy (on at most
   ABLATE_IMAGES of its images).
4. explanations: each unit's label (top concept) under `scorer` from the store; relatedness =
   MiniLM cosine(label, class name); flagged when below `threshold` AND the unit fires
   selectively on the class's images (selectivity = AUROC of its per-image peak, class vs rest,
   >= SELECTIVE; 0.5 is a unit that fires alike on every class, like the probe world's colour
   units, which drive every shape) AND, where the world can draw the cue (world.cue_pairs), the
   unit depends on it: drawing the cue on other-class scenes raises the unit's per-image peak by
   >= CUE_TIED of its SDs over the probe images (cue_effect). Selectivity alone cannot tell a cue
   unit from a shape unit a scorer mislabels: both fire on the class's images; only the cue's
   own units rise with the cue (2-3 SDs on the probe worlds, shape units -0.1-0.7).
   THRESHOLD = 0.5, calibrated on the probe world: a class name scores 1.0 with itself, other
   shape names score 0.26-0.56 with it, and every cue, colour and texture word scores at most
   0.46 with every shape name ('dot' vs 'circle' 0.45 is the closest), so 0.5 flags every
   cue word for every class while a unit labelled with the class's own name is never
   flagged. (Single-word MiniLM cosines between unrelated everyday words sit at 0.1-0.45.)
5. findings: flagged units grouped by label -> (class, concept, neurons, contribution); on a
   token model also residual-stream directions, since a ViT can carry a cue around its MLP
   neurons (the watermark worlds' ViTs do: no star-driving neuron is a cue unit): for each label,
   the direction after each block from the probe images its units fire on most to the rest
   (`concept_directions`), its contribution grad x act along it (`contributions`), kept at its
   best block when that is positive, the label unrelated, the projection selective for the class
   and (probe world) raised by the cue, with the label's units so too (their median cue_effect).
   Each finding is verified by removing it: its units zeroed together (a token model's also with
   the patch tokens they fire on mean-ablated where tokens enter the blocks), or its direction
   projected out of every token of that block's output: class accuracy before/after and, in the
   probe world, the cue flip rate toward the class (other-class scenes that become the class
   once the cue is drawn, from world.cue_pairs) before/after. verified when the flip rate
   drops by at least max(0.05, 0.3 x before) AND the cue gain (mean rise of the class logit
   when the cue is drawn on other-class scenes) falls by at least half. The gain separates
   units of the cue from units of the class's shape: zeroing shape units lowers the class
   logit with and without the cue alike (fewer flips, same gain); zeroing cue units removes
   the rise. The headline of a model is its verified finding with the largest relative gain
   drop (else the flagged finding with the largest contribution).

Everything is written in one run per audit (re-running the same model and classes replaces
it): audit_units, audit_findings, and effects rows (grad_x_act and weight_x_act of the driving
units, single-unit and set ablations).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import rankdata

from ..errors import BadInput, BadParameter, NeurostoreError, listed, unknown
from ..hooks import forward_hooks, keep
from ..models import list_layers
from ..progress import bar as progress_bar
from ..schema import load_schemas
from ..store import Store
from ._common import (TokenAblation, all_logits, as_btc, batch_size, blocks_of, check_models, cue_flip_rate,
                      load_model, logits_each_zeroed, logits_of, model_layers, open_store, predict, probe_images,
                      relatedness, resolve, stored_models, intact_stats, world_of)
from .ablate import cue_pairs_for
from .compare import explanations, pick_scorer

THRESHOLD = 0.5
SELECTIVE = 0.9         # flagged units fire on the class's images more than on others': AUROC >= this
TOP_UNITS = 10
VERIFY_TOP = 3          # findings verified per class (by contribution)
MIN_DROP = 0.05         # verified: flip rate drops by at least max(MIN_DROP, REL_DROP x before)
REL_DROP = 0.3
REL_GAIN = 0.5          # ... and the cue's logit gain toward the class by at least half
CUE_TIED = 1.0          # probe world: drawing the cue raises a flagged unit's peak by >= this many of its SDs
ABLATE_IMAGES = 200     # a class's images per ablation: its accuracy to +-0.07 (95%, worst case)
PRESENT = 0.9           # a concept's images: where its units' mean peak rank is in the top 10%


@dataclass
class AuditResult:
    """What `audit` returned: each model's headline finding, the findings and the units that
    drive each class (pyarrow), notes and the runs written; to_dict() is `neurostore audit --json`."""
    models: list[str]
    threshold: float
    units: pa.Table
    findings: pa.Table
    headlines: list[dict]
    notes: list[str] = field(default_factory=list)
    run_ids: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"models": self.models, "threshold": self.threshold, "headlines": self.headlines,
                "findings": self.findings.to_pylist(), "notes": self.notes, "run_ids": self.run_ids,
                "units": self.units.to_pylist()}


# ---- contributions ----------------------------------------------------------------------------------


def _sum_positions(target, g: torch.Tensor, a: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """grad x (act - mean act) summed over every position/token -> [batch, units]. The mean
    (per position, over the probe images) is the baseline: a unit that fires alike on every
    class's images (a colour, in the probe world) contributes nothing to telling them apart."""
    if a.dim() == 3:
        g, a = as_btc(target, g), as_btc(target, a)     # -> [b, t, c], as the mean is kept
    ga = g * (a - mean.to(a.device))
    if ga.dim() == 4:
        return ga.sum((2, 3))                           # [b, c, h, w] -> [b, c]
    if ga.dim() == 3:
        return ga.sum(1)                                # [b, t, c] -> [b, c]
    return ga                                           # [b, c]


def _poolings(target, out: torch.Tensor) -> list[torch.Tensor]:
    """Ways a layer's output can become a head's input: [b, c] each."""
    if out.dim() == 4:
        return [out.mean((2, 3)), torch.relu(out).mean((2, 3)), out.amax((2, 3))]
    if out.dim() == 3:
        x = out.transpose(0, 1) if target.token_layout == "tbc" else out  # [b, t, c]
        return [x[:, 0], x.mean(1), x[:, target.num_prefix_tokens:].mean(1)]
    return [out, torch.relu(out)]


def head_of(target) -> tuple[str, torch.nn.Linear] | None:
    """The classifier head: the last Linear layer the forward pass calls."""
    modules = dict(target.module.named_modules())
    for li in reversed(list_layers(target)):
        m = modules.get(li.layer)
        if isinstance(m, torch.nn.Linear) and li.kind == "logits":
            return li.layer, m
    return None


@torch.no_grad()
def head_input_layer(target, pixels: torch.Tensor) -> str | None:
    """The layer whose (pooled) output is exactly the head's input, found by comparing tensors."""
    head = head_of(target)
    if head is None:
        return None
    name, lin = head
    infos = [li for li in list_layers(target) if li.n_units == lin.in_features and li.layer != name]
    got, inp = {}, {}
    with forward_hooks(target.module, {li.layer: keep(got, li.layer) for li in infos}, pre={name: keep(inp, "x")}):
        logits_of(target, pixels[:16], exact=True)  # fp32: the comparison below is exact
    x = inp.get("x")
    if x is None or x.dim() != 2:
        return None
    for li in reversed(infos):
        out = got.get(li.layer)
        if out is None:
            continue
        for p in _poolings(target, out):
            if p.shape == x.shape and torch.allclose(p, x, atol=1e-5, rtol=1e-4):
                return li.layer
    return None


def contributions(target, probe, layers: Sequence[str], head_layer: str | None, means: dict,
                  directions: dict[str, torch.Tensor] | None = None) -> dict:
    """Mean grad x (act - mean act) per (layer, class) [classes, units] over each class's images
    (toward its own logit; `means` from intact_stats), weight x act at the head input
    [classes, units], and with `directions` ({block: [k, d] unit rows}) the same along each
    direction of the block's output: sum over tokens of (grad . d)((act - mean) . d) [classes, k]."""
    n_cls = len(probe.classes)
    directions = directions or {}
    sums = {layer: None for layer in [*layers, *directions]}
    wxa = None
    counts = np.bincount(probe.labels, minlength=n_cls).astype(np.float64)
    head = head_of(target)
    batch = batch_size(probe.pixels)
    for i in range(0, len(probe.pixels), batch):
        x = probe.pixels[i : i + batch]
        y = torch.from_numpy(probe.labels[i : i + batch])
        outs, inp = {}, {}
        pre = {head[0]: keep(inp, "x")} if head is not None and head_layer is not None else {}
        with forward_hooks(target.module, {n: keep(outs, n) for n in sums}, pre=pre), torch.enable_grad():
            xg = x.clone().requires_grad_(True)  # so every activation is part of the graph
            logits = logits_of(target, xg)
            sel = logits.float().gather(1, y[:, None].to(logits.device)).sum()
            names = [n for n in sums if n in outs]
            grads = torch.autograd.grad(sel, [outs[n] for n in names], allow_unused=True)
        onehot = torch.nn.functional.one_hot(y, n_cls).double()  # [b, classes]
        for n, g in zip(names, grads):
            a = outs[n].detach()
            g = torch.zeros_like(a) if g is None else g
            if n in directions:
                D = directions[n].to(a.device)                                       # [k, d]
                ga = (as_btc(target, g).float() @ D.T) * ((as_btc(target, a).float() - means[n].to(a.device)) @ D.T)
                per = ga.sum(1).cpu().double()                                       # [b, t, k] -> [b, k]
            else:
                per = _sum_positions(target, g.float(), a.float(), means[n]).cpu().double()  # [b, units] (MPS has no fp64)
            s = onehot.T @ per                                    # [classes, units]
            sums[n] = s if sums[n] is None else sums[n] + s
        if "x" in inp:
            W = head[1].weight.detach().double()                  # [classes, f]
            contrib = W.cpu()[y] * inp["x"].detach().float().cpu().double()  # [b, f]: W[label, f] x input f
            s = onehot.T @ contrib
            wxa = s if wxa is None else wxa + s
    denom = np.clip(counts, 1, None)[:, None]
    out = {"grad_x_act": {n: (s.numpy() / denom) for n, s in sums.items() if s is not None and n not in directions},
           "direction": {n: (s.numpy() / denom) for n, s in sums.items() if s is not None and n in directions}}
    out["weight_x_act"] = (wxa.numpy() / denom) if wxa is not None else None
    return out


def concept_directions(expl: dict, ranks: dict, token_mean: dict, layers: Sequence[str],
                       blocks: Sequence[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Each label's direction in the residual stream after each block: the mean patch token of the
    probe images its units fire on most (their mean peak rank in the top 1 - PRESENT) minus that
    of the other images, as a unit vector. No ground truth: the units' labels say which images
    hold the concept. -> (labels [k], {block: [k, d]})."""
    by: dict[str, list[np.ndarray]] = {}
    for (layer, u), e in expl.items():
        if e["label"] and layer in layers and layer in ranks:
            by.setdefault(e["label"], []).append(ranks[layer][:, u])
    labels = sorted(by)
    if not blocks or not labels:
        return [], {}
    score = np.stack([np.mean(by[k], axis=0) for k in labels])                 # [k, images]
    P = (score >= np.quantile(score, PRESENT, axis=1, keepdims=True)).astype(np.float64)
    out = {}
    for b in blocks:
        X = token_mean[b].astype(np.float64)                                    # [images, d]
        D = P @ X / P.sum(1, keepdims=True) - (1 - P) @ X / np.clip((1 - P).sum(1, keepdims=True), 1, None)
        out[b] = torch.from_numpy((D / np.clip(np.linalg.norm(D, axis=1, keepdims=True), 1e-12, None)).astype(np.float32))
    return labels, out


def auroc(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each column of `ranks` ([images, k] ranks of scores, scipy's rankdata), the
    `positive` images against the rest (Mann-Whitney) -> [k]; NaN without both kinds of image."""
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return np.full(ranks.shape[1], np.nan)
    return (ranks[positive].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


# ---- audit --------------------------------------------------------------------------------------------


def _verified(before, after, gain_before, gain_after) -> bool | None:
    """Zeroing removed the reliance: the flip rate fell by max(MIN_DROP, REL_DROP x before) and
    the cue's logit gain by at least REL_GAIN of itself (module doc)."""
    if before is None or after is None or gain_before is None or gain_after is None:
        return None
    return bool((before - after) >= max(MIN_DROP, REL_DROP * before) and gain_before > 0
                and (gain_before - gain_after) >= REL_GAIN * gain_before)


def _gain_drop(f: dict) -> float:
    gb, ga = f.get("cue_gain_before"), f.get("cue_gain_after")
    return (gb - ga) / gb if gb and ga is not None and gb > 0 else 0.0


def audit_model(st: Store, model: str, classes: Sequence[str] | None, scorer: str | None, top_units: int,
                threshold: float, max_images: int, verify_top: int, progress: bool, device=None,
                precision: str | None = None) -> dict:
    target = load_model(st, model, device, precision)
    probe = probe_images(st, model, target, max_images=max_images)
    want = list(classes) if classes else list(probe.classes)
    bad = [c for c in want if c not in probe.classes]
    if bad:
        raise BadParameter(unknown(f"class of {model}", bad[0], probe.classes))
    scorer = pick_scorer(st, [model], scorer)
    expl = explanations(st, model, scorer)
    module_names = dict(target.module.named_modules())
    head = head_of(target)
    # The head's own outputs are the logits: a "unit" there is the class itself, not evidence.
    layers = [r["layer"] for r in model_layers(st, model)
              if r["layer"] in module_names and r["kind"] != "logits" and (head is None or r["layer"] != head[0])]
    if not layers:
        raise BadInput(f"Model '{model}' has no dissected layers in the store that exist in '{target.spec}'.")
    head_layer = head_input_layer(target, probe.pixels)
    # A token model's block outputs: the residual stream, where a ViT carries a cue around its
    # neurons (module doc, step 5). A block dissected as a layer keeps its units (one hook a module).
    blocks = [] if not target.grid_size else [
        b for b in dict.fromkeys(b for l in layers for b in blocks_of(target, l)) if b not in layers]
    hooked = [*layers, *blocks]
    intact = intact_stats(target, probe.pixels, hooked)
    # Selectivity: AUROC of each unit's per-image peak, the class's images against the rest
    # (0.5 = fires alike on every class, the baseline of a concept that has nothing to do with it).
    ranks = {l: rankdata(p, axis=0) for l, p in intact.peak.items()}    # [images, units]
    dlabels, dvec = concept_directions(expl, ranks, intact.token_mean, layers, blocks)
    contrib = contributions(target, probe, layers, head_layer, intact.mean, dvec)
    proj = {b: intact.token_mean[b] @ D.numpy().T for b, D in dvec.items()}   # [images, k] per block
    proj_ranks = {b: rankdata(x, axis=0) for b, x in proj.items()}
    world = world_of(target)
    pairs = cue_pairs_for(world, target)
    base_preds = predict(target, probe.pixels)
    # Ablations are measured on the audited class's own images only (its accuracy is all they
    # report), at most ABLATE_IMAGES of them: the single-unit ablations are most of an audit's time.
    own_idx = {ci: np.flatnonzero(probe.labels == ci)[:ABLATE_IMAGES] for ci in range(len(probe.classes))}
    own = {ci: probe.pixels[torch.from_numpy(i)] for ci, i in own_idx.items()}
    base = {c: (float((base_preds[own_idx[ci]] == ci).mean()), len(own_idx[ci]))
            for ci, c in enumerate(probe.classes) if len(own_idx[ci])}
    cue_effect: dict[str, np.ndarray] = {}       # layer or block -> [units or k] (probe world)
    if pairs is not None:
        clean, cued, plabels = pairs
        base_lc, base_lq = all_logits(target, clean), all_logits(target, cued)
        # How much drawing the cue raises each unit's peak (each direction's projection), in SDs
        # of it over the probe images: the cue's own units rise, shape units that merely share
        # its class do not (module doc, step 4).
        on, off = intact_stats(target, cued, hooked), intact_stats(target, clean, hooked)
        for l in layers:
            if l in intact.peak:
                cue_effect[l] = (on.peak[l] - off.peak[l]).mean(0) / (intact.peak[l].std(0) + 1e-6)
        for b, D in dvec.items():
            P = D.numpy().T                                                      # [d, k]
            cue_effect[b] = ((on.token_mean[b] - off.token_mean[b]) @ P).mean(0) / (proj[b].std(0) + 1e-6)

    def ablation(units):
        """How a finding's units are removed: zeroed, and on a token model also the tokens they
        fire on (module doc of _common, token ablation); (what, TokenAblation or None)."""
        tok = TokenAblation(target, units, intact) if target.grid_size is not None else None
        return ("units+tokens", tok) if tok is not None and tok.usable else ("units", None)

    def cue_stats(ci: int, units=None, tokens=None, directions=None):
        """(flip rate, cued accuracy of other classes, cue gain, n): the cue gain is the mean rise
        of the class's logit when the cue is drawn on other-class scenes. Zeroing units that carry
        the class's shape lowers its logit with and without the cue alike; zeroing the cue's units
        removes the rise: the gain separates the two where the flip rate alone cannot."""
        if pairs is None:
            return None, None, None, 0
        intact_run = not units and not directions
        lc = base_lc if intact_run else all_logits(target, clean, units, tokens=tokens, directions=directions)
        lq = base_lq if intact_run else all_logits(target, cued, units, tokens=tokens, directions=directions)
        pc, pq = lc.argmax(1), lq.argmax(1)
        flip, n = cue_flip_rate(pc, pq, plabels, ci)
        m = plabels != ci
        gain = float((lq[m, ci] - lc[m, ci]).mean()) if m.any() else None
        return flip, float((pq[m] == plabels[m]).mean()) if m.any() else None, gain, n

    def tied(layer: str, i: int) -> bool:
        """Tied to the cue where the world can draw it; without cue pairs, no evidence either way."""
        return layer not in cue_effect or bool(cue_effect[layer][i] >= CUE_TIED)

    # A label's direction is the cue's only when its units are: the median cue effect of the
    # units that carry the label (a shape label's direction can still lean toward the cue when the
    # cue and the shape share images).
    by_label: dict[str, list[float]] = {}
    for (layer, u), e in expl.items():
        if e["label"] and layer in cue_effect and layer in layers:
            by_label.setdefault(e["label"], []).append(float(cue_effect[layer][u]))
    label_tied = {k: float(np.median(v)) >= CUE_TIED for k, v in by_label.items()}

    ci_of = {c: i for i, c in enumerate(probe.classes)}
    labels_sorted = sorted({e["label"] for e in expl.values() if e["label"]})
    R = relatedness(want, labels_sorted)               # [classes, labels] MiniLM cosine
    rel = {c: dict(zip(labels_sorted, R[i].tolist())) for i, c in enumerate(want)}
    unit_rows, finding_rows, effect_rows = [], [], []
    for c in progress_bar(len(want), f"audit {model}", "class", progress, items=want):
        ci = ci_of[c]
        if c not in base:
            continue
        acc_b, n_img = base[c]
        is_c = probe.labels == ci
        cands = []
        for layer in layers:
            g = contrib["grad_x_act"].get(layer)
            if g is None:
                continue
            pos = np.clip(g[ci], 0, None).sum()
            for u, v in enumerate(g[ci]):
                if v > 0:
                    cands.append((float(v), layer, u, float(v / pos) if pos > 0 else 0.0))
        cands.sort(key=lambda t: (-t[0], t[1], t[2]))
        top = cands[:top_units]
        sel = {layer: auroc(ranks[layer], is_c) for layer in {t[1] for t in top} if layer in ranks}
        alone = logits_each_zeroed(target, own[ci], [(t[1], t[2]) for t in top]).argmax(-1) == ci  # [k, n]
        for rank, (v, layer, u, share) in enumerate(top):
            key = (layer, u)
            acc_a = float(alone[rank].mean())
            e = expl.get(key, {})
            label = e.get("label")
            r = rel[c].get(label) if label else None
            s_u = float(sel[layer][u]) if layer in sel else float("nan")
            w = None
            if head_layer == layer and contrib["weight_x_act"] is not None:
                w = float(contrib["weight_x_act"][ci, u])
            unit_rows.append({"class": c, "rank": rank, "layer": layer, "unit": u, "grad_x_act": v, "weight_x_act": w,
                              "share": share, "ablation_effect": acc_a - acc_b, "label": label,
                              "label_confidence": e.get("confidence"), "relatedness": r, "threshold": threshold,
                              "selectivity": s_u,
                              "cue_effect": float(cue_effect[layer][u]) if layer in cue_effect else None,
                              "flagged": bool(r is not None and r < threshold and s_u >= SELECTIVE and tied(layer, u)),
                              "scorer": scorer, "n_images": n_img,
                              "dataset": probe.dataset, "model": model})
            effect_rows.append({"layer": layer, "unit": u, "units": None, "class": c, "kind": "grad_x_act", "value": v,
                                "baseline": None, "ablated": None, "n_images": n_img, "dataset": probe.dataset,
                                "model": model})
            if w is not None:
                effect_rows.append({"layer": layer, "unit": u, "units": None, "class": c, "kind": "weight_x_act",
                                    "value": w, "baseline": None, "ablated": None, "n_images": n_img,
                                    "dataset": probe.dataset, "model": model})
            effect_rows.append({"layer": layer, "unit": u, "units": None, "class": c, "kind": "ablation",
                                "value": acc_a - acc_b, "baseline": acc_b, "ablated": acc_a, "n_images": n_img,
                                "dataset": probe.dataset, "model": model})
        # Findings: flagged units grouped by their label; on a token model also each unrelated
        # label's residual direction (at the block where it contributes most) when it is as
        # selective for the class and tied to the cue as a flagged unit must be.
        groups: dict[str, list[dict]] = {}
        for row in unit_rows:
            if row["class"] == c and row["flagged"]:
                groups.setdefault(row["label"], []).append(row)
        found = [{"concept": k, "rows": rs, "contribution": float(sum(r["grad_x_act"] for r in rs)),
                  "relatedness": rs[0]["relatedness"], "block": None} for k, rs in groups.items()]
        for k, label in enumerate(dlabels):
            r = rel[c].get(label)
            if r is None or r >= threshold:
                continue
            b = max(dvec, key=lambda b: contrib["direction"][b][ci, k])
            v = float(contrib["direction"][b][ci, k])
            if (v > 0 and auroc(proj_ranks[b][:, k : k + 1], is_c)[0] >= SELECTIVE and tied(b, k)
                    and label_tied.get(label, True)):
                found.append({"concept": label, "rows": [], "contribution": v, "relatedness": r, "block": b,
                              "direction": dvec[b][k]})
        found.sort(key=lambda f: (-f["contribution"], f["concept"], f["block"] or ""))
        flip_b, cued_b, gain_b, n_pairs = cue_stats(ci)
        for frank, f in enumerate(found):
            rows, concept = f["rows"], f["concept"]
            units: dict[str, list[int]] = {}
            for r in rows:
                units.setdefault(r["layer"], []).append(r["unit"])
            dirs = {f["block"]: f["direction"]} if f["block"] else None
            acc_a = flip_a = cued_a = gain_a = how = None
            if frank < verify_top:
                how, tok = ablation(units) if units else ("direction", None)
                acc_a = float((predict(target, own[ci], units, tokens=tok, directions=dirs) == ci).mean())
                # Verification needs a reliance to remove (_verified): without one the cue pairs
                # are not run again, and the finding is not verified.
                if flip_b is not None and flip_b >= MIN_DROP and gain_b is not None and gain_b > 0:
                    flip_a, cued_a, gain_a, _ = cue_stats(ci, units, tok, dirs)
                for layer, us in units.items():
                    effect_rows.append({"layer": layer, "unit": None, "units": sorted(us), "class": c, "kind": "ablation",
                                        "value": acc_a - acc_b, "baseline": acc_b, "ablated": acc_a, "n_images": n_img,
                                        "dataset": probe.dataset, "model": model})
            drop = (flip_b - flip_a) if flip_b is not None and flip_a is not None else None
            finding_rows.append({
                "class": c, "concept": concept, "rank": frank,
                "neurons": [f"{r['layer']}/{r['unit']}" for r in rows], "n_units": len(rows),
                "contribution": f["contribution"], "relatedness": f["relatedness"],
                "threshold": threshold, "accuracy_before": acc_b, "accuracy_after": acc_a,
                "cue_flip_before": flip_b if frank < verify_top else None, "cue_flip_after": flip_a,
                "cued_accuracy_before": cued_b if frank < verify_top else None, "cued_accuracy_after": cued_a,
                "cue_gain_before": gain_b if frank < verify_top else None, "cue_gain_after": gain_a,
                "reliance_drop": drop,
                "verified": (bool(_verified(flip_b, flip_a, gain_b, gain_a)) if flip_b is not None else None)
                            if frank < verify_top else None, "ablation": how, "direction_layer": f["block"],
                "headline": False, "scorer": scorer, "n_images": n_img, "n_pairs": n_pairs if pairs is not None else None,
                "dataset": probe.dataset, "model": model})
    # Headline: the verified finding with the largest reliance drop; else the finding whose
    # ablation lowered the cue flip rate most (measured evidence, though short of verification);
    # else the largest contribution.
    headline = None
    verified = [f for f in finding_rows if f["verified"]]
    measured = [f for f in finding_rows if f.get("reliance_drop") is not None and f["reliance_drop"] > 0]
    if verified:
        # gain drops within 0.1 of each other are a tie (token ablation removes a cue whole
        # whichever of its findings it starts from): the larger contribution wins
        headline = max(verified, key=lambda f: (round(_gain_drop(f), 1), f["contribution"]))
    elif measured:
        headline = max(measured, key=lambda f: (f["reliance_drop"], f["contribution"]))
    elif finding_rows:
        headline = max(finding_rows, key=lambda f: f["contribution"])
    if headline is not None:
        headline["headline"] = True
    summary = {"model": model, "scorer": scorer, "dataset": probe.dataset, "n_images": len(probe.image_ids),
               "head_layer": head_layer, "layers": layers, "classes": want,
               "class": headline["class"] if headline else None, "concept": headline["concept"] if headline else None,
               "verified": headline["verified"] if headline else None,
               "ablation": headline["ablation"] if headline else None,
               "direction_layer": headline["direction_layer"] if headline else None,
               "neurons": headline["neurons"] if headline else [],
               "cue_flip_before": headline["cue_flip_before"] if headline else None,
               "cue_flip_after": headline["cue_flip_after"] if headline else None,
               "reliance_drop": headline["reliance_drop"] if headline else None,
               "cue_gain_before": headline["cue_gain_before"] if headline else None,
               "cue_gain_after": headline["cue_gain_after"] if headline else None}
    return {"summary": summary, "units": unit_rows, "findings": finding_rows, "effects": effect_rows}



def audit(store: Store | str | Path, model: str | Sequence[str] | None = None, classes: str | Sequence[str] | None = None,
          *, scorer: str | None = None, top_units: int = TOP_UNITS, threshold: float = THRESHOLD,
          max_images: int = 2000, verify_top: int = VERIFY_TOP, write: bool = True,
          progress: bool = True, device=None, precision: str | None = None) -> AuditResult:
    """Audit `model` (a stored model id, several, or every model with classes when None) for
    spurious concepts in `classes` (default every class). See the module doc. The models run on
    `device` (default auto: CUDA when present) under autocast at `precision` (default auto)."""
    t0 = time.time()  # the runs row records when the audit began, not when it wrote
    device, precision = resolve(device, precision)  # a missing device fails before any work
    if top_units < 1 or verify_top < 0:
        raise BadParameter(f"top_units={top_units} must be at least 1 and verify_top={verify_top} at least 0.")
    if not -1.0 <= threshold <= 1.0:
        raise BadParameter(f"threshold={threshold} is a cosine similarity: give one from -1 to 1.")
    st = open_store(store, read_only=not write)
    classes = listed(classes, "classes")
    if model is None:
        models = stored_models(st)
        if not models:
            raise BadInput(f"Store '{st.path}' holds no dissected models. Dissect one first: 'neurostore dissect MODEL'.")
    else:
        models = check_models(st, listed(model, "model"))
    notes, results = [], []
    for m in models:
        try:
            results.append(audit_model(st, m, classes, scorer, top_units, threshold, max_images, verify_top, progress,
                                       device, precision))
        except NeurostoreError as e:
            if model is not None:
                raise  # the user asked for this model: tell them why it cannot be audited
            notes.append(f"{m}: skipped ({e})")
    if not results:
        raise BadInput("No model could be audited: " + "; ".join(notes))
    schemas = load_schemas()
    units = pa.Table.from_pylist([r for res in results for r in res["units"]], schema=_schema(schemas["audit_units"]))
    findings = pa.Table.from_pylist([r for res in results for r in res["findings"]],
                                    schema=_schema(schemas["audit_findings"]))
    out = AuditResult(models=[r["summary"]["model"] for r in results], threshold=threshold, units=units,
                      findings=findings, headlines=[r["summary"] for r in results], notes=notes)
    if write:
        for res in results:
            m = res["summary"]["model"]
            params = {"model": m, "classes": res["summary"]["classes"], "scorer": res["summary"]["scorer"],
                      "top_units": top_units, "threshold": threshold, "max_images": max_images,
                      "verify_top": verify_top, "dataset": res["summary"]["dataset"], "device": device,
                      "precision": precision}
            key = "audit:" + ("*" if not classes else ",".join(sorted(classes)))
            with st.run("audit", params, started_at=t0) as run:
                if res["units"]:
                    run.write("audit_units", pa.Table.from_pylist(res["units"]), key=key)
                if res["findings"]:
                    run.write("audit_findings", pa.Table.from_pylist(res["findings"]), key=key)
                if res["effects"]:
                    run.write("effects", pa.Table.from_pylist(res["effects"]), key=key)
            out.run_ids[m] = run.run_id
    return out


def _schema(ts) -> pa.Schema:
    """The table's Arrow schema without run_id (the store fills it in)."""
    s = ts.arrow_schema()
    return pa.schema([f for f in s if f.name != "run_id"])
