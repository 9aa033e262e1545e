"""Scorers: equality with direct transcriptions of the published code, planted signals found by
every scorer, bounded confidence, hand-computed IoU, registry errors, Arrow rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from neurostore import scorers as S
from neurostore.errors import BadInput, BadParameter, UnknownScorer



def _clip_inputs(n=300, c=40, u=12, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    txt = torch.randn(c, d, generator=g)
    sim = S.image_text_similarity(img, txt)
    acts = torch.randn(n, u, generator=g)
    return sim, acts


def test_similarity_in_chunks_equals_one_product():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    whole = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    for chunk in (None, 1, 13, 50):
        sim = S.image_text_similarity(img, txt, chunk=chunk, device="cpu")
        assert sim.shape == (50, 7) and sim.device.type == "cpu"
        torch.testing.assert_close(sim, whole)


def test_streamed_similarity_gives_the_dense_scores():
    """The scorers read a `Similarity` a column tile at a time (never [n, c] whole): the same
    scores as from the dense matrix, with tiles that do not divide the vocabulary."""
    g = torch.Generator().manual_seed(3)
    img, txt, acts = torch.randn(300, 32, generator=g), torch.randn(5000, 32, generator=g), torch.randn(300, 9, generator=g)
    dense = S.image_text_similarity(img, txt)                     # [n, c]
    streamed = S.Similarity(img, txt)
    assert streamed.shape == dense.shape
    torch.testing.assert_close(streamed.columns(4090, 5000), dense[:, 4090:])
    rows, cols = torch.arange(300) % 7 == 0, torch.tensor([3, 4999, 17])
    torch.testing.assert_close(streamed.take(rows, cols), dense[rows][:, cols])
    for fn, params in ((S.soft_wpmi, {"top_k": 20}), (S.wpmi, {}), (S.cos_cubed, {"concept_chunk": 1000})):
        torch.testing.assert_close(fn(streamed, acts, **params), fn(dense, acts, **params), rtol=0, atol=1e-4)
    # Without a similarity the scorers stream from the embeddings themselves.
    got = S.run_scorer("cos_cubed", {"image_emb": img, "text_emb": txt, "pooled": acts}).scores
    torch.testing.assert_close(got, S.cos_cubed(dense, acts), rtol=0, atol=1e-5)


def test_cos_cubed_leaves_a_dense_similarity_unchanged():
    sim, acts = _clip_inputs()
    before = sim.clone()
    S.cos_cubed(sim, acts)
    assert torch.equal(sim, before)


# ---- equality with the published formulas --------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_wpmi_equals_direct_transcription(seed):
    sim, acts = _clip_inputs(seed=seed)
    fast = S.soft_wpmi(sim, acts, top_k=50)
    # The direct code in float64 is the exact value of the published formula; in float32 its
    # own rounding is ~1e-4 (sums of 50-100 logs), so that is checked with a looser bound.
    ref64 = S._soft_wpmi_reference(sim.double(), acts.double(), top_k=50)
    ref32 = S._soft_wpmi_reference(sim, acts, top_k=50)
    assert fast.shape == (12, 40) and fast.dtype == torch.float32
    assert (fast.double() - ref64).abs().max() <= 1e-4
    assert (fast - ref32).abs().max() <= 5e-4


def test_soft_wpmi_defaults_match_clip_dissect():
    d = S.get_scorer("soft_wpmi").defaults
    assert (d["top_k"], d["a"], d["lam"], d["p_start"], d["p_end"]) == (100, 10.0, 1.0, 0.998, 0.97)
    w = S.membership_weights(100)
    assert w[0] == pytest.approx(0.998) and w[-1] == pytest.approx(0.998 - 0.99 * 0.028)
    d = S.get_scorer("wpmi").defaults
    assert (d["top_k"], d["a"], d["lam"]) == (28, 2.0, 0.6)


def test_soft_wpmi_full_defaults_and_chunking_do_not_change_result():
    sim, acts = _clip_inputs(n=400, c=70, u=9, seed=3)
    ref64 = S._soft_wpmi_reference(sim.double(), acts.double())           # top_k=100
    for cc, uc in [(None, None), (16, 4), (7, 1)]:
        got = S._pmi(S._sum_log_factors(sim, acts, 100, 10.0,
                                        1 - S.membership_weights(100).double() + 1e-7,
                                        S.membership_weights(100).double(), cc, False, uc), 1.0)
        assert (got.double() - ref64).abs().max() <= 1e-4


def test_the_gpu_path_of_the_log_sums_equals_the_published_formula():
    """`_sum_log_factors_on` (what a dissect on a GPU runs: one gather per concept block, float32
    logs summed in float64), run here on the CPU, from a dense and a streamed similarity."""
    sim, acts = _clip_inputs(n=400, c=70, u=9, seed=3)
    w = S.membership_weights(100).double()
    ref64 = S._soft_wpmi_reference(sim.double(), acts.double())           # top_k=100
    streamed = S.Similarity(torch.randn(400, 16), torch.randn(70, 16))
    for s in (sim, streamed):
        ref = ref64 if s is sim else S._soft_wpmi_reference(_dense(s).double(), acts.double())
        got = S._pmi(S._sum_log_factors_on(torch.device("cpu"), s, acts, 100, 10.0, 1 - w + 1e-7, w), 1.0)
        assert got.dtype == torch.float32 and (got.double() - ref).abs().max() <= 1e-4
    ones = torch.ones(28, dtype=torch.float64)
    got = S._pmi(S._sum_log_factors_on(torch.device("cpu"), sim, acts, 28, 2.0, ones * 1e-7, ones), 0.6)
    assert (got.double() - S._wpmi_reference(sim.double(), acts.double())).abs().max() <= 1e-4


def _dense(sim: "S.Similarity") -> torch.Tensor:
    return sim.columns(0, sim.shape[1])


def test_wpmi_equals_direct_transcription():
    sim, acts = _clip_inputs(seed=2)
    fast = S.wpmi(sim, acts)
    ref64 = S._wpmi_reference(sim.double(), acts.double())
    assert (fast.double() - ref64).abs().max() <= 1e-4


def test_cos_cubed_equals_direct_transcription():
    sim, acts = _clip_inputs(seed=4)
    fast = S.cos_cubed(sim, acts, concept_chunk=7)
    ref = S._cos_cubed_reference(sim, acts)
    assert (fast - ref).abs().max() <= 1e-5
    assert fast.abs().max() <= 1 + 1e-5


def test_patch_equals_direct_form():
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(60, 16, generator=g)
    texts = torch.randn(9, 16, generator=g)
    idx = torch.randint(0, 60, (5, 4), generator=g)
    idx[2, 3] = -1                                       # a unit with only 3 patches
    w = torch.rand(5, 4, generator=g)
    w[4] = 0                                             # all-zero weights -> equal weights
    fast = S.patch_scores(patches, texts, idx, w)
    ref = S._patch_scores_reference(patches, texts, idx, w)
    assert (fast - ref).abs().max() <= 1e-5


def test_soft_wpmi_bad_shapes_and_params():
    sim, acts = _clip_inputs()
    with pytest.raises(BadInput):
        S.soft_wpmi(sim, acts[:10])
    with pytest.raises(BadParameter):
        S.soft_wpmi(sim, acts, top_k=10_000)


# ---- planted signal: every scorer ranks the planted concept first -------------------------


def _planted_world(n=1200, c=30, u=6, d=24, seed=7, noise_units=24):
    """Images are embeddings; unit j < u fires on images close to concept planted[j]; the other
    `noise_units` units of the layer fire at random (soft_wpmi's p(c) averages over all units
    of a layer, so a layer made only of planted units would be unrealistic)."""
    g = torch.Generator().manual_seed(seed)
    txt = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1)
    # Each image shows one concept (plus noise): sims are peaked, as for real photos.
    shown = torch.randint(0, c, (n,), generator=g)
    img = torch.nn.functional.normalize(txt[shown] + 0.6 * torch.randn(n, d, generator=g), dim=-1)
    sim = img @ txt.T                                             # [n, c]
    planted = torch.randperm(c, generator=g)[:u]
    acts = 3 * sim[:, planted] + 0.3 * torch.randn(n, u, generator=g)
    acts = torch.cat([acts, torch.randn(n, noise_units, generator=g)], dim=1)
    return img, txt, sim, acts, planted


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi", "cos_cubed"])
def test_planted_concept_ranks_first_clip_scorers(name):
    _, _, sim, acts, planted = _planted_world()
    params = {"top_k": 20} if name != "cos_cubed" else {}
    res = S.run_scorer(name, {"similarity": sim, "pooled": acts}, params)
    assert torch.equal(res.scores[:6].argmax(dim=1), planted)
    # Confidence separates the planted units' answers from the noise units' best guesses.
    planted_conf = res.confidence[:6].gather(1, planted[:, None]).mean()
    noise_conf = res.confidence[6:].max(dim=1).values.mean()
    assert planted_conf > noise_conf + 0.15


def test_planted_concept_ranks_first_patch():
    img, txt, sim, acts, planted = _planted_world()
    # The unit's top patches: its 10 most activating images' embeddings.
    top = torch.topk(acts[:, :6], k=10, dim=0)
    unit_patches, unit_weights = top.indices.T, top.values.T
    for mode in ("diff", "z"):
        res = S.run_scorer("patch", {"patch_emb": img, "text_emb": txt,
                                     "unit_patches": unit_patches,
                                     "unit_weights": unit_weights}, {"mode": mode})
        assert torch.equal(res.scores.argmax(dim=1), planted), mode
        assert (res.confidence.gather(1, planted[:, None]) > 0.9).all()


def test_planted_concept_ranks_first_top_images():
    """top_images: the mean of a unit's top images' similarities minus the concept's mean; streamed
    through the embeddings (the mean of cosines is the cosine with the mean) or from the dense
    matrix, the same scores, and equal to gathering each unit's top images by hand."""
    img, txt, sim, acts, planted = _planted_world()
    res = S.run_scorer("top_images", {"similarity": sim, "peak": acts}, {"top_k": 10})
    assert torch.equal(res.scores[:6].argmax(dim=1), planted)
    streamed = S.top_image_scores(S.Similarity(img, txt), acts, top_k=10, chunk=7)
    torch.testing.assert_close(streamed, res.scores, rtol=0, atol=1e-5)
    top = torch.topk(acts, 10, dim=0).indices.T                    # [u, 10]
    by_hand = torch.stack([sim[t].mean(0) for t in top]) - sim.mean(0)
    torch.testing.assert_close(res.scores, by_hand, rtol=0, atol=1e-6)
    with pytest.raises(BadInput, match="images"):
        S.top_image_scores(sim[:-1], acts)


