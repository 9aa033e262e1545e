"""Analysis layer: find, compare, audit, ablate (neurostore.analysis), their tables, named queries
and CLI commands.

Two kinds of fixture: a small store written directly through the Store API whose truth is known
by construction (model B's units are a permutation of model A's plus noise, with known labels),
and the real probe world (a non-default cue kind and class) dissected by the pipeline, for the
audit, ablation, open-vocabulary and CNN-vs-ViT tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from neurostore.analysis import ablate, audit, compare, find
from neurostore.analysis._common import load_model, parse_units
from neurostore.errors import BadParameter, NeurostoreError, UnknownLayer, UnknownModel
from neurostore.store import Store

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ["striped", "red", "circle", "dog", "watermark", "sky"]


def build_synthetic(path, n_img=60, seed=0):
    """Two models over the same 60 images. B's 8 units are A's 8 units permuted plus 10% noise,
    and carry A's labels (except B's first unit, relabelled 'sky')."""
    rng = np.random.default_rng(seed)
    st = Store.open(path)
    base = rng.normal(size=(n_img, 8))
    perm = rng.permutation(8)
    acts = {"ma": {"l1": base[:, :4], "l2": base[:, 4:]}}
    bb = base[:, perm] + 0.1 * rng.normal(size=(n_img, 8))
    acts["mb"] = {"b1": bb[:, :3], "b2": bb[:, 3:]}
    keys_a = [("l1", u) for u in range(4)] + [("l2", u) for u in range(4)]
    keys_b = [("b1", u) for u in range(3)] + [("b2", u) for u in range(5)]
    lab = {"ma": {k: CONCEPTS[i % 6] for i, k in enumerate(keys_a)}}
    lab["mb"] = {keys_b[j]: lab["ma"][keys_a[perm[j]]] for j in range(8)}
    lab["mb"][keys_b[0]] = "sky"
    images = [f"img{i:03d}" for i in range(n_img)]
    with st.run("synthetic", {"seed": seed}) as run:
        run.write("models", pa.Table.from_pylist([
            {"model": m, "spec": None, "arch": "X", "n_params": 1, "input_size": 32, "classes": None, "crop_fraction": None} for m in acts]))
        rows = [{"layer": l, "kind": "conv", "n_units": X.shape[1], "grid_h": 1, "grid_w": 1, "depth": d,
                 "depth_frac": float(d), "model": m}
                for m in acts for d, (l, X) in enumerate(acts[m].items())]
        run.write("layers", pa.Table.from_pylist(rows))
        for m in acts:
            run.write("pooled", pa.Table.from_pylist([
                {"dataset": "ds", "image_id": iid, "act_mean": X[i].tolist(), "act_max": X[i].tolist(),
                 "model": m, "layer": l} for l, X in acts[m].items() for i, iid in enumerate(images)]))
            run.write("units", pa.Table.from_pylist([
                {"unit": u, "dataset": "ds", "n_images": n_img, "act_mean": 0.0, "act_std": 1.0, "act_max": 1.0,
                 "frac_active": .5, "q50": 0., "q90": 1., "q99": 2., "hist_edges": None, "hist_counts": None,
                 "model": m, "layer": l} for l, X in acts[m].items() for u in range(X.shape[1])]))
        srows, erows = [], []
        for m in acts:
            for (l, u), c in lab[m].items():
                others = [x for x in CONCEPTS if x != c][:2]
                conf = 0.95 if u % 2 == 0 else 0.6
                for r, cc in enumerate([c] + others):
                    srows.append({"unit": u, "scorer": "patch", "rank": r, "concept": cc, "score": 0.1 - 0.02 * r,
                                  "confidence": conf if r == 0 else 0.2, "vocabulary": "v", "encoder": "e",
                                  "model": m, "layer": l})
                erows.append({"unit": u, "scorer": "patch", "label": c, "confidence": conf, "concepts": [c] + others,
                              "confidences": [conf, .2, .2], "summary": None, "summary_by": None, "vocabulary": "v",
                              "encoder": "e", "model": m, "layer": l})
        run.write("scores", pa.Table.from_pylist(srows))
        run.write("explanations", pa.Table.from_pylist(erows))
    return st, perm, keys_a, keys_b, lab


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("synth") / "store")


def cli(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "neurostore.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                      "HOME": str(Path.home())})
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr[-2000:]
    return p


# ---- find ---------------------------------------------------------------------------------------


def test_find_exact_lists_the_concepts_units_and_depth_profile(synth):
    st, _, _, _, lab = synth
    res = find(st, "Striped", methods=("exact",))
    want = {(m, l, u) for m in lab for (l, u), c in lab[m].items() if c == "striped"}
    got = {(r["model"], r["layer"], r["unit"]) for r in res.units.to_pylist() if r["confidence"] >= 0.5}
    assert got == want
    assert set(res.units.column("method").to_pylist()) == {"exact"}
    prof = res.profile.to_pylist()
    # Every dissected layer of both models appears, with depth; the best confidence is the label's.
    assert {(r["model"], r["layer"]) for r in prof} == {("ma", "l1"), ("ma", "l2"), ("mb", "b1"), ("mb", "b2")}
    assert max(r["best_confidence"] for r in prof if r["model"] == "ma") == pytest.approx(0.95)


def test_find_semantic_matches_a_phrase_absent_from_the_vocabulary(synth):
    st = synth[0]
    res = find(st, "zebra stripes", methods=("exact", "semantic"))
    assert [c["concept"] for c in res.concepts] == ["striped"]  # not a stored concept; MiniLM finds it
    sims = {r["similarity"] for r in res.units.to_pylist()}
    assert len(sims) == 1 and 0.6 <= sims.pop() < 1.0
    assert set(res.units.column("method").to_pylist()) == {"semantic"}
    assert find(st, "zebra stripes", methods=("exact",)).units.num_rows == 0


def _with_mb_untrained(path):
    """The synthetic store with model mb written again by a dissect that ran on random weights."""
    st, *_ = build_synthetic(path)
    with st.run("dissect", {"random_weights": {"target": True, "encoder": False}}) as run:
        run.write("models", pa.Table.from_pylist([{"model": "mb", "spec": "x@random", "arch": "X", "n_params": 1,
                                                   "input_size": 32, "classes": None, "crop_fraction": None}]))
    return st


def test_find_says_which_models_had_untrained_weights(tmp_path):
    """Rows of a model dissected with random weights (`@random`, `/random`) come with a note that
    they are a baseline: its run's params say so."""
    st = _with_mb_untrained(tmp_path / "s")
    res = find(st, "striped", methods=("exact",))
    assert {"ma", "mb"} <= set(res.units.column("model").to_pylist())
    said = [n for n in res.notes if "untrained" in n]
    assert len(said) == 1 and said[0].startswith("mb was dissected with untrained (random) weights")
    # compare says so too, and that its correlations rest on few images
    notes = compare(st, "ma", "mb", write=False).notes
    assert [n.split(":")[0] for n in notes] == ["mb was dissected with untrained (random) weights",
                                                 "the activation correlations are over 60 images; a few hundred make them stable"]


