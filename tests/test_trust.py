"""Trust: the null confidence (random units get none, planted units get it, whatever the scorer
and vocabulary size), BH, held-out split, Pearson/AUPRC against references, the iou null, and
`assess` on the demo store (stored inputs reproduce the stored scores; tables written)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from neurostore import scorers as S
from neurostore import trust as T
from neurostore.errors import BadParameter
from test_scorers import _planted_world



def _confidence(name, inputs, m=200, seed=0):
    params = S.resolve_params(name, {"top_k": 20} if name in ("soft_wpmi", "wpmi") else None)
    real = S.run_scorer(name, inputs, params).scores
    null = T.fit_null(name, T.null_best(name, inputs, params, m, seed),
                      real.shape[1], seed)
    return T.bh_confidence(real, null), real


def _patch_inputs(img, txt, acts, k=8):
    top = torch.topk(acts, k=k, dim=0)
    # a patch per (unit, top image): here the image's own embedding, so patch index = image index
    return {"patch_emb": img, "text_emb": txt, "unit_patches": top.indices.T, "unit_images": top.indices.T,
            "unit_weights": top.values.T, "pooled": acts}


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi", "cos_cubed", "top_images", "patch"])
def test_planted_units_confident_random_units_not(name):
    """6 planted units fire on images of their concept; 40 units fire at random. The planted
    concept gets confidence >= 0.9; random units' best concepts almost never do (the old
    Phi(z)^C confidence gave the random units' best ~0.5 on average and often ~1)."""
    img, txt, sim, acts, planted = _planted_world(noise_units=40)
    inputs = _patch_inputs(img, txt, acts) if name == "patch" else {"similarity": sim, "pooled": acts, "peak": acts}
    conf, real = _confidence(name, inputs)
    assert torch.equal(real[:6].argmax(1), planted)
    if name != "soft_wpmi":
        # soft_wpmi saturates at log(units) for any unit that dominates p(c): a random
        # pseudo-unit that is alone on a concept reaches it too, so no score is rare there.
        assert (conf[:6].gather(1, planted[:, None]) >= 0.9).all()
    assert (conf[6:].max(1).values >= 0.9).float().mean() <= 0.05
    assert ((conf >= 0) & (conf <= 1)).all()
    # within a unit, confidence never falls as the score rises
    order = real.argsort(dim=1)
    assert (conf.gather(1, order).diff(dim=1) >= -1e-6).all()


def test_random_layer_gets_no_confidence_at_any_vocabulary_size():
    """A layer of units that explain nothing: <= 5% confident, for 30 and for 1,000 concepts."""
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(400, 32, generator=g), dim=-1)
    acts = torch.randn(400, 64, generator=g)
    for c in (30, 1000):
        txt = torch.nn.functional.normalize(torch.randn(c, 32, generator=g), dim=-1)
        for name in ("soft_wpmi", "cos_cubed", "top_images"):
            conf, _ = _confidence(name, {"similarity": S.image_text_similarity(img, txt), "pooled": acts,
                                         "peak": acts})
            assert (conf.max(1).values >= 0.9).float().mean() <= 0.05, (name, c)
            assert conf.max() < 1.0


def test_soft_wpmi_null_scores_a_pseudo_unit_as_one_more_unit_of_the_layer():
    """soft_wpmi's log p(c) averages over the units given: a pseudo-unit's null score is its
    score when it joins the layer's real units, exactly."""
    _, _, sim, acts, _ = _planted_world(noise_units=10)
    params = S.resolve_params("soft_wpmi", {"top_k": 20})
    best = T.null_best("soft_wpmi", {"similarity": sim, "pooled": acts}, params, m=3, seed=5)
    pseudo = T.pseudo_pooled(acts, 3, torch.Generator().manual_seed(5))   # the same draw
    for j in range(3):
        joint = S.soft_wpmi(sim, torch.cat([acts, pseudo[:, j:j + 1]], dim=1), top_k=20)
        assert abs(float(joint[-1].max()) - float(best[j])) < 1e-4


