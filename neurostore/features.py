"""Dictionary features: directions learned on a layer's activations, explained like neurons.

    summary = fit(store, "probe:cnn", "conv4", method="topk-sae", width=8, k=32)
    summary["layer"]                     # 'conv4.topk_sae_8x': a feature layer
    attach(target, store)                # the store's dictionaries of target.id, as modules
    dissect(store, "probe:cnn", layers=["conv4.topk_sae_8x"])

A dictionary is fitted on the samples of one layer: every spatial position of a conv map, every
patch token of a ViT (prefix tokens left out, as the recorder does), from the probe images
streamed through the recorder's hooks and subsampled to `max_samples`; one image in five is held
out, and the quality is measured on all its samples: fraction of variance explained (FVE), mean
active features per sample (L0) and dead features (never active on any sample). The fit uses the
`active` fraction (ACTIVE_FRACTION) of the samples farthest from the layer's mean: where the
layer responds to something, not the background that fills most of an image.

Methods:
    topk-sae   a TopK sparse autoencoder (Gao et al. 2024) in torch: z = TopK(W_enc (x - b_dec)
               + b_enc), x_hat = W_dec z + b_dec, unit-norm decoder rows, AuxK loss on dead
               latents. `k` features are active per sample.
    batchtopk-sae  the same autoencoder trained with BatchTopK (Bussmann et al. 2024): the top
               k x batch pre-activations of a batch are kept, so `k` is the mean number of active
               features per sample and a sample that stands out takes more than the background;
               encoding keeps the features above one threshold (the mean of the smallest kept
               value over the last half of training), so the number active varies per sample.
    jumprelu-sae  BatchTopK for the first half of training, then JumpReLU (Rajamanoharan et al.
               2024): each feature its own threshold, z_i = pre_i H(pre_i - theta_i), learned by a
               straight-through estimator on the reconstruction and on a penalty that keeps each
               feature's frequency over every position (not only the fitted ones) within `band`
               (BAND: 0.2-0.5% of positions; the `iou` reference takes a unit's top 0.5%). The
               thresholds are folded into the weights (feature i scaled by mean(theta) / theta_i,
               its decoder row by the inverse), so encoding is batchtopk-sae's one threshold.
    nmf        scikit-learn's NMF of the rectified output max(x, 0) (NMF needs x >= 0); a sample's
               features are its non-negative least-squares code under the components.

The feature layer is a real module: a `FeatureEncoder` added as a child of the source layer,
named `<method>_<width>x` (module path `conv4.topk_sae_8x`: a dotted path like every layer; the
store's layer keys allow only letters, digits, `_` and `.`), and called by a forward hook on the
source layer with its output. It returns the features in the source's own layout ([batch,
features, h, w] for a conv map, [batch, tokens, features] for a ViT), so `list_layers`, the
recorder, patches and scorers see one more layer and need nothing else. The hook leaves the
source's output unchanged: the model computes what it computed before.

The weights live in the store (`dictionaries`, one row per feature layer, with provenance and
quality), written in one run; a refit of the same feature layer replaces its row.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .devices import describe, resolve_device
from .errors import BadInput, BadParameter, UnknownModel, unknown
from .images import probe_source
from .models import Target, list_layers, load_target, resolve_layer
from .progress import bar as progress_bar
from .record import hooks
from .store import Store

METHODS = ("topk-sae", "batchtopk-sae", "jumprelu-sae", "nmf")
SAES = ("topk-sae", "batchtopk-sae", "jumprelu-sae")   # methods with an encoder (w_enc, b_enc)
THRESHOLDED = ("batchtopk-sae", "jumprelu-sae")        # encoded by one threshold, not the top k
# Fit on the quarter of the samples farthest from the layer's mean sample. Most positions of a
# probe image are background, and a TopK SAE fitted on all of them spends most features on the
# background (k features fire on every sample): on the fast probe world's CNN (8x, k 8) the share
# of features whose headline agrees with the truth rose from 0.11 to 0.18 (neurons: 0.19; seed 1:
# 0.09 to 0.16, neurons 0.18), at a lower FVE on all positions (0.93/0.90/0.83 -> 0.83/0.71/0.75).
# bench/features_vs_neurons.py; README, "Beyond neurons".
ACTIVE_FRACTION = 0.25
HOLDOUT_EVERY = 5          # every 5th image is held out for the quality figures
MIN_SAMPLES = 1024         # below this a dictionary is noise, whatever its size
SAMPLES_PER_FEATURE = 4    # and at least this many samples per feature
# jumprelu-sae: each feature's frequency over every position is pulled into BAND. On the fast probe
# world's CNN the features active on 0.2-0.5% of positions agree with the truth four times as
# often as the rest (README, "Beyond neurons"). BAND_PENALTY weighs a feature's frequency outside
# the band against the reconstruction; BAND_EPS is the width of the straight-through estimator's
# kernel around a threshold, in pre-activation units of the normalised data.
BAND = (0.002, 0.005)
BAND_PENALTY = 100.0
BAND_EPS = 0.1
NMF_CODE_ITERS = 50        # multiplicative updates of a sample's non-negative code


def feature_layer_name(layer: str, method: str, width: int) -> str:
    """'conv4', 'topk-sae', 8 -> 'conv4.topk_sae_8x' (the module path of the feature layer)."""
    return f"{layer}.{method.replace('-', '_')}_{width}x"


# ---- the feature layer as a module ---------------------------------------------------------------


class FeatureEncoder(nn.Module):
    """Encodes a layer's output into dictionary features, keeping the layer's layout.

    The weights are buffers, not parameters: the target's parameter count (models.n_params)
    stays the model's own."""

    def __init__(self, method: str, w_dec: torch.Tensor, b_dec: torch.Tensor,
                 w_enc: torch.Tensor | None = None, b_enc: torch.Tensor | None = None, k: int | None = None,
                 threshold: float | None = None):
        super().__init__()
        self.method, self.k, self.threshold = method, k, threshold
        self.register_buffer("w_dec", w_dec.float())            # [features, units]
        self.register_buffer("b_dec", b_dec.float())            # [units]
        if method in SAES:
            self.register_buffer("w_enc", w_enc.float())        # [units, features]
            self.register_buffer("b_enc", b_enc.float())        # [features]
        else:
            self.register_buffer("gram", w_dec.float() @ w_dec.float().T)           # [features, features]
            self.register_buffer("pinv", torch.linalg.pinv(w_dec.float()))          # [units, features]

    @property
    def n_features(self) -> int:
        return self.w_dec.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, units] -> [n, features] (non-negative, sparse for the autoencoders)."""
        x = x.float()
        if self.method in SAES:
            pre = (x - self.b_dec) @ self.w_enc + self.b_enc     # [n, features]
            if self.method in THRESHOLDED:
                return pre * (pre > self.threshold)              # threshold > 0: non-negative
            val, idx = pre.topk(self.k, dim=1)
            return torch.zeros_like(pre).scatter_(1, idx, val.relu())
        # NMF: min ||x+ - z W||, z >= 0, by multiplicative updates from the clipped least-squares code
        xp = x.relu()
        num = xp @ self.w_dec.T                                  # [n, features]
        z = (xp @ self.pinv).clamp(min=1e-4)                     # [n, features]
        for _ in range(NMF_CODE_ITERS):
            z = z * num / (z @ self.gram).clamp(min=1e-9)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[n, features] -> [n, units]."""
        return z @ self.w_dec + (self.b_dec if self.method in SAES else 0.0)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        """The source layer's output -> features in the same layout: [b, units, h, w] ->
        [b, features, h, w]; [b, tokens, units] -> [b, tokens, features]; [b, units] -> [b, features]."""
        if out.dim() == 4:
            x = out.movedim(1, -1)                               # [b, h, w, units]
            return self.encode(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1).movedim(-1, 1)
        return self.encode(out.reshape(-1, out.shape[-1])).reshape(*out.shape[:-1], -1)


