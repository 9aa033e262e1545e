"""The analysis questions answered on the demo store (the fast probe world's CNN and ViT,
dissected by the real pipeline): find in all three modes, compare, ablate, audit."""

import shutil

import pytest

from neurostore.analysis import ablate, audit, compare, find
from neurostore.store import Store


@pytest.fixture(scope="module")
def written(demo_run, tmp_path_factory):
    """(summary, a copy of the demo store) for the tests that write (ablate, audit): the shared
    store stays as the demo left it for every other test."""
    summary, store = demo_run
    path = tmp_path_factory.mktemp("analysis") / "store"
    shutil.copytree(store.path, path)
    return summary, Store.open(path)


def test_find_exact_semantic_and_open_vocabulary(demo_run):
    summary, store = demo_run
    cue = summary["world"]["config"]["cue_kind"]
    exact = find(store, cue, methods=("exact",), top=5)
    assert exact.units.num_rows > 0
    assert set(exact.units.column("concept").to_pylist()) == {cue}
    # units whose headline is the concept lead, as in concept_neurons
    lead = exact.units.column("headline").to_pylist()
    assert lead[0] and lead == sorted(lead, reverse=True)
    # 'zebra stripes' is in no vocabulary; MiniLM maps it to the stored concept 'striped'.
    sem = find(store, "zebra stripes", methods=("semantic",), top=5)
    assert "striped" in [c["concept"] for c in sem.concepts]
    assert sem.units.num_rows > 0 and set(sem.units.column("method").to_pylist()) == {"semantic"}
    # Open vocabulary: the phrase is embedded with the run's own encoder and matched to patches.
    opn = find(store, "a small mark in the corner", methods=("open",), top=5)
    assert opn.encoders == [summary["dissections"]["cnn"]["encoder"]]
    assert opn.units.num_rows == 5 and set(opn.units.column("method").to_pylist()) == {"open"}
    assert opn.profile.num_rows > 0  # depth profile


def test_open_vocabulary_confidence_is_the_patch_scorers_own(demo_run):
    """A phrase is scored and calibrated as the `patch` scorer would have had it been in the
    vocabulary: a stored concept gets its stored score and confidence back, unit by unit (within
    what boxes with the same pixels, stored once, move), and a phrase the probe world never draws
    gets no confident unit (the old open-vocabulary confidence put every layer's best near 1)."""
    import numpy as np

    from neurostore import trust
    from neurostore.encoding import cached_vectors

    summary, store = demo_run
    cue = summary["world"]["config"]["cue_kind"]
    enc = summary["dissections"]["cnn"]["encoder"]
    for model in ("probe-cnn", "probe-vit"):
        got = trust.phrase_explanations(store, model, cue, cached_vectors(store, enc, "concept", [cue])[cue], enc)
        stored = store.df("SELECT layer, unit, score, confidence FROM scores WHERE model = $m AND scorer = 'patch' "
                          "AND concept = $c", {"m": model, "c": cue})
        both = got.merge(stored, on=["layer", "unit"], suffixes=("", "_stored"))
        assert len(both) == len(stored) > 0 and got.attrs["files_missing"] == 0
        assert np.allclose(both["score"], both["score_stored"], atol=0.01)
        assert np.allclose(both["confidence"], both["confidence_stored"], atol=0.03)
        assert got["confidence"].max() > 0.5            # the planted cue is found
    dog = find(store, "a photo of a dog", methods=("open",))
    assert dog.units.num_rows > 0 and max(dog.profile.column("best_confidence").to_pylist()) < 0.2
    # the held-out images' vectors are found by the content hashes the dissect stored, not by
    # reading the files again (10,000 of them at 50,000 probe images)
    from neurostore.images import file_hash
    images = store.df("SELECT image_id, path, content_hash FROM images WHERE image_id IN (SELECT image_id FROM pooled)")
    assert len(images) > 0 and images["content_hash"].notna().all()   # every image the dissects read
    assert all(h == file_hash(p) for p, h in zip(images["path"][:20], images["content_hash"][:20]))


def test_compare_cnn_and_vit(demo_run):
    _, store = demo_run
    res = compare(store, "probe-cnn", "probe-vit")
    s = res.summary
    assert s["activation_pairs"] == min(s["units_a"], s["units_b"]) > 0
    # two networks trained on one world share signals (0.44 on the fast demo), yet are no copies
    assert 0.2 < s["mean_matched_corr"] < 1.0
    assert res.coverage and all(c["model"] in ("probe-cnn", "probe-vit") for c in res.coverage)
    stored = store.query("compare_models", {"model_a": "probe-cnn", "model_b": "probe-vit"})
    assert stored.num_rows > 0


