"""The recorder against brute force: top-k, locations, pooled rows, statistics, shards, tokens."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from neurostore.images import ImageFolder
from neurostore.models import load_target
from neurostore.record import Recorder, activation_maps, hooks, record, record_batches

LAYERS = ["layer2", "layer4.1.conv2", "fc"]


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return load_target("torchvision:resnet18@random", input_size=48)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 3, 48, 48, generator=g)  # [n, 3, S, S]
    return [f"img{i:02d}" for i in range(37)], x


def _batches(ids, x, bs):
    for i in range(0, len(ids), bs):
        yield ids[i : i + bs], x[i : i + bs]


@pytest.fixture(scope="module")
def brute(target, data):
    return activation_maps(target, LAYERS, data[1])  # layer -> [n, units, h, w]


def test_topk_pooled_and_stats_match_brute_force(target, data, brute):
    ids, x = data
    res = record_batches(target, LAYERS, _batches(ids, x, 8), dataset="d", k=5)
    assert res.image_ids == ids
    for name in LAYERS:
        m = brute[name]
        n, U, h, w = m.shape
        vmax, loc = m.flatten(2).max(2)                    # [n, units]
        lr = res.layers[name]
        val, idx = vmax.T.topk(5, dim=1)                    # [units, 5]
        np.testing.assert_allclose(lr.top_val, val.numpy(), rtol=1e-5, atol=1e-5)
        assert (lr.top_idx == idx.numpy()).mean() > 0.99   # ties aside
        want_loc = loc.T.gather(1, idx).numpy()
        np.testing.assert_array_equal(lr.loc_y * w + lr.loc_x, want_loc)
        np.testing.assert_allclose(lr.pooled_max, vmax.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(lr.pooled_mean, m.mean((2, 3)).numpy(), rtol=2e-3, atol=2e-3)
        assert lr.pooled_max.dtype == np.float16 and lr.pooled_max.shape == (37, U)
        v = vmax.double().numpy()
        np.testing.assert_allclose(lr.stats["act_mean"], v.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lr.stats["act_std"], v.std(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lr.stats["frac_active"], (v > 0).mean(0))
        # Fewer images than the reservoir: quantiles are exact.
        np.testing.assert_allclose(lr.stats["q90"], np.quantile(v, 0.9, axis=0), rtol=1e-4, atol=1e-5)
        assert (lr.stats["hist_counts"].sum(1) == 37).all()


def test_batch_size_does_not_matter_and_shards_merge(target, data):
    ids, x = data
    with Recorder(target, LAYERS, k=4, dataset="d", keep_maps=True) as r0:
        for b in _batches(ids, x, 37):
            r0.update(*b)
    a = r0.result()
    with Recorder(target, LAYERS, k=4, dataset="d", keep_maps=True) as r1:
        for b in _batches(ids[:20], x[:20], 6):
            r1.update(*b)
    with Recorder(target, LAYERS, k=4, dataset="d", keep_maps=True) as r2:
        for b in _batches(ids[20:], x[20:], 5):
            r2.update(*b)
    merged = r1.merge(r2).result()
    for name in LAYERS:
        la, lm = a.layers[name], merged.layers[name]
        np.testing.assert_allclose(la.top_val, lm.top_val, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(la.top_idx, lm.top_idx)
        np.testing.assert_allclose(la.stats["act_mean"], lm.stats["act_mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(la.pooled_max, lm.pooled_max, atol=2e-3)
        np.testing.assert_allclose(la.top_maps, lm.top_maps, rtol=1e-5, atol=1e-5)  # maps follow their images


def test_reservoir_quantiles_when_sample_is_smaller(target, data):
    ids, x = data
    res = record_batches(target, ["fc"], _batches(ids, x, 8), dataset="d", k=3, reservoir=16)
    s = res.layers["fc"].stats
    assert (s["hist_counts"].sum(1) == 16).all()
    assert np.all(s["q50"] <= s["act_max"] + 1e-6)


def test_tables_follow_the_schema(target, data):
    ids, x = data
    res = record_batches(target, LAYERS, _batches(ids, x, 16), dataset="d", k=3)
    acts = res.activations_table()
    assert acts.column_names == ["unit", "rank", "dataset", "image_id", "act_value", "act_mean",
                                 "loc_y", "loc_x", "act_map", "patch_id", "model", "layer"]
    assert acts.column("act_map").null_count == acts.num_rows  # maps only where the recorder kept them
    assert acts.num_rows == 3 * (128 + 512 + 1000)
    units = res.units_table()
    assert units.column_names == ["unit", "dataset", "n_images", "act_mean", "act_std", "act_max",
                                  "frac_active", "q50", "q90", "q99", "hist_edges", "hist_counts",
                                  "model", "layer"]
    pooled = res.pooled_table()
    assert pooled.column_names == ["dataset", "image_id", "act_mean", "act_max", "model", "layer"]
    assert pooled.num_rows == 37 * 3 and len(pooled.column("act_max")[0].as_py()) == 128


def test_hooks_are_removed_even_on_error(target):
    mod = dict(target.module.named_modules())["layer3"]
    with pytest.raises(RuntimeError):
        with hooks(target, ["layer3"], lambda *a: None):
            assert len(mod._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(mod._forward_hooks) == 0


def test_record_folder_skips_bad_files(target, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    src = ImageFolder(tmp_path)
    res = record(target, ["layer3"], src, k=2, batch_size=4, progress=False)
    assert res.n_images == 6 and res.rejects[0]["path"].endswith("broken.jpg")
    assert res.rejects_table().num_rows == 1


def test_vit_mlp_neurons_per_patch_token():
    t = load_target("timm:vit_tiny_patch16_224@random", input_size=32)
    x = torch.randn(5, 3, 32, 32)
    res = record_batches(t, ["blocks.1.mlp.fc1"], [([str(i) for i in range(5)], x)], dataset="d", k=2)
    lr = res.layers["blocks.1.mlp.fc1"]
    assert (lr.n_units, lr.grid_h, lr.grid_w) == (768, 2, 2)
    out = {}
    h = t.module.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    with torch.no_grad():
        t.module(x)
    h.remove()
    patch = out["o"][:, 1:, :]  # [batch, 4 patch tokens, 768]; the CLS token is not a place
    np.testing.assert_allclose(lr.pooled_max.astype(np.float32), patch.max(1).values.numpy(), rtol=5e-3, atol=5e-3)
    assert lr.loc_y.max() <= 1 and lr.loc_x.max() <= 1


def test_seq_first_token_layout():
    """A sequence-first transformer ([tokens, batch, units]) is read with its layout."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 6))

        def forward(self, x):
            t = self.proj(x).flatten(2).permute(2, 0, 1)  # [16 tokens, batch, 8]
            t = torch.cat([t.mean(0, keepdim=True), t])   # class token first
            return self.mlp(t)

    from neurostore.models import Target

    m = SeqFirst().eval()
    t = Target(m, "sf", "x", None, None, 32, num_prefix_tokens=1, grid_size=(4, 4), token_layout="tbc")
    x = torch.randn(3, 3, 32, 32)
    maps = activation_maps(t, ["mlp.0"], x)["mlp.0"]
    assert maps.shape == (3, 6, 4, 4)
    with torch.no_grad():
        full = m(x)  # [17, batch, 6]
    assert torch.allclose(maps[:, :, 1, 2], full[1 + 1 * 4 + 2])



