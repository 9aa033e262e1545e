"""Dictionary features: fitting (TopK SAE, NMF), their store rows, the feature layer as a module
the recorder hooks, dissecting and querying features on the fast probe world's CNN and ViT, and
the one-line errors of the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from neurostore import features
from neurostore.models import list_layers, load_target
from neurostore.pipeline import dissect
from neurostore.record import activation_maps
from neurostore.store import Store

from _cli import run_cli

SMALL = dict(width=2, k=4, steps=60, max_samples=16384, progress=False, log=lambda *a: None)




@pytest.fixture(scope="module")
def fitted(tmp_path_factory, probe_world):
    """A store with a small TopK SAE on the CNN's conv4 and on the ViT's blocks.1.mlp.fc1, both
    dissected (with their source layers) on 120 probe images with the patch and iou scorers."""
    torch.set_num_threads(1)
    store = Store.open(tmp_path_factory.mktemp("features") / "store")
    out = {}
    for name, layer in (("cnn", "conv4"), ("vit", "blocks.1.mlp.fc1")):
        spec = f"probe:{name}@{probe_world.root}"
        s = features.fit(store, spec, layer, "topk-sae", **SMALL)
        d = dissect(store, spec, world=probe_world, layers=[layer, s["layer"]], vocabulary="probe",
                    scorers=["patch", "iou"], max_images=120, progress=False, evaluate=False, log=lambda *a: None)
        out[name] = (spec, s, d)
    return store, out


def test_fit_stores_the_dictionary_with_provenance_and_quality(fitted):
    store, out = fitted
    spec, s, _ = out["cnn"]
    assert s["layer"] == "conv4.topk_sae_2x" and s["n_features"] == 2 * 64
    row = store.df("SELECT * FROM dictionaries WHERE model = 'probe-cnn'").iloc[0]
    assert (row["source_layer"], row["method"], row["width"], row["k"], row["seed"]) == ("conv4", "topk-sae", 2, 4, 0)
    assert row["dataset"] == s["dataset"] and row["n_samples"] == s["samples"] > 1024
    assert 0.3 < row["fve"] <= 1.0 and 0 < row["l0"] <= 4 and 0 <= row["dead_fraction"] <= 1
    assert len(row["w_enc"]) == len(row["w_dec"]) == 64 * 128
    run = store.df("SELECT command, params FROM runs WHERE run_id = $r", {"r": s["run_id"]}).iloc[0]
    assert run["command"] == "features fit" and json.loads(run["params"])["method"] == "topk-sae"
    assert features.ls(store, "probe-cnn").column("layer").to_pylist() == ["conv4.topk_sae_2x"]


def test_feature_layer_is_a_module_the_recorder_sees_and_the_model_is_unchanged(fitted, probe_world):
    store, out = fitted
    for name, (spec, s, _) in out.items():
        target = load_target(spec)
        x = torch.randn(3, 3, target.input_size, target.input_size)
        with torch.no_grad():
            before = target.module(x)
        assert features.attach(target, store) == [s["layer"]]
        assert features.attach(target, store) == [s["layer"]]  # twice: no second module or hook
        assert len(target.extra["feature_hooks"]) == 1
        infos = {li.layer: li for li in list_layers(target)}
        src, feat = infos[s["source_layer"]], infos[s["layer"]]
        assert feat.n_units == s["n_features"] and (feat.grid_h, feat.grid_w) == (src.grid_h, src.grid_w)
        maps = activation_maps(target, [s["source_layer"], s["layer"]], x)
        enc = dict(target.module.named_modules())[s["layer"]]
        src_map = maps[s["source_layer"]]                                     # [b, units, h, w]
        want = enc.encode(src_map.movedim(1, -1).reshape(-1, src.n_units))    # [b*h*w, features]
        got = maps[s["layer"]].movedim(1, -1).reshape(-1, feat.n_units)
        assert torch.allclose(got, want, atol=1e-5)
        assert int((got > 0).sum(1).max()) <= 4                               # TopK: at most k active
        with torch.no_grad():
            assert torch.equal(target.module(x), before)                      # the hook changes nothing


def test_features_are_dissected_and_queried_like_neurons(fitted):
    store, out = fitted
    for name, (spec, s, d) in out.items():
        assert s["layer"] in d["layers"]
        n = store.df("SELECT count(DISTINCT unit) AS n FROM explanations WHERE model = $m AND layer = $l",
                     {"m": d["model"], "l": s["layer"]})["n"][0]
        assert n == s["n_features"]
        layer = store.df("SELECT kind, n_units FROM layers WHERE model = $m AND layer = $l",
                         {"m": d["model"], "l": s["layer"]}).iloc[0]
        assert layer["n_units"] == s["n_features"]
        unit = int(store.df("SELECT unit FROM explanations WHERE model = $m AND layer = $l LIMIT 1",
                            {"m": d["model"], "l": s["layer"]})["unit"][0])
        assert store.query("neuron_concepts", {"model": d["model"], "layer": s["layer"], "unit": unit}).num_rows > 0
    concepts = store.df("SELECT DISTINCT layer FROM concept_units")["layer"].tolist()
    assert any("topk_sae" in layer for layer in concepts)


def test_patches_and_patch_scores_of_a_layer_do_not_depend_on_the_other_layers_of_the_run(fitted, probe_world,
                                                                                         tmp_path):
    """conv4 and its dictionary's features, each dissected alone, get the patches and `patch`
    scores they got in one run together: the contrast is over a layer's own patches
    (scorers.own_patches) and a box merges only with its own layer's near-identical boxes
    (patches.py; merged across layers, features took conv4's slightly different crops)."""
    import shutil

    store, out = fitted
    spec, s, _ = out["cnn"]
    scores = ("SELECT unit, rank, concept, score FROM scores WHERE model = 'probe-cnn' AND layer = $l "
              "AND scorer = 'patch' ORDER BY unit, rank")
    patches = ("SELECT unit, rank, patch_id FROM activations WHERE model = 'probe-cnn' AND layer = $l "
               "ORDER BY unit, rank")
    for layer, n in (("conv4", 64), (s["layer"], 128)):
        shutil.copytree(store.path, tmp_path / layer)
        alone = Store.open(tmp_path / layer)
        dissect(alone, spec, world=probe_world, layers=[layer], vocabulary="probe", scorers=["patch"],
                max_images=120, progress=False, evaluate=False, log=lambda *a: None)
        assert alone.df(patches, {"l": layer}).equals(store.df(patches, {"l": layer}))
        got, together = alone.df(scores, {"l": layer}), store.df(scores, {"l": layer})
        assert len(got) == len(together) == n * 5
        assert got["concept"].tolist() == together["concept"].tolist()
        assert (got["score"] - together["score"]).abs().max() < 1e-5


def test_own_patches_scores_a_layer_as_if_its_patches_were_the_only_ones():
    from neurostore import scorers as S

    g = torch.Generator().manual_seed(0)
    pool, text = torch.randn(30, 8, generator=g), torch.randn(5, 8, generator=g)   # [P, d], [c, d]
    up = torch.tensor([[3, 7, -1], [7, 12, 20]])                                      # [u, k] into pool
    pe, local = S.own_patches(pool, up)
    assert pe.shape == (4, 8) and local.tolist() == [[0, 1, -1], [1, 2, 3]]
    alone = S.patch_scores(pool[[3, 7, 12, 20]], text, local)                         # only the layer's patches
    assert torch.allclose(S.patch_scores(pe, text, local), alone)
    assert not torch.allclose(S.patch_scores(pool, text, up), alone)                  # the run-wide contrast


def test_topk_sae_learns_a_planted_sparse_dictionary():
    """Data made of 2 of 32 planted directions per sample: a trained SAE explains most of the
    variance; the same SAE untrained (0 steps) does not."""
    g = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)   # [32, 16]
    codes = torch.zeros(6000, 32)
    idx = torch.randint(0, 32, (6000, 2), generator=g)
    codes.scatter_(1, idx, torch.rand(6000, 2, generator=g) + 0.5)
    x = codes @ atoms                                                                  # [6000, 16]
    held = x[5000:]
    trained = features.quality(features.fit_topk_sae(x[:5000], 64, 2, steps=600, seed=0), x[:5000], held)
    untrained = features.quality(features.fit_topk_sae(x[:5000], 64, 2, steps=0, seed=0), x[:5000], held)
    assert trained["fve"] > 0.8 > untrained["fve"] + 0.2