def _child_name(layer: str) -> str:
    return layer.rpartition(".")[2]


def attach(target: Target, store: Store | None = None, rows: list[dict] | None = None) -> list[str]:
    """Add the store's dictionaries of `target.id` (or the given rows) to the target as feature
    layers; returns their module paths. Attaching again replaces a feature layer's weights."""
    if rows is None:
        if store is None or "dictionaries" not in store.tables():
            return []
        rows = store.sql("SELECT * FROM dictionaries WHERE model = $m ORDER BY layer", {"m": target.id}).to_pylist()
    modules = dict(target.module.named_modules())
    hooks_ = target.extra.setdefault("feature_hooks", {})
    names = []
    for r in rows:
        name = r["layer"]
        names.append(name)
        if r["source_layer"] not in modules:
            continue
        if name in hooks_:  # attached before: replaced by the row's weights (a refit), never doubled
            hooks_.pop(name).remove()
        enc = _encoder_from_row(r).to(getattr(target, "device", None) or "cpu")
        source = modules[r["source_layer"]]
        source.add_module(_child_name(name), enc)  # replaces a child of the same name

        def run_features(_m, _inp, out, enc=enc):
            enc(out[0] if isinstance(out, (tuple, list)) else out)  # hooks on enc record it
        # Lives as long as the target (a feature layer is part of it), so not neurostore.hooks'
        # with-block; the handle is kept so a refit replaces it.
        hooks_[name] = source.register_forward_hook(run_features)
    target.extra.pop("_layers", None)  # list_layers must see the new modules
    return names


