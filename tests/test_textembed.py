"""The text embedder: the bundled MiniLM loads offline and behaves like a sentence model."""

import os

import numpy as np
import pytest

from neurostore.errors import UnknownEncoder
from neurostore.textembed import TextEmbedder, get_text_embedder


@pytest.fixture(scope="module")
def minilm():
    return get_text_embedder()


def test_loads_offline_unit_norms(minilm):
    assert minilm.id == "minilm:all-MiniLM-L6-v2" and minilm.dim == 384
    v = minilm.encode(["striped", "a red circle", "striped"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.array_equal(v[0], v[2])
    assert minilm.encode([]).shape == (0, 384)


def test_similarity_sanity(minilm):
    s = minilm.similarity(["cat"], ["kitten", "truck", "spreadsheet"])[0]
    assert s[0] > s[1] and s[0] > s[2]
    s2 = minilm.similarity(["zebra stripes"], ["striped pattern", "polka dots"])[0]
    assert s2[0] > s2[1]


def test_bad_local_path(tmp_path):
    with pytest.raises(UnknownEncoder, match=r"Could not load text model '.*nope'.*Use 'minilm'"):
        TextEmbedder(str(tmp_path / "nope"))


def test_bundled_model_loads_without_a_progress_bar():
    import subprocess
    import sys

    # without the offline variables conftest sets: loading the bundled model must neither need
    # them nor set them (a user's later child processes would inherit offline mode)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import os; from neurostore.textembed import TextEmbedder; TextEmbedder(); "
            "print([k for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE') if k in os.environ])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_uncached_vectors_do_not_depend_on_what_the_process_encoded_before():
    """A probe world's encoder trains on its captions' vectors; the cache would hand it vectors
    first encoded in another batch (last bits differ), so the same world built after other work in
    a process trained differently. cached=False is one call on exactly the strings given."""
    from neurostore.world.encoder import caption_set

    captions = caption_set("watermark")
    fresh = TextEmbedder().encode(captions, cached=False)
    used = TextEmbedder()
    used.encode(["a long phrase that pads the batch far beyond any caption's length"] + captions[:20])
    # (here the cached vectors of the 20 captions seen in the longer batch differ in the last bits)
    assert np.array_equal(used.encode(captions, cached=False), fresh)
    assert np.array_equal(TextEmbedder().encode(captions), fresh)   # a first, cached call agrees