def test_bh_matches_the_step_up_procedure():
    """q-values of the units' best p-values equal scipy's BH adjustment."""
    from scipy.stats import false_discovery_control

    g = torch.Generator().manual_seed(0)
    best = torch.randn(500, generator=g) * 0.3
    best[:20] += 2.5
    null = T.fit_null("x", torch.randn(300, generator=g) * 0.3, 100, 0)
    conf = T.bh_confidence(best.view(-1, 1), null)
    want = false_discovery_control(null.pvalues(best).numpy(), method="bh")
    np.testing.assert_allclose(1 - conf.view(-1).numpy(), want, atol=1e-6)


def test_gumbel_fit_recovers_parameters():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g, dtype=torch.float64)
    draws = 1.5 - 0.2 * torch.log(-torch.log(u))                  # Gumbel(1.5, 0.2)
    null = T.fit_null("x", draws, 10, 0)
    assert abs(null.loc - 1.5) < 0.01 and abs(null.scale - 0.2) < 0.01
    p = null.pvalues(torch.tensor([null.q99]))
    assert abs(float(p) - 0.01) < 0.003
    assert float(null.pvalues(torch.tensor([float("nan")]))) == 1.0


def test_iou_null_is_random_directions_of_the_layer():
    """A unit whose maps are a concept's mask has IoU ~1; random directions of the layer (the
    null) mix it with 39 noise units, so their best IoU stays low and the unit is confident,
    while the noise units are not."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(64, 5, 8, 8, generator=g) > 0.8             # [b, concepts, H, W]
    maps = torch.randn(64, 40, 8, 8, generator=g)                  # [b, units, h, w]
    maps[:, 0] = masks[:, 2].float() * 5 + 0.01 * torch.randn(64, 8, 8, generator=g)  # unit 0 = concept 2
    thr = torch.quantile(maps.transpose(0, 1).reshape(40, -1), 0.8, dim=1)
    acc, nul = S.IoUAccumulator(thr, 5), T.NullIoU(40, 5, top_fraction=0.2)
    for i in range(0, 64, 16):
        acc.update(maps[i:i + 16], masks[i:i + 16])
        nul.update(maps[i:i + 16], masks[i:i + 16])
    real = acc.result()
    best = nul.best()
    assert real[0, 2] > 0.9 and best.numel() == 40 and best.max() < 0.5
    conf = T.bh_confidence(real, T.fit_null("iou", best, 5, 0))
    assert conf[0, 2] > 0.99 and (conf[1:].max(1).values >= 0.9).float().mean() <= 0.05


def test_heldout_split_is_deterministic_by_id():
    ids = [f"img{i:05d}" for i in range(5000)]
    h = T.heldout(ids)
    assert abs(h.mean() - 0.2) < 0.02
    assert np.array_equal(T.heldout(ids[::-1])[::-1], h)          # order does not matter
    assert T.heldout(["img00007"])[0] == h[7]
    with pytest.raises(BadParameter):
        T.heldout(ids, 1.5)


def test_pearson_and_auprc_match_references():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = x + torch.randn(200, 3, generator=g)
    lab = y > 0.8
    np.testing.assert_allclose(T.pearson(x, y).numpy(), [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(3)],
                               atol=1e-10)
    np.testing.assert_allclose(T.auprc(x, lab).numpy(),
                               [average_precision_score(lab[:, j], x[:, j]) for j in range(3)], atol=1e-10)
    assert torch.isnan(T.auprc(x[:, :1], torch.zeros(200, 1, dtype=torch.bool)))[0]
    assert T.pearson(torch.ones(5, 1), torch.randn(5, 1))[0] == 0


def test_fidelity_with_too_few_held_out_images_is_nan_not_a_crash():
    """A small probe set (a user's 18 photos) holds out a handful of images, on which every Pearson
    is +-1 and every AUPRC near 1 by chance: below MIN_HELDOUT no evidence, NaN; from it, values."""
    import pandas as pd

    ids = [f"img{i}" for i in range(400)]
    hold = T.heldout(ids)
    for keep in (0, 1, 2, T.MIN_HELDOUT - 1, T.MIN_HELDOUT):  # every explained image, plus `keep` held-out ones
        sub = [i for i, h in zip(ids, hold) if not h] + [i for i, h in zip(ids, hold) if h][:keep]
        assert T.heldout(sub).sum() == keep
        expl = pd.DataFrame({"unit": [0, 1], "scorer": "patch", "concept": ["a", "b"], "rank": 0})
        g = torch.Generator().manual_seed(keep)
        out = T.explanation_fidelity(expl, torch.rand(len(sub), 2, generator=g), torch.rand(len(sub), 2, generator=g),
                                     sub, {"a": 0, "b": 1})
        assert len(out) == 8   # pearson, auprc, cosine_pearson, concept_peak
        assert out["value"].isna().all() == (keep < T.MIN_HELDOUT)
    assert not T.encoder_presence(torch.rand(0, 3)).any()


def test_zero_shot_presence_is_softmax_over_the_vocabulary_dense_or_streamed():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(50, 16, generator=g), torch.randn(30, 16, generator=g)
    dense = S.image_text_similarity(img, txt)                        # [50, 30]
    rows, cols = torch.arange(50) % 3 == 0, torch.tensor([4, 0, 29])
    want = torch.softmax(T.ZERO_SHOT_SCALE * dense, dim=1)[rows][:, cols]
    torch.testing.assert_close(T.zero_shot(dense, rows, cols), want)
    torch.testing.assert_close(T.zero_shot(S.Similarity(img, txt), rows, cols), want, atol=1e-6, rtol=1e-5)
    assert T.ZERO_SHOT_SCALE == S.SCORERS["soft_wpmi"].defaults["a"]


def test_encoder_fidelity_is_blind_to_how_near_an_image_is_to_every_concept():
    """An image near every concept at once (busy, blank, off-distribution) does not hold each
    of them more: the held-out encoder Pearson of a unit that follows concept 0 is the same
    with and without a per-image offset on every concept's cosine (the raw cosine, the
    previous presence, loses most of it here)."""
    import pandas as pd

    g = torch.Generator().manual_seed(2)
    n, c = 1000, 8
    ids = [f"img{i:04d}" for i in range(n)]
    x = torch.rand(n, generator=g)                                   # concept 0's amount per image
    sim = 0.02 * torch.randn(n, c, generator=g)
    sim[:, 0] += 0.1 * x
    acts = (x + 0.1 * torch.randn(n, generator=g)).view(-1, 1)       # [n, 1] one unit
    offset = 0.1 * torch.randn(n, 1, generator=g)                    # [n, 1] shared by every concept
    expl = pd.DataFrame({"unit": [0], "scorer": "patch", "concept": ["c0"], "rank": 0})
    cidx = {f"c{j}": j for j in range(c)}

    def enc_pearson(s):
        f = T.explanation_fidelity(expl, acts, s, ids, cidx)
        return float(f.loc[f["metric"] == "pearson", "value"].iloc[0])

    clean, shifted = enc_pearson(sim), enc_pearson(sim + offset)
    assert clean > 0.7 and abs(clean - shifted) < 1e-5
    hold = torch.from_numpy(T.heldout(ids))
    raw = T.pearson(acts[hold], (sim + offset)[hold][:, :1]).item()  # the cosine as presence
    assert raw < clean - 0.2


def test_concept_peak_tells_a_concept_some_images_show_from_one_none_shows():
    """concept_peak: a concept drawn in a tenth of the held-out images (cosine raised there)
    peaks far above its mean zero-shot p; one drawn nowhere, whose cosine is noise like every
    other concept's, does not, though the encoder's top 10% still calls it present somewhere.
    The explanation_scores rows carry it per explanation; too few images: NaN."""
    import pandas as pd

    g = torch.Generator().manual_seed(3)
    n, c = 600, 20
    ids = [f"img{i:04d}" for i in range(n)]
    sim = 0.2 + 0.02 * torch.randn(n, c, generator=g)                # [n, c] cosines
    sim[torch.arange(n) % 10 == 0, 0] += 0.3                          # concept 0 in 10% of the images
    hold = torch.from_numpy(T.heldout(ids))
    peak = T.concept_peak(T.zero_shot(sim, hold, torch.arange(c)))   # [c]
    assert peak[0] > peak[1:].max() + 0.5
    assert T.encoder_presence(sim[hold])[:, 1].any()                 # "present" by the top 10% anyway
    expl = pd.DataFrame({"unit": [0, 0], "scorer": "patch", "concept": ["c0", "c1"], "rank": [0, 1]})
    f = T.explanation_fidelity(expl, torch.rand(n, 1, generator=g), sim, ids, {f"c{j}": j for j in range(c)})
    got = f[f["metric"] == "concept_peak"].set_index("concept")["value"]
    np.testing.assert_allclose(got[["c0", "c1"]].to_numpy(), peak[:2], rtol=1e-5)
    assert np.isnan(T.concept_peak(torch.rand(1, 3))).all()


def test_headline_prefers_the_calibrated_confidence_then_held_out_fidelity():
    import pandas as pd

    c = pd.DataFrame({"model": "m", "layer": "l", "unit": [0, 0, 0, 1, 1], "scorer": ["patch", "wpmi", "cos_cubed", "patch", "wpmi"],
                      "concept": ["a", "b", "c", "d", "e"], "rank": 0, "auprc": [0.3, 0.9, np.nan, np.nan, 0.5],
                      "fidelity": [0.5, 0.1, 0.9, 0.2, 0.3], "confidence": [0.8, 0.6, 0.5, 0.7, 0.7]})
    h = T.headlines(c)
    assert h["concept"].tolist() == ["a", "e"]                      # unit 1: a tie, broken by AUPRC
    # beside it the runner-up: the best candidate naming another concept
    assert h["runner_up"].tolist() == ["b", "d"] and h["runner_up_scorer"].tolist() == ["wpmi", "patch"]
    assert h["runner_up_confidence"].tolist() == [0.6, 0.7]
    same = T.headlines(c.assign(concept=["a", "a", "c", "d", "d"]))   # unit 1: every candidate says d
    assert same["runner_up"].tolist()[0] == "c" and same["runner_up"].isna().tolist() == [False, True]


# ---- calibration ------------------------------------------------------------------------------


def test_shipped_calibration_gives_monotone_probabilities():
    """The fitted maps load, give probabilities in [0, 1], never fall as the null's evidence
    (smaller q), the margin over the next concept or the held-out fidelity rises, and say what
    they were fitted on."""
    import pandas as pd

    cal = T.Calibration.load()
    assert {"seed", "cue_kind", "world", "command"} <= set(cal.fitted_on)
    assert {"iou", "*"} <= set(cal.explanation_maps)
    q = torch.logspace(-8, 0, 40, dtype=torch.float64)              # ascending q: less evidence
    margin = torch.linspace(-12, 12, 30, dtype=torch.float64)
    grid = torch.linspace(-1, 1, 9, dtype=torch.float64)
    for scorer in list(cal.explanation_maps) + ["a-scorer-it-never-saw"]:
        p = cal.explanation(scorer, q.view(-1, 1).expand(-1, 30), margin.view(1, -1).expand(40, -1))  # [q, margin]
        assert ((p >= 0) & (p <= 1)).all()
        assert (p.diff(dim=0) <= 1e-12).all() and (p.diff(dim=1) >= -1e-12).all(), scorer
        # [auprc, cosine_pearson] at a middling q and margin
        mid = torch.full((9, 9), 0.05, dtype=torch.float64)
        p = cal.explanation(scorer, mid, 20 * mid, grid.abs().view(-1, 1).expand(-1, 9), grid.view(1, -1).expand(9, -1))
        assert ((p >= 0) & (p <= 1)).all() and (p.diff(dim=1) >= -1e-12).all(), scorer
        assert (p[4:].diff(dim=0) >= -1e-12).all(), scorer         # rows 4.. : auprc 0 -> 1
    base = pd.DataFrame({"unit": [0, 0], "scorer": ["patch", "wpmi"], "concept": ["a", "b"],
                         "confidence": 0.3, "auprc": 0.2, "fidelity": 0.1, "cosine_pearson": 0.1, "concept_peak": 1.0})
    p0 = cal.headline(base)
    for col, hi in (("confidence", 0.8), ("auprc", 0.9), ("cosine_pearson", 0.7), ("concept_peak", 2.0),
                    ("concept", "a")):
        p1 = cal.headline(base.assign(**{col: hi}))                  # concept 'a' twice: two scorers agree
        assert ((p1 >= p0 - 1e-12) & (p1 <= 1) & (p1 >= 0)).all(), col


def test_unreadable_calibration_is_one_clear_error(tmp_path):
    from neurostore.errors import BadInput

    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    with pytest.raises(BadInput, match="refit") as e:
        T.Calibration.load(bad)
    assert "\n" not in str(e.value)


def test_confidence_is_the_calibrated_probability_not_one_minus_q():
    """scored_with_null's confidence is the shipped map of (q, margin), not the null's 1 - q
    (what it was before the calibration); it still grows with the score within a unit."""
    img, txt, sim, acts, planted = _planted_world(noise_units=40)
    inputs = {"similarity": sim, "pooled": acts}
    res = S.run_scorer("cos_cubed", inputs)
    out, null = T.scored_with_null(res, inputs, m=200)
    one_minus_q = T.bh_confidence(res.scores, null)
    assert (out.confidence - one_minus_q).abs().max() > 0.05
    order = res.scores.argsort(dim=1)
    assert (out.confidence.gather(1, order).diff(dim=1) >= -1e-6).all()
    # the stored rows give back the same confidence (assess and the bench recompute it from them)
    rows = S.top_concepts(out, [f"c{i}" for i in range(res.scores.shape[1])], 5).to_pandas()
    q, margin = T.rows_q_margin(rows, null)
    again = T.calibration().explanation("cos_cubed", q, margin)
    np.testing.assert_allclose(again.numpy(), rows["confidence"].to_numpy(), atol=1e-5)


def test_confidence_of_the_kept_concepts_only_is_the_same():
    """A dissect stores each unit's top concepts only, so scored_with_null(top=n) gives only those
    (and any tied with the n-th) a confidence: every row S.top_concepts keeps is the same as from
    the whole matrix, with ties, NaN scores and a unit with no score at all."""
    img, txt, sim, acts, planted = _planted_world(noise_units=40)
    inputs = {"similarity": sim, "pooled": acts}
    res = S.run_scorer("cos_cubed", inputs)
    sc = res.scores.clone()
    sc[0, 3:9] = sc[0].max()                      # six concepts tied at the top
    sc[1, ::2] = float("nan")                     # half of a unit's scores missing
    sc[2] = float("nan")                          # a unit with none
    res = dataclasses.replace(res, scores=sc)
    names = [f"c{i}" for i in range(sc.shape[1])]
    whole, _ = T.scored_with_null(res, inputs, m=200)
    for n in (1, 2, 5):
        kept, _ = T.scored_with_null(res, inputs, m=200, top=n)
        pd.testing.assert_frame_equal(S.top_concepts(kept, names, n).to_pandas(),
                                      S.top_concepts(whole, names, n).to_pandas())   # NaN scores too
        assert (kept.confidence > 0).sum(dim=1).min() >= n and (kept.confidence == 0).any()


@pytest.mark.slow
def test_reinitialised_probe_cnn_gets_few_confident_units(probe_world, tmp_path):
    """The probe CNN with fresh random weights: its labels are not right, so at most 5% of its
    units get confidence >= 0.9 from any scorer (0.45 with the null's 1 - q, all from patch).
    Not the re-initialisation the calibration was fitted with (seed 0)."""
    from neurostore.pipeline import dissect
    from neurostore.store import Store

    from neurostore.weights import reinitialise

    torch.manual_seed(7)
    torch.save(reinitialise(probe_world.load_target("cnn")), tmp_path / "cnn-random.pt")
    store = Store.open(tmp_path / "store")
    m = dissect(store, str(tmp_path / "cnn-random.pt"), world=probe_world, vocabulary="probe", evaluate=False,
                progress=False, log=lambda *a: None)["model"]
    e = store.df("SELECT layer, unit, max(confidence) AS c FROM explanations WHERE model = $m GROUP BY ALL", {"m": m})
    assert len(e) > 100 and (e["c"] >= 0.9).mean() <= 0.05


# ---- dissect writes them in its run ------------------------------------------------------------


def test_dissect_stores_null_confidence_fidelity_and_headlines(demo_run):
    import json

    _, store = demo_run
    runs = store.df("SELECT run_id, params FROM runs WHERE command = 'dissect'")
    nulls = [json.loads(p)["nulls"] for p in runs["params"]]
    assert all(n and all({"loc", "scale", "n"} <= set(v) for sc in n.values() for v in sc.values()) for n in nulls)
    es = store.df("SELECT model, presence, metric, count(*) AS n, count(value) AS v, any_value(run_id) AS r "
                  "FROM explanation_scores GROUP BY ALL")
    # fidelity from both presences, and the null's q of every row (what the calibrated confidence maps)
    assert set(zip(es["presence"], es["metric"])) == ({(p, m) for p in ("encoder", "masks") for m in ("pearson", "auprc")}
                                                      | {("encoder", "cosine_pearson"), ("encoder", "concept_peak"),
                                                         ("null", "null_q")})
    assert set(es["r"]) <= set(runs["run_id"])                    # written by the dissect's own run
    h = store.df("SELECT model, layer, count(*) AS n, count(DISTINCT unit) AS u FROM headlines GROUP BY ALL")
    units = store.df("SELECT model, layer, count(DISTINCT unit) AS u FROM explanations GROUP BY ALL")
    both = h.merge(units, on=["model", "layer"])
    assert len(both) == len(units) and (both["n"] == both["u_y"]).all()   # one headline per unit
    ru = store.df("SELECT concept, runner_up, confidence, runner_up_confidence FROM headlines WHERE runner_up IS NOT NULL")
    assert len(ru) and (ru["runner_up"] != ru["concept"]).all() and (ru["runner_up_confidence"] <= ru["confidence"]).all()
    # concept_neurons leads with units whose headline the concept is
    top = store.query("concept_neurons", {"concept": "watermark", "top": 50}).to_pandas()
    assert top["headline"].any() and top["headline"].is_monotonic_decreasing


def test_dissect_confidence_is_the_map_of_q_margin_and_held_out_fidelity(demo_run):
    """The dissect stores the confidence it takes back from layer_trust, made once the layer's
    held-out fidelity exists: the shipped map of q, margin AND encoder fidelity (before, it was
    the map of q and margin alone, made before the fidelity); the demo's encoder_iou included."""
    import json

    from neurostore.trust import Null

    _, store = demo_run
    s = store.df("""SELECT s.run_id, s.layer, s.unit, s.scorer, s.rank, s.concept, s.score, s.confidence,
                           max(e.value) FILTER (WHERE e.metric = 'auprc') AS auprc,
                           max(e.value) FILTER (WHERE e.metric = 'cosine_pearson') AS cosine_pearson,
                           max(e.value) FILTER (WHERE e.metric = 'concept_peak') AS concept_peak
                    FROM scores s JOIN explanation_scores e USING (model, layer, unit, scorer, concept)
                    WHERE s.model = 'probe-cnn' AND e.presence = 'encoder' GROUP BY ALL""")
    params = store.df("SELECT run_id, params FROM runs WHERE run_id = $r", {"r": s["run_id"].iloc[0]})["params"]
    nulls = json.loads(params.iloc[0])["nulls"]
    cal, changed = T.calibration(), []
    assert "encoder_iou" in set(s["scorer"])
    for (layer, scorer), r in s.groupby(["layer", "scorer"]):
        q, margin = T.rows_q_margin(r, Null(**nulls[layer][scorer]))
        fid = [torch.tensor(r[c].to_numpy(np.float64)) for c in ("auprc", "cosine_pearson", "concept_peak")]
        np.testing.assert_allclose(cal.explanation(scorer, q, margin, *fid).numpy(), r["confidence"], atol=1e-5)
        changed.append((cal.explanation(scorer, q, margin) - cal.explanation(scorer, q, margin, *fid)).abs() > 1e-3)
    assert torch.cat(changed).double().mean() > 0.5, "the fidelity must move most confidences"


# ---- a stored dissect, assessed ---------------------------------------------------------------


@pytest.fixture(scope="module")
def assessed(demo_run, tmp_path_factory):
    """The demo store (copied: assess writes) with probe-cnn assessed."""
    from neurostore.store import Store

    _, store = demo_run
    dst = tmp_path_factory.mktemp("trust") / "store"
    shutil.copytree(store.path, dst)
    s = Store.open(dst)
    before = s.df("SELECT layer, unit, scorer, rank, concept, score, confidence FROM scores WHERE model = 'probe-cnn'")
    out = T.assess(s, model="probe-cnn", null_units=64, log=lambda *a: None)
    return s, before, out


def test_assess_rewrites_confidence_and_writes_tables(assessed):
    s, before, out = assessed
    after = s.df("SELECT layer, unit, scorer, rank, concept, score, confidence FROM scores WHERE model = 'probe-cnn'")
    m = before.merge(after, on=["layer", "unit", "scorer", "rank", "concept"], suffixes=("_old", "_new"))
    assert len(m) == len(before) == len(after)
    assert np.array_equal(m["score_old"], m["score_new"])          # raw scores untouched
    assert (m["confidence_old"] != m["confidence_new"]).mean() > 0.5
    summary = out["probe-cnn"]["probe"]
    # the inputs read back from the store reproduce the stored scores (pooled activations are
    # kept in float16, so top-k ties may break differently: agreement to 1%, not bit for bit)
    assert summary["recomputed_max_diff"] < 1e-2
    nulls = s.df("SELECT params FROM runs WHERE run_id = $r", {"r": summary["run_id"]})["params"].iloc[0]
    assert '"loc"' in nulls and '"scale"' in nulls                 # null parameters are the run's
    es = s.df("SELECT presence, metric, count(*) AS n, count(value) AS v FROM explanation_scores "
              "WHERE model = 'probe-cnn' GROUP BY ALL")
    assert set(zip(es["presence"], es["metric"])) == \
        {(p, m) for p in ("encoder", "masks") for m in ("pearson", "auprc")} \
        | {("encoder", "cosine_pearson"), ("encoder", "concept_peak"), ("null", "null_q")}
    q = s.df("SELECT e.value AS q, s.confidence FROM explanation_scores e JOIN scores s USING (model, layer, unit, scorer, concept) "
             "WHERE e.model = 'probe-cnn' AND e.metric = 'null_q'")
    assert len(q) == len(after) and q["q"].between(0, 1).all()       # the null's q kept beside the confidence
    assert (np.abs(1 - q["q"] - q["confidence"]) > 1e-3).mean() > 0.5
    h = s.df("SELECT layer, count(*) AS n, count(DISTINCT unit) AS u FROM headlines WHERE model = 'probe-cnn' GROUP BY layer")
    units = s.df("SELECT layer, count(DISTINCT unit) AS u FROM explanations WHERE model = 'probe-cnn' GROUP BY layer")
    assert h.merge(units, on="layer").pipe(lambda d: (d["n"] == d["u_y"]).all())
    e = s.df("SELECT confidence, confidences[1] AS first FROM explanations WHERE model = 'probe-cnn'")
    assert np.allclose(e["confidence"], e["first"])


def test_assess_again_is_idempotent(assessed):
    s, _, out = assessed
    first = s.df("SELECT layer, unit, scorer, rank, confidence FROM scores WHERE model = 'probe-cnn' ORDER BY ALL")
    T.assess(s, model="probe-cnn", null_units=64, log=lambda *a: None)
    again = s.df("SELECT layer, unit, scorer, rank, confidence FROM scores WHERE model = 'probe-cnn' ORDER BY ALL")
    assert first.equals(again)


def test_fidelity_in_blocks_equals_fidelity_at_once(monkeypatch):
    """fidelity splits the explanations into blocks sized to the device's memory (a GPU dissect
    of 50,000 images); blocks of 3 give the same figures as one block."""
    from neurostore import devices

    g = torch.Generator().manual_seed(0)
    acts, amount = torch.rand(50, 6, generator=g), torch.rand(50, 4, generator=g)
    units, concepts = np.array([0, 1, 2, 3, 4, 5, 0, 2]), np.array([0, 1, 2, 3, 0, 1, 3, 3])
    whole = T.fidelity(acts, amount, amount > 0.5, units, concepts)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda d: 3 * 50 * 64 * 4)   # 3 explanations a block
    assert devices.chunk_rows(torch.device("cpu"), 50 * 64, fraction=0.25) == 3
    blocks = T.fidelity(acts, amount, amount > 0.5, units, concepts)
    for w, b in zip(whole, blocks):
        assert w.shape == (8,) and np.array_equal(w, b)