def test_a_dissect_stores_each_units_map_on_its_top_images(probe_world, tmp_path):
    """A probe-world dissect keeps each unit's map on each top image in activations.act_map: the
    grid area-downsampled to at most 16x16 (conv1's 32x32 -> 16x16 cell means, conv3's 8x8 kept),
    0..100 from the map's min to its max, 100 at the recorded max cell; the head (1x1) gets none."""
    from neurostore.pipeline import dissect
    from neurostore.store import Store

    store = Store.open(tmp_path / "s")
    dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, max_images=40, k=4,
            layers=["conv1", "conv3", "fc"], scorers=["cos_cubed"], evaluate=False, progress=False,
            log=lambda *a: None)
    rows = store.sql("SELECT layer, loc_y, loc_x, act_map FROM activations ORDER BY layer, unit, rank").to_pylist()
    grids = {"conv1": (16, 16), "conv3": (8, 8)}
    for r in rows:
        if r["layer"] == "fc":
            assert r["act_map"] is None
            continue
        m = np.array(r["act_map"])
        assert m.shape == grids[r["layer"]] and m.min() >= 0 and m.max() <= 100
        if m.max() > 0:                                  # a flat map (a dead unit) is all 0
            assert m.min() == 0 and m.max() == 100
            if r["layer"] == "conv3":                    # kept at grid size: the max is the max cell
                assert m[r["loc_y"], r["loc_x"]] == 100
    assert {r["layer"] for r in rows} == {"conv1", "conv3", "fc"}
    assert sum(np.array(r["act_map"]).max() == 100 for r in rows if r["act_map"]) > len(rows) / 2
