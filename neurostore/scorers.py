"""Scorers: how well each concept explains each unit, as a [units, concepts] matrix, plus a
bounded confidence next to every raw score.

    name        inputs                                           source
    patch       patch embeddings, a unit's top patches, texts    MILAN / the paper's patch method
    soft_wpmi   image-text similarity [n, c], pooled acts [n, u] CLIP-Dissect (default there)
    wpmi        same                                             CLIP-Dissect
    cos_cubed   same                                             CLIP-Dissect (cos_similarity_cubed)
    top_images  image-text similarity, per-image max acts [n, u] the patch method on whole images
    iou         activation maps, per-pixel concept masks         Network Dissection

Pipeline inputs. Each `Scorer` declares its inputs; the dissect asks the scorers of a run what
they `need()` and computes only that: `similarity` (whole-image embeddings, taken in the single
pass), `pooled` and `peak` (per-image mean and max), `unit_images` (the recorder), `patch_emb`,
`text_emb`, `unit_patches`, `unit_weights` (patches), `iou_scores` (per-pixel masks: thresholds
in the pass, then IoU).

The CLIP-Dissect formulas follow the published code (Trustworthy-ML-Lab/CLIP-dissect,
similarity.py) exactly, including its quirks: p(d) in soft_wpmi/wpmi is the mean over the
*units given* of p(d | unit), so call them with all units of a layer at once; the membership
weights run `p_start - r/top_k * (p_start - p_end)` for r = 0..top_k-1 (arange, so the last one
stops one step short of p_end). `_soft_wpmi_reference` & co. are line-by-line transcriptions used
by tests and bench/soft_wpmi.py to check the fast versions to 1e-4.

The fast soft_wpmi / wpmi (same inputs, same numbers to 1e-4 of the published code evaluated in
float64) differ from the transcription in four ways: (1) a factor 1 + w (p - 1) + min_prob is
written b (p + a / b), so the b's come out as one constant and each gathered value costs one
addition; (2) sums of logs become logs of products of G consecutive factors, G chosen from the
tile's smallest factor so a product stays inside [1e-30, 1e30] (G = 11 for the defaults): ~G
times fewer logarithms; (3) concepts are walked in tiles whose softmax is formed from each
image's log-sum-exp, and for each group of G ranks all units' top images are gathered in one
index_select, so memory stays at [n, tile] + [G, units, tile] and there are few, large tensor
operations; (4) sums are accumulated in float64, since log p(c | unit) is a sum of ~100 terms
around -5 and the score a difference of two numbers near -500 (the published float32 code is
itself ~1e-4 away from its float64 value).

Confidence. What the store keeps is `neurostore.trust`'s: the chance that a unit explaining
nothing would score this well, from a null of pseudo-units of the same layer scored by this
module's code (dissect swaps it in through `trust.scored_with_null`). `confidence()` below is
only the within-unit fallback `run_scorer` returns for callers without a null: it looks at the
unit's own scores over the concepts, so a unit of a random network can still get ~1 from it
(issue 13). Per unit, the scores over all C concepts are fitted with a robust normal null
(median, 1.4826 x MAD; the standard deviation when the MAD is 0), and a score s with robust
z-score z gets

    confidence = Phi(z) ** C        (the chance that the best of C null concepts scores below s)

Why: a rank or plain percentile always hands the top concept of every unit ~1.0, even for a
unit that explains nothing; Phi(z) alone does the same with 20,000 concepts (the max of 20,000
normal draws sits near z = 4). Raising to the power C calibrates for the size of the search:
the top concept of a unit with no signal gets a value spread over (0, 1) (about 0.5 on
average), a concept that stands well above the vocabulary gets ~1, and the number means the
same for a 61-word and a 20,000-word vocabulary and for bounded (iou) and unbounded (soft_wpmi)
raw scores.

`top_concepts()` turns a result into the Arrow rows of schema/scores.sql (the store derives
concept_units from them at commit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .errors import BadInput, BadParameter, UnknownScorer, unknown
from .progress import bar as progress_bar

# --------------------------------------------------------------------------------------------
# similarities


@torch.no_grad()
def image_text_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor,
                          chunk: int | None = None, device: "torch.device | str | None" = None) -> torch.Tensor:
    """Cosine similarity of every image to every concept: [n, d] x [c, d] -> [n, c] float32 on
    the CPU (CLIP-Dissect's clip_feats: both sides L2-normalised, then a matrix product),
    computed on `device` in row chunks sized to its free memory (devices.chunk_rows)."""
    from .devices import chunk_rows

    device = torch.device(device or "cpu")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1).to(device)      # [c, d]
    out = torch.empty(img.shape[0], txt.shape[0], dtype=torch.float32)
    # The CPU keeps its fixed 4096-row chunks (the same numbers as ever); a GPU fills its memory.
    chunk = chunk or (4096 if device.type == "cpu" else chunk_rows(device, 4 * (txt.shape[0] + txt.shape[1])))
    for i in range(0, img.shape[0], chunk):
        if device.type == "cpu":
            torch.matmul(img[i : i + chunk], txt.T, out=out[i : i + chunk])
        else:
            out[i : i + chunk] = (img[i : i + chunk].to(device) @ txt.T).cpu()  # [chunk, c]
    return out


class Similarity:
    """The image-concept cosine similarity [n, c] of `image_text_similarity`, never held whole:
    the CLIP-Dissect scorers ask for column tiles [n, tile] (and trust for a few rows), each
    computed from the normalised embeddings [n, d] and [c, d] when asked. At 50,000 images and
    20,000 concepts the whole matrix is 4 GB; the embeddings are 140 MB."""

    def __init__(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                 device: "torch.device | str | None" = None):
        self.device = torch.device(device or "cpu")
        self.img = F.normalize(image_emb.float(), dim=-1).to(self.device)   # [n, d]
        self.txt = F.normalize(text_emb.float(), dim=-1).to(self.device)    # [c, d]
        self.shape = torch.Size((self.img.shape[0], self.txt.shape[0]))
        self._lse: dict[float, torch.Tensor] = {}   # a -> [n, 1]: every scorer call of a layer reuses it

    def dim(self) -> int:
        return 2

    @torch.no_grad()
    def columns(self, c0: int, c1: int, on_device: bool = False) -> torch.Tensor:
        """[n, c1 - c0] float32 on the CPU (on_device: where the embeddings are)."""
        out = self.img @ self.txt[c0:c1].T
        return out if on_device else out.cpu()

    @torch.no_grad()
    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[len(rows), len(cols)] float32 on the CPU (rows: indices or a bool mask over images)."""
        return (self.img[rows.to(self.device)] @ self.txt[cols.to(self.device)].T).cpu()


def similarity_columns(sim: "torch.Tensor | Similarity", c0: int, c1: int, on_device: bool = False) -> torch.Tensor:
    """Columns c0:c1 of a similarity, dense [n, c] or streamed (`Similarity`): [n, c1 - c0]
    (a streamed one's on its device with on_device, else on the CPU)."""
    return sim.columns(c0, c1, on_device) if isinstance(sim, Similarity) else sim[:, c0:c1].float()


def logsumexp_rows(sim: "torch.Tensor | Similarity", a: float, tile: int = 4096) -> torch.Tensor:
    """log sum_c exp(a * sim[i, c]) -> [n, 1], one column tile at a time."""
    if not isinstance(sim, Similarity):
        return torch.logsumexp(a * sim.float(), dim=1, keepdim=True)
    if a not in sim._lse:
        out = torch.full((sim.shape[0], 1), -math.inf, device=sim.device)
        for c0 in range(0, sim.shape[1], tile):
            cols = sim.columns(c0, c0 + tile, on_device=True)
            out = torch.logaddexp(out, torch.logsumexp(a * cols, dim=1, keepdim=True))
        sim._lse[a] = out.cpu()
    return sim._lse[a]


# --------------------------------------------------------------------------------------------
# CLIP-Dissect: fast versions


def membership_weights(top_k: int, p_start: float = 0.998, p_end: float = 0.97) -> torch.Tensor:
    """soft_wpmi's weight of the r-th most activating image, r = 0..top_k-1 (published code)."""
    return p_start - (torch.arange(start=0, end=top_k) / top_k * (p_start - p_end))


def _check_acts(sim: torch.Tensor, acts: torch.Tensor, top_k: Optional[int] = None) -> None:
    if sim.dim() != 2 or acts.dim() != 2 or sim.shape[0] != acts.shape[0]:
        raise BadInput(
            f"similarities {tuple(sim.shape)} and activations {tuple(acts.shape)} must be "
            "[n_images, concepts] and [n_images, units] over the same images.")
    if top_k is not None and not 1 <= top_k <= sim.shape[0]:
        raise BadParameter(f"top_k={top_k} must be between 1 and the number of images "
                           f"({sim.shape[0]}).")


@torch.no_grad()
def _sum_log_factors(
    sim: torch.Tensor,
    acts: torch.Tensor,
    top_k: int,
    a: float,
    coef_a: torch.Tensor,   # [top_k]: factor = coef_a[r] + coef_b[r] * p(concept | image)
    coef_b: torch.Tensor,   # [top_k]
    concept_chunk: Optional[int] = None,
    progress: bool = False,
    unit_chunk: Optional[int] = None,
) -> torch.Tensor:
    """sum_r log(coef_a[r] + coef_b[r] * softmax(a * sim)[top_r(unit), c]) -> [units, concepts]
    float64.

    Sums of logs are computed as logs of products of G consecutive factors (G from the smallest
    factor in the tile, so a product stays above 1e-30 and cannot underflow float32), over
    concept tiles: the softmax of a tile comes from each row's log-sum-exp, and for each group
    of G ranks a block of units' images is gathered at once ([G * units, tile] in one
    index_select). Tiles are spread over torch.get_num_threads() Python threads. The sums are
    kept in float64: log p(c | unit) is a sum of 100 terms around -5, so its float32 rounding
    alone would be ~1e-4."""
    n, n_concepts = sim.shape
    n_units = acts.shape[1]
    if float(coef_b.min()) <= 0 or float(coef_a.min()) <= 0:
        raise BadParameter("membership weights must lie in (0, 1] and min_prob must be > 0.")
    if isinstance(sim, Similarity) and sim.device.type != "cpu":
        return _sum_log_factors_on(sim.device, sim, acts, top_k, a, coef_a, coef_b, progress)
    # topk along rows of the transposed matrix: same indices as topk over dim 0, ~10x faster.
    inds = torch.topk(acts.float().T.contiguous(), dim=1, k=top_k)[1].T.contiguous()  # [top_k, u]
    lse = logsumexp_rows(sim, a)                                 # [n, 1] softmax denominators
    ca, cb = coef_a.double(), coef_b.double()
    # a_r + b_r p = b_r (p + a_r / b_r): the b_r factor out as one constant, sum_r log b_r,
    # added at the end, which saves a multiplication per gathered value.
    kappa = (ca / cb).float().view(-1, 1, 1)                      # [top_k, 1, 1]
    out = torch.zeros(n_units, n_concepts, dtype=torch.float64)  # [units, concepts]
    if concept_chunk is None:
        concept_chunk = 32
    if unit_chunk is None:
        # ~350k gathered values per operation: few Python round trips, temporaries in cache.
        unit_chunk = max(1, (1 << 20) // (3 * 11 * concept_chunk))
    ka = ca / cb

    def score_block(b0: int) -> None:
        b1 = min(b0 + concept_block, n_concepts)
        # p(concept | image) for a block of concepts in three large operations; the tiles
        # below are column views of it, gathered from directly.
        block = torch.exp(a * similarity_columns(sim, b0, b1) - lse)  # [n, block]
        f_min = float((ka + float(block.min())).min())
        f_max = float(ka.max()) + 1.0
        # G factors in [f_min, f_max] multiply to a number in [1e-30, 1e30]: no under/overflow
        # in float32.
        group = max(1, int(math.floor(30.0 / max(-math.log10(f_min), math.log10(f_max), 1e-9))))
        group = min(group, top_k)
        for c0 in range(b0, b1, concept_chunk):
            c1 = min(c0 + concept_chunk, b1)
            probs = block[:, c0 - b0 : c1 - b0]                   # [n, cc] view
            for u0 in range(0, n_units, unit_chunk):
                u1 = min(u0 + unit_chunk, n_units)
                tile = out[u0:u1, c0:c1]
                for r0 in range(0, top_k, group):
                    r1 = min(top_k, r0 + group)
                    g = probs.index_select(0, inds[r0:r1, u0:u1].reshape(-1))  # [(r1-r0)*uc, cc]
                    g = g.view(r1 - r0, u1 - u0, c1 - c0)
                    g.add_(kappa[r0:r1])                          # p + a_r / b_r
                    tile.add_(g.prod(dim=0).log_())               # [uc, cc]

    concept_block = max(concept_chunk, 1024)
    starts = list(range(0, n_concepts, concept_block))
    bar = progress_bar(len(starts), "scoring concepts", "block", progress)
    # Parallelism: one Python thread per core, each scoring its own concept tiles with
    # single-threaded torch ops (torch releases the GIL inside ops). Intra-op threading would
    # put a barrier after every small op; on a busy shared machine one preempted thread then
    # stalls the other, which made the 2-thread intra-op version 30x slower than 1 thread.
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    intra = torch.get_num_threads()
    try:
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(score_block, starts):
                    bar.update(1)
        else:
            for b0 in starts:
                score_block(b0)
                bar.update(1)
    finally:
        torch.set_num_threads(intra)
        bar.close()
    out.add_(float(torch.log(cb).sum()))
    return out


@torch.no_grad()
def _sum_log_factors_on(device: torch.device, sim: "torch.Tensor | Similarity", acts: torch.Tensor, top_k: int,
                        a: float, coef_a: torch.Tensor, coef_b: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """`_sum_log_factors` on a GPU (any device; the CPU keeps the threaded version above): for a
    block of concepts, every unit's top_k images gathered at once ([top_k, u, block], the block
    sized to the device's free memory), one log per factor in float32, summed in float64 (the
    rounding of each log is ~1e-7 of a term around -5). Returns [u, c] float64 on the CPU."""
    from .devices import chunk_rows

    n, n_concepts = sim.shape
    n_units = acts.shape[1]
    inds = torch.topk(acts.float().to(device).T, dim=1, k=top_k)[1].T.reshape(-1)   # [top_k * u]
    lse = logsumexp_rows(sim, a).to(device)                                          # [n, 1]
    ca, cb = coef_a.double(), coef_b.double()
    kappa = (ca / cb).float().to(device).view(-1, 1, 1)                                # [top_k, 1, 1]
    out = torch.empty(n_units, n_concepts, dtype=torch.float64, device=device)         # [u, c]
    # per concept: the gathered factors (float32), their logs and the float64 copy
    block = min(n_concepts, chunk_rows(device, top_k * n_units * 16, fraction=0.25))
    starts = range(0, n_concepts, block)
    bar = progress_bar(len(starts), "scoring concepts", "block", progress)
    for c0 in starts:
        c1 = min(c0 + block, n_concepts)
        cols = similarity_columns(sim, c0, c1, on_device=True).to(device)              # [n, b]
        probs = torch.exp(a * cols - lse)                                              # [n, b]
        g = probs.index_select(0, inds).view(top_k, n_units, c1 - c0)                 # [top_k, u, b]
        out[:, c0:c1] = g.add_(kappa).log_().double().sum(0)                           # [u, b]
        bar.update(1)
    bar.close()
    return out.add_(float(torch.log(cb).sum())).cpu()


@torch.no_grad()
def soft_wpmi(
    sim: torch.Tensor,
    acts: torch.Tensor,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
    concept_chunk: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """CLIP-Dissect's SoftWPMI. sim: image-concept cosine similarities [n, c]; acts: pooled
    activations [n, u] of all units of one layer. Returns [u, c] (higher = better).

    log p(c | unit) = sum_r log(1 + w_r (p(c | img_r) - 1) + min_prob) over the unit's top_k
    images img_r, with p(c | img) = softmax over concepts of a * sim and membership weights w_r
    from p_start down toward p_end; log p(c) = log mean over units of p(c | unit);
    score = log p(c | unit) - lam * log p(c). lam=None: log p(c | unit) itself, float64
    (`log_p_given_unit`)."""
    _check_acts(sim, acts, top_k)
    if not (0 <= p_end <= 1 and 0 <= p_start <= 1):
        raise BadParameter(f"p_start={p_start} and p_end={p_end} must lie in [0, 1].")
    w = membership_weights(top_k, p_start, p_end).double()
    # 1 + w (p - 1) + min_prob  ==  w p + (1 - w + min_prob), without the cancellation of p - 1
    log_p = _sum_log_factors(sim, acts, top_k, a, 1 - w + min_prob, w, concept_chunk, progress)
    return log_p if lam is None else _pmi(log_p, lam)


@torch.no_grad()
def wpmi(
    sim: torch.Tensor,
    acts: torch.Tensor,
    top_k: int = 28,
    a: float = 2.0,
    lam: float = 0.6,
    min_prob: float = 1e-7,
    concept_chunk: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """CLIP-Dissect's WPMI: log p(c | unit) = sum over the top_k images of log(p(c | img) +
    min_prob); p(c) and the score as in `soft_wpmi` (lam=None: log p(c | unit)). Returns [u, c]."""
    _check_acts(sim, acts, top_k)
    ones = torch.ones(top_k, dtype=torch.float64)
    log_p = _sum_log_factors(sim, acts, top_k, a, ones * min_prob, ones, concept_chunk, progress)
    return log_p if lam is None else _pmi(log_p, lam)


def log_p_given_unit(name: str, inputs: dict[str, Any], params: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """soft_wpmi's or wpmi's log p(c | unit), [u, c] float64, before the PMI step: its scores are
    `pmi(log_p, lam)`, and trust's null reuses it for p(c) instead of scoring the units again."""
    if name not in PMI_SCORERS:
        raise BadParameter(f"log p(c | unit) is soft_wpmi's or wpmi's, not '{name}'s.")
    return get_scorer(name).fn(inputs, **{**resolve_params(name, params), "lam": None})


def pmi(log_p: torch.Tensor, lam: float) -> torch.Tensor:
    """[u, c] float64 log p(c | unit) -> the PMI scores, float32 (log_p is left as it is)."""
    return _pmi(log_p.clone(), lam)


def _pmi(log_p: torch.Tensor, lam: float) -> torch.Tensor:
    # log p(c) = logsumexp over units - log(units): the mean over units of p(c | unit).
    # In float64: the result is a small difference of two numbers around -500.
    log_pd = torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(log_p.shape[0])
    return log_p.sub_(lam * log_pd).float()


@torch.no_grad()
def cos_cubed(
    sim: torch.Tensor,
    acts: torch.Tensor,
    min_norm: float = 1e-3,
    concept_chunk: int = 4096,
) -> torch.Tensor:
    """CLIP-Dissect's cos_similarity_cubed: centre each concept's and each unit's column over
    images, cube, L2-normalise over images (norm clipped below at min_norm), and take the
    cosine. Returns [u, c], bounded in [-1, 1]."""
    _check_acts(sim, acts)
    # on the similarity's device (a GPU: the [u, n] x [n, tile] products are the whole cost)
    device = sim.device if isinstance(sim, Similarity) else torch.device("cpu")
    t = acts.float().to(device)
    t = (t - t.mean(dim=0, keepdim=True)).pow_(3)
    t = t / torch.clip(torch.norm(t, p=2, dim=0, keepdim=True), min_norm)   # [n, u]
    out = torch.empty(acts.shape[1], sim.shape[1], device=device)
    for c0 in range(0, sim.shape[1], concept_chunk):
        c = similarity_columns(sim, c0, c0 + concept_chunk, on_device=True)  # [n, tile]
        c = (c - c.mean(dim=0, keepdim=True)).pow_(3)
        c = c / torch.clip(torch.norm(c, p=2, dim=0, keepdim=True), min_norm)
        torch.matmul(t.T, c, out=out[:, c0 : c0 + concept_chunk])
    return out.cpu()


# --------------------------------------------------------------------------------------------
# CLIP-Dissect: direct transcriptions of the published code (for tests and the benchmark). Kept
# line for line as published, so soft_wpmi and wpmi repeat each other on purpose: they are the
# oracle the streamed scorers above are tested against, not code to factor.


@torch.no_grad()
def _soft_wpmi_reference(clip_feats, target_feats, top_k=100, a=10, lam=1, min_prob=1e-7,
                         p_start=0.998, p_end=0.97):
    """similarity.soft_wpmi of CLIP-Dissect, transcribed (CUDA calls and prints removed)."""
    clip_feats = torch.nn.functional.softmax(a * clip_feats, dim=1)
    inds = torch.topk(target_feats, dim=0, k=top_k)[1]
    prob_d_given_e = []
    p_in_examples = p_start - (torch.arange(start=0, end=top_k) / top_k * (p_start - p_end)).unsqueeze(1)
    for orig_id in range(target_feats.shape[1]):
        curr_clip_feats = clip_feats.gather(0, inds[:, orig_id:orig_id + 1].expand(-1, clip_feats.shape[1]))
        curr_p_d_given_e = 1 + p_in_examples * (curr_clip_feats - 1)
        curr_p_d_given_e = torch.sum(torch.log(curr_p_d_given_e + min_prob), dim=0, keepdim=True)
        prob_d_given_e.append(curr_p_d_given_e)
    prob_d_given_e = torch.cat(prob_d_given_e, dim=0)
    prob_d = (torch.logsumexp(prob_d_given_e, dim=0, keepdim=True)
              - torch.log(prob_d_given_e.shape[0] * torch.ones([1])))
    return prob_d_given_e - lam * prob_d


@torch.no_grad()
def _wpmi_reference(clip_feats, target_feats, top_k=28, a=2, lam=0.6, min_prob=1e-7):
    """similarity.wpmi of CLIP-Dissect, transcribed."""
    clip_feats = torch.nn.functional.softmax(a * clip_feats, dim=1)
    inds = torch.topk(target_feats, dim=0, k=top_k)[1]
    prob_d_given_e = []
    for orig_id in range(target_feats.shape[1]):
        curr_clip_feats = clip_feats.gather(0, inds[:, orig_id:orig_id + 1].expand(-1, clip_feats.shape[1]))
        curr_p_d_given_e = torch.sum(torch.log(curr_clip_feats + min_prob), dim=0, keepdim=True)
        prob_d_given_e.append(curr_p_d_given_e)
    prob_d_given_e = torch.cat(prob_d_given_e, dim=0)
    prob_d = (torch.logsumexp(prob_d_given_e, dim=0, keepdim=True)
              - torch.log(prob_d_given_e.shape[0] * torch.ones([1])))
    return prob_d_given_e - lam * prob_d


@torch.no_grad()
def _cos_cubed_reference(clip_feats, target_feats, batch_size=10000, min_norm=1e-3):
    """similarity.cos_similarity_cubed of CLIP-Dissect, transcribed."""
    clip_feats = clip_feats - torch.mean(clip_feats, dim=0, keepdim=True)
    target_feats = target_feats - torch.mean(target_feats, dim=0, keepdim=True)
    clip_feats = clip_feats ** 3
    target_feats = target_feats ** 3
    clip_feats = clip_feats / torch.clip(torch.norm(clip_feats, p=2, dim=0, keepdim=True), min_norm)
    target_feats = target_feats / torch.clip(torch.norm(target_feats, p=2, dim=0, keepdim=True), min_norm)
    similarities = []
    for t_i in range(math.ceil(target_feats.shape[1] / batch_size)):
        curr_similarities = []
        curr_target = target_feats[:, t_i * batch_size:(t_i + 1) * batch_size].T
        for c_i in range(math.ceil(clip_feats.shape[1] / batch_size)):
            curr_similarities.append(curr_target @ clip_feats[:, c_i * batch_size:(c_i + 1) * batch_size])
        similarities.append(torch.cat(curr_similarities, dim=1))
    return torch.cat(similarities, dim=0)


# --------------------------------------------------------------------------------------------
# patch


@torch.no_grad()
def patch_scores(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    unit_patches: torch.Tensor,
    unit_weights: Optional[torch.Tensor] = None,
    mode: str = "diff",
) -> torch.Tensor:
    """The patch method: how much closer a unit's top patches are to a concept than patches in
    general are.

    patch_emb [P, d]: the patches the contrast is over (the dissect gives each layer its own, so a
    unit's scores do not depend on the other layers of the run); text_emb [c, d]; unit_patches
    [u, k]: indices into patch_emb of each unit's top-k patches (-1 pads units with fewer);
    unit_weights [u, k]: their activations (negatives count as 0; all-zero rows fall back to equal
    weights).

    mode 'diff' (default): activation-weighted mean cos(unit patch, concept) minus the mean
    cos(any patch, concept). The contrast stops generic concepts that sit close to every patch
    ("photo", "image", "thing") from winning for every unit.
    mode 'z': the same difference divided by the standard deviation of cos(any patch, concept),
    so concepts whose similarity varies little across patches are not penalised.

    Cosine similarity is linear in the patch vector, so the weighted mean of similarities is the
    similarity to the weighted mean patch: [u, d] x [d, c] instead of gathering [u, k, c]."""
    if mode not in ("diff", "z"):
        raise BadParameter(f"patch mode '{mode}' is not known; use 'diff' or 'z'.")
    if unit_patches.dim() != 2:
        raise BadInput(f"unit_patches must be [units, k] indices, got {tuple(unit_patches.shape)}.")
    P = F.normalize(patch_emb.float(), dim=-1)                    # [P, d]
    T = F.normalize(text_emb.float(), dim=-1)                     # [c, d]
    idx = unit_patches.long()
    valid = idx >= 0
    if idx.numel() and int(idx.max()) >= P.shape[0]:
        raise BadInput(f"unit_patches refers to patch {int(idx.max())} but only {P.shape[0]} "
                       "patch embeddings were given.")
    w = torch.ones(idx.shape) if unit_weights is None else unit_weights.float().clamp(min=0)
    w = w * valid
    empty = w.sum(dim=1, keepdim=True) == 0
    w = torch.where(empty, valid.float(), w)
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)           # [u, k] rows sum to 1
    unit_mean = torch.einsum("uk,ukd->ud", w, P[idx.clamp(min=0)])  # [u, d]
    all_mean = P.mean(dim=0, keepdim=True)                        # [1, d]
    scores = (unit_mean - all_mean) @ T.T                         # [u, c]
    if mode == "z":
        centred = P - all_mean
        cov = centred.T @ centred / max(1, P.shape[0] - 1)          # [d, d]
        sd = torch.sqrt(torch.einsum("cd,de,ce->c", T, cov, T).clamp(min=1e-12))
        scores = scores / sd
    # Units without any patch have no evidence: the lowest score.
    scores[~valid.any(dim=1)] = float("nan")
    return scores


@torch.no_grad()
def top_image_scores(sim: "torch.Tensor | Similarity", peak: torch.Tensor, top_k: int = 50,
                     chunk: int = 256) -> torch.Tensor:
    """The patch method at the level of whole images, which needs no crops: how much closer a
    unit's top-k images (by its per-image max activation, as top images are chosen everywhere)
    are to a concept than the probe images in general are: mean cos(top image, concept) minus
    the concept's mean cos over all images.

    sim [n, c] image-concept cosine, dense or streamed (`Similarity`: then through the
    embeddings, since the mean of cosines with unit vectors is the cosine with their mean:
    [u, d] x [d, c], never [u, k, c]); peak [n, u]. Why beside `patch`: it reads more of a
    unit's images than the k crops a dissect cuts per unit (a crop costs an encoding; the whole
    images are encoded in the pass anyway), and on the fast probe worlds the label of the top
    50 agreed with the mask-IoU reference more often than patch's top 10 (README, "Confidence
    and fidelity")."""
    n, u = peak.shape
    if sim.shape[0] != n:
        raise BadInput(f"similarity has {sim.shape[0]} images but the activations {n}.")
    top = torch.topk(peak.float(), min(top_k, n), dim=0).indices.T          # [u, k]
    out = []
    if isinstance(sim, Similarity):
        img = sim.img                                                       # [n, d] normalised
        base = img.mean(0)                                                  # [d]
        for u0 in range(0, u, chunk):
            t = top[u0 : u0 + chunk].to(img.device)
            out.append(((img[t].mean(1) - base) @ sim.txt.T).cpu())         # [b, c]
    else:
        s = sim.float()
        base = s.mean(0)                                                    # [c]
        for u0 in range(0, u, chunk):
            out.append(s[top[u0 : u0 + chunk]].mean(1) - base)              # [b, k, c] -> [b, c]
    return torch.cat(out) if out else torch.zeros(0, sim.shape[1])


def own_patches(patch_emb: torch.Tensor, unit_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's inputs to `patch_scores`: (the patches its units have [p, d], unit_patches
    [u, k] re-indexed into them, -1 kept). `patch_scores` contrasts with every patch it is given,
    so a layer given its own gets scores that do not depend on the other layers of the run."""
    idx = unit_patches.long()
    have = idx >= 0
    own = torch.unique(idx[have])                                 # [p] sorted indices into patch_emb
    local = torch.full_like(idx, -1)
    local[have] = torch.searchsorted(own, idx[have])
    return patch_emb[own], local


def _patch_scores_reference(patch_emb, text_emb, unit_patches, unit_weights=None):
    """Direct form of mode 'diff', for tests: gather every similarity, average, subtract."""
    P = F.normalize(patch_emb.float(), dim=-1)
    T = F.normalize(text_emb.float(), dim=-1)
    sims = P @ T.T                                                # [P, c]
    out = torch.empty(unit_patches.shape[0], T.shape[0])
    for u in range(unit_patches.shape[0]):
        keep = unit_patches[u] >= 0
        idx = unit_patches[u][keep]
        w = (torch.ones(len(idx)) if unit_weights is None
             else unit_weights[u][keep].float().clamp(min=0))
        if w.sum() == 0:
            w = torch.ones(len(idx))
        out[u] = (w[:, None] * sims[idx]).sum(0) / w.sum() - sims.mean(0)
    return out


def greedy_cover(describes: torch.Tensor, min_gain: float = 0.25, max_size: int = 4) -> tuple[list[int], list[float], float]:
    """An explanation SET from how well each concept describes each of a unit's top items
    (describes [k, c] in [0, 1], 1 for an item's best concept): a set covers an item by its best
    member; concepts are added by largest gain in mean coverage while a gain is at least
    `min_gain` x the coverage so far (a unit that detects two things has two halves of its items
    to cover; one that detects one thing gains little from a second word).
    Returns (concept indices, their gains, coverage)."""
    cover = torch.zeros(describes.shape[0])  # [k]
    chosen, gains = [], []
    while len(chosen) < max_size:
        gain = (torch.maximum(describes, cover[:, None]) - cover[:, None]).mean(0)  # [c]
        c = int(gain.argmax())
        if chosen and float(gain[c]) < min_gain * float(cover.mean()):
            break
        chosen.append(c)
        gains.append(float(gain[c]))
        cover = torch.maximum(cover, describes[:, c])
    return chosen, gains, float(cover.mean())


@torch.no_grad()
def cover_sets(patch_emb: torch.Tensor, text_emb: torch.Tensor, unit_patches: torch.Tensor, *,
               temperature: float = 0.05, min_gain: float = 0.25, max_size: int = 4,
               all_emb: Optional[torch.Tensor] = None) -> list[tuple[list[int], list[float], float]]:
    """Explanation SETS by the patch method (`greedy_cover` of each unit's top patches). A concept
    describes a patch by exp((s - s_best) / temperature), s = cos(patch, concept) minus the
    concept's mean cos over all patches (the contrast of `patch_scores`) and s_best the patch's
    best s: 1 for its best concept, near 1 for a word that describes it almost as well ('red' and
    'red circle' for a red circle; a softmax would split the patch between them).
    patch_emb [P, d]; text_emb [c, d]; unit_patches [u, k] (-1 pads); all_emb [Q, d]: the
    patches the contrast is over (default patch_emb). Returns per unit (concept indices, gains,
    coverage); ([], [], 0.0) for a unit without patches."""
    if unit_patches.dim() != 2:
        raise BadInput(f"unit_patches must be [units, k] indices, got {tuple(unit_patches.shape)}.")
    P = F.normalize(patch_emb.float(), dim=-1)                    # [P, d]
    T = F.normalize(text_emb.float(), dim=-1)                     # [c, d]
    base = (F.normalize(all_emb.float(), dim=-1) if all_emb is not None else P).mean(0) @ T.T  # [c]
    out = []
    for row in unit_patches.long():
        idx = row[row >= 0]
        if len(idx) == 0:
            out.append(([], [], 0.0))
            continue
        s = P[idx] @ T.T - base                                            # [k, c]
        out.append(greedy_cover(torch.exp((s - s.amax(1, keepdim=True)) / temperature), min_gain, max_size))
    return out


# --------------------------------------------------------------------------------------------
# iou (Network Dissection)


class TopQuantile:
    """Streaming per-unit threshold T_u with P(a_u > T_u) = top_fraction over all activation
    values of all images (Network Dissection: top_fraction = 0.005), exact.

    It keeps each unit's ceil(top_fraction * total) largest values, so `total` (images x h x w
    of the raw maps, before upsampling, as Network Dissection does) must be known up front."""

    def __init__(self, n_units: int, total: int, top_fraction: float = 0.005):
        if not 0 < top_fraction < 1:
            raise BadParameter(f"top_fraction={top_fraction} must lie in (0, 1).")
        self.k = max(1, int(math.ceil(top_fraction * total)))
        self.n_units = n_units
        self.total = total
        self.seen = 0
        self.top = torch.full((n_units, 0), float("-inf"))      # [units, <=k]

    @torch.no_grad()
    def update(self, act_maps: torch.Tensor) -> None:
        """act_maps: [b, units, h, w] (or [b, units, tokens])."""
        flat = act_maps.float().transpose(0, 1).reshape(self.n_units, -1)  # [units, b*h*w]
        self.seen += flat.shape[1]
        both = torch.cat([self.top, flat], dim=1)
        k = min(self.k, both.shape[1])
        self.top = torch.topk(both, k=k, dim=1).values

    def thresholds(self) -> torch.Tensor:
        """[units]: the k-th largest value of each unit."""
        if self.top.shape[1] == 0:
            raise BadInput("no activations were given to the threshold estimator.")
        return self.top[:, -1].clone()


class IoUAccumulator:
    """Network Dissection IoU, streamed over image batches: per unit and concept, the summed
    intersection and union over all images of (upsampled map > T_u) and the concept's mask;
    IoU = sum |M_u & L_c| / sum |M_u | L_c|, the dataset-level IoU of the paper."""

    def __init__(self, thresholds: torch.Tensor, n_concepts: int, max_values: int = 1 << 24):
        self.thr = thresholds.float().view(1, -1, 1, 1)           # [1, units, 1, 1]
        self.n_units = thresholds.numel()
        self.n_concepts = n_concepts
        self.inter = torch.zeros(self.n_units, n_concepts, dtype=torch.float64)
        self.act_area = torch.zeros(self.n_units, dtype=torch.float64)
        self.mask_area = torch.zeros(n_concepts, dtype=torch.float64)
        # Upsampled maps of all units for a few images at a time: at most max_values floats
        # (64 MB) per step, whatever the batch size the caller streams.
        self.max_values = max_values

    @torch.no_grad()
    def update(self, act_maps: torch.Tensor, masks: torch.Tensor) -> None:
        """act_maps [b, units, h, w] raw; masks [b, concepts, H, W] bool, or a label map
        [b, H, W] int64 (each pixel's one concept index, -1 for none: encoder_iou's pseudo-masks,
        which at 20,000 concepts would not fit as bool planes). Maps are upsampled bilinearly to
        the mask size, then thresholded."""
        labels = masks.dim() == 3 and masks.dtype != torch.bool
        if act_maps.dim() != 4 or masks.dim() != (3 if labels else 4) or act_maps.shape[0] != masks.shape[0]:
            raise BadInput(f"act_maps {tuple(act_maps.shape)} and masks {tuple(masks.shape)} "
                           "must be [b, units, h, w] and [b, concepts, H, W] (or a [b, H, W] label map) "
                           "for the same images.")
        if act_maps.shape[1] != self.n_units or (not labels and masks.shape[1] != self.n_concepts):
            raise BadInput(f"expected {self.n_units} units and {self.n_concepts} concepts, got "
                           f"{act_maps.shape[1]} and {'a label map' if labels else masks.shape[1]}.")
        H, W = masks.shape[-2:]
        per_image = H * W
        step = max(1, self.max_values // (per_image * (self.n_units if labels else max(self.n_units, self.n_concepts))))
        for i in range(0, act_maps.shape[0], step):
            a = act_maps[i : i + step].float()
            if a.shape[-2:] != (H, W):
                a = F.interpolate(a, size=(H, W), mode="bilinear", align_corners=False)
            on = (a > self.thr).transpose(0, 1).reshape(self.n_units, -1).float()   # [u, px]
            if labels:   # each pixel counts for its one concept
                lab = masks[i : i + step].reshape(-1).long()
                keep = lab >= 0
                self.inter.index_add_(1, lab[keep], on[:, keep].double())
                self.mask_area += torch.bincount(lab[keep], minlength=self.n_concepts).double()
            else:
                m = masks[i : i + step].transpose(0, 1).reshape(self.n_concepts, -1).float()  # [c, px]
                # 0/1 products summed in float32 are exact below 2**24 pixels per chunk.
                self.inter += (on @ m.T).double()
                self.mask_area += m.sum(dim=1).double()
            self.act_area += on.sum(dim=1).double()

    def result(self) -> torch.Tensor:
        """[units, concepts] IoU in [0, 1] (0 where both unit and concept are empty)."""
        union = self.act_area[:, None] + self.mask_area[None, :] - self.inter
        return torch.where(union > 0, self.inter / union.clamp(min=1), 0.0).float()


def iou_scores(act_maps: torch.Tensor, masks: torch.Tensor, top_fraction: float = 0.005,
               batch_size: int = 64, n_concepts: Optional[int] = None) -> torch.Tensor:
    """In-memory convenience: thresholds from all maps, then the streamed IoU. [u, c]. masks as
    IoUAccumulator.update takes them; a label map needs `n_concepts`."""
    tq = TopQuantile(act_maps.shape[1], act_maps[:, 0].numel(), top_fraction)
    for i in range(0, act_maps.shape[0], batch_size):
        tq.update(act_maps[i : i + batch_size])
    acc = IoUAccumulator(tq.thresholds(), n_concepts or masks.shape[1])
    for i in range(0, act_maps.shape[0], batch_size):
        acc.update(act_maps[i : i + batch_size], masks[i : i + batch_size])
    return acc.result()


CELL_GRID = 4          # encoder_iou: cells per side of an image
CELL_RESOLUTION = 32   # encoder_iou: the side its label maps (and the upsampled unit maps) are compared at


def border_cells(grid: int) -> list[tuple[int, int]]:
    """The (row, column) cells on a grid's border, row by row (images.CellWindows' second windows)."""
    return [(gy, gx) for gy in range(grid) for gx in range(grid) if min(gy, gx) == 0 or max(gy, gx) == grid - 1]


def cell_windows(grid: int) -> int:
    """Windows per image of images.CellWindows: one per cell, one more per border cell."""
    return grid * grid + len(border_cells(grid))


@torch.no_grad()
def cell_concepts(cell_emb: torch.Tensor, text_emb: torch.Tensor, baseline: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """encoder_iou's pseudo-masks: each cell's one concept. cell_emb [b, g*g, d] (the encoder's
    embedding of a window around each cell, images.CellWindows), text_emb [c, d], baseline [c]
    (the concept's mean cosine over the whole probe images) -> [b, g, g] int64: per cell the
    concept whose cosine with it exceeds its baseline most. With CellWindows' second windows of
    the border cells after the g*g (cell_emb [b, g*g + len(border_cells(g)), d]), a border cell
    takes the concept of whichever of its two windows exceeds its baseline more. The baseline
    does what the patch method's contrast does: a concept close to every image ("photo") does
    not win every cell. It is the whole images' mean, known after the one pass, not the cells' own mean, which would
    need every cell encoded before any is labelled; on the fast probe worlds the two agreed with
    the mask-IoU reference alike on the watermark and dot worlds, the images' mean better on the
    frame worlds."""
    b, cells, _ = cell_emb.shape
    e = F.normalize(cell_emb.float().reshape(b * cells, -1), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    out = torch.empty(b * cells, dtype=torch.long)
    val = torch.empty(b * cells)
    for i in range(0, len(e), chunk):   # [chunk, c] at a time: 20,000 concepts stay small
        v, k = (e[i : i + chunk] @ t.T - baseline.float()).max(dim=1)
        out[i : i + chunk], val[i : i + chunk] = k.cpu(), v.float().cpu()
    g = next(g for g in range(1, cells + 1) if cells in (g * g, cell_windows(g)))   # the layout fixes the grid
    out, val = out.view(b, cells), val.view(b, cells)
    lab = out[:, : g * g].clone()
    if cells > g * g:   # border cells: the window (repeated edge or shifted inside) with the higher best contrast
        idx = torch.tensor([gy * g + gx for gy, gx in border_cells(g)])
        better = val[:, g * g :] > val[:, idx]
        lab[:, idx] = torch.where(better, out[:, g * g :], lab[:, idx])
    return lab.view(b, g, g)


def label_map(cells: torch.Tensor, size: int = CELL_RESOLUTION) -> torch.Tensor:
    """[b, g, g] cell concepts -> [b, size, size] (each cell's label over its pixels)."""
    g = cells.shape[-1]
    rep = -(-size // g)
    return cells.repeat_interleave(rep, dim=1).repeat_interleave(rep, dim=2)[:, :size, :size]


def encoder_iou_scores(act_maps: torch.Tensor, cell_emb: torch.Tensor, text_emb: torch.Tensor,
                       baseline: torch.Tensor, top_fraction: float = 0.005, batch_size: int = 64) -> torch.Tensor:
    """In-memory convenience (the pipeline streams the same): Network Dissection IoU of each
    unit's top region against the encoder's pseudo-masks (cell_concepts). [u, c]."""
    labels = label_map(cell_concepts(cell_emb, text_emb, baseline))
    return iou_scores(act_maps, labels, top_fraction, batch_size, n_concepts=text_emb.shape[0])


# --------------------------------------------------------------------------------------------
# confidence


@torch.no_grad()
def confidence(scores: torch.Tensor, unit_chunk: int = 1024) -> torch.Tensor:
    """[u, c] raw scores -> [u, c] within-unit confidence in [0, 1]: Phi(robust z) ** C per unit
    (module doc; stored explanations carry trust's calibrated confidence instead).
    NaN scores get 0; a unit whose scores are all equal gets 0 everywhere."""
    n_units, n_concepts = scores.shape
    out = torch.zeros(n_units, n_concepts, dtype=torch.float32)
    for u0 in range(0, n_units, unit_chunk):
        s = scores[u0 : u0 + unit_chunk].double()
        nan = torch.isnan(s)
        s_f = torch.where(nan, torch.nanmedian(s, dim=1, keepdim=True).values.nan_to_num(0.0), s)
        med = s_f.median(dim=1, keepdim=True).values
        mad = (s_f - med).abs().median(dim=1, keepdim=True).values * 1.4826
        sd = s_f.std(dim=1, keepdim=True, unbiased=False) if n_concepts > 1 else torch.zeros_like(med)
        scale = torch.where(mad > 1e-12 * (1 + med.abs()), mad, sd)
        z = (s_f - med) / scale.clamp(min=1e-300)
        conf = torch.exp(n_concepts * torch.special.log_ndtr(z))
        conf = torch.where((scale <= 0).expand_as(conf) | nan, 0.0, conf)
        out[u0 : u0 + unit_chunk] = conf.float()
    return out


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Scorer:
    """A scorer and what it takes. `inputs` lists each input as its alternatives ('a|b+c': a,
    or b and c); a pipeline provides the first of each (`needs`) and computes only what the
    scorers of a run need (module doc: pipeline inputs). `prepare` fits the parameters to the
    probe set once its size is known. `opt_in`: run only when asked for by name, not by default."""

    name: str
    fn: Callable[..., torch.Tensor]
    defaults: dict[str, Any]
    inputs: tuple[str, ...]
    description: str
    uses_encoder: bool = True
    prepare: Optional[Callable[[dict[str, Any], int], dict[str, Any]]] = None
    opt_in: bool = False

    def needs(self) -> frozenset[str]:
        """The inputs a pipeline provides: the first alternative of each declared input."""
        return frozenset(p for i in self.inputs for p in i.split("|")[0].split("+"))

    def needs_masks(self) -> bool:
        """Whether it scores against per-pixel concept masks (which only the probe world has)."""
        return "iou_scores" in self.needs()

    def needs_thresholds(self) -> bool:
        """Whether it thresholds units at their top `top_fraction` (a Network Dissection IoU)."""
        return bool({"iou_scores", "encoder_iou_scores"} & self.needs())

    def prepared(self, params: dict[str, Any], n_images: int) -> dict[str, Any]:
        """`params` fitted to a probe set of `n_images` images."""
        return self.prepare(params, n_images) if self.prepare else dict(params)


@dataclass
class ScoreResult:
    """One scorer's output: raw [units, concepts] scores, their confidence, and the full
    parameters used (defaults merged), which go into the run's provenance."""

    scorer: str
    params: dict[str, Any]
    scores: torch.Tensor       # [units, concepts]
    confidence: Optional[torch.Tensor]   # [units, concepts] in [0, 1]; None when not asked for
    uses_encoder: bool = True


def _similarity(inputs: dict[str, Any], acts: str) -> "torch.Tensor | Similarity":
    """The image-concept similarity given, else streamed from the embeddings given."""
    sim = inputs.get("similarity")
    if sim is None:
        if "image_emb" not in inputs or "text_emb" not in inputs:
            raise BadInput(f"this scorer needs 'similarity' [n, c] or 'image_emb' and 'text_emb', "
                           f"plus '{acts}' activations [n, u].")
        sim = Similarity(inputs["image_emb"], inputs["text_emb"])
    return sim


def _run_clip(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(inputs: dict[str, Any], **params: Any) -> torch.Tensor:
        return fn(_similarity(inputs, "pooled"), _need(inputs, "pooled"), **params)
    return run


def _run_patch(inputs: dict[str, Any], **params: Any) -> torch.Tensor:
    return patch_scores(_need(inputs, "patch_emb"), _need(inputs, "text_emb"),
                        _need(inputs, "unit_patches"), inputs.get("unit_weights"), **params)


def _run_top_images(inputs: dict[str, Any], **params: Any) -> torch.Tensor:
    return top_image_scores(_similarity(inputs, "peak"), _need(inputs, "peak"), **params)


def _run_iou(inputs: dict[str, Any], **params: Any) -> torch.Tensor:
    if inputs.get("iou_scores") is not None:   # computed while streaming the images (pipeline)
        return inputs["iou_scores"]
    if inputs.get("accumulator") is not None:
        return inputs["accumulator"].result()
    return iou_scores(_need(inputs, "act_maps"), _need(inputs, "masks"), **params)


def _run_encoder_iou(inputs: dict[str, Any], **params: Any) -> torch.Tensor:
    if inputs.get("encoder_iou_scores") is not None:   # computed while streaming the images (pipeline)
        return inputs["encoder_iou_scores"]
    return encoder_iou_scores(_need(inputs, "act_maps"), _need(inputs, "cell_emb"), _need(inputs, "text_emb"),
                              _need(inputs, "baseline"), **params)


def _top_k_within(params: dict[str, Any], n_images: int) -> dict[str, Any]:
    """CLIP-Dissect's top_k cannot exceed the number of images."""
    return {**params, "top_k": min(params["top_k"], n_images)}


def _need(inputs: dict[str, Any], key: str) -> Any:
    if inputs.get(key) is None:
        raise BadInput(f"scorer input '{key}' is missing; given: {', '.join(sorted(inputs)) or 'none'}.")
    return inputs[key]


PMI_SCORERS = ("soft_wpmi", "wpmi")   # score = log p(c | unit) - lam log p(c)

SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in [
        Scorer("patch", _run_patch, {"mode": "diff"},
               ("patch_emb", "text_emb", "unit_patches", "unit_weights"),
               "mean similarity of a unit's top patches to a concept minus that concept's mean "
               "similarity over all patches of its layer (mode 'z': divided by its spread)"),
        Scorer("soft_wpmi", _run_clip(soft_wpmi),
               {"top_k": 100, "a": 10.0, "lam": 1.0, "min_prob": 1e-7, "p_start": 0.998,
                "p_end": 0.97},
               ("similarity|image_emb+text_emb", "pooled"),
               "CLIP-Dissect SoftWPMI over whole-image similarities and pooled activations",
               prepare=_top_k_within),
        Scorer("wpmi", _run_clip(wpmi), {"top_k": 28, "a": 2.0, "lam": 0.6, "min_prob": 1e-7},
               ("similarity|image_emb+text_emb", "pooled"),
               "CLIP-Dissect WPMI over whole-image similarities and pooled activations",
               prepare=_top_k_within),
        Scorer("cos_cubed", _run_clip(cos_cubed), {"min_norm": 1e-3},
               ("similarity|image_emb+text_emb", "pooled"),
               "CLIP-Dissect cos_similarity_cubed: cosine of centred, cubed columns"),
        Scorer("top_images", _run_top_images, {"top_k": 50}, ("similarity|image_emb+text_emb", "peak"),
               "mean similarity of a unit's top-k images (by per-image max activation) to a concept "
               "minus that concept's mean similarity over all probe images (opt-in: README, "
               "'Confidence and fidelity')",
               prepare=_top_k_within, opt_in=True),
        Scorer("iou", _run_iou, {"top_fraction": 0.005}, ("iou_scores|act_maps+masks|accumulator",),
               "Network Dissection IoU of the unit's top-0.5% region with per-pixel concept "
               "masks, summed over images", uses_encoder=False),
        Scorer("encoder_iou", _run_encoder_iou, {"top_fraction": 0.005},
               ("encoder_iou_scores|act_maps+cell_emb+text_emb+baseline", "similarity|image_emb+text_emb"),
               "Network Dissection IoU with masks from the encoder instead of the truth: each of a "
               "4x4 grid of cells takes the concept its window is closest to (above the concept's "
               "mean over the probe images); works on any model (opt-in: it encodes 28 windows "
               "per image)", opt_in=True),
    ]
}


def list_scorers() -> list[dict[str, Any]]:
    """Name, default parameters, inputs and description of every scorer."""
    return [{"name": s.name, "defaults": dict(s.defaults), "inputs": list(s.inputs),
             "description": s.description} for s in SCORERS.values()]


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UnknownScorer(unknown("scorer", name, SCORERS))
    return SCORERS[name]


def resolve_params(name: str, params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Defaults overridden by `params`; unknown parameter names raise BadParameter."""
    s = get_scorer(name)
    params = dict(params or {})
    bad = sorted(set(params) - set(s.defaults))
    if bad:
        raise BadParameter(f"Scorer '{name}' has no parameter {', '.join(bad)}. Valid: "
                           f"{', '.join(f'{k}={v}' for k, v in s.defaults.items())}.")
    return {**s.defaults, **params}


def run_scorer(name: str, inputs: dict[str, Any], params: Optional[dict[str, Any]] = None,
               progress: bool = False, with_confidence: bool = True) -> ScoreResult:
    """Score with a named scorer. `inputs` by scorer (see `list_scorers()`):
    patch: patch_emb, text_emb, unit_patches[, unit_weights];
    soft_wpmi / wpmi / cos_cubed: similarity (or image_emb and text_emb), pooled;
    iou: iou_scores (already computed), act_maps and masks, or accumulator (a filled IoUAccumulator);
    encoder_iou: encoder_iou_scores (already computed), or act_maps, cell_emb, text_emb and baseline."""
    s = get_scorer(name)
    full = resolve_params(name, params)
    extra = {"progress": progress} if name in PMI_SCORERS else {}
    scores = s.fn(inputs, **full, **extra)
    # with_confidence=False: the caller replaces it (trust's calibrated confidence) or reads only
    # the scores (a null's pseudo-units); the within-unit confidence costs a median per unit.
    return ScoreResult(name, full, scores, confidence(scores) if with_confidence else None, s.uses_encoder)


# --------------------------------------------------------------------------------------------
# Arrow rows for the store


def _constants(n: int, cols: dict[str, Any]) -> dict[str, pa.Array]:
    return {k: pa.array([v] * n, pa.string()) for k, v in cols.items() if v is not None or k == "encoder"}


def top_concepts(
    result: ScoreResult,
    concepts: Sequence[str],
    top_n: int = 5,
    units: Optional[Sequence[int]] = None,
    **columns: Any,
) -> pa.Table:
    """Top-N concepts per unit (schema/scores.sql minus run_id): unit, scorer, rank, concept,
    score, confidence, then any of vocabulary / encoder / model / layer given as keyword
    constants. Ranked by raw score (within a unit, confidence grows with the score). NaN
    scores rank last. `units` maps rows to unit ids (default 0..u-1)."""
    s = result.scores.float()
    n_units, n_concepts = s.shape
    if len(concepts) != n_concepts:
        raise BadInput(f"{len(concepts)} concept names for a score matrix of {n_concepts} concepts.")
    k = min(top_n, n_concepts)
    key = torch.nan_to_num(s, nan=float("-inf"))
    vals, idx = torch.topk(key, k=k, dim=1)                       # [u, k]
    conf = torch.gather(result.confidence, 1, idx)
    raw = torch.gather(s, 1, idx)
    unit_ids = np.asarray(units if units is not None else np.arange(n_units), dtype=np.int32)
    names = np.asarray(concepts, dtype=object)
    n = n_units * k
    table = {
        "unit": pa.array(np.repeat(unit_ids, k), pa.int32()),
        "scorer": pa.array([result.scorer] * n, pa.string()),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int32), n_units), pa.int32()),
        "concept": pa.array(names[idx.numpy().ravel()], pa.string()),
        "score": pa.array(raw.numpy().ravel(), pa.float32()),
        "confidence": pa.array(conf.numpy().ravel(), pa.float32()),
    }
    if "encoder" not in columns and not result.uses_encoder:
        columns["encoder"] = None
    table.update(_constants(n, columns))
    return pa.table(table)