def test_patch_contrast_stops_generic_concept():
    """A concept near every patch wins on raw similarity but not after the contrast."""
    g = torch.Generator().manual_seed(11)
    d = 32
    generic = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    specific = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    patches = torch.nn.functional.normalize(
        2 * generic + 0.5 * torch.randn(200, d, generator=g), dim=-1)
    patches[:10] = torch.nn.functional.normalize(2 * generic + 1.5 * specific
                                                 + 0.3 * torch.randn(10, d, generator=g), dim=-1)
    texts = torch.stack([generic, specific])
    unit = torch.arange(10)[None, :]
    raw = (patches[:10] @ texts.T).mean(0)
    assert raw.argmax() == 0                                     # generic wins without contrast
    scores = S.patch_scores(patches, texts, unit)
    assert scores.argmax(dim=1).item() == 1


def test_planted_concept_ranks_first_iou():
    g = torch.Generator().manual_seed(3)
    n, c, H = 40, 5, 16
    masks = torch.rand(n, c, H, H, generator=g) > 0.8
    # Unit 0 fires where concept 3 is; unit 1 where concept 1 is; both on a coarser 8x8 map.
    def follow(k):
        m = masks[:, k].float()[:, None]
        return torch.nn.functional.avg_pool2d(m, 2) + 0.05 * torch.rand(n, 1, 8, 8, generator=g)
    maps = torch.cat([follow(3), follow(1)], dim=1)              # [n, 2, 8, 8]
    res = S.run_scorer("iou", {"act_maps": maps, "masks": masks}, {"top_fraction": 0.1})
    assert res.scores.argmax(dim=1).tolist() == [3, 1]
    assert ((res.scores >= 0) & (res.scores <= 1)).all()