def test_batchtopk_sae_gives_samples_with_more_atoms_more_features():
    """Samples made of 0 to 4 of 32 planted directions: BatchTopK (k 2 on average) encodes an empty
    sample with about no features and a 4-atom sample with more than k, while TopK gives every
    sample k; its threshold round-trips through a store row."""
    g = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)   # [32, 16]
    n_atoms = torch.randint(0, 5, (6000,), generator=g)                               # [6000]
    on = torch.arange(4)[None] < n_atoms[:, None]                                      # [6000, 4]
    codes = torch.zeros(6000, 32).scatter_add_(1, torch.randint(0, 32, (6000, 4), generator=g),
                                               (torch.rand(6000, 4, generator=g) + 0.5) * on)
    x = codes @ atoms                                                                  # [6000, 16]
    enc = features.fit_topk_sae(x[:5000], 64, 2, steps=600, seed=0, batch_topk=True)
    assert enc.method == "batchtopk-sae" and enc.threshold > 0
    held, n_held = x[5000:], n_atoms[5000:]
    l0 = (enc.encode(held) > 0).sum(1).float()                                         # [1000]
    assert l0[n_held == 0].mean() < 0.5 and l0[n_held == 4].mean() > 2.5
    assert 1.5 < float(l0.mean()) < 2.5 and features.quality(enc, x[:5000], held)["fve"] > 0.6
    topk = features.fit_topk_sae(x[:5000], 64, 2, steps=60, seed=0)
    assert topk.threshold is None and set((topk.encode(held) > 0).sum(1).tolist()) <= {1, 2}
    row = {"method": enc.method, "n_units": 16, "n_features": 64, "k": 2, "threshold": enc.threshold,
           **{c: features._flat(getattr(enc, c)) for c in ("w_enc", "b_enc", "w_dec", "b_dec")}}
    assert torch.allclose(features._encoder_from_row(row).encode(held), enc.encode(held))