def test_every_page_of_an_untrained_model_says_so(tmp_path):
    """The web app's and the report's index, model, layer and neuron pages of a model dissected
    with random weights say its explanations are a baseline (the `untrained_models()` macro);
    a trained model's pages do not."""
    from neurostore.report import build_report

    st = _with_mb_untrained(tmp_path / "s")
    assert st.df("SELECT * FROM untrained_models()")["model"].tolist() == ["mb"]
    out = tmp_path / "report"
    build_report(st, out, max_units=1, progress=False)
    note = "was dissected with untrained (random) weights"
    pages = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.html")}
    for m in ("ma", "mb"):
        mine = [t for name, t in pages.items() if name.startswith((f"model/{m}.", f"layer/{m}/", f"neuron/{m}/"))]
        assert len(mine) >= 3 and all((f"{m} {note}" in t) == (m == "mb") for t in mine), m
    assert ">untrained</span>" in pages["index.html"]


def test_find_rejects_bad_input(synth):
    st = synth[0]
    with pytest.raises(UnknownModel, match="Unknown model 'nope'.*Valid: ma, mb"):
        find(st, "striped", models=["nope"])
    with pytest.raises(BadParameter, match="empty"):
        find(st, "   ")
    with pytest.raises(BadParameter, match="Unknown method 'fuzzy'"):
        find(st, "striped", methods=("fuzzy",))
    layers = sorted(st.sql("SELECT DISTINCT layer FROM layers").column("layer").to_pylist())
    with pytest.raises(UnknownLayer, match=f"Unknown dissected layer 'layer9'.*Valid: {', '.join(layers)}"):
        find(st, "striped", layers=["layer9"])  # said 'nothing found for striped' before
    # one name for a list argument is a list of one (it was read a character at a time: model 'm');
    # an empty list is refused (it silently meant every model); a phrase must be text
    one = find(st, "striped", models="ma", methods="exact").units.to_pylist()
    assert one == find(st, "striped", models=["ma"], methods=["exact"]).units.to_pylist() and one
    with pytest.raises(BadParameter, match=r"models=\[\] is empty: give at least one, or leave models out"):
        find(st, "striped", models=[])
    with pytest.raises(BadParameter, match="phrase=None must be a word or phrase"):
        find(st, None)
    # nothing found: the reasons of the methods that ran, and only those
    res = find(st, "qqqq zzzz", methods=("semantic",))
    assert res.notes == ["nothing found for 'qqqq zzzz': no stored concept within MiniLM similarity 0.6"]
    res = find(st, "qqqq", methods=("exact", "label"))
    assert res.notes == ["nothing found for 'qqqq': not a stored concept and no explanation's label names it"]