# ---- iou by hand ----------------------------------------------------------------------------


def test_iou_matches_hand_computation():
    # Two images, 1 unit, 2 concepts, 2x2 maps equal to the mask size (no upsampling).
    maps = torch.tensor([[[[5.0, 1.0], [1.0, 1.0]]],
                         [[[5.0, 5.0], [1.0, 1.0]]]])               # [2, 1, 2, 2]
    masks = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 0] = True                                      # concept 0: top-left of img 0
    masks[0, 0, 0, 1] = True                                      # ... and top-right of img 0
    masks[1, 0, 0, 0] = True                                      # ... top-left of img 1
    masks[1, 1, 1, :] = True                                      # concept 1: bottom row img 1
    acc = S.IoUAccumulator(torch.tensor([2.0]), n_concepts=2)
    acc.update(maps[:1], masks[:1])                               # streamed: one image at a time
    acc.update(maps[1:], masks[1:])
    iou = acc.result()
    # Unit on: img0 {(0,0)}, img1 {(0,0),(0,1)} -> 3 pixels.
    # Concept 0: img0 {(0,0),(0,1)}, img1 {(0,0)}: inter = 1 + 1 = 2; union = 3 + 3 - 2 = 4.
    # Concept 1: img1 {(1,0),(1,1)}: inter 0; union 3 + 2 = 5.
    assert iou[0, 0].item() == pytest.approx(2 / 4)
    assert iou[0, 1].item() == pytest.approx(0.0)