def test_jumprelu_sae_pulls_features_into_the_band_with_one_threshold(tmp_path):
    """Planted directions drawn from common to rare (probability ~ 1 / rank): jumprelu-sae puts
    more features' frequency within the band than BatchTopK, at about its FVE; the per-feature
    thresholds are folded into the weights, so one threshold encodes it and its row round-trips.
    A band that is not a range is refused."""
    from neurostore.errors import BadParameter

    g = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)   # [32, 16]
    p = 1.0 / torch.arange(1, 33).float()                                              # [32]
    idx = torch.multinomial(p / p.sum(), 6000 * 2, replacement=True, generator=g).view(6000, 2)
    x = torch.zeros(6000, 32).scatter_(1, idx, torch.rand(6000, 2, generator=g) + 0.5) @ atoms   # [6000, 16]
    lo, hi = 0.02, 0.05
    base = features.fit_topk_sae(x[:5000], 64, 2, steps=600, seed=0, batch_topk=True)
    jump = features.fit_topk_sae(x[:5000], 64, 2, steps=600, seed=0, band=(lo, hi))

    def in_band(enc):
        f = (enc.encode(x[:5000]) > 0).float().mean(0)                                  # [64] frequency
        return int(((f >= lo) & (f <= hi)).sum())
    assert jump.method == "jumprelu-sae" and in_band(jump) >= in_band(base) + 8        # measured 28 vs 12
    held = x[5000:]
    assert features.quality(jump, x[:5000], held)["fve"] > features.quality(base, x[:5000], held)["fve"] - 0.1
    row = {"method": jump.method, "n_units": 16, "n_features": 64, "k": 2, "threshold": jump.threshold,
           **{c: features._flat(getattr(jump, c)) for c in ("w_enc", "b_enc", "w_dec", "b_dec")}}
    assert torch.allclose(features._encoder_from_row(row).encode(held), jump.encode(held))
    with pytest.raises(BadParameter, match="band"):
        features.fit(tmp_path / "st", "probe:cnn", "conv4", "jumprelu-sae", 2, 4, band=(0.5, 0.1))


