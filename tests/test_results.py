"""One dissect is one run, and what dissect / evaluate return: a small probe-world dissect (real
world, models, encoder, MiniLM and store) with a hidden and a logit layer and a scorer of each
kind, then checks on its single commit and on the result objects."""

import json

import pytest

from neurostore.evaluation import evaluate
from neurostore.pipeline import dissect
from neurostore.store import Store

LAYERS = ["conv2", "fc"]
SCORERS = ["patch", "soft_wpmi", "iou"]
N_IMAGES = 60


@pytest.fixture(scope="module")
def one_dissect(probe_world, tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("results") / "s")
    res = dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, layers=LAYERS, scorers=SCORERS,
                  k=3, max_images=N_IMAGES, progress=False, log=lambda *a: None)
    return res, store


def test_a_dissect_is_one_run(one_dissect):
    """Scores, concept vectors (encoder's and MiniLM's) and the evaluation are one commit."""
    from neurostore.textembed import MINILM_ID

    res, store = one_dissect
    runs = store.sql("SELECT run_id, command FROM runs").to_pylist()
    assert runs == [{"run_id": res["run_id"], "command": "dissect"}]
    by_table = store.sql("""
        SELECT 'evaluations' AS t, list(DISTINCT run_id) AS runs FROM evaluations
        UNION ALL SELECT 'minilm', list(DISTINCT run_id) FROM embeddings WHERE encoder = $m
        UNION ALL SELECT 'scores', list(DISTINCT run_id) FROM scores""", {"m": MINILM_ID}).to_pylist()
    assert {r["t"]: r["runs"] for r in by_table} == {t: [res["run_id"]] for t in ("evaluations", "minilm", "scores")}
    # the MiniLM vectors are what SQL's semantic search finds
    assert store.sql("SELECT count(*) AS n FROM similar_concepts('star', 3)")["n"][0].as_py() == 3


def test_the_evaluation_in_the_run_is_the_stores(one_dissect):
    """The figures a dissect computes before it commits equal what `evaluate` reads back from
    the committed store; the standalone evaluate still commits a run of its own."""
    res, store = one_dissect
    ev = res.evaluation
    assert ev.run_id == res.run_id
    assert ev.to_dict() == evaluate(store, model="probe-cnn", write=False).to_dict()
    layers = ev.to_dict()["probe-cnn"]
    assert set(layers) == set(LAYERS)
    assert {"top1", "top5"} <= set(layers["fc"]["patch"]) and "interpretable" in layers["conv2"]["iou"]
    stored = store.sql("SELECT count(*) AS n FROM evaluations")["n"][0].as_py()
    assert stored == len(ev.rows) > 0

    again = evaluate(store, model="probe-cnn")
    assert again.run_id and again.to_dict() == ev.to_dict()
    runs = store.sql("SELECT command FROM runs ORDER BY started_at").column("command").to_pylist()
    assert runs == ["dissect", "eval"]
    assert store.sql("SELECT count(*) AS n FROM evaluations")["n"][0].as_py() == stored  # replaced, not added


def test_dissect_result_reads_as_the_dict_it_was(one_dissect):
    res, store = one_dissect
    d = res.to_dict()
    assert list(d) == ["run_id", "model", "spec", "dataset", "images", "rejects", "layers", "units", "patches",
                       "patch_boxes", "vocabulary", "concepts", "scorers", "encoder", "random_weights", "device",
                       "precision", "rows", "seconds", "timings", "passes", "resumed_from", "checkpoints",
                       "evaluation"]
    assert json.loads(json.dumps(d)) == d  # what --json prints
    assert res.images == res["images"] == N_IMAGES and res.layers == LAYERS and res.scorers == SCORERS
    assert d["evaluation"] == res.evaluation.to_dict()
    assert list(res.timings) == ["vocabulary", "record", "patches", "scores", "evaluate", "store"]
    assert d["rows"]["evaluations"] == len(res.evaluation.rows)
    html = res._repr_html_()
    assert "<table>" in html and "conv2, fc" in html and "patch, soft_wpmi, iou" in html and "scores" in html
    # the scorer fitted its own parameters to the probe set (CLIP-Dissect's top_k <= images)
    params = json.loads(store.sql("SELECT params FROM runs WHERE run_id = $r", {"r": res.run_id})["params"][0].as_py())
    assert params["scorers"]["soft_wpmi"]["top_k"] == N_IMAGES


def test_only_what_the_scorers_need_is_computed(probe_world, tmp_path):
    """The patch scorer needs neither whole-image embeddings nor the IoU pass."""
    res = dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv2"],
                  scorers=["patch"], k=2, max_images=20, progress=False, log=lambda *a: None)
    assert res.passes["encoded_images"] == 0 and res.passes["target_passes"] == 1
    iou = dissect(tmp_path / "s", f"probe:cnn@{probe_world.root}", world=probe_world, layers=["conv2"],
                  scorers=["iou"], k=2, max_images=20, progress=False, log=lambda *a: None)
    assert iou.passes["encoded_images"] == 0 and iou.passes["target_passes"] == 2
