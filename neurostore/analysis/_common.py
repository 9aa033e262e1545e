"""Shared pieces of the analysis layer: opening stores, finding what a model was dissected on,
loading its probe images, zeroing units, and MiniLM relatedness of words.

A neuron is `(model, layer, unit)` everywhere; as text `layer/unit` within a model, or
`model/layer/unit` across models (`parse_neuron`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .. import devices
from ..classnames import class_map
from ..errors import BadInput, BadParameter, UnknownLayer, UnknownModel, listed, unknown
from ..hooks import forward_hooks, keep
from ..models import list_layers, load_target
from ..store import Store
from ..textembed import embed_texts as minilm  # [n, 384] unit MiniLM vectors, cached per phrase

# Images pushed through a model per forward pass in ablations and contributions: 64 at 224 px
# (real models), more for smaller inputs so that a batch holds the same number of pixels (784 at
# the probe world's 64 px: its tiny models run 4-6x faster per image in large batches on a CPU).
BATCH = 64


def batch_size(pixels: torch.Tensor) -> int:
    """Images per forward pass for inputs like `pixels` ([n, 3, H, W]): as many pixels as BATCH
    images at 224 px, at most 1024 images."""
    return int(np.clip(BATCH * 224 * 224 // (pixels.shape[-1] * pixels.shape[-2]), 1, 1024))


def open_store(store: Store | str | Path, read_only: bool = False) -> Store:
    """A Store from a Store or a path (analysis commands never create a store: it must hold a
    dissection already)."""
    if isinstance(store, Store):
        if store.read_only and not read_only:   # say so before the work, not at its write
            raise BadInput(f"Store '{store.path}' was opened read-only, and this writes its results: open it "
                           "with read_only=False, or pass write=False where the function takes it.")
        return store
    return Store.open(store, read_only=read_only, create=False)


def stored_models(store: Store) -> list[str]:
    return [m for m in store.sql("SELECT DISTINCT model FROM models ORDER BY model").column("model").to_pylist() if m]


def check_models(store: Store, models: Iterable[str]) -> list[str]:
    """The given model ids, each checked against the models table."""
    have = stored_models(store)
    out = []
    for m in models:
        if m not in have:
            raise UnknownModel(unknown("model", m, have, "Dissect it first: 'neurostore dissect MODEL'; "
                                                       "stored models are in 'neurostore sql \"SELECT * FROM models\"'."))
        out.append(m)
    return out


def untrained(store: Store, models: Iterable[str]) -> list[str]:
    """Those of `models` whose dissect ran on random weights (its run's params say so)."""
    models = sorted(models)
    if not models:
        return []
    return sorted(store.df("SELECT model FROM untrained_models() WHERE list_contains($m, model)", {"m": models})["model"])


def model_row(store: Store, model: str) -> dict:
    check_models(store, [model])
    rows = store.sql("SELECT * FROM models WHERE model = $m ORDER BY run_id DESC LIMIT 1", {"m": model}).to_pylist()
    return rows[0]


def model_dataset(store: Store, model: str) -> str | None:
    """The probe set a model was recorded on (the most recent when there are several)."""
    rows = store.sql("SELECT dataset, max(run_id) AS r FROM units WHERE model = $m GROUP BY dataset ORDER BY r DESC",
                     {"m": model}).to_pylist()
    return rows[0]["dataset"] if rows else None


def model_layers(store: Store, model: str) -> list[dict]:
    """Rows of the layers table for a model, in depth order."""
    return store.sql("SELECT layer, kind, n_units, depth, depth_frac FROM layers WHERE model = $m "
                     "ORDER BY depth, layer", {"m": model}).to_pylist()


@functools.lru_cache(maxsize=8)
def _load_target_cached(spec: str, device: str, precision: str):
    return load_target(spec).to(device, precision)


def resolve(device, precision) -> tuple[str, str]:
    """Check --device and --precision before any work; (device, precision) as cache keys."""
    dev = devices.resolve_device(device)
    return str(dev), devices.precision_name(devices.resolve_precision(precision, dev))


def load_model(store: Store, model: str, device=None, precision: str | None = None):
    """The target model behind a stored model id, loaded from its recorded spec, on `device`
    (default auto) with autocast at `precision` (default auto: fp32 on the CPU)."""
    device, precision = resolve(device, precision)
    row = model_row(store, model)
    spec = row.get("spec")
    if not spec:
        raise BadInput(f"Model '{model}' has no spec in the models table, so it cannot be re-loaded for "
                       "ablations or gradients. Dissect it again with 'neurostore dissect SPEC'.")
    return _load_target_cached(spec, device, precision)


def world_of(target) -> object | None:
    """The probe world a target belongs to (probe:* specs), else None."""
    return (target.extra or {}).get("world")


# ---- neurons ------------------------------------------------------------------------------------

_NEURON_RE = re.compile(r"^(?:(?P<model>[a-z0-9][a-z0-9_.\-]*)/)?(?P<layer>[A-Za-z0-9_][A-Za-z0-9_.]*)[/:](?P<units>[\d,\- ]+)$")


def parse_units(specs: Sequence[str] | str, layer: str | None = None) -> dict[str, list[int]]:
    """Unit selections -> {layer: [units]}.  Accepts 'conv4:3', 'conv4/3', 'conv4:3,7,9',
    'conv4:0-7' (a range), or bare unit numbers when `layer` is given."""
    out: dict[str, list[int]] = {}
    for raw in listed(specs, "units") or []:   # numbers too: units=[3, 7] with layer
        for part in [p for p in re.split(r"\s+(?=[A-Za-z_])", str(raw).strip()) if p]:
            m = _NEURON_RE.match(part.strip())
            if m:
                lay, units = m.group("layer"), m.group("units")
            elif layer is not None and re.fullmatch(r"[\d,\- ]+", part.strip()):
                lay, units = layer, part
            else:
                raise BadParameter(f"Cannot read unit selection '{part}'. Use LAYER:UNIT[,UNIT...] or "
                                   "LAYER:FIRST-LAST, e.g. units='conv4:3,7' or units='blocks.3.mlp.fc1:0-15'.")
            for tok in [t for t in units.replace(" ", "").split(",") if t]:
                if "-" in tok:
                    a, b = tok.split("-", 1)
                    if not a or not b or int(b) < int(a):
                        raise BadParameter(f"Bad unit range '{tok}' in '{part}'. Use FIRST-LAST, e.g. 0-7.")
                    out.setdefault(lay, []).extend(range(int(a), int(b) + 1))
                else:
                    out.setdefault(lay, []).append(int(tok))
    if not out:
        raise BadParameter("No units given. Pass e.g. units='conv4:3,7'.")
    return {k: sorted(set(v)) for k, v in out.items()}


def check_units(target, units: dict[str, list[int]]) -> None:
    """Every layer exists in the model and every unit is in range."""
    infos = {li.layer: li for li in list_layers(target)}
    for layer, us in units.items():
        if layer not in infos:
            raise UnknownLayer(unknown(f"layer for {target.id}", layer, infos, f"See 'neurostore layers {target.spec}'."))
        n = infos[layer].n_units
        bad = [u for u in us if not 0 <= u < n]
        if bad:
            raise BadParameter(f"Unit {bad[0]} is out of range for {target.id} layer {layer}: it has units 0..{n - 1}.")


def neuron_names(units: dict[str, list[int]]) -> list[str]:
    return [f"{layer}/{u}" for layer in units for u in units[layer]]


# ---- zeroing units --------------------------------------------------------------------------------


def _channel_dim(target, out: torch.Tensor) -> int:
    # conv maps [b, c, h, w] and linear outputs [b, c] carry units on dim 1; token layers carry
    # them on the last dim in both layouts ([b, t, c] and [t, b, c]).
    return 1 if out.dim() in (2, 4) else out.dim() - 1


def zeroed(target, units: dict[str, list[int]], tokens: "TokenAblation | None" = None,
           directions: dict[str, torch.Tensor] | None = None):
    """Forward hooks, for a `with` block, that set the given units of each layer to 0 (every
    position and token: the whole unit is removed, as in the papers' ablation studies); with
    `tokens`, also the tokens it masks replaced by their mean where they enter the blocks; with
    `directions` ({block: unit vector [d]}), also that direction projected out of every token of
    the block's output (the residual stream: what a ViT carries outside its neurons)."""
    def zero(idx: torch.Tensor):
        def hook(out):
            z = out.clone()  # never in place: a later in-place op could see the original
            return z.index_fill_(_channel_dim(target, z), idx.to(z.device), 0.0)
        return hook

    def project_out(d: torch.Tensor):
        def hook(out):                                    # [b, t, d] or [t, b, d]: d is last either way
            v = d.to(out.device, out.dtype)
            return out - (out @ v)[..., None] * v
        return hook
    fwd = {layer: zero(torch.tensor(sorted(us), dtype=torch.long, device=target.device)) for layer, us in units.items()}
    fwd.update({block: project_out(d) for block, d in (directions or {}).items()})
    pre = {tokens.entry: tokens.hook} if tokens is not None else None
    return forward_hooks(target.module, fwd, pre=pre)


# ---- token ablation (ViTs) ------------------------------------------------------------------------
# A ViT does not keep a cue in its MLP neurons: the patch tokens where the cue is drawn carry it
# through attention and the residual stream, around any neuron that is zeroed. So a token model's
# units are removed together with the tokens they fire on: each image's patch tokens where a
# unit exceeds FIRE x its largest activation on the probe images are replaced, where the tokens
# enter the first block, by the mean token of that position (mean ablation).

FIRE = 0.5


def blocks_of(target, layer: str) -> list[str]:
    """The blocks of the numbered block list `layer` sits in, in order (['blocks.0', ...,
    'blocks.3'] for 'blocks.2.mlp.fc1'; 'transformer.resblocks.N' for open_clip): each one's
    output is the residual stream after it. [] when `layer` is in no block list."""
    modules = dict(target.module.named_modules())
    parts = layer.split(".")
    for i, p in enumerate(parts):
        lst = modules.get(".".join(parts[:i]))
        if p.isdigit() and isinstance(lst, (torch.nn.ModuleList, torch.nn.Sequential)):
            return [".".join(parts[:i] + [str(j)]) for j in range(len(lst))]
    return []


def block_entry(target, layer: str) -> str | None:
    """The first block of the block list `layer` sits in ('blocks.0' for 'blocks.2.mlp.fc1',
    'transformer.resblocks.0' for 'transformer.resblocks.5.mlp.c_fc'): its input is the token
    sequence entering the residual stream. None when `layer` is in no numbered block list."""
    blocks = blocks_of(target, layer)
    return blocks[0] if blocks else None


def as_btc(target, t: torch.Tensor) -> torch.Tensor:
    """A token layer's output (or its gradient) as [batch, tokens, channels], whatever its layout."""
    return t.transpose(0, 1) if target.token_layout == "tbc" else t  # -> [b, t, c]


@dataclass
class IntactStats:
    """The intact model on the probe images: the baselines of contributions and token ablation."""

    mean: dict[str, torch.Tensor]        # layer -> its mean output per position ([c, h, w], [t, c] or [c])
    peak: dict[str, np.ndarray]          # layer -> [images, units] largest activation over positions/patch tokens
    act_max: dict[str, torch.Tensor]     # token layer -> [units] largest activation over patch tokens
    entry_mean: dict[str, torch.Tensor]  # block entry -> [t, d] mean token per position
    token_mean: dict[str, np.ndarray]    # token layer -> [images, units] mean over patch tokens


@torch.no_grad()
def intact_stats(target, pixels: torch.Tensor, layers: Sequence[str]) -> IntactStats:
    """One pass over `pixels` recording each layer's mean output and per-image peak, each token
    layer's largest patch-token activation per unit, and the mean token at each token layer's
    block entry."""
    entries = {e for e in (block_entry(target, l) for l in layers) if e} if target.grid_size is not None else set()
    act_max: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    peaks: dict[str, list[np.ndarray]] = {}
    tmeans: dict[str, list[np.ndarray]] = {}
    p, batch = target.num_prefix_tokens, batch_size(pixels)
    for i in range(0, len(pixels), batch):
        outs = {}
        with forward_hooks(target.module, {l: keep(outs, l) for l in layers}, pre={e: keep(outs, ("in", e)) for e in entries}):
            logits_of(target, pixels[i : i + batch], exact=True)
        for l, a in outs.items():
            a = as_btc(target, a).float() if a.dim() == 3 else a.float()  # tokens as [b, t, c]
            sums[l] = a.sum(0) if l not in sums else sums[l] + a.sum(0)
            if isinstance(l, tuple):
                continue
            peak = a[:, p:].amax(1) if a.dim() == 3 else a.amax((2, 3)) if a.dim() == 4 else a  # [b, units]
            peaks.setdefault(l, []).append(peak.cpu().numpy())
            if a.dim() == 3:
                tmeans.setdefault(l, []).append(a[:, p:].mean(1).cpu().numpy())  # [b, units]
                m = peak.amax(0)                                          # [units]
                act_max[l] = m if l not in act_max else torch.maximum(act_max[l], m)
    means = {k: v / max(1, len(pixels)) for k, v in sums.items()}
    return IntactStats({l: means[l] for l in layers if l in means}, {l: np.concatenate(v) for l, v in peaks.items()},
                       act_max,
                       {e: means[("in", e)] for e in entries if ("in", e) in means},
                       {l: np.concatenate(v) for l, v in tmeans.items()})


class TokenAblation:
    """The tokens where `units` fire, for one batch at a time: `mask(x)` runs the intact model on
    the batch and marks them; `hook` (a pre-hook on `entry`) swaps them for the mean token."""

    def __init__(self, target, units: dict[str, list[int]], stats: IntactStats):
        self.target, self.units = target, {l: us for l, us in units.items() if l in stats.act_max}
        entries = {block_entry(target, l) for l in self.units}
        self.entry = next(iter(entries)) if len(entries) == 1 else None
        self.thresholds = {l: FIRE * stats.act_max[l][us] for l, us in self.units.items()}  # [k] each
        self.mean = stats.entry_mean.get(self.entry)                     # [t, d]
        self.masked: torch.Tensor | None = None                           # [b, t] of the last batch

    @property
    def usable(self) -> bool:
        return bool(self.units) and self.entry is not None and self.mean is not None

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> None:
        outs = {}
        with forward_hooks(self.target.module, {l: keep(outs, l) for l in self.units}):
            logits_of(self.target, x)
        m = None
        for l, us in self.units.items():
            a = as_btc(self.target, outs[l])[..., us].float()            # [b, t, k]
            fired = (a > self.thresholds[l].to(a.device)).any(-1)        # [b, t]
            m = fired if m is None else m | fired
        m[:, : self.target.num_prefix_tokens] = False                     # the class token is the readout
        self.masked = m

    def hook(self, x: torch.Tensor) -> torch.Tensor:
        xb = as_btc(self.target, x)                                      # [b, t, d]
        out = torch.where(self.masked[..., None].to(xb.device), self.mean.to(xb.device, xb.dtype), xb)
        return as_btc(self.target, out)                                  # back to the layer's layout


def logits_of(target, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """[b, classes] logits on the target's device, under autocast to its dtype (exact: fp32,
    for comparing tensors). x may be on the CPU."""
    with devices.autocast(target.device, None if exact else target.dtype):
        out = target.module(x.to(target.device, non_blocking=True))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    return out  # [b, classes]


@torch.no_grad()
def all_logits(target, pixels: torch.Tensor, units: dict[str, list[int]] | None = None, batch: int | None = None,
               tokens: TokenAblation | None = None, directions: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """[n, classes] logits, optionally with `units` zeroed (and the `tokens` they fire on ablated)
    and `directions` projected out of block outputs (`zeroed`)."""
    out = []
    batch = batch or batch_size(pixels)
    for i in range(0, len(pixels), batch):
        x = pixels[i : i + batch]
        if tokens is not None:
            tokens.mask(x)  # the intact model marks this batch's tokens before the ablated pass
        with zeroed(target, units or {}, tokens, directions) if units or directions else contextlib.nullcontext():
            out.append(logits_of(target, x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def predict(target, pixels: torch.Tensor, units: dict[str, list[int]] | None = None, batch: int | None = None,
            tokens: TokenAblation | None = None, directions: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Predicted class index per image, optionally with `units` zeroed (and `tokens` ablated,
    `directions` projected out)."""
    if not len(pixels):
        return np.zeros(0, np.int64)
    return all_logits(target, pixels, units, batch, tokens, directions).argmax(1)


@torch.no_grad()
def logits_each_zeroed(target, pixels: torch.Tensor, units: Sequence[tuple[str, int]]) -> np.ndarray:
    """[len(units), n, classes] logits with each (layer, unit) zeroed alone, as `all_logits` with
    {layer: [unit]} gives them, but computed over the stacked units x images rows in full batches:
    a small model runs up to 2x faster per image in large batches on a CPU (the probe ViT: 2.7 vs
    5.8 CPU-s for 2000 images in batches of 784 vs 200)."""
    k, n = len(units), len(pixels)
    if not k or not n:
        return np.zeros((k, n, 0), np.float32)
    which = torch.arange(k).repeat_interleave(n)           # [k*n] the unit zeroed in each row
    image = torch.arange(n).repeat(k)                      # [k*n] the image of each row
    chans = torch.tensor([u for _, u in units])

    def zero_rows(rows: torch.Tensor, ch: torch.Tensor):
        def hook(out):
            z = out.clone()  # never in place (see zeroed)
            r, c = rows.to(z.device), ch.to(z.device)
            if z.dim() == 3 and target.token_layout == "tbc":
                z[:, r, c] = 0.0                           # [t, b, c]
            elif z.dim() == 3:
                z[r, :, c] = 0.0                           # [b, t, c]
            else:
                z[r, c] = 0.0                              # [b, c, h, w] or [b, c]
            return z
        return hook

    out, batch = [], batch_size(pixels)
    for i in range(0, k * n, batch):
        w = which[i : i + batch]
        hooks = {}
        for layer in {units[j][0] for j in w.unique().tolist()}:
            mine = torch.tensor([j for j, (l, _) in enumerate(units) if l == layer])
            rows = torch.nonzero(torch.isin(w, mine)).flatten()
            hooks[layer] = zero_rows(rows, chans[w[rows]])
        with forward_hooks(target.module, hooks):
            out.append(logits_of(target, pixels[image[i : i + batch]]).float().cpu().numpy())
    return np.concatenate(out).reshape(k, n, -1)


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, tuple[float, int]]:
    """{class: (accuracy, n_images)} over the classes that have images."""
    out = {}
    for ci, c in enumerate(classes):
        m = labels == ci
        if m.any():
            out[c] = (float((preds[m] == ci).mean()), int(m.sum()))
    return out


def cue_flip_rate(p_clean: np.ndarray, p_cued: np.ndarray, labels: np.ndarray, class_index: int) -> tuple[float, int]:
    """Among other-class scenes not predicted as the class without the cue, the fraction predicted
    as the class once the cue is drawn (the probe world's measure of reliance on the cue)."""
    base = (labels != class_index) & (p_clean != class_index)
    if not base.any():
        return 0.0, 0
    return float((p_cued[base] == class_index).mean()), int(base.sum())


# ---- probe images -------------------------------------------------------------------------------


@dataclass
class ProbeSet:
    dataset: str
    image_ids: list[str]
    pixels: torch.Tensor     # [n, 3, S, S] preprocessed for the target
    labels: np.ndarray       # [n] class index into target.classes
    classes: list[str]


def probe_images(store: Store, model: str, target, max_images: int = 2000, split: str | None = None,
                 seed: int = 0) -> ProbeSet:
    """The labelled images of the probe set `model` was dissected on, preprocessed for it.

    Which images: the model's dataset (units table), rows of the images table with a label that
    names one of the model's classes (`classnames.class_map`: an image folder's subfolder names
    classes its own way); of split `split` when given, else the 'probe' split when the
    dataset has one (what was dissected), else every split. At most `max_images`, drawn evenly
    per class with a fixed seed so re-runs see the same images."""
    if max_images < 1:
        raise BadParameter(f"max_images={max_images} must be at least 1.")
    classes = list(target.classes or [])
    if not classes:
        raise BadInput(f"Model '{model}' has no class names (models.classes is empty), so its probe images "
                       "cannot be labelled by class (ablate, audit and groups measure per class). Give a model "
                       "with a classifier head and known classes (pretrained torchvision or timm ImageNet "
                       "weights, or a checkpoint dict with 'classes').")
    dataset = model_dataset(store, model)
    if dataset is None:
        raise BadInput(f"Model '{model}' has no recorded activations in this store. Dissect it first: "
                       "'neurostore dissect SPEC'.")
    rows = store.sql("SELECT image_id, path, label, split FROM images WHERE dataset = $d AND label IS NOT NULL "
                     "ORDER BY image_id", {"d": dataset}).to_pylist()
    named = class_map({r["label"] for r in rows}, classes)   # a folder's 'great_white_shark', 'n01484850'
    rows = [dict(r, label=named[r["label"]]) for r in rows if r["label"] in named]
    splits = {r["split"] for r in rows}
    want = split if split is not None else ("probe" if "probe" in splits else None)
    if want is not None:
        if want not in splits:
            raise BadParameter(unknown(f"split of dataset {dataset}", want, [s for s in splits if s]))
        rows = [r for r in rows if r["split"] == want]
    if not rows:
        raise BadInput(f"Dataset '{dataset}' of model '{model}' has no images labelled with the model's classes "
                       f"({', '.join(classes[:6])}…). Ablations and audits need labelled probe images: put each "
                       "class's images in a subfolder named for the class (or its ImageNet synset id) and dissect "
                       "that folder.")
    if len(rows) > max_images:
        rng = np.random.default_rng(seed)
        by_class: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_class.setdefault(r["label"], []).append(i)
        per = max(1, max_images // len(by_class))
        keep = sorted(int(j) for idx in by_class.values()
                      for j in rng.choice(idx, min(per, len(idx)), replace=False))
        rows = [rows[i] for i in keep]
    pix = []
    for r in rows:
        with Image.open(r["path"]) as im:
            pix.append(target.preprocess(im.convert("RGB")))
    index = {c: i for i, c in enumerate(classes)}
    return ProbeSet(dataset, [r["image_id"] for r in rows], torch.stack(pix),
                    np.array([index[r["label"]] for r in rows], np.int64), classes)


# ---- words ------------------------------------------------------------------------------------------


def relatedness(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """[len(a), len(b)] MiniLM cosine similarities of words/phrases."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return minilm(a) @ minilm(b).T


def matrix(column) -> np.ndarray:
    """A list/array column of equal-length float vectors -> [n, d] float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.float32()))
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    flat = np.asarray(flat, dtype=np.float32)
    return flat.reshape(n, -1)