# ---- compare ------------------------------------------------------------------------------------


def test_compare_recovers_the_permutation_and_stores_both_sides(synth):
    st, perm, keys_a, keys_b, lab = synth
    res = compare(st, "ma", "mb")
    truth = {keys_a[perm[j]]: keys_b[j] for j in range(8)}
    got = {(r["layer"], r["unit"]): (r["other_layer"], r["other_unit"])
           for r in res.matches.to_pylist() if r["model"] == "ma" and r["method"] == "activation"}
    assert got == truth
    s = res.summary
    assert s["mean_matched_corr"] > 0.95
    assert s["label_agreement"] == pytest.approx(7 / 8)  # one B unit was relabelled
    assert s["label_agreement"] > s["label_agreement_chance"]
    assert s["partner_agreement"] > s["partner_agreement_chance"]
    # concepts: labels with confidence >= 0.9 (even unit indices): B has 'sky' and 'red' that A lacks
    assert {c["concept"] for c in res.concepts["only_in_b"]} == {
        c for (l, u), c in lab["mb"].items() if u % 2 == 0} - {c for (l, u), c in lab["ma"].items() if u % 2 == 0}
    # stored from both sides; a re-run replaces instead of adding
    n1 = st.sql("SELECT count(*) AS n FROM unit_matches").column("n")[0].as_py()
    assert n1 == 2 * 2 * 8
    compare(st, "mb", "ma")
    assert st.sql("SELECT count(*) AS n FROM unit_matches").column("n")[0].as_py() == n1
    q = st.query("compare_models", {"model_a": "ma", "model_b": "mb", "section": "matching"}).to_pylist()
    la = [r["value"] for r in q if r["metric"] == "label_agreement"]
    assert la and all(v == pytest.approx(7 / 8) for v in la)
    m = st.query("unit_matches", {"model": "mb", "other_model": "ma"}).to_pylist()
    assert {(r["layer"], r["unit"]): (r["other_layer"], r["other_unit"]) for r in m} == {v: k for k, v in truth.items()}


def test_compare_errors(synth):
    st = synth[0]
    with pytest.raises(BadParameter, match="two different models"):
        compare(st, "ma", "ma", write=False)
    with pytest.raises(NeurostoreError, match="bounded to 4 per model"):
        compare(st, "ma", "mb", max_units=4, write=False)
    # a layer typo is named as one (it said 'no pooled activations for the chosen layers')
    with pytest.raises(UnknownLayer, match="Unknown layer of ma 'l9'.*Valid: l1, l2"):
        compare(st, "ma", "mb", layers_a=["l9"], write=False)
    # a store opened read-only is refused before the work (after it, at the write, before)
    ro = Store.open(st.path, read_only=True)
    with pytest.raises(NeurostoreError, match="opened read-only, and this writes its results.*write=False"):
        compare(ro, "ma", "mb")
    assert compare(ro, "ma", "mb", write=False).run_id is None