def test_top_quantile_threshold_is_exact():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(50, 3, 4, 4, generator=g)
    tq = S.TopQuantile(3, total=50 * 16, top_fraction=0.01)      # k = 8 values per unit
    for i in range(0, 50, 7):
        tq.update(maps[i : i + 7])
    flat = maps.transpose(0, 1).reshape(3, -1)
    expected = torch.sort(flat, dim=1, descending=True).values[:, 7]
    assert torch.equal(tq.thresholds(), expected)
    assert ((flat > tq.thresholds()[:, None]).sum(1) == 7).all()


def test_iou_upsamples_maps_to_mask_size():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True
    acc = S.IoUAccumulator(torch.tensor([0.5]), 1)
    acc.update(maps, masks)
    assert 0.3 < acc.result().item() <= 1.0


# ---- confidence -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(S.SCORERS))
def test_confidence_bounded_for_every_scorer(name):
    img, txt, sim, acts, planted = _planted_world(seed=1)
    if name == "patch":
        top = torch.topk(acts, k=8, dim=0)
        inputs = {"patch_emb": img, "text_emb": txt, "unit_patches": top.indices.T,
                  "unit_weights": top.values.T}
    elif name == "iou":
        g = torch.Generator().manual_seed(0)
        inputs = {"act_maps": torch.randn(20, 6, 4, 4, generator=g),
                  "masks": torch.rand(20, 30, 8, 8, generator=g) > 0.7}
    elif name == "encoder_iou":
        g = torch.Generator().manual_seed(0)
        inputs = {"act_maps": torch.randn(20, 6, 4, 4, generator=g), "cell_emb": torch.randn(20, 16, 12, generator=g),
                  "text_emb": torch.randn(30, 12, generator=g), "baseline": torch.zeros(30)}
    else:
        inputs = {"similarity": sim, "pooled": acts, "peak": acts}
    res = S.run_scorer(name, inputs)
    assert res.confidence.shape == res.scores.shape
    assert torch.isfinite(res.confidence).all()
    assert (res.confidence >= 0).all() and (res.confidence <= 1).all()
    assert res.params == S.get_scorer(name).defaults


def test_confidence_calibrated_under_null_and_high_for_signal():
    g = torch.Generator().manual_seed(0)
    null = torch.randn(400, 2000, generator=g)
    conf = S.confidence(null)
    top = conf.max(dim=1).values
    # The best of C null concepts: spread over (0, 1), not pinned at 1 as a rank would be.
    assert 0.25 < top.mean().item() < 0.75
    strong = null.clone()
    strong[:, 0] = 8.0
    assert (S.confidence(strong)[:, 0] > 0.99).all()
    flat = torch.ones(2, 10)
    assert (S.confidence(flat) == 0).all()
    with_nan = torch.randn(1, 50, generator=g)
    with_nan[0, 3] = float("nan")
    c = S.confidence(with_nan)
    assert c[0, 3] == 0 and torch.isfinite(c).all()


