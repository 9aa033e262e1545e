"""Ablations: zero a unit or a set of units and measure per-class accuracy on the probe images
(the papers' ablation study), stored in the `effects` table.

    from neurostore.analysis import ablate
    res = ablate("store/", "probe-cnn", ["conv4:3,7"])          # the set {conv4/3, conv4/7} together
    res = ablate("store/", "probe-cnn", ["conv4:3,7"], individually=True)   # and each alone
    res.table        # Arrow rows of schema/effects.sql: kind='ablation', value = ablated - baseline

A unit is zeroed at every position and token by a forward hook on its layer (the channel of a
conv map, the neuron of a linear layer, the hidden neuron of a ViT MLP over every token), so the
rest of the network sees it as dead. With `tokens` (token models), the patch tokens where the
units fire are also mean-ablated where tokens enter the blocks, as the audit verifies a ViT's
finding (`_common.TokenAblation`). Images: the labelled probe images the model was dissected
on (`_common.probe_images`). In the probe world, also the reliance on the planted cue: the
cue flip rate toward each class (`cue_flip_rate`) before and after, from `world.cue_pairs`.

Effects rows: one per class and ablated set. A set inside one layer is one row with `units` =
the set; a set spanning layers gives one row per layer, all carrying the set's figures (the
rows of one set share the run and its `neurons` parameter in `runs.params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import BadParameter
from ..progress import bar as progress_bar
from ..store import Store
from ._common import (TokenAblation, check_units, cue_flip_rate, intact_stats, load_model, neuron_names, open_store,
                      parse_units, per_class_accuracy, predict, probe_images, resolve, world_of)


@dataclass
class Ablation:
    """One ablated set: per-class accuracy before and after."""

    neurons: list[str]                       # 'layer/unit'
    units: dict[str, list[int]]
    per_class: dict[str, dict]               # class -> {baseline, ablated, change, n_images}
    accuracy_before: float
    accuracy_after: float
    cue: dict | None = None                  # probe world: cue flip rate before/after per class

    def to_dict(self) -> dict:
        return {"neurons": self.neurons, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "change": self.accuracy_after - self.accuracy_before,
                "per_class": self.per_class, "cue": self.cue}


@dataclass
class AblationResult:
    """What `ablate` returned: per-class accuracy before and after each ablation, and the effects
    rows written (pyarrow); to_dict() is `neurostore ablate --json`."""
    model: str
    dataset: str
    n_images: int
    ablations: list[Ablation]
    table: pa.Table                          # effects rows written
    run_id: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "n_images": self.n_images,
                "run_id": self.run_id, "ablations": [a.to_dict() for a in self.ablations]}


def cue_pairs_for(world, target, split: str = "test"):
    """(clean, cued, labels) paired scenes from the probe world, or None when the world has none."""
    fn = getattr(world, "cue_pairs", None) if world is not None else None
    if fn is None:
        return None
    clean, cued, labels = fn(split=split)
    return clean, cued, np.asarray(labels)


def measure(target, probe, units: dict[str, list[int]] | None, pairs=None,
            base_preds: np.ndarray | None = None, tokens: TokenAblation | None = None) -> dict:
    """Predictions with `units` zeroed (None: intact; with `tokens`, also the tokens they fire on
    ablated) -> per-class accuracy and cue flip rates."""
    preds = base_preds if base_preds is not None else predict(target, probe.pixels, units, tokens=tokens)
    out = {"preds": preds, "per_class": per_class_accuracy(preds, probe.labels, probe.classes),
           "accuracy": float((preds == probe.labels).mean())}
    if pairs is not None:
        clean, cued, labels = pairs
        pc, pq = predict(target, clean, units, tokens=tokens), predict(target, cued, units, tokens=tokens)
        flips = {c: cue_flip_rate(pc, pq, labels, ci)[0] for ci, c in enumerate(probe.classes)}
        other = {}
        for ci, c in enumerate(probe.classes):
            m = labels != ci
            other[c] = float((pq[m] == labels[m]).mean()) if m.any() else float("nan")
        out["cue"] = {"flip_rate": flips, "cued_accuracy_other": other,
                      "clean_accuracy": float((pc == labels).mean()), "cued_accuracy": float((pq == labels).mean()),
                      "n_pairs": int(len(labels))}
    return out


def effects_rows(model: str, dataset: str, units: dict[str, list[int]], before: dict, after: dict) -> list[dict]:
    rows = []
    for c, (acc_b, n) in before["per_class"].items():
        acc_a = after["per_class"][c][0]
        for layer, us in units.items():
            single = len(units) == 1 and len(us) == 1
            rows.append({"layer": layer, "unit": us[0] if single else None, "units": None if single else us,
                         "class": c, "kind": "ablation", "value": acc_a - acc_b, "baseline": acc_b,
                         "ablated": acc_a, "n_images": n, "dataset": dataset, "model": model})
    return rows


def ablate(store: Store | str | Path, model: str, units: Sequence[str] | str, *, layer: str | None = None,
           individually: bool = False, together: bool = True, tokens: bool = False, max_images: int = 2000,
           split: str | None = None, write: bool = True, progress: bool = True, device=None,
           precision: str | None = None) -> AblationResult:
    """Zero `units` of `model` (a model id in the store) and measure per-class accuracy on its
    labelled probe images; write the changes to `effects` (kind='ablation').

    units: selections like 'conv4:3,7', 'blocks.3.mlp.fc1:0-15' (or bare numbers with `layer`).
    together: ablate the whole selection at once; individually: also each unit alone.
    tokens: (token models) also mean-ablate the patch tokens where the units fire.
    The model runs on `device` (default auto: CUDA when present) under autocast at `precision`.
    Re-running the same ablation replaces its rows."""
    sel = parse_units(units, layer)  # the user's input first: no model is loaded for a typo
    device, precision = resolve(device, precision)
    st = open_store(store)
    target = load_model(st, model, device, precision)
    check_units(target, sel)
    if tokens and target.grid_size is None:
        raise BadParameter(f"tokens=True (--tokens) needs a token model such as a ViT; {model} has no patch tokens. "
                           "Leave it out to zero the units alone.")
    probe = probe_images(st, model, target, max_images=max_images, split=split)
    stats = intact_stats(target, probe.pixels, list(sel)) if tokens else None
    world = world_of(target)
    pairs = cue_pairs_for(world, target)
    sets: list[dict[str, list[int]]] = []
    if together:
        sets.append(sel)
    if individually:
        singles = [{lay: [u]} for lay, us in sel.items() for u in us]
        sets.extend(s for s in singles if s != sel)
    base = measure(target, probe, None, pairs)
    out, rows = [], []
    for s in progress_bar(len(sets), f"ablate {model}", "set", progress and len(sets) >= 3, items=sets):
        tok = None
        if tokens:
            tok = TokenAblation(target, s, stats)
            if not tok.usable:
                raise BadParameter(f"Cannot ablate the tokens of {', '.join(neuron_names(s)[:4])}: token ablation "
                                   "needs units of token layers inside one block list (e.g. blocks.N.mlp.fc1).")
        after = measure(target, probe, s, pairs, tokens=tok)
        per = {c: {"baseline": b, "ablated": after["per_class"][c][0], "change": after["per_class"][c][0] - b,
                   "n_images": n} for c, (b, n) in base["per_class"].items()}
        cue = None
        if pairs is not None:
            cue = {"flip_rate_before": base["cue"]["flip_rate"], "flip_rate_after": after["cue"]["flip_rate"],
                   "n_pairs": base["cue"]["n_pairs"]}
        out.append(Ablation(neuron_names(s), s, per, base["accuracy"], after["accuracy"], cue))
        rows.extend(effects_rows(model, probe.dataset, s, base, after))
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    res = AblationResult(model, probe.dataset, len(probe.image_ids), out, table)
    if write and rows:
        params = {"model": model, "neurons": neuron_names(sel), "individually": individually,
                  "together": together, "tokens": tokens, "dataset": probe.dataset, "n_images": len(probe.image_ids),
                  "split": split, "max_images": max_images, "device": device, "precision": precision}
        with st.run("ablate", params) as run:
            run.write("effects", table, key="ablate:" + ",".join(neuron_names(sel)) + f":{individually}:{together}"
                      + (":tokens" if tokens else ""))
        res.run_id = run.run_id
    return res