def test_concept_depth_profile_query(synth):
    st = synth[0]
    rows = st.query("concept_depth_profile", {"concept": "watermark", "min_confidence": 0.9}).to_pylist()
    assert {(r["model"], r["layer"]) for r in rows} == {("ma", "l1"), ("ma", "l2"), ("mb", "b1"), ("mb", "b2")}
    assert [r["depth"] for r in rows if r["model"] == "ma"] == [0, 1]


# ---- units ----------------------------------------------------------------------------------------


def test_parse_units():
    assert parse_units(["conv4:3,7", "conv3/1"]) == {"conv4": [3, 7], "conv3": [1]}
    assert parse_units("blocks.3.mlp.fc1:0-3") == {"blocks.3.mlp.fc1": [0, 1, 2, 3]}
    assert parse_units(["5,2"], layer="conv2") == {"conv2": [2, 5]}
    with pytest.raises(BadParameter, match="Cannot read unit selection 'conv4'"):
        parse_units(["conv4"])
    with pytest.raises(BadParameter, match="Bad unit range '7-3'"):
        parse_units(["conv4:7-3"])
    # numbers, as the docstring allows with `layer` (an AttributeError on int.strip before)
    assert parse_units([7, 3], layer="conv4") == {"conv4": [3, 7]}
    assert parse_units(3, layer="conv4") == {"conv4": [3]}
    with pytest.raises(BadParameter, match="No units given"):
        parse_units(None)


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_find_json_is_one_object(synth):
    p = cli("find", "striped", "--store", synth[0].path, "--method", "exact", "--json", check_rc=0)
    obj = json.loads(p.stdout)
    assert obj["phrase"] == "striped" and obj["units"] and obj["profile"]


def test_cli_errors_are_one_line(synth):
    p = cli("compare", "ma", "zz", "--store", synth[0].path, check_rc=1)
    assert p.stderr.strip().splitlines()[-1].startswith("Error: Unknown model 'zz'. Valid: ma, mb.")
    p = cli("ablate", "ma", "--units", "conv4", "--store", synth[0].path, check_rc=1)
    assert "Error: Cannot read unit selection 'conv4'" in p.stderr
    p = cli("find", "striped", "--min-similarity", "5", "--store", synth[0].path, check_rc=1)
    assert "Error: --min-similarity 5.0 is a cosine similarity: give one from -1 to 1." in p.stderr
    with pytest.raises(BadParameter, match=r"^min_similarity=5.0 is a cosine similarity"):   # the API's own words
        find(synth[0], "striped", min_similarity=5.0)


def test_cli_help_has_examples():
    from typer.testing import CliRunner

    from neurostore.cli import app

    for cmd in ("find", "compare", "audit", "ablate"):
        r = CliRunner().invoke(app, [cmd, "--help"], terminal_width=200)
        assert r.exit_code == 0
        assert "Example: neurostore " + cmd in " ".join(r.output.split())


# ---- the probe world (slow: builds a world with a non-default cue and dissects two models) ----------

SLOW = pytest.mark.skipif(__import__("os").environ.get("NEUROSTORE_SLOW") != "1",
                          reason="builds and dissects a probe world; set NEUROSTORE_SLOW=1")


@pytest.fixture(scope="module")
def world_store(tmp_path_factory):
    """A fast world whose cue is a 'dot' planted on class 'ring' (not the default watermark/star),
    with its CNN and ViT dissected by the pipeline into a fresh store."""
    from neurostore.pipeline import dissect
    from neurostore.world import WorldConfig, build_world

    world = build_world(WorldConfig.fast(cue_kind="dot", cue_class="ring", seed=3), progress=False)
    path = tmp_path_factory.mktemp("world") / "store"
    for name in ("cnn", "vit"):
        dissect(path, f"probe:{name}@{world.root}", progress=False, log=lambda *a: None)
    return Store.open(path), world