# ---- registry -------------------------------------------------------------------------------


def test_registry_lists_and_rejects():
    names = [s["name"] for s in S.list_scorers()]
    assert names == ["patch", "soft_wpmi", "wpmi", "cos_cubed", "top_images", "iou", "encoder_iou"]
    with pytest.raises(UnknownScorer) as e:
        S.get_scorer("softwpmi")
    assert "Did you mean soft_wpmi" in str(e.value) and "cos_cubed" in str(e.value)
    with pytest.raises(BadParameter) as e:
        S.resolve_params("wpmi", {"topk": 3})
    assert "top_k=28" in str(e.value)
    with pytest.raises(BadInput):
        S.run_scorer("soft_wpmi", {"similarity": torch.zeros(3, 3)})


def test_scorers_declare_what_a_pipeline_computes_for_them():
    """The dissect computes an input only when some scorer needs it (no per-scorer branch)."""
    needs = {name: S.get_scorer(name).needs() for name in S.SCORERS}
    assert needs["patch"] == {"patch_emb", "text_emb", "unit_patches", "unit_weights"}
    assert needs["soft_wpmi"] == needs["wpmi"] == needs["cos_cubed"] == {"similarity", "pooled"}
    assert needs["top_images"] == {"similarity", "peak"}
    assert needs["iou"] == {"iou_scores"}
    assert needs["encoder_iou"] == {"encoder_iou_scores", "similarity"}
    assert [n for n in S.SCORERS if S.get_scorer(n).needs_masks()] == ["iou"]
    assert [n for n in S.SCORERS if S.get_scorer(n).needs_thresholds()] == ["iou", "encoder_iou"]


def test_scorers_fit_their_parameters_to_the_probe_set():
    """CLIP-Dissect's top_k cannot exceed the number of images; other parameters pass through."""
    for name in ("soft_wpmi", "wpmi", "top_images"):
        p = S.resolve_params(name)
        assert S.get_scorer(name).prepared(p, 7) == {**p, "top_k": 7}
        assert S.get_scorer(name).prepared(p, 10_000) == p
    for name in ("patch", "cos_cubed", "iou"):
        p = S.resolve_params(name)
        assert S.get_scorer(name).prepared(p, 1) == p


def test_iou_takes_scores_computed_while_streaming():
    """The pipeline's IoU (accumulated beside the single pass) goes through run_scorer like any
    other scorer: same scores, the scorer's parameters and confidence."""
    g = torch.Generator().manual_seed(0)
    maps, masks = torch.randn(12, 5, 4, 4, generator=g), torch.rand(12, 3, 8, 8, generator=g) > 0.7
    direct = S.iou_scores(maps, masks, top_fraction=0.05)
    res = S.run_scorer("iou", {"iou_scores": direct}, {"top_fraction": 0.05})
    assert torch.equal(res.scores, direct) and res.params == {"top_fraction": 0.05}
    assert not res.uses_encoder and torch.equal(res.confidence, S.confidence(direct))
    assert torch.equal(S.run_scorer("iou", {"act_maps": maps, "masks": masks}, {"top_fraction": 0.05}).scores, direct)


# ---- Arrow rows -----------------------------------------------------------------------------


def test_top_tables_match_schema_columns():
    _, _, sim, acts, planted = _planted_world(noise_units=0)
    res = S.run_scorer("cos_cubed", {"similarity": sim, "pooled": acts})
    concepts = [f"c{i}" for i in range(sim.shape[1])]
    t = S.top_concepts(res, concepts, top_n=3, vocabulary="v", encoder="enc", model="m",
                       layer="layer1")
    assert t.column_names == ["unit", "scorer", "rank", "concept", "score", "confidence",
                              "vocabulary", "encoder", "model", "layer"]
    assert t.num_rows == 6 * 3
    assert t.schema.field("unit").type == pa.int32() and t.schema.field("score").type == pa.float32()
    rows = t.to_pylist()
    assert [r["concept"] for r in rows if r["rank"] == 0] == [concepts[i] for i in planted]
    # concept -> units is derived by the store from these rows (test_store.py, test_store_derived.py)