def _encoder_from_row(r: dict) -> FeatureEncoder:
    U, F = int(r["n_units"]), int(r["n_features"])

    def t(col, *shape):
        return torch.tensor(np.asarray(r[col], np.float32).reshape(shape)) if r[col] is not None else None
    return FeatureEncoder(r["method"], t("w_dec", F, U), t("b_dec", U), t("w_enc", U, F), t("b_enc", F), r["k"],
                          r.get("threshold"))


# ---- samples ----------------------------------------------------------------------------------------


@torch.no_grad()
def layer_samples(target: Target, layer: str, source, *, max_samples: int, seed: int, batch_size: int = 64,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stream the images through the recorder's hooks and keep a uniform subsample of the layer's
    samples (positions / patch tokens): (fit [n, units], held-out [m, units], images seen)."""
    li = next(li for li in list_layers(target) if li.layer == layer)
    per_image = li.grid_h * li.grid_w
    keep = min(1.0, max_samples / max(1, len(source) * per_image))
    g = torch.Generator().manual_seed(seed)
    fit_rows, held_rows, seen = [], [], [0]

    def take(_layer, m):                                         # m: [b, units, h, w]
        rows = m.float().flatten(2).transpose(1, 2).cpu()        # [b, h*w, units]
        held = (torch.arange(seen[0], seen[0] + rows.shape[0]) % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
        seen[0] += rows.shape[0]
        pick = torch.rand(rows.shape[:2], generator=g) < keep   # [b, h*w]
        fit_rows.append(rows[pick & ~held[:, None]])
        held_rows.append(rows[pick & held[:, None]])

    with hooks(target, [layer], take):
        for b in source.batches(target.preprocess, batch_size, progress=progress):
            target.module(b.pixels.to(target.device))
    U = li.n_units
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, U)  # noqa: E731
    return cat(fit_rows), cat(held_rows), seen[0]


def active_samples(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The `fraction` of samples x [n, units] farthest from the mean sample."""
    if fraction >= 1.0:
        return x
    dist = (x - x.mean(0)).norm(dim=1)                           # [n]
    return x[dist.topk(max(1, int(round(fraction * len(x))))).indices]


# ---- fitting --------------------------------------------------------------------------------------


def _kernel(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The straight-through estimator's rectangle kernel: d H(pre - theta) / d theta ~ -K / eps."""
    return ((pre - theta).abs() < BAND_EPS / 2).float() / BAND_EPS


class _Step(torch.autograd.Function):
    """H(pre - theta) [n, features]; a gradient to theta only (JumpReLU's pseudo-derivative)."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, -(g * _kernel(pre, theta)).sum(0)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta): to pre through the open gate, to theta by the pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return g * (pre > theta), -(g * theta * _kernel(pre, theta)).sum(0)


def fit_topk_sae(x: torch.Tensor, n_features: int, k: int, *, steps: int, seed: int, batch: int = 1024,
                 lr: float = 1e-3, batch_topk: bool = False, band: tuple[float, float] | None = None,
                 band_x: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 progress: bool = False) -> FeatureEncoder:
    """A TopK sparse autoencoder on samples x [n, units] (BatchTopK with `batch_topk`: the top
    k x batch of a batch's pre-activations, and a threshold for encoding; with `band` (lo, hi),
    jumprelu-sae: BatchTopK for the first half, then a threshold per feature, its frequency on
    batches of `band_x` [m, units] (every position; default x) pulled into [lo, hi]). The data
    are centred and scaled to unit mean squared norm per dimension for the optimiser; the scale is
    folded back into the weights, so the encoder takes the layer's raw output."""
    batch_topk = batch_topk or band is not None
    g = torch.Generator().manual_seed(seed)
    mu = x.mean(0)                                               # [units]
    s = float((x - mu).pow(2).mean().sqrt()) or 1.0
    xn = ((x - mu) / s).to(device)                               # [n, units]
    n, U = xn.shape
    xb_all = ((band_x if band_x is not None else x) - mu).div(s).to(device)   # [m, units] for the band
    w_dec = torch.randn(n_features, U, generator=g)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).to(device).requires_grad_(True)  # [features, units]
    w_enc = w_dec.detach().T.clone().requires_grad_(True)        # [units, features]
    b_enc = torch.zeros(n_features, device=device, requires_grad=True)
    b_dec = torch.zeros(U, device=device, requires_grad=True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    last_fired = torch.zeros(n_features, dtype=torch.long, device=device)
    k_aux = min(n_features, max(1, U // 2))
    gd = torch.Generator(device=device).manual_seed(seed) if torch.device(device).type != "cpu" else g
    kept_min = []  # batchtopk: the smallest kept pre-activation of each batch (last half of its training)
    topk_steps = steps // 2 if band is not None else steps       # BatchTopK's steps; JumpReLU's after
    theta = None                                                 # [features] JumpReLU's thresholds
    # long on a CPU at real scale: 16,384 features of a ResNet-50 layer4 are ~400 GFLOP a step (dense
    # encode and decode of 1,024 samples, forward and backward)
    for step in progress_bar(steps, f"fit {n_features} features", "step", progress, items=range(1, steps + 1)):
        xb = xn[torch.randint(0, n, (min(batch, n),), generator=gd, device=device)]  # [b, units]
        pre = (xb - b_dec) @ w_enc + b_enc                       # [b, features]
        penalty = 0.0
        if step > topk_steps:  # JumpReLU, from BatchTopK's threshold
            if theta is None:
                theta = torch.full((n_features,), float(np.mean(kept_min)) if kept_min else 0.0, device=device,
                                   requires_grad=True)
                opt.add_param_group({"params": [theta]})
            z = _JumpReLU.apply(pre, theta)
            xa = xb_all[torch.randint(0, len(xb_all), (4 * len(xb),), generator=gd, device=device)]  # [4b, units]
            f = _Step.apply((xa - b_dec) @ w_enc + b_enc, theta).mean(0)   # [features] frequency on every position
            penalty = BAND_PENALTY * ((f - band[1]).relu() + (band[0] - f).relu()).sum()
        elif batch_topk:
            val, idx = pre.relu().flatten().topk(k * len(xb))   # [b * k] over the whole batch
            z = torch.zeros_like(pre).flatten().scatter(0, idx, val).view_as(pre)
            if step > topk_steps // 2 and bool((val > 0).any()):
                kept_min.append(float(val[val > 0].min().detach()))
        else:
            val, idx = pre.topk(k, dim=1)
            z = torch.zeros_like(pre).scatter(1, idx, val.relu())    # [b, features]
        recon = z @ w_dec + b_dec                                # [b, units]
        loss = (recon - xb).pow(2).sum(1).mean() + penalty
        fired = (z > 0).any(0)
        last_fired = torch.where(fired, torch.full_like(last_fired, step), last_fired)
        dead = (step - last_fired) > 200
        if dead.any():
            # AuxK: the dead latents' top-k_aux reconstruct what the live ones missed, so they learn again
            aux_pre = pre.masked_fill(~dead, -float("inf"))
            a_val, a_idx = aux_pre.topk(min(k_aux, int(dead.sum())), dim=1)
            za = torch.zeros_like(pre).scatter(1, a_idx, a_val.relu())
            resid = (xb - recon).detach()
            loss = loss + (za @ w_dec - resid).pow(2).sum(1).mean() / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
            if theta is not None:
                theta.clamp_(min=1e-3)                           # > 0: features stay non-negative
    with torch.no_grad():  # fold the normalisation: z(x) and x_hat(x) in the raw units
        mu_d = mu.to(device)
        # the threshold compares pre-activations, which the folding leaves as they were
        threshold = (float(np.mean(kept_min)) if kept_min else 0.0) if batch_topk else None
        w_enc, b_enc, w_dec = w_enc.detach(), b_enc.detach(), w_dec.detach()
        if theta is not None:  # feature i scaled by c_i = mean(theta) / theta_i: one threshold, same x_hat
            threshold = float(theta.mean())
            c = threshold / theta                                # [features]
            w_enc, b_enc, w_dec = w_enc * c, b_enc * c, w_dec / c[:, None]
        method = "jumprelu-sae" if band is not None else "batchtopk-sae" if batch_topk else "topk-sae"
        return FeatureEncoder(method, w_dec * s, mu_d + s * b_dec.detach(), w_enc / s, b_enc, k, threshold).cpu()


def fit_nmf(x: torch.Tensor, n_features: int, *, steps: int, seed: int) -> FeatureEncoder:
    """scikit-learn's NMF of max(x, 0) [n, units]; the encoder finds each sample's code."""
    from sklearn.decomposition import NMF  # here: scikit-learn takes seconds to import, only NMF needs it

    xp = x.relu().double().numpy()
    init = "nndsvda" if n_features <= min(xp.shape) else "random"
    nmf = NMF(n_components=n_features, init=init, max_iter=steps, random_state=seed, tol=1e-4)
    nmf.fit(xp)
    w = torch.from_numpy(nmf.components_).float()               # [features, units]
    return FeatureEncoder("nmf", w, torch.zeros(x.shape[1]))


@torch.no_grad()
def quality(enc: FeatureEncoder, fit_x: torch.Tensor, held_x: torch.Tensor, chunk: int = 8192) -> dict:
    """FVE and L0 on the held-out samples; features never active on any sample are dead."""
    ever = torch.zeros(enc.n_features, dtype=torch.bool)
    err = l0 = 0.0
    target_x = held_x.relu() if enc.method == "nmf" else held_x  # what the dictionary reconstructs
    mean = target_x.mean(0)
    total = float((target_x - mean).pow(2).sum())
    for part, is_held in ((held_x, True), (fit_x, False)):
        for i in range(0, len(part), chunk):
            xb = part[i : i + chunk]
            z = enc.encode(xb)                                   # [n, features]
            ever |= (z > 0).any(0)
            if is_held:
                tx = xb.relu() if enc.method == "nmf" else xb
                err += float((enc.decode(z) - tx).pow(2).sum())
                l0 += float((z > 0).sum())
    dead = int((~ever).sum())
    return {"fve": 1.0 - err / total if total > 0 else float("nan"), "l0": l0 / max(1, len(held_x)),
            "dead_features": dead, "dead_fraction": dead / enc.n_features}


def _check_args(method: str, width: int, k: int | None, steps: int | None = None) -> None:
    if steps is not None and steps < 1:   # 0 would read as the default, a negative as no training at all
        raise BadParameter(f"--steps must be at least 1; got {steps}. Leave it out for the default.")
    if method not in METHODS:
        raise BadParameter(unknown("feature method", method, METHODS, "Example: --method topk-sae."))
    if not isinstance(width, int) or width < 1:
        raise BadParameter(f"--width must be a whole number of features per unit, at least 1; got {width}. "
                           "Example: --width 8 (8 features per unit of the layer).")
    if method in SAES and (k is None or k < 1):
        raise BadParameter(f"--k (active features per sample) must be at least 1 for {method}; got {k}.")


def fit(store: Store | str, model: str, layer: str, method: str = "topk-sae", width: int = 8,
        k: int | None = 32, *, images=None, max_images: int | None = None, max_samples: int = 100_000,
        steps: int | None = None, seed: int = 0, active: float | None = None,
        band: tuple[float, float] = BAND, batch_size: int = 64,
        device: str = "auto", target: Target | None = None, progress: bool = True, log=print) -> dict:
    """Learn a dictionary on `layer` of `model` over the probe images (a probe-world model's own,
    or the folder `images`), store it with its provenance and quality, and return the summary.
    steps: optimiser steps (the autoencoders, default 3000) or NMF iterations (default 200).
    band: jumprelu-sae's range for each feature's fraction of active positions."""

    t0 = time.time()
    _check_args(method, width, k, steps)
    if max_samples < 1:
        raise BadParameter(f"--max-samples must be at least 1, got {max_samples}.")
    active = ACTIVE_FRACTION if active is None else active
    if not 0 < active <= 1:
        raise BadParameter(f"--active must be a fraction of the samples in (0, 1]; got {active}. Example: "
                           f"--active {ACTIVE_FRACTION} (fit on the {ACTIVE_FRACTION:.0%} farthest from the mean).")
    band = tuple(band) if method == "jumprelu-sae" else None
    if band is not None and not (len(band) == 2 and 0 <= band[0] < band[1] <= 1):
        raise BadParameter(f"band must be two fractions of positions, low < high, within [0, 1]; got {band}. "
                           f"Example: band={BAND}.")
    if not isinstance(store, Store):
        store = Store.open(store)
    dev = resolve_device(device)
    try:
        target = target or load_target(model)
    except UnknownModel:   # a stored model id where the spec is wanted: name the spec it was dissected as
        spec = next(iter(store.sql("SELECT any_value(spec) AS spec FROM models WHERE model = $m",
                                   {"m": model}).column("spec").to_pylist()), None)
        if spec is None:
            raise
        raise UnknownModel(f"'{model}' is a stored model's id; fitting features runs the model, so give its "
                           f"spec: '{spec}'.") from None
    target.to(dev)
    attach(target, store)  # so a feature layer given as `layer` is recognised (and refused)
    layer = resolve_layer(target, layer)
    if isinstance(dict(target.module.named_modules())[layer], FeatureEncoder):
        raise BadParameter(f"'{layer}' is a feature layer already; fit a dictionary on a layer of the model itself "
                           f"(see 'neurostore layers {target.spec}').")
    info = next((li for li in list_layers(target) if li.layer == layer), None)
    if info is None:
        raise BadParameter(f"Layer '{layer}' of {target.id} gives no tensor output to fit on. "
                           f"See 'neurostore layers {target.spec}'.")
    world = target.extra.get("world")
    source = probe_source(images, None if images is not None else world, max_images)
    n_features = width * info.n_units
    if method in SAES and k > n_features:
        raise BadParameter(f"--k {k} active features per sample is more than the dictionary's {n_features} "
                           f"({width} per unit x {info.n_units} units); give --k {n_features} or less, or a larger --width.")
    k = k if method in SAES else None
    need = max(MIN_SAMPLES, SAMPLES_PER_FEATURE * n_features)   # samples fitted on
    need_all = math.ceil(need / active)                          # samples streamed, `active` of them fitted
    of_them = f" ({active} of them fitted, --active)" if active < 1 else ""
    have = len(source) * info.grid_h * info.grid_w
    if have < need_all:
        raise BadInput(
            f"Layer '{layer}' of {target.id} gives too few samples for {n_features} features: "
            f"{len(source)} images x {info.grid_h * info.grid_w} positions = {have}; it needs at least "
            f"{need_all}{of_them}. Use more images, a smaller --width, or a layer with a spatial map or tokens.")
    if max_samples < need_all:
        raise BadParameter(f"--max-samples {max_samples} is below the {need_all} samples {n_features} features "
                           f"need{of_them}; raise it or use a smaller --width.")
    steps = steps or (200 if method == "nmf" else 3000)
    name = feature_layer_name(layer, method, width)
    log(f"features {name}: {method}, {n_features} features of {info.n_units} units, "
        f"{len(source)} images, device {describe(dev)}")
    fit_x, held_x, n_images = layer_samples(target, layer, source, max_samples=max_samples, seed=seed,
                                            batch_size=batch_size, progress=progress)
    if len(fit_x) < need or len(held_x) == 0:
        raise BadInput(f"Layer '{layer}' of {target.id} gave {len(fit_x)} usable samples ({len(source.rejects)} "
                       f"images rejected); {n_features} features need at least {need}. Use more images.")
    t_fit = time.time()
    train_x = active_samples(fit_x, active)
    if len(train_x) < need:
        raise BadInput(f"--active {active} keeps {len(train_x)} of the {len(fit_x)} samples of layer '{layer}'; "
                       f"{n_features} features need at least {need}. Raise --active or use a smaller --width.")
    if method in SAES:
        enc = fit_topk_sae(train_x, n_features, k, steps=steps, seed=seed, batch_topk=method == "batchtopk-sae",
                           band=band, band_x=fit_x, device=dev, progress=progress)
    else:
        enc = fit_nmf(train_x, n_features, steps=steps, seed=seed)
    q = quality(enc, fit_x, held_x)
    fit_s = time.time() - t_fit
    row = {"layer": name, "source_layer": layer, "method": method, "width": width, "k": k,
           "threshold": enc.threshold,
           "n_units": info.n_units, "n_features": n_features, "input": "relu" if method == "nmf" else "raw",
           "dataset": source.dataset, "n_images": n_images, "n_samples": len(train_x), "n_holdout": len(held_x),
           "seed": seed, "steps": steps, **q,
           "w_enc": _flat(getattr(enc, "w_enc", None)), "b_enc": _flat(getattr(enc, "b_enc", None)),
           "w_dec": _flat(enc.w_dec), "b_dec": _flat(enc.b_dec), "model": target.id}
    params = {"model": target.spec, "layer": layer, "method": method, "width": width, "k": k, "seed": seed,
              "steps": steps, "active": active, "band": band, "max_samples": max_samples, "dataset": source.dataset,
              "max_images": max_images}
    with store.run("features fit", params, work_key=f"dictionary:{target.id}:{name}", started_at=t0) as run:
        run.write("models", pa.Table.from_pylist([target.model_row()]), key=f"model:{target.id}")
        run.write("dictionaries", pa.Table.from_pylist([row]), key=f"dictionary:{name}")
    attach(target, rows=[row])
    return {"run_id": run.run_id, "model": target.id, "spec": target.spec, "layer": name, "source_layer": layer,
            "method": method, "width": width, "k": k, "threshold": enc.threshold, "n_units": info.n_units,
            "n_features": n_features, "dataset": source.dataset, "images": n_images, "samples": len(train_x),
            "holdout": len(held_x),
            "seed": seed, "steps": steps, "active": active, "band": band,
            **{m: round(v, 4) if isinstance(v, float) else v for m, v in q.items()},
            "device": describe(dev), "fit_seconds": round(fit_s, 1), "seconds": round(time.time() - t0, 1),
            "next": f"neurostore dissect {target.spec} --layer {name}"}


def _flat(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.detach().cpu().float().reshape(-1).tolist()


def ls(store: Store | str, model: str | None = None) -> pa.Table:
    """The store's dictionaries (without weights): provenance and quality, one row per feature layer."""
    if not isinstance(store, Store):
        store = Store.open(store, create=False)
    if "dictionaries" not in store.tables():
        return pa.table({"model": pa.array([], pa.string()), "layer": pa.array([], pa.string())})
    return store.sql("""
        SELECT model, layer, source_layer, method, width, k, n_units, n_features, dataset, n_samples,
               round(fve, 4) AS fve, round(l0, 2) AS l0, dead_features, seed, steps, run_id
        FROM dictionaries WHERE $m IS NULL OR model = $m ORDER BY model, layer""", {"m": model})