@pytest.mark.slow
@SLOW
def test_audit_names_the_planted_cue_and_class_and_ablation_confirms_it(world_store):
    st, world = world_store
    res = audit(st, "probe-cnn", progress=False)
    h = res.headlines[0]
    assert (h["class"], h["concept"]) == (world.config.cue_class, world.config.cue_kind) == ("ring", "dot")
    assert h["verified"] is True and h["cue_flip_after"] < h["cue_flip_before"]
    rows = st.query("audit_findings", {"model": "probe-cnn", "verified": True}).to_pylist()
    assert rows and rows[0]["headline"] and rows[0]["concept"] == "dot" and rows[0]["threshold"] == 0.5


@pytest.mark.slow
@SLOW
def test_ablate_writes_per_class_effects(world_store):
    st, world = world_store
    res = ablate(st, "probe-cnn", ["conv4:0-15"], individually=False, progress=False)
    a = res.ablations[0]
    assert set(a.per_class) == set(world.classes)
    assert a.accuracy_after <= a.accuracy_before + 0.05
    rows = st.query("ablation_effects", {"model": "probe-cnn"}).to_pylist()
    mine = [r for r in rows if r["run_id"] == res.run_id]
    assert len(mine) == len(world.classes) and all(r["units"] == list(range(16)) for r in mine)
    for r in mine:
        assert r["accuracy_change"] == pytest.approx(r["ablated"] - r["baseline"], abs=1e-6)  # FLOAT columns


@pytest.mark.slow
@SLOW
def test_compare_cnn_vit_and_find_open_vocabulary(world_store):
    st, world = world_store
    res = compare(st, "probe-cnn", "probe-vit")
    s = res.summary
    assert s["activation_pairs"] == min(s["units_a"], s["units_b"]) > 0
    assert s["mean_matched_corr"] > 0.3
    assert any(c["n_labelled"] for c in res.coverage)
    # open vocabulary: a phrase in no vocabulary, answered from stored patch embeddings
    f = find(st, "a small bright spot in the corner", methods=("open",))
    assert f.encoders == [world.encoder().id]
    assert f.units.num_rows > 0 and set(f.units.column("method").to_pylist()) == {"open"}


# ---- token ablation (the ViT audit's verification) ---------------------------------------------------


def test_token_ablation_swaps_only_the_patch_tokens_where_the_units_fire(probe_world):
    """A ViT keeps a cue in its patch tokens, around any zeroed MLP neuron: the audit removes the
    units together with the tokens they fire on, mean-ablated where tokens enter the blocks."""
    import torch

    from neurostore.analysis._common import TokenAblation, all_logits, block_entry, intact_stats
    from neurostore.models import load_target

    t = load_target(f"probe:vit@{probe_world.root}")
    assert block_entry(t, "blocks.2.mlp.fc1") == "blocks.0" and block_entry(t, "head") is None
    _, cued, _ = probe_world.cue_pairs()
    x = cued[:48]
    layer = "blocks.1.mlp.fc1"
    stats = intact_stats(t, x, [layer])
    assert stats.peak[layer].shape == (48, 128) and stats.entry_mean["blocks.0"].shape == (65, 64)
    units = {layer: [int(stats.peak[layer].max(0).argmax())]}    # the unit with the largest peak
    tok = TokenAblation(t, units, stats)
    assert tok.usable and tok.entry == "blocks.0"
    tok.mask(x)
    m = tok.masked                                                  # [48, 65]
    assert not m[:, 0].any() and m.any() and not m.all()            # never the class token
    with_tokens = all_logits(t, x, units, tokens=tok)
    zeroed_only = all_logits(t, x, units)
    hit = m.any(1).numpy()
    assert np.allclose(with_tokens[~hit], zeroed_only[~hit], atol=1e-5)  # nothing masked: same logits
    assert not np.allclose(with_tokens[hit], zeroed_only[hit], atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(all_logits(t, x)), torch.from_numpy(all_logits(t, x, batch=7)))


