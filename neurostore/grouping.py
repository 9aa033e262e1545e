"""Neuron groups and their circuit (after NeurFlow): units that fire together and push the same
classes, explained as a set of concepts; and the circuit: unit -> unit, group -> group and
-> class attributions.

    summary = groups(store, "probe-cnn")          # after 'neurostore dissect probe:cnn'
    store.query("class_circuit", {"model": "probe-cnn", "class": "star"})

Per dissected hidden layer (in depth order; logits and feature layers left out):

1. Units are clustered (average-linkage, scipy) on a distance that mixes co-activation and
   attribution: 1 - (corr_act + corr_attr) / 2, where corr_act correlates two units' pooled
   activations over the probe images (the `pooled` table) and corr_attr their class-attribution
   profiles (gradient x activation toward each class's logit on its images: the audit's
   contributions with a baseline of 0 rather than the audit's mean activation, which on the
   fast probe world blurred the cue class's path: its top groups no longer stood out).
2. A group's explanation is the set of its members' labels (from `explanations`, one scorer),
   most common first.
3. Unit edges: the attribution of upstream unit i to unit j of the next dissected layer is
   gradient x activation, d(mean_pos down_j)/d(up_i) * up_i summed over positions (patch tokens:
   CLS left out), averaged over images: how much of unit j's mean activation unit i's output
   carries, to first order. One backward per downstream unit and batch, so they are measured on
   a bounded sample: `edge_images` (default 64) images spread evenly over the probe images.
   A unit's edge to a class is its class attribution of step 1 (all `max_images`).
4. Group edges are the block sums of the unit edges (attribution is linear in the upstream
   units and in the summed downstream activations); a group's class edge sums its members'.

One run writes `groups`, `group_edges` and `unit_edges`; re-running for the same model replaces
them, but for the layers it leaves out: their groups and the edges among them are kept. `unit_edges` keeps only the strongest edges (dense matrices grow as units squared): per
unit its `TOP_EDGES` (8) largest |weight| edges in and out, and its 8 classes of largest |weight|.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from .analysis._common import (BATCH, check_models, load_model, logits_of, model_dataset, model_layers,
                               open_store, probe_images)
from .analysis.audit import contributions
from .errors import BadInput, BadParameter, UnknownLayer, listed, unknown
from .hooks import forward_hooks, keep
from .progress import bar as progress_bar
from .record import to_map
from .store import Store


def _pooled(store: Store, model: str, layer: str, dataset: str) -> tuple[list[str], np.ndarray]:
    t = store.df("SELECT image_id, act_mean FROM pooled WHERE model = $m AND layer = $l AND dataset = $d "
                 "ORDER BY image_id", {"m": model, "l": layer, "d": dataset})
    return t["image_id"].tolist(), np.stack(t["act_mean"].to_numpy()).astype(np.float64)  # [n, units]


def _corr(x: np.ndarray) -> np.ndarray:
    """Correlation of the columns of x [n, units] -> [units, units]; constant columns correlate 0."""
    x = x - x.mean(0)
    norm = np.linalg.norm(x, axis=0)
    c = (x.T @ x) / np.maximum(np.outer(norm, norm), 1e-12)
    return np.where(np.outer(norm, norm) > 0, c, 0.0)


def cluster(acts: np.ndarray, attr: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Units -> groups (largest first): acts [n_images, units], attr [classes, units]."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = 1.0 - (_corr(acts) + _corr(attr)) / 2.0                 # [units, units] in [0, 2]
    np.fill_diagonal(d, 0.0)
    d = np.clip((d + d.T) / 2.0, 0.0, None)
    labels = fcluster(linkage(squareform(d, checks=False), "average"), n_groups, "maxclust")
    groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    return sorted(groups, key=lambda m: (-len(m), int(m[0])))


UNIT_EDGE_IMAGES = 64  # images the unit -> unit attributions average over (module doc)
TOP_EDGES = 8           # edges kept per unit in each direction, and classes per unit (module doc)


def unit_edges(target, pixels: torch.Tensor, layers: list[str], progress: bool = False) -> dict:
    """{(up, down): [units_up, units_down]} mean attribution of each upstream unit to each unit of
    the next layer (module doc): one backward per downstream unit and batch. (A vmapped backward,
    is_grads_batched, was no faster on the CPU and needs memory per unit.)"""
    pairs = list(zip(layers, layers[1:]))
    sums: dict = {}
    # a ResNet-50's layer3 -> layer4 alone is 2,048 backwards a batch; the count is known after the first
    bar = progress_bar(None, "unit edges", "backward", progress and bool(pairs))
    for i in range(0, len(pixels), BATCH):
        outs = {}
        with forward_hooks(target.module, {n: keep(outs, n) for n in layers}), torch.enable_grad():
            logits_of(target, pixels[i : i + BATCH].clone().requires_grad_(True), exact=True)
            if bar.total is None:
                bar.total = -(-len(pixels) // BATCH) * sum(to_map(target, outs[d]).shape[1] for _, d in pairs)
            for up, down in pairs:
                pooled = to_map(target, outs[down]).float().mean((2, 3))             # [b, units_down]
                a = outs[up]
                cols = []
                for j in range(pooled.shape[1]):
                    g, = torch.autograd.grad(pooled[:, j].sum(), a, retain_graph=True)  # like a: [b, ...]
                    cols.append(to_map(target, (g * a).detach()).double().sum((2, 3)).sum(0))  # [units_up]
                    bar.update(1)
                s = torch.stack(cols, 1).cpu().numpy()                                # [units_up, units_down]
                sums[(up, down)] = sums[(up, down)] + s if (up, down) in sums else s
    bar.close()
    return {p: s / len(pixels) for p, s in sums.items()}


def block_sums(w: np.ndarray, rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
    """[units_up, units_down] unit edges -> [groups_up, groups_down] group edges (attribution is
    linear in the source units and in the summed downstream activations)."""
    return np.array([[w[np.ix_(r, c)].sum() for c in cols] for r in rows]).reshape(len(rows), len(cols))


def _ranks(w: np.ndarray, axis: int) -> np.ndarray:
    """Rank of each |w| along `axis`, 0 = strongest."""
    return np.argsort(np.argsort(-np.abs(w), axis, kind="stable"), axis, kind="stable")


def strongest(w: np.ndarray, top: int = TOP_EDGES) -> np.ndarray:
    """Mask [rows, cols]: the `top` largest |w| of each row and of each column."""
    return (_ranks(w, 1) < top) | (_ranks(w, 0) < top)


def _explain(expl, layer: str, units: np.ndarray) -> tuple[str | None, list[str], list[int]]:
    rows = expl[(expl["layer"] == layer) & expl["unit"].isin(units.tolist())]
    if rows.empty:
        return None, [], []
    conf = rows.groupby("label")["confidence"].mean()
    counts = Counter(rows["label"])
    order = sorted(counts, key=lambda c: (-counts[c], -float(conf.get(c, 0.0)), c))
    return order[0], order, [counts[c] for c in order]


def _other_layers(store: Store, table: str, model: str, layers: list[str]) -> list[dict]:
    """The stored rows of `model` in `table` that touch none of `layers` (rows without run_id)."""
    if table not in store.tables():
        return []
    touch = "layer" if table == "groups" else "src_layer"
    where = f"NOT list_contains($l, {touch})" + ("" if table == "groups" else
                                                " AND (dst_layer IS NULL OR NOT list_contains($l, dst_layer))")
    return store.sql(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE model = $m AND {where}",
                     {"m": model, "l": layers}).to_pylist()


def groups(store: Store | str, model: str, *, layers: list[str] | None = None, n_groups: int | None = None,
           scorer: str = "patch", max_images: int = 1000, edge_images: int = UNIT_EDGE_IMAGES, seed: int = 0,
           log=print, progress: bool = True) -> dict:
    """Cluster each dissected hidden layer of `model` into groups, explain them, and store the
    group circuit (module doc). n_groups per layer: default about sqrt(units), at least 2."""
    t0 = time.time()
    layers = listed(layers, "layers")
    store = open_store(store)
    if n_groups is not None and n_groups < 1:
        raise BadParameter(f"--groups must be at least 1, got {n_groups}.")
    if max_images < 2:
        raise BadParameter(f"--max-images must be at least 2, got {max_images}.")
    if edge_images < 1:
        raise BadParameter(f"--edge-images must be at least 1, got {edge_images}.")
    check_models(store, [model])
    stored = model_layers(store, model)
    feature_layers = set()
    if "dictionaries" in store.tables():
        feature_layers = set(store.df("SELECT layer FROM dictionaries WHERE model = $m", {"m": model})["layer"])
    hidden = [r["layer"] for r in stored if r["kind"] != "logits" and r["layer"] not in feature_layers]
    if layers:
        for l in layers:
            if l not in hidden:
                raise UnknownLayer(unknown("layer", l, hidden, f"Groups are built on the dissected hidden layers "
                                           f"of {model}; dissect it first: 'neurostore dissect SPEC --layer {l}'."))
        hidden = [l for l in hidden if l in layers]
    if not hidden:
        raise BadInput(f"Model '{model}' has no dissected hidden layers to group. Dissect it first: "
                       "'neurostore dissect SPEC'.")
    expl = store.df("SELECT layer, unit, label, confidence FROM explanations WHERE model = $m AND scorer = $s",
                    {"m": model, "s": scorer})
    if expl.empty:
        have = store.df("SELECT DISTINCT scorer FROM explanations WHERE model = $m", {"m": model})["scorer"]
        raise BadParameter(unknown(f"scorer with explanations of {model}", scorer, have.tolist()))
    dataset = model_dataset(store, model)
    target = load_model(store, model)
    probe = probe_images(store, model, target, max_images=max_images, seed=seed)
    log(f"groups {model}: {len(hidden)} layers, {len(probe.image_ids)} labelled probe images")
    zero = {l: torch.zeros(()) for l in hidden}                            # baseline 0: plain grad x act (module doc)
    attr = contributions(target, probe, hidden, None, zero)["grad_x_act"]   # layer -> [classes, units]
    members, rows = {}, []
    for layer in hidden:
        _ids, acts = _pooled(store, model, layer, dataset)
        if acts.shape[0] < 2:
            raise BadInput(f"Layer '{layer}' of {model} has pooled activations of {acts.shape[0]} image(s); "
                           "grouping needs at least 2. Dissect it on more images.")
        U = acts.shape[1]
        n = min(U, n_groups or max(2, int(round(np.sqrt(U)))))
        members[layer] = cluster(acts, attr[layer], n)
        c = _corr(acts)
        for gid, m in enumerate(members[layer]):
            label, concepts, counts = _explain(expl, layer, m)
            sub = c[np.ix_(m, m)]
            coh = float((sub.sum() - len(m)) / (len(m) * (len(m) - 1))) if len(m) > 1 else 1.0
            rows.append({"layer": layer, "group_id": gid, "units": m.tolist(), "n_units": len(m), "label": label,
                         "concepts": concepts, "concept_units": counts, "coherence": coh, "scorer": scorer,
                         "dataset": dataset, "model": model})
    # Unit -> unit edges on a bounded, evenly spread sample of the images (module doc); group
    # edges are their block sums.
    pick = np.unique(np.linspace(0, len(probe.image_ids) - 1, min(edge_images, len(probe.image_ids))).round().astype(int))
    log(f"groups {model}: unit edges on {len(pick)} images")
    w_units = unit_edges(target, probe.pixels[pick], hidden, progress)
    edges, links = [], []
    for (up, down), w in w_units.items():
        wg = block_sums(w, members[up], members[down])                   # [groups_up, groups_down]
        edges += [{"kind": "group", "src_layer": up, "src_group": i, "dst_layer": down, "dst_group": j, "class": None,
                   "weight": float(wg[i, j]), "n_images": len(pick)} for i, j in np.ndindex(*wg.shape)]
        links += [{"kind": "unit", "src_layer": up, "src_unit": int(i), "dst_layer": down, "dst_unit": int(j),
                   "class": None, "weight": float(w[i, j]), "n_images": len(pick)} for i, j in np.argwhere(strongest(w))]
    n_cls = np.bincount(probe.labels, minlength=len(probe.classes))     # [classes] images of each
    for layer in hidden:
        for gid, m in enumerate(members[layer]):
            edges += [{"kind": "class", "src_layer": layer, "src_group": gid, "dst_layer": None, "dst_group": None,
                       "class": cls, "weight": float(attr[layer][ci, m].sum()), "n_images": int(n_cls[ci])}
                      for ci, cls in enumerate(probe.classes)]
        links += [{"kind": "class", "src_layer": layer, "src_unit": int(u), "dst_layer": None, "dst_unit": None,
                   "class": probe.classes[ci], "weight": float(attr[layer][ci, u]), "n_images": int(n_cls[ci])}
                  for ci, u in np.argwhere(_ranks(attr[layer], 0) < TOP_EDGES)]
    for e in edges + links:
        e.update(dataset=dataset, model=model)
    # The model's groups are one piece of work (its key), rewritten whole: the other layers' groups
    # and the edges among them, from earlier runs, are carried over; edges to a regrouped layer are not
    # (its group ids changed), so a note says how to recompute them.
    kept = {t: _other_layers(store, t, model, hidden) for t in ("groups", "group_edges", "unit_edges")}
    if kept["groups"]:
        others = sorted({r["layer"] for r in kept["groups"]})
        log(f"groups {model}: kept the groups of {', '.join(others)} from earlier runs; edges between them and "
            f"{', '.join(hidden)} need them grouped together: neurostore groups {model}")
    with store.run("groups", {"model": model, "layers": hidden, "n_groups": n_groups, "scorer": scorer,
                              "max_images": max_images, "edge_images": edge_images, "seed": seed}, work_key=f"groups:{model}") as run:
        run.write("groups", pa.Table.from_pylist(rows + kept["groups"]), key=f"groups:{model}")
        run.write("group_edges", pa.Table.from_pylist(edges + kept["group_edges"]), key=f"groups:{model}")
        run.write("unit_edges", pa.Table.from_pylist(links + kept["unit_edges"]), key=f"groups:{model}")
    return {"run_id": run.run_id, "model": model, "layers": hidden, "images": len(probe.image_ids),
            "groups": {l: len(members[l]) for l in hidden}, "edges": len(edges),
            "unit_edges": len(links), "edge_images": len(pick), "scorer": scorer,
            "seconds": round(time.time() - t0, 1),
            "next": f"neurostore query class_circuit -p model={model} -p class={probe.classes[0]}"}