def test_candidates_with_encoder_iou_take_its_own_headline_map():
    """encoder_iou's labels have a map of their own, and so do headline candidates among which
    it runs (the shared map, fitted with it, was over-confident without it); the shipped file
    holds both, and a dissect without encoder_iou keeps the shared one."""
    import pandas as pd

    cal = T.Calibration({"*": {"intercept": 0.0}}, {"intercept": -2.0}, {}, {"intercept": 2.0})
    c = pd.DataFrame({"unit": [0, 0], "scorer": ["patch", "encoder_iou"], "concept": ["a", "b"],
                      "confidence": [0.5, 0.5], "auprc": [0.0, 0.0], "cosine_pearson": [0.0, 0.0],
                      "concept_peak": [0.0, 0.0]})
    assert cal.headline(c) == pytest.approx([1 / (1 + np.exp(-2.0))] * 2)
    assert cal.headline(c[c["scorer"] == "patch"]) == pytest.approx([1 / (1 + np.exp(2.0))])
    shipped = T.calibration()
    assert shipped.encoder_iou_headline_map is not None and "encoder_iou" in shipped.explanation_maps
    assert "concept_peak" in shipped.explanation_maps["encoder_iou"]


def test_encoder_iou_first_marks_every_row_of_the_concept_encoder_iou_ranks_first():
    """The headline feature `encoder_iou_first` is 1 on each candidate (whichever scorer's) whose
    concept is encoder_iou's first for that unit, 0 elsewhere and where encoder_iou did not run;
    the shipped map with encoder_iou weighs it (> 0), so with all else equal it wins."""
    import pandas as pd

    c = pd.DataFrame({"unit": [0, 0, 0, 1, 1], "scorer": ["patch", "encoder_iou", "encoder_iou", "patch", "encoder_iou"],
                      "concept": ["cyan", "green", "cyan", "green", "blue"], "rank": [0, 0, 1, 0, 2],
                      "confidence": 0.3, "auprc": 0.5, "cosine_pearson": 0.2, "concept_peak": 1.0})
    assert T.headline_features(c)["encoder_iou_first"].tolist() == [0, 1, 0, 0, 0]
    assert T.headline_features(c[c["scorer"] == "patch"])["encoder_iou_first"].tolist() == [0, 0]
    shipped = T.calibration()
    assert shipped.encoder_iou_headline_map.get("encoder_iou_first", 0) > 0
    p = shipped.headline(c)
    assert p[1] > p[2] and p[1] > p[0]       # unit 0: green (encoder_iou's first) over cyan