# ---- residual-stream directions (where a ViT carries a cue outside its neurons) ----------------------


def test_concept_directions_point_from_the_concepts_images_to_the_rest():
    """A label's direction: the mean output on the images its units fire on most minus the rest."""
    from scipy.stats import rankdata

    from neurostore.analysis.audit import auroc, concept_directions

    rng = np.random.default_rng(0)
    n, d = 400, 16
    X = rng.normal(size=(n, d))
    on = np.zeros(n, bool)
    on[:40] = True                                            # 10% of the images hold the concept
    X[on, 3] += 3.0                                           # ... and move the stream along axis 3
    unit = np.where(on, 5.0, 0.0) + rng.normal(scale=0.1, size=n)
    ranks = {"l": rankdata(np.stack([unit, rng.normal(size=n)], 1), axis=0)}
    expl = {("l", 0): {"label": "watermark"}, ("l", 1): {"label": "noise"}}
    labels, D = concept_directions(expl, ranks, {"b": X}, ["l"], ["b"])
    assert labels == ["noise", "watermark"] and D["b"].shape == (2, d)
    assert float(D["b"][1, 3]) > 0.9 and abs(float(D["b"][0, 3])) < 0.5
    assert auroc(ranks["l"], on).tolist() == pytest.approx([1.0, 0.5], abs=0.15)
    assert concept_directions(expl, ranks, {"b": X}, ["l"], []) == ([], {})   # no blocks: a CNN


def test_direction_ablation_projects_it_out_of_the_residual_stream(probe_world):
    import torch

    from neurostore.analysis._common import all_logits, blocks_of, zeroed
    from neurostore.hooks import forward_hooks, keep
    from neurostore.models import load_target

    t = load_target(f"probe:vit@{probe_world.root}")
    assert blocks_of(t, "blocks.2.mlp.fc1") == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert blocks_of(t, "head") == []
    _, cued, _ = probe_world.cue_pairs()
    x = cued[:32]
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    got = {}
    with torch.no_grad(), zeroed(t, {}, directions={"blocks.1": d}), \
            forward_hooks(t.module, pre={"blocks.2": keep(got, "in")}):
        t.module(x)
    assert got["in"].shape == (32, 65, 64) and float((got["in"] @ d).abs().max()) < 1e-4
    assert not np.allclose(all_logits(t, x, directions={"blocks.1": d}), all_logits(t, x), atol=1e-3)


@pytest.mark.parametrize("name,layers", [("vit", ["blocks.1.mlp.fc1", "blocks.3.mlp.fc1"]), ("cnn", ["conv3", "conv4"])])
def test_logits_each_zeroed_equals_one_ablation_per_unit(probe_world, name, layers):
    """The audit's single-unit ablations run stacked in full batches; each must equal zeroing
    that unit alone."""
    from neurostore.analysis._common import all_logits, logits_each_zeroed
    from neurostore.models import load_target

    t = load_target(f"probe:{name}@{probe_world.root}")
    _, cued, _ = probe_world.cue_pairs()
    x = cued[:40]
    units = [(layers[0], 3), (layers[1], 0), (layers[0], 5)]
    got = logits_each_zeroed(t, x, units)                             # [3, 40, classes]
    assert got.shape == (3, 40, len(probe_world.classes))
    for j, (layer, u) in enumerate(units):
        np.testing.assert_allclose(got[j], all_logits(t, x, {layer: [u]}), atol=1e-4)
    assert not np.allclose(got[0], got[2], atol=1e-4)                # each row its own unit


def test_loading_a_stored_model_leaves_torch_threads_alone(probe_world, tmp_path):
    """ablate, audit and groups load the model behind a stored id; that must not cap the process's
    torch threads (it set them to at most 2: on a 16-core machine every later forward ran on 2)."""
    import torch

    from neurostore.pipeline import dissect

    store = Store.open(tmp_path / "store")
    dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=["fc"], scorers=["iou"],
            max_images=20, progress=False, log=lambda *a: None, evaluate=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert load_model(store, "probe-cnn", device="cpu") is not None
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