def test_ablation_is_stored_per_class(written):
    summary, store = written
    res = ablate(store, "probe-cnn", ["conv4:0-7"], progress=False, max_images=300)
    a = res.ablations[0]
    classes = store.sql("SELECT classes FROM models WHERE model = 'probe-cnn'")["classes"][0].as_py()
    assert set(a.per_class) == set(classes)
    rows = [r for r in store.query("ablation_effects", {"model": "probe-cnn"}).to_pylist()
            if r["run_id"] == res.run_id]
    assert len(rows) == len(classes)
    for r in rows:
        assert r["accuracy_change"] == pytest.approx(r["ablated"] - r["baseline"], abs=1e-6)  # FLOAT columns
    from neurostore.errors import BadParameter, cli_message

    for n in (0, -5):   # ran on 6 images and stored the effects before
        with pytest.raises(BadParameter) as e:
            ablate(store, "probe-cnn", ["conv4:0-7"], progress=False, max_images=n)
        assert cli_message(e.value) == f"--max-images {n} must be at least 1."


def test_audit_names_the_planted_cue_and_class(written):
    summary, store = written
    cfg = summary["world"]["config"]
    res = audit(store, "probe-cnn", progress=False, max_images=600)
    h = res.headlines[0]
    assert (h["class"], h["concept"]) == (cfg["cue_class"], cfg["cue_kind"])
    assert h["verified"] is True and h["cue_flip_after"] < h["cue_flip_before"]


def test_piped_result_tables_are_not_folded(demo_run):
    """Without a terminal (a pipe, a log, CI) rich would lay tables out in 80 columns and fold
    every cell into slivers ('probe-' / 'vit'); the CLI lays them out 160 wide instead."""
    import os
    import subprocess
    import sys

    summary, store = demo_run
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "neurostore.cli", "find", summary["world"]["config"]["cue_kind"],
                        "--store", str(store.path), "--top", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("depth frac" in l and "confidence" in l for l in lines), r.stdout  # one header line
    rows = [l for l in lines if l.lstrip().startswith(("exact", "open", "semantic"))]
    assert rows and all(("probe-cnn" in l or "probe-vit" in l) for l in rows), r.stdout


def test_audit_flags_only_cue_units_and_verifies_the_vit(demo_run):
    """The CNN flags only units that rise when the cue is drawn (not the class-selective shape
    units a scorer mislabels), and the ViT, which carries the watermark in its residual stream
    rather than its MLP neurons, is verified by projecting the cue's direction out."""
    summary, store = demo_run
    cfg = summary["world"]["config"]
    res = audit(store, ["probe-cnn", "probe-vit"], progress=False, max_images=600, write=False)
    units = res.units.to_pylist()
    flagged = [u for u in units if u["flagged"]]
    assert flagged and all(u["cue_effect"] >= 1.0 for u in flagged)
    assert {u["label"] for u in flagged if u["model"] == "probe-cnn"} == {cfg["cue_kind"]}
    h = {x["model"]: x for x in res.headlines}["probe-vit"]
    assert (h["class"], h["concept"]) == (cfg["cue_class"], cfg["cue_kind"])
    assert h["verified"] is True and h["ablation"] == "direction" and h["direction_layer"].startswith("blocks.")
    assert h["cue_flip_after"] <= 0.3 * h["cue_flip_before"]


def test_ablate_tokens(demo_run):
    from neurostore.errors import BadParameter

    _, store = demo_run
    with pytest.raises(BadParameter, match="needs a token model"):
        ablate(store, "probe-cnn", ["conv4:0"], tokens=True, write=False, progress=False)
    units = ["blocks.1.mlp.fc1:0-31"]
    plain = ablate(store, "probe-vit", units, write=False, progress=False, max_images=300).ablations[0]
    tok = ablate(store, "probe-vit", units, tokens=True, write=False, progress=False, max_images=300).ablations[0]
    assert tok.per_class.keys() == plain.per_class.keys()
    assert tok.accuracy_after != plain.accuracy_after or tok.cue != plain.cue   # the tokens changed something
