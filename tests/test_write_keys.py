"""Write keys at the granularity of the work: re-running some work replaces exactly that work.

A dissect of some layers leaves every other layer's rows (activations, units, pooled, layers,
scores, explanations, evaluations) and every patch and embedding other work refers to untouched;
`patch_id` is unique in `patches`, and every table's natural key is unique after any re-run."""

import pytest

from neurostore.pipeline import dissect
from neurostore.store import Store

# The natural key of every table a dissect writes: no two rows may share one.
NATURAL_KEYS = {
    "models": ("model",),
    "layers": ("model", "layer"),
    "images": ("dataset", "image_id"),
    "activations": ("model", "layer", "unit", "rank"),
    "units": ("model", "layer", "dataset", "unit"),
    "pooled": ("model", "layer", "dataset", "image_id"),
    "patches": ("patch_id",),
    "crops": ("image_hash", "x0", "y0", "x1", "y1"),
    "embeddings": ("encoder", "kind", "item_id"),
    "vocabularies": ("vocabulary",),
    "concepts": ("vocabulary", "concept"),
    "scores": ("model", "layer", "unit", "scorer", "vocabulary", "rank"),
    "explanations": ("model", "layer", "unit", "scorer", "vocabulary"),
    "evaluations": ("model", "layer", "scorer", "metric", "dataset"),
}
LAYERS = ["conv1", "conv2", "conv3"]


def _rows(store, table, where="", params=None):
    cols = [c for c, *_ in store.schema(table) if c != "run_id"]
    sel = ", ".join(f'"{c}"' for c in cols)
    return store.sql(f'SELECT {sel} FROM "{table}" {where} ORDER BY ALL', params).to_pylist()


def _duplicates(store, table):
    key = ", ".join(NATURAL_KEYS[table])
    return store.sql(f'SELECT {key}, count(*) AS n FROM "{table}" GROUP BY ALL HAVING n > 1').num_rows


@pytest.fixture(scope="module")
def two_runs(probe_world, tmp_path_factory):
    """probe:cnn dissected on three layers (and probe:vit on one), then conv2 alone again with
    other settings; the tables before and after the re-run."""
    store = Store.open(tmp_path_factory.mktemp("keys") / "s")
    kw = dict(world=probe_world, max_images=60, scorers=["patch", "cos_cubed", "iou"],
              progress=False, log=lambda *a: None)
    dissect(store, f"probe:cnn@{probe_world.root}", layers=LAYERS, **kw)
    dissect(store, f"probe:vit@{probe_world.root}", layers=["blocks.1.mlp.fc1"], **kw)
    before = {t: _rows(store, t) for t in NATURAL_KEYS}
    # Other work on one layer: another k cuts other patches, records other top images.
    dissect(store, f"probe:cnn@{probe_world.root}", layers=["conv2"], k=4, **kw)
    after = {t: _rows(store, t) for t in NATURAL_KEYS}
    return store, before, after


@pytest.mark.parametrize("table", sorted(NATURAL_KEYS))
def test_every_table_keeps_one_row_per_natural_key(two_runs, table):
    store, _, _ = two_runs
    assert _duplicates(store, table) == 0


@pytest.mark.parametrize("table", ["activations", "units", "pooled", "layers", "scores",
                                   "explanations", "evaluations"])
def test_other_layers_rows_are_untouched(two_runs, table):
    """Per-layer tables: conv1, conv3 and the other model keep exactly their rows (evaluations:
    recomputed from the same explanations, so the same figures)."""
    store, before, after = two_runs
    def others(rows):
        return [r for r in rows if not (r["model"] == "probe-cnn" and r["layer"] == "conv2")]
    assert others(after[table]) == others(before[table]) and others(before[table])
    redone = [r for r in after[table] if r["model"] == "probe-cnn" and r["layer"] == "conv2"]
    assert redone                                          # the re-run's own rows are there
    if table == "activations":
        assert {r["rank"] for r in redone} == set(range(4))  # and replaced the k=10 ones


@pytest.mark.parametrize("table", ["patches", "embeddings", "models", "images", "vocabularies", "concepts"])
def test_shared_tables_lose_nothing(two_runs, table):
    """Content-addressed and shared tables only gain rows: patches and vectors other layers and
    models refer to stay."""
    _, before, after = two_runs
    have = {repr(sorted(r.items())) for r in after[table]}
    gone = [r for r in before[table] if repr(sorted(r.items())) not in have]
    assert not gone


def test_every_activation_has_its_patch_and_every_patch_its_vectors(two_runs):
    store, _, _ = two_runs
    orphans = store.sql("""SELECT count(*) AS n FROM activations a
                           WHERE a.patch_id NOT IN (SELECT patch_id FROM patches)""").column("n")[0].as_py()
    assert orphans == 0
    no_vec = store.sql("""SELECT count(*) AS n FROM (SELECT DISTINCT a.model, a.patch_id, m.spec FROM activations a
                          JOIN models m USING (model)) p
                          WHERE p.patch_id NOT IN (SELECT item_id FROM embeddings WHERE kind = 'patch')""")
    assert no_vec.column("n")[0].as_py() == 0
    n, distinct = store.sql("SELECT count(*), count(DISTINCT patch_id) FROM patches").to_pylist()[0].values()
    assert n == distinct > 0
