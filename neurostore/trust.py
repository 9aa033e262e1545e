"""Trust in an explanation: a calibrated confidence built on a real null, fidelity on held-out
images, and one headline explanation per unit.

Confidence is the probability that the explanation is right: that it agrees with the truth where
the truth is known. The null (below) answers another question, "better than a random direction
of the layer?", and a unit can beat it with a label the truth disagrees with (measured on the
probe world: explanations at 1 - q >= 0.9 agreed with the mask-IoU reference 52% of the time,
those below 0.8 1-5%). So the null's q-value is kept as evidence (explanation_scores metric
'null_q'; its Gumbel parameters in the run's params) and the confidence is a map fitted where
the truth is known:

    confidence = sigmoid(a_s + b_s * evidence + c_s * margin + d_s * auprc + e_s * cosine_pearson)

    evidence   -log10 q, capped at EVIDENCE_MAX (the null's BH q-value, below)
    margin     (score - the unit's best other concept's score) / the null's Gumbel scale,
               clipped to +-MARGIN_CLIP: a label that barely beats the next one is often wrong
    auprc,     the explanation's held-out encoder fidelity (below; none: 0); the Pearson is
    cosine_    with the raw cosine, not the zero-shot presence the stored fidelity uses (as a
    pearson    feature that one worsened calibration, below). A label can be
               right with little null evidence (seed 2's ViT: 40 labels at 1 - q < 0.5 agreed
               58% of the time) and the fidelity sees it; a random network's colour filter
               has fidelity too, and there the null's evidence is what is missing.

all coefficients >= 0 (the fit drops a feature that would come out negative), so confidence
never falls as any evidence rises. The dissect can only make it once the layer's fidelity
exists: `layer_trust` computes fidelity, then the confidence (`calibrated`), and the dissect
stores the confidence it returns (scored_with_null's is the same map without fidelity, the
stand-in where no fidelity can be computed). Within a unit, confidence therefore need not
follow the score: it is P(right), and a concept below the label may be likelier.

encoder_iou (the opt-in Network Dissection IoU against the encoder's own pseudo-masks) has a map
of its own too, fitted with `--fit --fit-headline --encoder-iou` on the same world while the others
were kept: it reads the concept's peak besides (the cells of a concept the encoder cannot see in a
window take a concept near it, often one the images never show), and headline candidates among
which it runs have their own headline map (`Calibration.encoder_iou_headline_map`), which also
reads whether a candidate's concept is encoder_iou's first for the unit (`encoder_iou_first`).

The map is a logistic regression fitted by `bench/confidence_calibration.py --fit` on the fast
probe world (seed 0, watermark cue) on the labels (rank 0) of its CNN and ViT, label = "agrees
with the mask-IoU reference" (the unit is interpretable, IoU >= 0.04, and the concept is the
reference's), and of its CNN re-initialised, every label "not right" but weighted (the bench
says why: at full weight a random filter's labels, which look like trained ones in fidelity,
pull the trained labels' confidence below their agreement). Two maps, not one per scorer:
s = '*' for every ground-truth-free scorer, because a scorer's own accuracy does not carry over
between worlds (wpmi agrees on 0% of the seed-0 ViT's interpretable units, 63% of the seed-1
ViT's), and s = 'iou' on evidence only (its label is right when the unit is interpretable at
all, which is what its null asks; its margin, in scales of a narrow null, is 3-7 for any colour
filter of a random CNN). The coefficients ship in neurostore/data/CALIBRATION_FILE with what
they were fitted on. The headline's confidence (below) is a second map, over candidates. The
bench measures both on worlds they were not fitted on (seeds 1 and 2, dot and frame cues) and
on random networks (README, "Confidence and fidelity").

The null. A scorer's raw score means nothing until it is compared with what a unit that
explains nothing would score. The null here is made of pseudo-units of the same layer, scored
by the SAME scorer code as the real units:

    pooled-activation scorers   a pseudo-unit is a random direction of the layer: its
    (soft_wpmi, wpmi,           activations are the layer's standardised activations projected
     cos_cubed, top_images)     on a random unit vector (top_images: the per-image max ones);
    patch                       a random direction's top-k images, each represented by the
                                patch of the unit contributing most to the direction there;
    iou                         a random direction of the layer's standardised activation maps,
                                thresholded at its own top 0.5%.

Why random directions and not permuted activations or random image sets: a unit of a network
with random weights is not a unit that sees nothing. Random conv filters are colour and edge
detectors, so such units beat a permutation null by far (measured: 98% of the re-initialised
probe CNN's units got confidence >= 0.9 with a permutation null). What a random network lacks
is a privileged basis: its units are no better aligned with concepts than any direction of its
layer. Network Dissection's rotation control (Bau et al. 2017) asks exactly this, and it is what
"this unit explains c" should mean: better than an arbitrary direction of the same layer.

Each pseudo-unit keeps its best score over the whole vocabulary, so the size of the search is
accounted for: with 20,000 concepts the null's best is higher than with 61. The null's best
scores are summarised by a Gumbel fit (the law of a maximum; location and scale by moments),
whose parameters are stored with the run. A score s gets the p-value P(null best >= s), and
within a layer the units' p-values are corrected for multiple testing by Benjamini–Hochberg:

    q = the BH q-value of p among the layer's units' best p-values

so on a layer whose units are no better than random directions, only a small fraction of units
reach q <= 0.1 (BH holds the false discoveries to 10%), and q means the same for every scorer
and vocabulary size.

soft_wpmi and wpmi subtract lam log p(c), where p(c) is the mean of p(c | unit) over the units
given: each pseudo-unit is scored as one more unit of the layer (p(c) over the real units and
it), with log p(c | unit) from the same code run at lam = 0, so the null is on the real scale.

Fidelity. How well the explained concept's presence in an image predicts the unit's activation,
on held-out probe images (HELDOUT_FRACTION of them, chosen by a hash of the image id): Pearson
correlation of the unit's per-image max activation (how top images are chosen; the spatial mean
followed whole-image properties such as the background and chose worse headlines) with the
concept's presence, and AUPRC of that activation as a detector of the concept (NeuronEval, ICML 2025, finds these two pass its sanity
checks). Presence comes from the encoder, so it works on real models: for Pearson, CLIP's
zero-shot p(concept | image), the softmax over the whole vocabulary of a x cosine at soft_wpmi's
a (`zero_shot`): the image's concepts compete, so an image near every concept at once does not
hold each of them, and the encoder's fidelity ranks explanations like the masks' (Spearman
0.749 -> 0.835 on the fit world, 0.781 -> 0.859 and 0.822 -> 0.886 on two others; README); "present"
for AUPRC: the 10% of images most similar to the concept. On the probe world also from the masks
(area fraction; present: any pixel). The confidence maps read AUPRC and `cosine_pearson`, the
Pearson with the raw cosine, also stored: fed the zero-shot Pearson instead, the maps calibrated
worse on the held-out worlds (worst decile gap 0.139 -> 0.225 and 0.012 -> 0.218), because it
ranks a unit's activation like the masks do, and the masks' own fidelity is not what "right"
means (the mask-IoU reference: choosing each unit's headline by mask Pearson agrees with it on
0.846 / 0.710 of the fit world's units), and within a unit it favours concepts the probe world
never draws. The explanations themselves are computed on
every probe image by today's pipeline (held-out images included): the split is held out from
the fidelity's choice of headline, not from the scorers.

Headline. For each unit, the candidates are the top HEADLINE_RANKS concepts of every scorer
that needs no ground truth (iou is the truth on the probe world). Each gets a headline
confidence from a second fitted logistic map (same file, same fit, coefficients >= 0) of its
scorer's calibrated confidence (as a logit), its held-out encoder AUPRC and Pearson, the
concept's peak on held-out images (`concept_peak`: a concept the probe images never show is
spread evenly over them, and candidates the world never draws were most of the headline's
misses) and how many scorers put the concept in their top HEADLINE_RANKS; the headline is the
candidate with the highest, reported with it (ties: AUPRC, then Pearson). The headline map is
fitted regularised (the bench's HEADLINE_C and HEADLINE_C_ENCODER_IOU, which say why). No ground
truth is used at dissect time, so the same choice runs on real models.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from . import devices
from . import scorers as S
from .encoding import cached_vectors
from .errors import BadInput, BadParameter
from .images import ProbeMasks

NULL_UNITS = 256          # pseudo-units per layer and scorer
STREAMED_NULLS = ("iou", "encoder_iou")   # NullIoU, fed beside the real IoU while the images stream
HELDOUT_FRACTION = 0.2    # probe images held out for fidelity
# Fewer held-out images than this give no fidelity evidence (NaN, read as none): on a handful
# Pearson and AUPRC come out high by chance, and the maps were fitted on 60 held-out images per
# world. The fast world's CNN re-initialised, dissected on its first N probe images: units with a
# label at >= 0.9 were 12-19 of 176 at 10-19 held-out images, 9 at 30, 2 at 44 and 1 at 56 (a
# random resnet18 on 18 photos, 2 held out: 442 of 512 by wpmi); with this floor 0 below it.
MIN_HELDOUT = 40
ENCODER_PRESENT = 0.10    # encoder presence for AUPRC: the concept's top 10% of images
ZERO_SHOT_SCALE = S.SCORERS["soft_wpmi"].defaults["a"]   # p(c | image) = softmax(a x cosine), soft_wpmi's a
EULER_GAMMA = 0.5772156649015329
CALIBRATION_FILE = "confidence_calibration.json"   # neurostore/data/: the fitted maps (module doc)
EVIDENCE_MAX = 6.0        # -log10 q is capped: a q below 1e-6 says nothing more
MARGIN_CLIP = 10.0        # margins beyond 10 null scales say nothing more


# ---- the null -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Null:
    """A layer's null for one scorer: the law of a pseudo-unit's best score over the vocabulary.
    Gumbel(loc, scale) fitted by moments to `n` pseudo-units; q50/q99/max are the empirical
    figures, kept to check the fit."""

    scorer: str
    n: int
    loc: float
    scale: float
    q50: float
    q99: float
    max: float
    concepts: int
    seed: int

    def pvalues(self, scores: torch.Tensor) -> torch.Tensor:
        """P(null best >= s) for raw scores of any shape (NaN -> 1: no evidence)."""
        s = scores.double()
        if self.scale <= 0:  # a degenerate null (all pseudo-units tie): above it or not
            p = torch.where(s > self.loc, 0.0, 1.0).double()
        else:
            z = (s - self.loc) / self.scale
            # Gumbel survival 1 - exp(-exp(-z)), accurate far in the tail (-expm1)
            p = -torch.expm1(-torch.exp(-z.clamp(min=-50.0)))
        return torch.where(torch.isnan(s), 1.0, p)

    def margin(self, scores: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """How far a score lies above the unit's best other concept (`other`, same shape), in
        units of the null's scale, clipped to +-MARGIN_CLIP (NaN: the clip's low end)."""
        d = scores.double() - other.double()
        d = d / self.scale if self.scale > 0 else torch.sign(d) * MARGIN_CLIP
        return torch.nan_to_num(d, nan=-MARGIN_CLIP).clamp(-MARGIN_CLIP, MARGIN_CLIP)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_null(scorer: str, best: torch.Tensor, concepts: int, seed: int) -> Null:
    """Gumbel by moments: scale = sd * sqrt(6) / pi, loc = mean - gamma * scale."""
    b = best.double()
    b = b[torch.isfinite(b)]
    if b.numel() < 2:
        raise BadInput(f"the {scorer} null has {b.numel()} usable pseudo-units; need at least 2.")
    sd = float(b.std(unbiased=True))
    scale = sd * math.sqrt(6.0) / math.pi
    loc = float(b.mean()) - EULER_GAMMA * scale
    q = torch.quantile(b, torch.tensor([0.5, 0.99], dtype=torch.float64))
    return Null(scorer, int(b.numel()), loc, scale, float(q[0]), float(q[1]), float(b.max()),
                int(concepts), int(seed))


def directions(u: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[u, m] random unit-length directions in the layer's (standardised) unit space."""
    r = torch.randn(u, m, generator=gen)
    return r / r.norm(dim=0, keepdim=True).clamp(min=1e-12)