def test_a_random_network_on_a_small_probe_set_gets_no_confident_label(probe_world, tmp_path):
    """A few dozen probe images hold out a handful, where Pearson and AUPRC come out high by
    chance: the probe CNN re-initialised got labels at >= 0.9 from that alone. Now such a probe
    set gives no fidelity evidence (NaN rows) and the random network no confident label."""
    from neurostore.pipeline import dissect
    from neurostore.store import Store
    from neurostore.weights import reinitialise

    torch.manual_seed(0)
    path = tmp_path / "cnn-random.pt"
    torch.save(reinitialise(probe_world.load_target("cnn")), path)
    store = Store.open(tmp_path / "s")
    said = []
    s = dissect(store, str(path), world=probe_world, vocabulary="probe", max_images=100, progress=False,
                log=said.append, evaluate=False)
    assert any("held out for fidelity, which needs 40" in m for m in said)   # the user is told
    fid = store.df("SELECT value, n_images FROM explanation_scores WHERE run_id = $r AND presence = 'encoder'",
                   {"r": s["run_id"]})
    assert len(fid) and (fid["n_images"].between(2, T.MIN_HELDOUT - 1)).all() and fid["value"].isna().all()
    conf = store.df("SELECT confidence FROM explanations WHERE run_id = $r AND list_contains($s, scorer)",
                    {"r": s["run_id"], "s": list(T.HEADLINE_SCORERS)})["confidence"]
    assert len(conf) and conf.max() < 0.9


def test_image_hashes_come_from_the_store_and_from_files_only_for_older_rows(tmp_path):
    """The stored content hash is used as is (the file may have moved); a row written before the
    column existed is hashed from its file; one whose file is gone is counted, not raised."""
    import pandas as pd

    from neurostore.images import file_hash
    from neurostore.trust import image_hashes

    (tmp_path / "b.png").write_bytes(b"not really a png")
    rows = pd.DataFrame({"image_id": ["a", "b", "c"],
                         "path": [str(tmp_path / "moved.png"), str(tmp_path / "b.png"), str(tmp_path / "gone.png")],
                         "content_hash": ["0123456789abcdef", None, None]})
    hashes, unread = image_hashes(rows)
    assert hashes == {"a": "0123456789abcdef", "b": file_hash(tmp_path / "b.png")} and unread == 1
    assert image_hashes(rows.drop(columns="content_hash"))[1] == 2   # a frame without the column
