"""Embeddings are computed once per (encoder, content) and reused: counted at the encoder itself
(its real encode calls), not by timing."""

import pytest

from neurostore.pipeline import dissect
from neurostore.store import Store
from neurostore.world.encoder import ProbeEncoder


@pytest.fixture
def calls(monkeypatch):
    """How many images (whole or crops) and texts the probe encoder encodes."""
    n = {"images": 0, "texts": 0}
    enc_images, enc_texts = ProbeEncoder.encode_images, ProbeEncoder.encode_texts

    def images(self, batch):
        n["images"] += batch.shape[0]
        return enc_images(self, batch)

    def texts(self, texts):
        n["texts"] += len(texts)
        return enc_texts(self, texts)

    monkeypatch.setattr(ProbeEncoder, "encode_images", images)
    monkeypatch.setattr(ProbeEncoder, "encode_texts", texts)
    return n


def test_second_dissect_encodes_nothing_again(probe_world, tmp_path, calls):
    store = Store.open(tmp_path / "s")
    kw = dict(world=probe_world, max_images=60, layers=["conv2"], progress=False,
              log=lambda *a: None, evaluate=False)
    spec = f"probe:cnn@{probe_world.root}"
    first = dissect(store, spec, scorers=["patch", "cos_cubed"], **kw)
    p = first["passes"]
    n_concepts = len(set(store.sql("SELECT concept FROM concepts").column("concept").to_pylist()))
    assert calls["texts"] == p["encoded_texts"] == n_concepts
    # every image once (whole) and every distinct crop once
    assert calls["images"] == p["encoded_images"] + p["encoded_crops"] == 60 + first["patches"]
    assert p["decoded"] == 60 and p["target_passes"] == 1
    calls.update(images=0, texts=0)
    # Another scorer on the same images, vocabulary and encoder: nothing is encoded again.
    again = dissect(store, spec, scorers=["wpmi", "patch"], **kw)
    assert calls == {"images": 0, "texts": 0}
    assert again["passes"]["encoded_images"] == again["passes"]["encoded_crops"] == 0
    # Another model: the texts and whole images are reused; only its own new crops are encoded.
    vit = dissect(store, f"probe:vit@{probe_world.root}", scorers=["cos_cubed"], **{**kw, "layers": ["head"]})
    assert calls["texts"] == 0 and calls["images"] == vit["passes"]["encoded_crops"]
    assert store.sql("SELECT count(*) AS n FROM embeddings WHERE kind = 'image'").column("n")[0].as_py() == 60


def test_reused_vectors_give_the_same_scores(probe_world, tmp_path):
    """Scores from stored vectors equal scores from freshly encoded ones."""
    kw = dict(world=probe_world, max_images=60, layers=["conv2"], scorers=["patch", "soft_wpmi"],
              progress=False, log=lambda *a: None, evaluate=False)
    spec = f"probe:cnn@{probe_world.root}"
    warm = Store.open(tmp_path / "warm")
    dissect(warm, spec, **{**kw, "layers": ["conv1"]})   # fills the caches (texts, images)
    dissect(warm, spec, **kw)
    cold = Store.open(tmp_path / "cold")
    dissect(cold, spec, **kw)
    q = "SELECT layer, unit, scorer, rank, concept, score FROM scores WHERE layer = 'conv2' ORDER BY ALL"
    a, b = warm.sql(q).to_pylist(), cold.sql(q).to_pylist()
    assert [r["concept"] for r in a] == [r["concept"] for r in b]
    assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a, b))