def standardise(x: torch.Tensor, dim) -> torch.Tensor:
    """Each unit centred and scaled to unit variance over `dim`, so every unit weighs the same in
    a random direction whatever its activation scale."""
    x = x.float()
    return (x - x.mean(dim=dim, keepdim=True)) / x.std(dim=dim, keepdim=True).clamp(min=1e-6)


def pseudo_pooled(pooled: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """[n, u] activations -> [n, m] pseudo-units: random directions of the layer (Network
    Dissection's rotated-basis control): what a unit of this layer would be if the layer's basis
    meant nothing."""
    return standardise(pooled, 0) @ directions(pooled.shape[1], m, gen)


def pseudo_patches(inputs: dict[str, Any], m: int, gen: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The patch scorer's pseudo-units: a random direction's top-k images (from the pooled
    activations) among the images the layer's patch pool has a patch of (patches are cut for
    real units' top images only). On each image the direction is represented by the patch of
    the unit that contributes most to it there (weight x standardised activation): where the
    direction fires, as near as the stored crops allow. Weighted like a random real unit.
    Returns ([m, k] patch indices, -1 = none; [m, k] weights)."""
    unit_patches, unit_images = inputs["unit_patches"], inputs["unit_images"]   # [u, k] each
    u, k = unit_patches.shape
    by_image: dict[int, list[tuple[int, int]]] = {}                # image -> [(unit, patch)]
    for unit in range(u):
        for img, pat in zip(unit_images[unit].tolist(), unit_patches[unit].tolist()):
            if img >= 0 and pat >= 0:
                by_image.setdefault(img, []).append((unit, pat))
    if not by_image:
        raise BadInput("the patch null needs patches; no unit of the layer has any.")
    have = torch.tensor(sorted(by_image))                          # images with a patch
    kk = min(k, have.numel())
    z = standardise(inputs["pooled"], 0)                            # [n, u]
    dirs = directions(u, m, gen)                                    # [u, m]
    top = have[torch.topk((z @ dirs)[have], kk, dim=0).indices.T]   # [m, kk] images
    idx = torch.full((m, k), -1, dtype=torch.long)
    for j in range(m):
        for r, img in enumerate(top[j].tolist()):
            units, pats = zip(*by_image[img])
            contrib = dirs[list(units), j] * z[img, list(units)]      # each unit's share here
            idx[j, r] = pats[int(contrib.argmax())]
    w = None
    if inputs.get("unit_weights") is not None:
        w = inputs["unit_weights"].float()[torch.randint(0, u, (m,), generator=gen)].clone()  # [m, k]
        w[idx < 0] = 0
    return idx, w


def null_best(scorer: str, inputs: dict[str, Any], params: dict[str, Any], m: int = NULL_UNITS,
              seed: int = 0, log_p: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[m] best score over the vocabulary of m pseudo-units of the layer whose real units are
    scored from `inputs` (the scorer's own inputs, see scorers.run_scorer) with `params`.
    soft_wpmi / wpmi: `log_p`, the real units' log p(c | unit) when the caller has it."""
    gen = torch.Generator().manual_seed(seed)
    if scorer == "patch":
        idx, w = pseudo_patches(inputs, m, gen)
        null = S.run_scorer("patch", {**inputs, "unit_patches": idx, "unit_weights": w}, params,
                            with_confidence=False).scores
    elif scorer in ("soft_wpmi", "wpmi"):
        # score = log p(c | unit) - lam log p(c), p(c) the mean over the layer's units: each
        # pseudo-unit is scored as one more unit of the layer (p(c) over the u real units and it).
        # lam = 0 gives log p(c | unit) from the same code.
        pooled = inputs["pooled"].float()                           # [n, u]
        if log_p is None:
            log_p = S.log_p_given_unit(scorer, inputs, params)      # [u, c] float64
        log_q = S.log_p_given_unit(scorer, {**inputs, "pooled": pseudo_pooled(pooled, m, gen)}, params)  # [m, c]
        u = log_p.shape[0]
        log_pc = torch.logaddexp(torch.logsumexp(log_p, 0, keepdim=True), log_q) - math.log(u + 1)
        null = (log_q - params["lam"] * log_pc).float()
    elif scorer in ("cos_cubed", "top_images"):  # each unit's score depends on its own column only
        key = "pooled" if scorer == "cos_cubed" else "peak"       # the activations it reads
        pseudo = pseudo_pooled(inputs[key], m, gen)
        null = S.run_scorer(scorer, {**inputs, key: pseudo}, params, with_confidence=False).scores
    else:
        raise BadParameter(f"no null for scorer '{scorer}' here; the nulls of {', '.join(STREAMED_NULLS)} are "
                           "NullIoU, fed while the images stream.")
    return torch.nan_to_num(null, nan=float("-inf")).max(dim=1).values


class NullIoU:
    """iou's null, streamed beside the real IoUAccumulator: m pseudo-units whose maps are random
    directions of the layer's standardised maps, thresholded at their own top `top_fraction`.
    The per-unit scale and the pseudo-units' thresholds come from the first batch (the real
    thresholds need a whole pass; an estimate from one batch is enough for a null)."""

    def __init__(self, n_units: int, n_concepts: int, top_fraction: float = 0.005,
                 m: Optional[int] = None, seed: int = 0):
        # as many pseudo-units as the layer has units (up to NULL_UNITS): the null costs about
        # as much as the real IoU
        self.m = m or min(NULL_UNITS, n_units)
        self.dirs = directions(n_units, self.m, torch.Generator().manual_seed(seed))   # [u, m]
        self.n_concepts, self.top_fraction = n_concepts, top_fraction
        self.acc = None

    @torch.no_grad()
    def update(self, act_maps: torch.Tensor, masks: torch.Tensor) -> None:
        """act_maps [b, units, h, w]; masks [b, concepts, H, W] bool (as IoUAccumulator)."""
        a = act_maps.float()
        if self.acc is None:
            self.mean = a.mean(dim=(0, 2, 3), keepdim=True)         # [1, u, 1, 1]
            self.std = a.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
        z = torch.einsum("buhw,um->bmhw", (a - self.mean) / self.std, self.dirs)   # [b, m, h, w]
        if self.acc is None:
            flat = z.transpose(0, 1).reshape(self.m, -1)
            k = max(1, int(math.ceil(self.top_fraction * flat.shape[1])))
            self.acc = S.IoUAccumulator(torch.topk(flat, k, dim=1).values[:, -1], self.n_concepts)
        self.acc.update(z, masks)

    def best(self, absent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[m] best IoU over concepts (concepts with no mask in the probe set left out)."""
        s = self.acc.result()
        if absent is not None:
            s[:, absent] = float("-inf")
        return s.max(dim=1).values


def bh_confidence(scores: torch.Tensor, null: Null, level_units: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[u, c] raw scores -> [u, c] confidence = 1 - BH q-value. The BH family is the layer's
    units (their best p-values, or `level_units` [u] when given): q(p) = min over p' >= p of
    p' * u / #{units with best p <= p'}, so a concept's confidence grows with its score."""
    p = null.pvalues(scores)                                        # [u, c]
    best = p.min(dim=1).values if level_units is None else level_units.double()
    ref, _ = torch.sort(best)                                       # [u] ascending
    u = ref.numel()
    q_ref = ref * u / torch.arange(1, u + 1, dtype=torch.float64, device=ref.device)
    q_ref = torch.flip(torch.cummin(torch.flip(q_ref, [0]), 0).values, [0])   # step-up minimum
    flat = p.reshape(-1).contiguous()
    below = torch.searchsorted(ref, flat, right=True)               # #{units with best p <= p}
    q = flat * u / below.clamp(min=1)
    later = torch.cat([q_ref, torch.ones(1, dtype=torch.float64, device=ref.device)])[below]   # next unit's q
    q = torch.minimum(q, later).clamp(max=1.0)
    return (1.0 - q).reshape(p.shape).clamp(0.0, 1.0).float()


# ---- calibration: from evidence to the probability that the label is right ----------------------


def explanation_features(q: torch.Tensor, margin: torch.Tensor, auprc: Optional[torch.Tensor] = None,
                         cosine_pearson: Optional[torch.Tensor] = None,
                         concept_peak: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """What a dissect knows of one explanation without ground truth: the null's evidence
    (-log10 of the BH q, capped at EVIDENCE_MAX), the margin over the unit's next concept, and
    its held-out encoder evidence (AUPRC, Pearson with the raw cosine, the concept's peak;
    None or NaN: none, 0). A map reads the features it has coefficients for."""
    zero = torch.zeros_like(q, dtype=torch.float64)
    fid = lambda v: zero if v is None else torch.nan_to_num(torch.as_tensor(v).double(), nan=0.0)   # noqa: E731
    return {"evidence": -torch.log10(q.double().clamp(10.0 ** -EVIDENCE_MAX, 1.0)), "margin": margin.double(),
            "auprc": fid(auprc), "cosine_pearson": fid(cosine_pearson), "concept_peak": fid(concept_peak)}


def headline_features(c: "pd.DataFrame") -> dict[str, np.ndarray]:  # noqa: F821
    """A headline candidate's evidence (rows: unit, scorer, concept, confidence, auprc,
    cosine_pearson, concept_peak): its scorer's calibrated confidence (as a logit), held-out
    encoder AUPRC and Pearson with the raw cosine, the concept's peak (`concept_peak`: does the
    encoder find it clearly in some held-out image at all?), and how many ground-truth-free
    scorers put the concept in their top HEADLINE_RANKS. NaN or a missing column: no evidence, 0."""
    p = np.clip(c["confidence"].to_numpy(np.float64), 1e-4, 1 - 1e-4)
    col = lambda k: np.nan_to_num(c[k].to_numpy(np.float64)) if k in c else np.zeros(len(c))   # noqa: E731
    return {"confidence_logit": np.log(p / (1 - p)), "auprc": col("auprc"), "cosine_pearson": col("cosine_pearson"),
            "concept_peak": col("concept_peak"),
            "scorers_agreeing": c.groupby(["unit", "concept"])["scorer"].transform("nunique").to_numpy(np.float64),
            "encoder_iou_first": encoder_iou_first(c)}


def encoder_iou_first(c: "pd.DataFrame") -> np.ndarray:  # noqa: F821
    """1.0 where the candidate's concept is encoder_iou's first for its unit, else 0 (also where
    encoder_iou did not run). The one spatial scorer's choice, whichever scorer's row this is:
    the other scorers rank a unit's concepts by where the unit fires across images, so a colour
    next to the right one (cyan for green) can win on them while the windows say where it fires."""
    if "rank" not in c:
        return np.zeros(len(c))
    top = c.loc[(c["scorer"] == "encoder_iou") & (c["rank"] == 0), ["unit", "concept"]]
    first = set(zip(top["unit"], top["concept"]))
    return np.fromiter(((u, k) in first for u, k in zip(c["unit"], c["concept"])), np.float64, len(c))


def logistic(coef: dict[str, float], features: dict[str, Any]):
    """sigmoid(intercept + sum of coef[f] * features[f]) (torch or numpy, as the features)."""
    zero = 0 * next(iter(features.values()))                        # the features' shape and kind
    z = coef["intercept"] + sum((w * features[f] for f, w in coef.items() if f != "intercept"), zero)
    return 1.0 / (1.0 + (np.exp(-z) if isinstance(z, np.ndarray) else torch.exp(-z)))


@dataclass(frozen=True)
class Calibration:
    """The fitted maps (neurostore/data/CALIBRATION_FILE, written by `bench/confidence_calibration.py
    --fit`): logistic coefficients of explanation_features by scorer name ('*': any scorer
    without a map of its own); one logistic map of headline_features. Coefficients are >= 0
    (the fit drops a feature that would come out negative), so confidence never falls as the
    evidence rises."""

    explanation_maps: dict
    headline_map: dict
    fitted_on: dict
    # candidates with encoder_iou among them have a headline map of their own: its labels are right
    # far more often, and the shared map fitted with them was over-confident without them
    encoder_iou_headline_map: Optional[dict] = None

    @classmethod
    def load(cls, path=None) -> "Calibration":
        from importlib import resources

        f = resources.files("neurostore").joinpath("data", CALIBRATION_FILE) if path is None else Path(path)
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            return cls(d["explanation"], d["headline"], d["fitted_on"], d.get("headline_with_encoder_iou"))
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"confidence calibration '{f}' is unreadable ({e}); reinstall neurostore or refit "
                           "it with 'python bench/confidence_calibration.py --fit'.") from None

    def explanation(self, scorer: str, q: torch.Tensor, margin: torch.Tensor, auprc: Optional[torch.Tensor] = None,
                    cosine_pearson: Optional[torch.Tensor] = None,
                    concept_peak: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P(the explanation agrees with the truth) from its null q-value, margin and held-out
        encoder evidence (any shape; none counts as 0)."""
        coef = self.explanation_maps.get(scorer, self.explanation_maps["*"])
        return logistic(coef, explanation_features(q, margin, auprc, cosine_pearson, concept_peak)).clamp(0.0, 1.0)

    def headline(self, candidates: "pd.DataFrame") -> np.ndarray:  # noqa: F821
        """P(the headline candidate agrees with the truth), per candidate row."""
        own = self.encoder_iou_headline_map is not None and (candidates["scorer"] == "encoder_iou").any()
        coef = self.encoder_iou_headline_map if own else self.headline_map
        return np.clip(logistic(coef, headline_features(candidates)), 0.0, 1.0)


@functools.cache
def calibration() -> Calibration:
    """The shipped calibration, loaded once."""
    return Calibration.load()


def rows_q_margin(rows: "pd.DataFrame", null: Null) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
    """Score rows (unit, rank, score) of one layer and scorer -> ([r] BH q, [r] margin), as
    scored_with_null has them from the whole matrix: the BH family is the units' rank-0 scores;
    a rank-0 concept's margin is over rank 1, any other's over rank 0."""
    score = torch.as_tensor(rows["score"].to_numpy(np.float64))
    top = rows[rows["rank"] == 0].groupby("unit")["score"].first()
    fam = null.pvalues(torch.as_tensor(top.to_numpy(np.float64)))
    q = 1.0 - bh_confidence(score.view(-1, 1), null, fam).double().view(-1)
    second = rows[rows["rank"] == 1].groupby("unit")["score"].first()
    other = np.where(rows["rank"] == 0, rows["unit"].map(second).to_numpy(np.float64),
                     rows["unit"].map(top).to_numpy(np.float64))
    other = np.where(np.isnan(other), rows["score"].to_numpy(np.float64), other)   # no rank 1 kept: margin 0
    return q, null.margin(score, torch.as_tensor(other))


# ---- held-out split and fidelity ----------------------------------------------------------------


def heldout(image_ids: Sequence[str], fraction: float = HELDOUT_FRACTION) -> np.ndarray:
    """[n] bool: the image is held out. By a hash of its id, so the split is the same in every
    run, model and order."""
    if not 0 < fraction < 1:
        raise BadParameter(f"held-out fraction {fraction} must lie in (0, 1).")
    h = [int.from_bytes(hashlib.sha1(str(i).encode()).digest()[:8], "big") / 2.0 ** 64 for i in image_ids]
    return np.asarray(h) < fraction


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Column-wise Pearson correlation of [n, e] with [n, e] -> [e] (0 where one is constant)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    den = (x.norm(dim=0) * y.norm(dim=0))
    return torch.where(den > 0, (x * y).sum(0) / den.clamp(min=1e-300), 0.0)


def auprc(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Column-wise average precision of [n, e] scores for [n, e] bool labels -> [e] (NaN where a
    column has no positive). Ties are broken by order; AP = mean precision at the positives."""
    order = torch.argsort(score.double(), dim=0, descending=True)
    lab = torch.gather(label.double(), 0, order)                    # [n, e] sorted by score
    tp = lab.cumsum(0)
    prec = tp / torch.arange(1, lab.shape[0] + 1, dtype=torch.float64, device=lab.device).view(-1, 1)
    npos = lab.sum(0)
    return torch.where(npos > 0, (prec * lab).sum(0) / npos.clamp(min=1), float("nan"))


def encoder_presence(sim: torch.Tensor, top: float = ENCODER_PRESENT) -> torch.Tensor:
    """[n, c] image–concept cosine -> [n, c] bool: the image is among the concept's `top`
    fraction most similar images (the encoder's 'c is in this image')."""
    if sim.shape[0] == 0:  # no held-out image (a tiny probe set): nothing is present
        return torch.zeros(sim.shape, dtype=torch.bool)
    k = min(sim.shape[0], max(1, int(round(top * sim.shape[0]))))
    thr = torch.topk(sim.float(), k, dim=0).values[-1]              # [c]
    return sim.float() >= thr


def zero_shot(sim, rows: torch.Tensor, cols: torch.Tensor, a: float = ZERO_SHOT_SCALE,
              cosine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[len(rows), len(cols)] p(concept | image), CLIP's zero-shot probability: the softmax over
    the WHOLE vocabulary of a x image-concept cosine (`sim` [n, c], dense or streamed), as
    soft_wpmi computes it (same a, and a streamed similarity's cached log-normaliser). For the
    images `rows` (indices or a bool mask) and concepts `cols`. Unlike the raw cosine, an image
    that is near every concept (a busy or a blank one) does not make each of them "present":
    the concepts of an image compete, so an image holds a concept more than other concepts.
    `cosine`: those cosines when the caller has them (on its device)."""
    s = cosine if cosine is not None else \
        sim.take(rows, cols) if isinstance(sim, S.Similarity) else sim.float()[rows][:, cols]   # [r, k]
    lse = S.logsumexp_rows(sim, a)[rows].to(s.device)             # [r, 1]
    return torch.exp(a * s.float() - lse)


def concept_peak(p: torch.Tensor) -> np.ndarray:
    """[n, c] zero-shot p(concept | image) on held-out images -> [c] log(max / mean) over the
    images: how far the concept's clearest image stands out. A concept the probe images never
    show has its probability spread evenly (measured on four fast worlds, it tells the 19 drawn
    concepts from the 34 never drawn at ROC AUC 0.97-0.99), and the encoder's "top 10%" still
    calls it present somewhere, so its AUPRC can look like a real concept's. NaN with fewer than
    MIN_HELDOUT images."""
    if p.shape[0] < MIN_HELDOUT:
        return np.full(p.shape[1], np.nan)
    p = p.double()
    return torch.log(p.max(dim=0).values / p.mean(dim=0).clamp(min=1e-300)).cpu().numpy()


def fidelity(acts: torch.Tensor, amount: torch.Tensor, present: torch.Tensor,
             units: np.ndarray, concepts: np.ndarray, device=None,
             auprc_too: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Explanations (units[e], concepts[e]) on held-out images: acts [n, u] pooled activations,
    amount [n, c] concept presence (cosine or mask area), present [n, c] bool.
    Returns (pearson [e], auprc [e], None without auprc_too); NaN (no evidence) with fewer than
    MIN_HELDOUT held-out images.
    Computed on `device` (default the CPU) in blocks of explanations: [n, e] at once is 10,000
    held-out images x 41,000 explanations of a 2,048-unit layer, gigabytes in float64."""
    if acts.shape[0] < MIN_HELDOUT:
        nan = np.full(len(units), np.nan)
        return nan, nan.copy()
    device = torch.device(device or "cpu")
    units, concepts = (torch.tensor(np.asarray(x), dtype=torch.long) for x in (units, concepts))
    acts, amount, present = acts.float().to(device), amount.float().to(device), present.to(device)
    block = devices.chunk_rows(device, acts.shape[0] * 64, fraction=0.25)   # ~8 float64 [n] columns each
    p_out, a_out = [], []
    for e0 in range(0, len(units), block):
        u, c = units[e0 : e0 + block].to(device), concepts[e0 : e0 + block].to(device)
        a = acts[:, u]                                              # [n, b]
        p_out.append(pearson(a, amount[:, c]).cpu())
        if auprc_too:
            a_out.append(auprc(a, present[:, c]).cpu())
    cat = lambda parts: torch.cat(parts).numpy() if parts else np.zeros(0)   # noqa: E731
    return cat(p_out), cat(a_out) if auprc_too else None


def mask_amount(masks, image_ids: Sequence[str], concept_index: dict) -> torch.Tensor:
    """[n, c] fraction of each image covered by each concept's mask (0 where it has none), from
    masks rows (schema/masks.sql: image_id, concept, area, height, width; Arrow or pandas)."""
    if isinstance(masks, pa.Table):
        masks = masks.select(["image_id", "concept", "area", "height", "width"]).to_pandas()
    at = {i: j for j, i in enumerate(image_ids)}
    mk = masks[masks["image_id"].isin(at) & masks["concept"].isin(concept_index)]
    out = torch.zeros(len(image_ids), len(concept_index))
    if mk.empty:   # a vocabulary none of whose concepts the world draws (empty columns come back as objects)
        return out
    out[torch.tensor(mk["image_id"].map(at).to_numpy()), torch.tensor(mk["concept"].map(concept_index).to_numpy())] = \
        torch.tensor((mk["area"] / (mk["height"] * mk["width"])).to_numpy(np.float32))
    return out


def explanation_fidelity(expl: "pd.DataFrame", peak: torch.Tensor, sim: torch.Tensor,  # noqa: F821
                         image_ids: Sequence[str], concept_index: dict,
                         amount: Optional[torch.Tensor] = None,
                         fraction: float = HELDOUT_FRACTION) -> "pd.DataFrame":  # noqa: F821
    """Held-out fidelity of explanations `expl` (columns unit, scorer, concept, rank) of one
    layer: peak [n, u] per-image max activation, sim [n, c] image-concept cosine, amount [n, c]
    mask area fraction (probe world) or None. Rows of schema/explanation_scores.sql without the
    constant columns; a mask metric is NaN where no held-out image has the concept."""
    import pandas as pd

    hold = torch.from_numpy(heldout(image_ids, fraction))
    units = expl["unit"].to_numpy()
    cis = expl["concept"].map(concept_index).to_numpy()
    acts_h = peak[hold]                                             # [nh, u]
    # Only the explained concepts' columns (each column's presence is its own): a streamed
    # similarity (scorers.Similarity) is never materialised as [images, vocabulary].
    used, col = np.unique(np.asarray(cis, np.int64), return_inverse=True)
    device = sim.device if isinstance(sim, S.Similarity) else None   # a dissect's GPU, where it has one
    used = torch.from_numpy(used)
    sim_h = sim.take(hold, used).to(device) if isinstance(sim, S.Similarity) else sim[hold][:, used]   # [nh, used]
    present = encoder_presence(sim_h)
    zs = zero_shot(sim, hold, used, cosine=sim_h)                  # [nh, used]
    p, a = fidelity(acts_h, zs, present, units, col, device)
    cosine_p, _ = fidelity(acts_h, sim_h, present, units, col, device, auprc_too=False)
    parts = [("encoder", (("pearson", p), ("auprc", a), ("cosine_pearson", cosine_p),
                          ("concept_peak", concept_peak(zs)[col])),
              f"zero-shot p(concept | image) at a = {ZERO_SHOT_SCALE:g} (cosine_pearson: the raw cosine; "
              "concept_peak: log(max / mean) of the concept's p over the held-out images); "
              "present: the concept's top 10% by cosine")]
    if amount is not None:
        am = amount[hold]                                           # [nh, c]
        p, a = fidelity(acts_h, am, am > 0, units, cis, device)
        absent = ((am > 0).sum(0)[torch.tensor(np.asarray(cis), dtype=torch.long)] == 0).numpy()
        parts.append(("masks", (("pearson", np.where(absent, np.nan, p)), ("auprc", a)), "mask area"))
    out = []
    for presence, metrics, what in parts:
        for metric, v in metrics:
            t = expl[["unit", "scorer", "concept", "rank"]].copy()
            t["metric"], t["presence"] = metric, presence
            t["value"] = np.where(np.isfinite(v), v, np.nan)
            t["n_images"] = int(hold.sum())
            t["method"] = f"per-image max activation vs {what}; held out: sha1(image_id) < {fraction}"
            out.append(t)
    return pd.concat(out, ignore_index=True)


# ---- headline -----------------------------------------------------------------------------------


def null_q_rows(rows: "pd.DataFrame", nulls: dict) -> "pd.DataFrame":  # noqa: F821
    """explanation_scores rows (metric 'null_q', presence 'null') of score rows of one layer:
    the BH q-value of each (unit, scorer, concept) against its scorer's null (`nulls`: scorer ->
    Null), the evidence the calibrated confidence is made from, kept as measured."""
    import pandas as pd

    out = []
    for scorer, r in rows.groupby("scorer"):
        if scorer in nulls:
            t = r[["unit", "scorer", "concept", "rank"]].copy()
            t["metric"], t["presence"] = "null_q", "null"
            t["value"] = rows_q_margin(r, nulls[scorer])[0].numpy()
            t["n_images"] = None
            t["method"] = (f"Benjamini-Hochberg q over the layer's units of the Gumbel p against the best scores "
                           f"of {nulls[scorer].n} random directions of the layer")
            out.append(t)
    return pd.concat(out, ignore_index=True) if out else None


def headline_candidates(rows: "pd.DataFrame", enc: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """A layer's headline candidates: the ground-truth-free scorers' top HEADLINE_RANKS score rows
    (unit, scorer, concept, rank, confidence) with their held-out encoder fidelity (`enc`:
    pearson, auprc, cosine_pearson and concept_peak columns indexed by unit, scorer, concept)."""
    c = rows[(rows["rank"] < HEADLINE_RANKS) & rows["scorer"].isin(HEADLINE_SCORERS)]
    c = c[["unit", "scorer", "concept", "rank", "confidence"]].copy()
    key = list(zip(c["unit"], c["scorer"], c["concept"]))
    c["fidelity"] = enc["pearson"].reindex(key).to_numpy()
    c["auprc"] = enc["auprc"].reindex(key).to_numpy()
    for k in ("cosine_pearson", "concept_peak"):
        c[k] = enc[k].reindex(key).to_numpy() if k in enc else np.nan
    return c


def layer_trust(rows: "pd.DataFrame", peak: torch.Tensor, sim: torch.Tensor,  # noqa: F821
                image_ids: Sequence[str], concept_index: dict, amount: Optional[torch.Tensor] = None,
                fraction: float = HELDOUT_FRACTION, nulls: Optional[dict] = None, **columns: Any) -> tuple:
    """One layer's explanation_scores rows and headlines from its score rows (unit, scorer,
    concept, rank, score, confidence): fidelity of every row on held-out images; with `nulls`
    (scorer -> Null) its null q and its calibrated confidence, which needs the fidelity (so the
    dissect takes it from here); then per unit the headline among the ground-truth-free
    scorers' top HEADLINE_RANKS concepts. `columns`: constants (dataset, vocabulary, encoder,
    model, layer); a mask or null metric's encoder is NULL. Returns (explanation_scores rows,
    headlines, the score rows with their confidence), DataFrames (schema minus run_id)."""
    import pandas as pd

    rows = rows[rows["concept"].isin(concept_index)]
    fid = explanation_fidelity(rows, peak, sim, image_ids, concept_index, amount, fraction)
    # (not pivot_table(dropna=False): it spans every unit x scorer x concept, 164M rows for a
    # 2,048-unit layer at 20,000 concepts; these are the explanations' own keys, NaN kept)
    enc = fid[fid["presence"] == "encoder"].groupby(["unit", "scorer", "concept", "metric"])["value"].first() \
        .unstack("metric")
    if nulls:
        fid = pd.concat([fid, null_q_rows(rows, nulls)], ignore_index=True)
        rows = calibrated(rows, nulls, enc)
    c = headline_candidates(rows, enc)
    c["confidence"] = calibration().headline(c)   # P(right) as a headline: evidence across scorers
    c["model"], c["layer"] = "", ""   # headlines() groups by them; the caller sets them
    head = headlines(c).merge(c.groupby("unit").size().rename("candidates").reset_index(), on="unit")
    head = head.drop(columns=["model", "layer", "cosine_pearson", "concept_peak"])
    for t in (fid, head):
        for k, v in columns.items():
            t[k] = v
    if "encoder" in columns:
        fid["encoder"] = np.where(fid["presence"] == "encoder", columns["encoder"], None)
    return fid, head, rows


def calibrated(rows: "pd.DataFrame", nulls: dict, enc: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """Score rows of one layer (unit, scorer, concept, rank, score) with `confidence` from the
    shipped map of their null q and margin (`nulls`: scorer -> Null) and held-out encoder
    evidence (`enc`: auprc and cosine_pearson columns indexed by unit, scorer, concept)."""
    import pandas as pd

    parts = []
    for scorer, r in rows.groupby("scorer", sort=False):
        q, margin = rows_q_margin(r, nulls[scorer])
        key = list(zip(r["unit"], r["scorer"], r["concept"]))
        ap, pr, pk = (torch.from_numpy(np.array(enc[m].reindex(key), np.float64)) if m in enc else None
                      for m in ("auprc", "cosine_pearson", "concept_peak"))
        parts.append(r.assign(confidence=calibration().explanation(scorer, q, margin, ap, pr, pk).numpy()))
    return pd.concat(parts).loc[rows.index] if parts else rows


def score(scorer: str, inputs: dict[str, Any], params: Optional[dict[str, Any]] = None,
          iou_best: Optional[torch.Tensor] = None, m: int = NULL_UNITS, seed: int = 0,
          device=None, top: Optional[int] = None) -> tuple["S.ScoreResult", Null]:
    """`S.run_scorer` then `scored_with_null`, with what they share computed once: soft_wpmi's and
    wpmi's log p(c | unit) of the real units gives both the scores and the null's p(c) (scoring
    the units twice was half of those scorers' time at 20,000 concepts)."""
    res, log_p = _scored(scorer, inputs, params)
    return scored_with_null(res, inputs, iou_best, m, seed, device, log_p=log_p, top=top)


def _scored(scorer: str, inputs: dict[str, Any], params: Optional[dict[str, Any]]) -> tuple["S.ScoreResult", Optional[torch.Tensor]]:
    """The scorer's result without a confidence, and soft_wpmi's / wpmi's log p(c | unit) [u, c]
    float64 it came from (None for the other scorers), for the null to reuse."""
    if scorer not in S.PMI_SCORERS:
        return S.run_scorer(scorer, inputs, params, with_confidence=False), None
    full = S.resolve_params(scorer, params)
    log_p = S.log_p_given_unit(scorer, inputs, full)                # [u, c] float64
    return S.ScoreResult(scorer, full, S.pmi(log_p, full["lam"]), None, S.get_scorer(scorer).uses_encoder), log_p


def scored_with_null(res: "S.ScoreResult", inputs: dict[str, Any], iou_best: Optional[torch.Tensor] = None,
                     m: int = NULL_UNITS, seed: int = 0, device=None,
                     log_p: Optional[torch.Tensor] = None, top: Optional[int] = None) -> tuple["S.ScoreResult", Null]:
    """A scorer's result with the calibrated confidence of q and margin alone (no fidelity yet:
    the dissect replaces it with layer_trust's once the layer's fidelity exists) in place of the
    old one, and the null (its parameters go with the run). iou: pass `iou_best` from a NullIoU
    fed beside the real IoU. `device`: where the [u, c] arithmetic runs (a dissect's GPU: seconds
    per layer on a CPU at 20,000 concepts); the confidence comes back on the CPU.
    `top`: only each unit's `top` best concepts (and any tied with the last) get a confidence,
    the rest 0. Within a unit confidence grows with the score, so these are the concepts
    S.top_concepts keeps; a dissect stores no other (half the scores stage at 10,000 concepts)."""
    from dataclasses import replace

    best = iou_best if res.scorer in STREAMED_NULLS else null_best(res.scorer, inputs, res.params, m, seed, log_p)
    null = fit_null(res.scorer, best, res.scores.shape[1], seed)
    scores = res.scores.to(device or "cpu")
    s = torch.nan_to_num(scores.double(), nan=float("-inf"))
    top2 = torch.topk(s, min(2, s.shape[1]), dim=1).values          # [u, 2]
    first, second = top2[:, :1], top2[:, -1:]                        # [u, 1]: a concept's best other is one of them
    kept = None   # (rows, cols) of the concepts given a confidence; None: every one
    if top is not None and top < s.shape[1]:
        # every concept at least the top-th best as S.top_concepts ranks them (float32, NaN last),
        # ties too, so whichever of them it keeps has its confidence
        key = torch.nan_to_num(scores.float(), nan=float("-inf"))
        kept = torch.nonzero(key >= torch.topk(key, top, dim=1).values[:, -1:], as_tuple=True)
        scores, s, first, second = scores[kept], s[kept], first[kept[0], 0], second[kept[0], 0]
    level = null.pvalues(top2[:, 0])                                 # [u] each unit's best p: BH's family
    q = 1.0 - bh_confidence(scores, null, level).double()
    other = torch.where(s == first, second, first)
    conf = calibration().explanation(res.scorer, q, null.margin(scores, other)).float()
    if kept is not None:   # the rest of the [u, c] matrix stays 0
        conf = torch.zeros(res.scores.shape, dtype=torch.float32, device=conf.device).index_put_(kept, conf)
    return replace(res, confidence=conf.cpu()), null


def headlines(candidates: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """One row per (model, layer, unit): the candidate (scorer, concept) with the highest
    confidence (the headline map's P(right)); ties by held-out encoder AUPRC, then Pearson,
    then scorer name (deterministic). NaN fidelity ranks last. Beside it the runner-up: the best
    candidate naming another concept (`runner_up`, `runner_up_scorer`, `runner_up_confidence`;
    None where every candidate names the headline's). Where the headline misses the probe world's
    mask-IoU reference, the runner-up is mostly the reference (README, "Confidence and fidelity")."""
    key = ["model", "layer", "unit"]
    c = candidates.assign(_a=candidates["auprc"].fillna(-1.0), _p=candidates["fidelity"].fillna(-2.0))
    c = c.sort_values([*key, "confidence", "_a", "_p", "scorer"],
                      ascending=[True, True, True, False, False, False, True], kind="stable")
    c = c.drop(columns=["_a", "_p"])
    head = c.groupby(key, sort=False).head(1).reset_index(drop=True)
    other = c.merge(head[[*key, "concept"]].rename(columns={"concept": "_head"}), on=key, how="left")
    other = other[other["concept"] != other["_head"]].groupby(key, sort=False).head(1)
    other = other[[*key, "concept", "scorer", "confidence"]].rename(
        columns={"concept": "runner_up", "scorer": "runner_up_scorer", "confidence": "runner_up_confidence"})
    return head.merge(other, on=key, how="left")


# ---- a dissect's stored run, assessed ------------------------------------------------------------

HEADLINE_SCORERS = ("patch", "top_images", "encoder_iou", "soft_wpmi", "wpmi", "cos_cubed")   # ground-truth free; iou is the truth
HEADLINE_RANKS = 3        # each scorer's top 3 concepts are headline candidates


def assess(store, model: Optional[str] = None, *, null_units: int = NULL_UNITS, seed: int = 0,
           fraction: float = HELDOUT_FRACTION, write: bool = True, log=print) -> dict:
    """Null confidence, held-out fidelity and headlines for the stored dissections of `model`
    (every model when None), from the tables the dissect wrote (pooled activations, image,
    concept and patch embeddings, top patches, masks). With `write`, one run rewrites the
    scores' and explanations' confidence (same write keys as the dissect) and writes
    `explanation_scores` and `headlines`; the nulls' parameters are the run's parameters.
    Returns {model: {"nulls": ..., "fractions_confident": ..., "headlines": n}}."""
    from .store import Store

    if not isinstance(store, Store):
        store = Store.open(store)
    have = store.df("SELECT DISTINCT model, run_id, vocabulary FROM scores ORDER BY ALL")
    if model is not None:
        if model not in set(have["model"]):
            from .errors import UnknownModel, unknown

            raise UnknownModel(unknown("model", model, sorted(set(have["model"])),
                                       "Dissect it first with 'neurostore dissect'."))
        have = have[have["model"] == model]
    if have.empty:
        raise BadInput(f"Store '{store.path}' has no scores to assess. Run 'neurostore dissect' first.")
    out, work = {}, []
    for m, run_id, vocab in have.itertuples(index=False):
        params = dissect_params(store, run_id, m, vocab)
        res = _assess_run(store, m, run_id, params, null_units, seed, fraction, log)
        out.setdefault(m, {})[params.get("vocabulary")] = res["summary"]
        work.append((m, params, res))
    if write:
        nulls = {f"{m}|{p['vocabulary']}": r["summary"]["nulls"] for m, p, r in work}
        sources = {f"{m}|{p['vocabulary']}": p for m, p, r in work}
        with store.run("trust", {"null_units": null_units, "seed": seed, "heldout_fraction": fraction,
                                 "fdr": "Benjamini-Hochberg per layer and scorer", "nulls": nulls,
                                 "calibration": calibration().fitted_on,
                                 "sources": sources}) as run:
            for m, p, r in work:
                for key, table, rows in r["writes"]:
                    run.write(table, rows, key=key)
        for m in out:
            for v in out[m]:
                out[m][v]["run_id"] = run.run_id
    return out


def phrase_explanations(store, model: str, phrase: str, vector: np.ndarray, encoder_id: str,
                        layers: Optional[Sequence[str]] = None, fraction: float = HELDOUT_FRACTION) -> "pd.DataFrame":  # noqa: F821
    """Every unit of `model` explained by `phrase` as the `patch` scorer would have explained it
    had the phrase been in the dissect's vocabulary, with the confidence that explanation would
    have had: the score from the unit's stored top patches against the layer's own (`vector`: the
    phrase's `encoder_id` text embedding), q against the layer's stored `patch` null (BH family:
    the units' stored best scores), the margin over the unit's stored best other concept, and
    held-out fidelity (zero-shot p over the vocabulary and the phrase, on the held-out probe
    images whose files can still be read; none where they cannot: no evidence), then the shipped
    map. A stored concept gets its stored score and confidence back. Layers whose dissect did not
    run `patch` with this encoder are left out, and so are those of a store written before the
    nulls (`layers_without_null`: `assess` computes them). Rows: layer, unit, score, confidence,
    null_q, margin, auprc, cosine_pearson, concept_peak; `files_missing`: held-out images not readable."""
    import pandas as pd

    have = store.df("""SELECT s.run_id, s.layer, s.vocabulary, max(r.started_at) AS t FROM scores s
                       JOIN runs r USING (run_id)
                       WHERE s.model = $m AND s.scorer = 'patch' AND s.encoder = $e GROUP BY ALL ORDER BY t DESC""",
                    {"m": model, "e": encoder_id})
    if layers:
        have = have[have["layer"].isin(list(layers))]
    have = have.drop_duplicates("layer")                      # the latest patch scores of each layer
    vec = torch.tensor(np.asarray(vector, np.float32)).view(1, -1)
    out, missing, no_null = [], 0, []
    for (run_id, vocab), g in have.groupby(["run_id", "vocabulary"], sort=False):
        params = dissect_params(store, run_id, model, vocab)
        nulls = json.loads(store.df("SELECT params FROM runs WHERE run_id = $r",
                                    {"r": run_id})["params"].iloc[0]).get("nulls") or {}   # none before trust
        nulls = nulls.get(f"{model}|{vocab}", nulls)          # a trust run keeps them per model and vocabulary
        concepts = store.df("SELECT concept FROM concepts WHERE vocabulary = $v ORDER BY concept",
                            {"v": vocab})["concept"].tolist()
        text = cached_vectors(store, encoder_id, "concept", concepts)
        names = [c for c in concepts if c in text and c != phrase] + [phrase]
        text_emb = torch.from_numpy(np.stack([text[c] for c in names[:-1]] + [vec[0].numpy()]))   # [c + 1, d]
        images = store.df("SELECT image_id, path, content_hash FROM images WHERE dataset = $d ORDER BY image_id",
                          {"d": params["dataset"]})
        hashes, unread = image_hashes(images[heldout(images["image_id"].tolist(), fraction)])
        missing += unread
        img = cached_vectors(store, encoder_id, "image", list(hashes.values()))
        ids = [i for i in hashes if hashes[i] in img]
        for layer in g["layer"]:
            if "patch" not in nulls.get(layer, {}):
                no_null.append(layer)
                continue
            null = Null(**nulls[layer]["patch"])
            a = store.df("SELECT unit, rank, patch_id, act_value FROM activations WHERE model = $m AND layer = $l "
                         "AND run_id = $r AND patch_id IS NOT NULL", {"m": model, "l": layer, "r": params["run_id"]})
            if a.empty:
                continue
            pv = cached_vectors(store, encoder_id, "patch", a["patch_id"].unique().tolist())
            a = a[a["patch_id"].isin(pv)]
            pid = sorted(pv)
            units = np.array(sorted(a["unit"].unique()), np.int64)
            up, uw, _ = _unit_index(a, units, {q: j for j, q in enumerate(pid)})
            pe, up = S.own_patches(torch.from_numpy(np.stack([pv[q] for q in pid])), up)
            sp = params.get("scorers", {}).get("patch", {})
            score = S.patch_scores(pe, vec, up, uw, mode=sp.get("mode", "diff"))[:, 0].double()   # [u]
            st = store.df("SELECT unit, rank, concept, score FROM scores WHERE model = $m AND layer = $l AND "
                          "run_id = $r AND scorer = 'patch' AND rank < 2", {"m": model, "l": layer, "r": run_id})
            top = st[st["rank"] == 0].set_index("unit")
            second = st[st["rank"] == 1].set_index("unit")["score"]
            fam = null.pvalues(torch.as_tensor(top["score"].to_numpy(np.float64)))
            q = (1.0 - bh_confidence(score.view(-1, 1), null, fam).double().view(-1))
            # the margin over the unit's best other concept: its rank 1 where the phrase is its rank 0
            first = top["concept"].reindex(units).to_numpy()
            other = np.where(first == phrase, second.reindex(units).to_numpy(np.float64),
                             top["score"].reindex(units).to_numpy(np.float64))
            other = np.where(np.isnan(other), score.numpy(), other)
            margin = null.margin(score, torch.from_numpy(other))
            rows = pd.DataFrame({"unit": units, "scorer": "patch", "concept": phrase, "rank": 0})
            ap = pr = pk = None
            if len(ids) >= MIN_HELDOUT:
                pooled = store.sql("SELECT image_id, act_max FROM pooled WHERE model = $m AND layer = $l AND "
                                   "dataset = $d AND image_id IN (SELECT unnest($ids)) ORDER BY image_id",
                                   {"m": model, "l": layer, "d": params["dataset"], "ids": ids})
                pid_img = pooled.column("image_id").to_pylist()
                peak = torch.from_numpy(_matrix(pooled.column("act_max")))                  # [nh, all units]
                emb = torch.from_numpy(np.stack([img[hashes[i]] for i in pid_img]))
                sim = S.Similarity(emb, text_emb)   # [nh, c + 1], streamed: 800 MB dense at 10,000 x 20,000
                fid = explanation_fidelity(rows, peak, sim, pid_img, {c: j for j, c in enumerate(names)},
                                           fraction=fraction)   # all of these are held out
                enc = fid[fid["presence"] == "encoder"].pivot_table(index="unit", columns="metric", values="value",
                                                                  dropna=False).reindex(units)
                ap, pr, pk = (torch.tensor(enc[m].to_numpy(np.float64)) if m in enc else None
                              for m in ("auprc", "cosine_pearson", "concept_peak"))
            conf = calibration().explanation("patch", q, margin, ap, pr, pk)
            col = lambda t: np.full(len(units), np.nan) if t is None else t.numpy()   # noqa: E731
            out.append(pd.DataFrame({"layer": layer, "unit": units, "score": score.numpy(), "confidence": conf.numpy(),
                                     "null_q": q.numpy(), "margin": margin.numpy(), "auprc": col(ap),
                                     "cosine_pearson": col(pr), "concept_peak": col(pk)}))
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["layer", "unit", "score", "confidence", "null_q", "margin", "auprc", "cosine_pearson", "concept_peak"])
    res.attrs["files_missing"], res.attrs["layers_without_null"] = missing, no_null
    return res


def _unit_index(a: "pd.DataFrame", units: "int | np.ndarray", patch_row: dict,  # noqa: F821
                image_row: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[units, k] tables of a layer's `activations` rows (unit, rank, patch_id, act_value,
    image_id), as the patch scorer takes them: each (unit, rank)'s patch row (`patch_row`), its
    weight (the activation) and, with `image_row`, its image's row; -1 and 0 where a unit has
    fewer. `units`: how many (the unit ids are the rows), or the unit ids in row order."""
    rows = a["unit"] if isinstance(units, int) else a["unit"].map({u: j for j, u in enumerate(units)})
    n = units if isinstance(units, int) else len(units)
    k = int(a["rank"].max()) + 1 if len(a) else 1
    up, ui, uw = torch.full((n, k), -1, dtype=torch.long), torch.full((n, k), -1, dtype=torch.long), torch.zeros(n, k)
    if len(a):
        # np.array copies: pandas hands out read-only views, which torch warns about
        at = (torch.from_numpy(np.array(rows, np.int64)), torch.from_numpy(np.array(a["rank"], np.int64)))
        up[at] = torch.from_numpy(np.array(a["patch_id"].map(patch_row), np.int64))
        uw[at] = torch.from_numpy(np.nan_to_num(np.array(a["act_value"], np.float32)))
        if image_row is not None:
            ui[at] = torch.from_numpy(np.array(a["image_id"].map(image_row).fillna(-1), np.int64))
    return up, uw, ui


@functools.lru_cache(maxsize=1 << 17)
def _file_content_id(path: str, size: int, mtime_ns: int) -> str:
    from .images import file_hash

    return file_hash(path)


def _content_id(path: str) -> str:
    """images.file_hash, kept per process while the file's size and time stay: the web app's
    every open-vocabulary search reads the same held-out images (10,000 files at 50,000 images)."""
    st = os.stat(path)
    return _file_content_id(str(path), st.st_size, st.st_mtime_ns)


def image_hashes(images: "pd.DataFrame") -> tuple[dict[str, str], int]:  # noqa: F821
    """image_id -> content hash (the key of the image's vectors in `embeddings`) of `images` rows
    (image_id, path, content_hash): as the dissect stored it, else read from the file (stores
    written before the column); and how many of those files could not be read."""
    out, unread = {}, 0
    stored = images["content_hash"] if "content_hash" in images else [None] * len(images)
    for i, path, h in zip(images["image_id"], images["path"], stored):
        if isinstance(h, str):
            out[i] = h
            continue
        try:
            out[i] = _content_id(path)
        except OSError:
            unread += 1
    return out, unread


def dissect_params(store, run_id: str, model: str, vocabulary: str) -> dict:
    """The parameters of the dissect that scored (model, vocabulary) in run `run_id`, with that
    dissect's run_id; a trust run that rewrote the scores keeps them under 'sources'."""
    t = store.df("SELECT command, params FROM runs WHERE run_id = $r", {"r": run_id})
    if t.empty:
        raise BadInput(f"run {run_id} of the scores of {model} is not in the store's runs table.")
    params = json.loads(t["params"].iloc[0])
    if t["command"].iloc[0] == "trust":
        return params["sources"][f"{model}|{vocabulary}"]
    return {**params, "run_id": run_id}


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length lists -> [rows, width] float32."""
    a = col.combine_chunks()
    return np.array(a.flatten(), np.float32).reshape(len(a), -1)


def _assess_run(store, model: str, run_id: str, params: dict, m: int, seed: int, fraction: float,
                log) -> dict:
    import pandas as pd

    ds, vocab, enc_id = params["dataset"], params["vocabulary"], params["encoder"]
    scorer_params = params.get("scorers", {})
    args = {"m": model, "r": run_id}
    scores = store.df("SELECT * FROM scores WHERE model = $m AND run_id = $r", args)
    expl = store.df("SELECT * FROM explanations WHERE model = $m AND run_id = $r", args)
    images = store.df("SELECT image_id, path, content_hash FROM images WHERE dataset = $d", {"d": ds})
    concepts = store.df("SELECT concept FROM concepts WHERE vocabulary = $v ORDER BY concept",
                        {"v": vocab})["concept"].tolist()
    cindex = {c: i for i, c in enumerate(concepts)}
    text = cached_vectors(store, enc_id, "concept", concepts)
    if len(text) != len(concepts):
        raise BadInput(f"the store lacks {len(concepts) - len(text)} concept vectors of {enc_id}; re-run the dissect.")
    text_emb = torch.from_numpy(np.stack([text[c] for c in concepts]))       # [c, d]
    hash_of, unread = image_hashes(images)
    if unread:
        raise BadInput(f"{unread} probe images of {ds} are neither hashed in the store nor readable (moved?); "
                       "put them back where the images table says, or re-run the dissect.")
    masks = None
    if "masks" in store.tables():
        masks = store.df("SELECT image_id, concept, area, height, width FROM masks WHERE dataset = $d",
                         {"d": ds})
        masks = masks if len(masks) else None
    acts_rows = store.df("SELECT layer, unit, rank, image_id, patch_id, act_value FROM activations "
                         "WHERE model = $m AND run_id = $r AND patch_id IS NOT NULL",
                         {"m": model, "r": params["run_id"]})   # the dissect's rows
    patch_vec = cached_vectors(store, enc_id, "patch", acts_rows["patch_id"].unique().tolist())
    pool_ids = sorted(patch_vec)
    prow = {p: i for i, p in enumerate(pool_ids)}
    patch_emb = torch.from_numpy(np.stack([patch_vec[p] for p in pool_ids])) if pool_ids else None  # [P, d]

    nulls, writes, summary_conf, n_heads = {}, [], {}, 0
    worst = 0.0  # largest relative gap between recomputed and stored scores
    new_conf = {}  # (layer, scorer) -> DataFrame of score rows with the new confidence
    layers = sorted(scores["layer"].unique())
    iou_best = _iou_nulls(store, model, params, layers, concepts, m, seed) if (scores["scorer"] == "iou").any() else {}
    for layer in layers:
        pooled_t = store.sql("SELECT image_id, act_mean, act_max FROM pooled WHERE model = $m AND layer = $l "
                             "AND dataset = $d ORDER BY image_id", {"m": model, "l": layer, "d": ds})
        ids = pooled_t.column("image_id").to_pylist()
        pooled = torch.from_numpy(_matrix(pooled_t.column("act_mean")))   # [n, u] the scorers' input
        peak = torch.from_numpy(_matrix(pooled_t.column("act_max")))      # [n, u] fidelity's
        img = cached_vectors(store, enc_id, "image", [hash_of[i] for i in ids])
        image_emb = torch.from_numpy(np.stack([img[hash_of[i]] for i in ids]))  # [n, d]
        sim = S.image_text_similarity(image_emb, text_emb)                 # [n, c]
        up, uw, ui = _unit_index(acts_rows[acts_rows["layer"] == layer], pooled.shape[1], prow,
                                 {i: j for j, i in enumerate(ids)})
        # the layer's own patches, as the dissect scored them
        pe, up = S.own_patches(patch_emb, up) if patch_emb is not None else (None, up)
        inputs = {"similarity": sim, "pooled": pooled, "peak": peak, "patch_emb": pe, "text_emb": text_emb,
                  "unit_patches": up, "unit_images": ui, "unit_weights": uw}
        rows_l = scores[scores["layer"] == layer]
        for scorer in sorted(rows_l["scorer"].unique()):
            sp = scorer_params.get(scorer, {})
            r = rows_l[rows_l["scorer"] == scorer].copy()
            if scorer == "encoder_iou":
                # its null needs the encoder over every image's cells again: the dissect's, as stored
                nulls.setdefault(layer, {})[scorer] = Null(**params["nulls"][layer][scorer])
                new_conf[(layer, scorer)] = r
                continue
            if scorer == "iou":
                best = iou_best[layer]
            else:
                res, log_p = _scored(scorer, inputs, sp)
                real = res.scores                                           # [u, c]
                best = null_best(scorer, inputs, sp, m, seed, log_p)
                # the inputs read back from the store must reproduce the stored scores
                got = real[np.array(r["unit"], np.int64), np.array(r["concept"].map(cindex), np.int64)].double().numpy()
                diff = np.abs(got - r["score"].to_numpy(np.float64))
                worst = max(worst, float(np.nanmax(diff / np.maximum(1.0, np.abs(got))))) if len(r) else worst
            nulls.setdefault(layer, {})[scorer] = fit_null(scorer, best, len(concepts), seed)
            new_conf[(layer, scorer)] = r
        # fidelity of every stored (unit, scorer, concept) on held-out images; the headline
        rows_c = pd.concat([new_conf[(layer, sc)] for sc in rows_l["scorer"].unique()])
        amount = mask_amount(masks, ids, cindex) if masks is not None else None
        fid, head, rows_c = layer_trust(rows_c, peak, sim, ids, cindex, amount, fraction, nulls=nulls[layer],
                                        dataset=ds, vocabulary=vocab, encoder=enc_id, model=model, layer=layer)
        for sc, r in rows_c.groupby("scorer"):   # the confidence with held-out fidelity
            new_conf[(layer, sc)] = r
            summary_conf.setdefault(sc, []).append(torch.from_numpy(np.array(r.loc[r["rank"] == 0, "confidence"])))
        nulls[layer] = {sc: n.to_dict() for sc, n in nulls[layer].items()}
        writes.append((f"trust:{ds}:{vocab}:{enc_id}", "explanation_scores", fid))
        if len(head):
            writes.append((f"trust:{ds}:{vocab}:{enc_id}", "headlines", head))
        n_heads += len(head)
    # rewrite scores and explanations with the calibrated confidence (same keys: they replace the dissect's)
    cols = [c for c in scores.columns if c != "run_id"]
    for (layer, scorer), r in new_conf.items():
        key = f"score:{ds}:{scorer}:{vocab}:{enc_id}"
        writes.append((key, "scores", r[cols]))
        x = expl[(expl["layer"] == layer) & (expl["scorer"] == scorer)].copy()
        lut = r.set_index(["unit", "concept"])["confidence"]
        x["confidences"] = [[float(lut.get((u, cc), 0.0)) for cc in cs] for u, cs in zip(x["unit"], x["concepts"])]
        x["confidence"] = [cs[0] if len(cs) else 0.0 for cs in x["confidences"]]
        writes.append((key, "explanations", x[[c for c in expl.columns if c != "run_id"]]))
    frac = {s: float((torch.cat(v) >= 0.9).double().mean()) for s, v in summary_conf.items()}
    any_conf = None
    if summary_conf:
        per_unit = {}
        for (layer, scorer), r in new_conf.items():
            for u in r.loc[(r["rank"] == 0) & (r["confidence"] >= 0.9), "unit"]:
                per_unit[(layer, int(u))] = True
        total = sum(int(scores.loc[scores["layer"] == l, "unit"].nunique()) for l in layers)
        any_conf = len(per_unit) / max(1, total)
    log(f"trust {model}: {n_heads} headlines; confidence >= 0.9: "
        + ", ".join(f"{s} {v:.3f}" for s, v in sorted(frac.items())) + f"; any scorer {any_conf:.3f}")
    return {"summary": {"nulls": nulls, "recomputed_max_diff": worst, "fraction_confident": frac, "fraction_confident_any": any_conf,
                        "headlines": int(n_heads)},
            "writes": writes}


def _iou_nulls(store, model: str, params: dict, layers: list[str], concepts: list[str], m: int,
               seed: int) -> dict[str, torch.Tensor]:
    """iou's null needs activation maps, which the store does not keep: run the target over the
    probe images again, feeding NullIoU (the dissect's own IoU pass feeds it directly)."""
    from types import SimpleNamespace

    from .images import ImageSource
    from .models import load_target
    from .record import activation_maps

    target = load_target(params["model"])
    ds = params["dataset"]
    ids = store.sql("SELECT DISTINCT image_id FROM pooled WHERE model = $m AND dataset = $d ORDER BY image_id",
                    {"m": model, "d": ds}).column("image_id").to_pylist()
    imgs = store.sql("SELECT image_id, path FROM images WHERE dataset = $d AND list_contains($ids, image_id) "
                     "ORDER BY image_id", {"d": ds, "ids": ids})
    source = ImageSource.from_table(ds, imgs)
    world = SimpleNamespace(masks=lambda: store.sql("SELECT * FROM masks WHERE dataset = $d", {"d": ds}))
    masks = ProbeMasks(world, concepts)
    frac = params.get("scorers", {}).get("iou", {}).get("top_fraction", 0.005)
    nul = {}
    with torch.no_grad():
        for b in source.batches(target.preprocess, 64):
            mk = masks.batch(b.image_ids)
            for l, a in activation_maps(target, layers, b.pixels).items():
                if l not in nul:
                    nul[l] = NullIoU(a.shape[1], len(concepts), frac, min(m, a.shape[1]), seed)
                nul[l].update(a, mk)
    absent = torch.ones(len(concepts), dtype=torch.bool)
    absent[masks.present] = False
    return {l: n.best(absent) for l, n in nul.items()}