# ---- encoder_iou ------------------------------------------------------------------------------


def test_a_label_map_scores_the_same_iou_as_its_one_hot_masks():
    """The label-map path (one concept per pixel, -1 none) is the bool-mask path exactly."""
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(6, 5, 4, 4, generator=g)
    labels = torch.randint(-1, 7, (6, 16, 16), generator=g)
    masks = torch.stack([labels == c for c in range(7)], dim=1)            # [6, 7, 16, 16]
    thr = torch.quantile(acts.transpose(0, 1).reshape(5, -1), 0.8, dim=1)
    a, b = S.IoUAccumulator(thr, 7), S.IoUAccumulator(thr, 7)
    for i in (0, 3):
        a.update(acts[i : i + 3], masks[i : i + 3])
        b.update(acts[i : i + 3], labels[i : i + 3])
    assert torch.equal(a.result(), b.result())


def test_encoder_iou_names_the_concept_the_encoder_sees_where_the_unit_fires():
    """Cells take the concept their window is closest to above its baseline; a unit firing on
    the cells of concept 2 (and a little everywhere) scores IoU 1 with it and ranks it first;
    a concept close to every cell (a high baseline) does not win them."""
    d, n, g = 8, 20, 4
    text = torch.eye(d)[:4]                                          # concepts 0..3 on the axes
    gen = torch.Generator().manual_seed(1)
    where = torch.randint(0, 3, (n, g * g), generator=gen)           # each cell shows concept 0, 1 or 2
    cells = torch.nn.functional.one_hot(where, d).float() + 0.6 * torch.eye(d)[3]   # all near concept 3
    baseline = torch.tensor([0.3, 0.3, 0.3, 0.6])                    # concept 3: close to everything
    lab = S.cell_concepts(cells, text, baseline)
    assert torch.equal(lab.view(n, -1), where)
    big = S.label_map(lab, 16)
    assert big.shape == (n, 16, 16) and torch.equal(big[:, :4, :4], lab[:, :1, :1].expand(n, 4, 4))
    side = S.CELL_RESOLUTION
    on = S.label_map(lab, side) == 2                                 # the cells of concept 2, at full size
    acts = on.float()[:, None] + 0.01 * torch.rand(n, 1, side, side, generator=gen)
    res = S.run_scorer("encoder_iou", {"act_maps": acts, "cell_emb": cells, "text_emb": text, "baseline": baseline},
                       {"top_fraction": float(on.float().mean()) - 1e-3})
    assert int(res.scores[0].argmax()) == 2 and float(res.scores[0, 2]) > 0.95


def test_a_border_cell_takes_the_window_that_says_more():
    """With each border cell's second window after the g*g (images.CellWindows), a border cell
    takes the concept of whichever of its two windows exceeds its baseline more; inner cells
    have one window."""
    g, d = 4, 4
    text = torch.eye(d)
    baseline = torch.tensor([0.0, 0.0, 0.0, 1.0])                    # concept 3 never wins
    border = S.border_cells(g)
    assert len(border) == 12 and (0, 0) in border and (1, 1) not in border
    first = torch.tensor([0.5, 0.0, 0.0, 0.5]).expand(1, g * g, d).clone()   # concept 0 at cosine 0.71
    second = torch.tensor([0.0, 0.0, 0.3, 0.6]).expand(1, len(border), d).clone()   # concept 2 at 0.45
    second[0, 0] = torch.tensor([0.0, 0.9, 0.0, 0.1])                # cell (0, 0): concept 1 at 0.99, says more
    lab = S.cell_concepts(torch.cat([first, second], 1), text, baseline)
    assert lab.shape == (1, g, g)
    assert int(lab[0, 0, 0]) == 1 and int(lab[0, 0, 1]) == 0 and int(lab[0, 1, 1]) == 0
    assert torch.equal(S.cell_concepts(first, text, baseline), torch.zeros(1, g, g, dtype=torch.long))