def test_active_samples_are_those_farthest_from_the_mean():
    """A background of near-identical samples and a few that stand out: the active fraction is the
    ones that stand out, and 1.0 keeps everything."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * 0.01                                      # [1000, 8] background
    x[::10] += torch.randn(100, 8, generator=g) * 3                                   # 100 objects
    kept = features.active_samples(x, 0.1)
    assert kept.shape == (100, 8) and torch.equal(kept.sort(0).values, x[::10].sort(0).values)
    assert features.active_samples(x, 1.0) is x


def test_nmf_dictionary_fits_the_rectified_layer(tmp_path, probe_world):
    torch.set_num_threads(1)
    s = features.fit(tmp_path / "st", f"probe:cnn@{probe_world.root}", "conv3", "nmf", width=1, steps=30,
                     max_samples=8000, progress=False, log=lambda *a: None)
    assert s["layer"] == "conv3.nmf_1x" and s["k"] is None and 0.5 < s["fve"] <= 1.0
    t = load_target(f"probe:cnn@{probe_world.root}")
    features.attach(t, Store.open(tmp_path / "st"))
    maps = activation_maps(t, ["conv3.nmf_1x"], torch.randn(2, 3, t.input_size, t.input_size))
    assert maps["conv3.nmf_1x"].min() >= 0                                  # NMF codes are non-negative


def test_cli_fit_ls_and_errors(tmp_path, probe_world, capsys, monkeypatch):
    spec = f"probe:cnn@{probe_world.root}"
    st = tmp_path / "st"
    code, out, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv2", "--width", "1",
                             "--k", "4", "--steps", "20", "--max-samples", "8000", "--store", st, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["layer"] == "conv2.topk_sae_1x" and s["next"].endswith("--layer conv2.topk_sae_1x")
    code, out, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv2", "--method",
                             "batchtopk-sae", "--width", "1", "--k", "4", "--steps", "20", "--max-samples", "8000",
                             "--store", st, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["layer"] == "conv2.batchtopk_sae_1x" and s["method"] == "batchtopk-sae" and s["threshold"] > 0
    code, out, _ = run_cli(capsys, monkeypatch, "features", "ls", "--store", st, "--format", "json")
    assert code == 0 and [r["layer"] for r in json.loads(out)] == ["conv2.batchtopk_sae_1x", "conv2.topk_sae_1x"]
    thresholds = Store.open(st).df("SELECT layer, threshold FROM dictionaries ORDER BY layer")["threshold"].tolist()
    assert thresholds[0] > 0 and thresholds[1] != thresholds[1]                # NULL (NaN) for topk-sae
    bad = {
        ("--method", "pca"): "Error: Unknown feature method 'pca'. Valid: batchtopk-sae, jumprelu-sae, nmf, "
                            "topk-sae. Example: --method topk-sae.",
        ("--width", "0"): "Error: --width must be a whole number of features per unit, at least 1; got 0. "
                          "Example: --width 8 (8 features per unit of the layer).",
        ("--steps", "0"): "Error: --steps must be at least 1; got 0. Leave it out for the default.",
        ("--steps", "-5"): "Error: --steps must be at least 1; got -5. Leave it out for the default.",
        ("--k", "1000"): "Error: --k 1000 active features per sample is more than the dictionary's 512 (8 per unit x "
                         "64 units); give --k 512 or less, or a larger --width.",
        ("--max-images", "5"): "Error: Layer 'conv4' of probe-cnn gives too few samples for 512 features: 5 images "
                               "x 64 positions = 320; it needs at least 8192 (0.25 of them fitted, --active). Use more "
                               "images, a smaller --width, or a layer with a spatial map or tokens.",
    }
    for (opt, val), line in bad.items():
        code, out, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv4", opt, val,
                                 "--store", st)
        assert code == 1 and out == ""
        assert " ".join(err.split()) == line
    # the store's model id where the spec is wanted (every other command takes the id)
    code, out, err = run_cli(capsys, monkeypatch, "features", "fit", "probe-cnn", "--layer", "conv4", "--store", st)
    assert code == 1 and " ".join(err.split()).startswith(
        "Error: 'probe-cnn' is a stored model's id; fitting features runs the model, so give its spec: 'probe:cnn")
    for val in ("0", "1.5"):
        code, out, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv2", "--active", val,
                                 "--store", st)
        assert code == 1 and " ".join(err.split()) == (
            f"Error: --active must be a fraction of the samples in (0, 1]; got {float(val)}. "
            f"Example: --active {features.ACTIVE_FRACTION} (fit on the {features.ACTIVE_FRACTION:.0%} farthest from "
            "the mean).")
    code, out, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv2", "--width", "1",
                             "--active", "0.001", "--store", st)
    assert code == 1 and " ".join(err.split()) == (
        "Error: Layer 'conv2' of probe-cnn gives too few samples for 32 features: 300 images x 256 positions = "
        "76800; it needs at least 1024000 (0.001 of them fitted, --active). Use more images, a smaller --width, "
        "or a layer with a spatial map or tokens.")
    code, _, err = run_cli(capsys, monkeypatch, "features", "fit", spec, "--layer", "conv2.topk_sae_1x",
                           "--store", st)
    assert code == 1 and "is a feature layer already" in err
