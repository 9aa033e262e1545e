"""Receptive-field patches: boxes from maps, geometry back to the image, dedup, thumbnails, embeddings."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from neurostore.images import ImageFolder
from neurostore.models import load_target
from neurostore.patches import (boxes_for_maps, crop_id, embed_patches, extract_patches, iou,
                                to_image_box)
from neurostore.record import Recorder, record



def test_box_follows_the_peak_and_has_a_minimum_size():
    m = torch.zeros(2, 8, 8)
    m[0, 1, 6] = 5.0             # one hot cell near the top right
    m[1, 2:6, 1:4] = 3.0         # a broad blob on the left
    m[1, 7, 7] = 2.0             # a weaker separate cell: not in the max's region
    b0, b1 = boxes_for_maps(m, 64, q=0.95, min_frac=0.25)
    x0, y0, x1, y1 = b0
    assert x1 - x0 >= 16 and y1 - y0 >= 16 and x0 >= 40 and y1 <= 32
    x0, y0, x1, y1 = b1
    assert x0 <= 16 and x1 <= 34 and 12 <= y0 and y1 <= 52  # the blob, not the far corner
    assert boxes_for_maps(torch.ones(3, 1, 1), 64) == [(0, 0, 64, 64)] * 3


def test_maps_labelled_together_keep_their_own_regions():
    """All maps of a call are labelled in one stack: a region never joins through the next map
    (map 0's two top corners are apart, map 1's top band would bridge them), and each map's box is
    the one it gets alone."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    m = -yy - 2 * (3.5 - (xx - 3.5).abs())                   # [8, 8] high at both top corners
    m = m.expand(3, 8, 8).clone()
    m[0, 0, 0], m[0, 0, 7] = 5.0, 4.9                        # peak top-left, a second blob top-right
    m[1] = -yy
    m[1, 0, :] = 4.0                                         # a band over the whole top row
    together = boxes_for_maps(m, 64)
    assert together == [boxes_for_maps(m[i : i + 1], 64)[0] for i in range(3)]
    assert together[0][2] <= 24 and together[1][2] == 64     # the corner only; the band


def test_box_geometry_back_to_the_image():
    # Centre crop of the shorter side: a 200x100 image shows x in 50..150 at input 50 px.
    assert to_image_box((0, 0, 50, 50), 50, 200, 100, 1.0) == (50, 0, 150, 100)
    assert to_image_box((0, 0, 25, 25), 50, 200, 100, 1.0) == (50, 0, 100, 50)
    # Whole image resized (aspect not kept).
    assert to_image_box((0, 0, 25, 25), 50, 200, 100, None) == (0, 0, 100, 50)


def test_crop_id_is_the_content_and_iou():
    a = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert crop_id(a) == crop_id(a.copy()) and len(crop_id(a)) == 16
    b = np.asarray(a).copy()
    b[0, 0, 0] += 1                                        # one value differs
    assert crop_id(Image.fromarray(b)) != crop_id(a)
    # the same bytes in another shape are another crop
    assert crop_id(Image.fromarray(np.asarray(a).reshape(2, 8, 3))) != crop_id(a)
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0 and iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    torch.manual_seed(0)
    t = load_target("torchvision:resnet18@random", input_size=48)
    src = ImageFolder(d)
    res = record(t, ["layer2", "fc"], src, k=3, batch_size=8, progress=False)
    return t, src, res


class _MeanColour:
    """A real (if simple) encoder: mean RGB of the crop, normalised. Counts calls."""
    id, dim, image_size = "meancolour", 3, 8

    def __init__(self):
        self.n = 0

    def preprocess(self, im):
        return torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32)).permute(2, 0, 1)

    def encode_images(self, batch):
        self.n += batch.shape[0]
        return torch.nn.functional.normalize(batch.mean((2, 3)) + 1e-3, dim=-1)


def test_extract_dedup_thumbnails_and_embeddings(recorded):
    t, src, res = recorded
    enc = _MeanColour()
    ps = extract_patches(t, res, src, encoders=[enc], batch_size=5, progress=False)
    assert ps.n_boxes == 3 * (128 + 1000)
    ids = ps.patch_ids
    assert len(ids) == len(set(ids)) and len(ids) < ps.n_boxes
    # fc units have no spatial map: every fc box is the whole view, one patch per image.
    fc_ids = {ps.assignment[("fc", u, r)] for u in range(1000) for r in range(3)}
    assert len(fc_ids) <= 12
    for row in ps.rows[:20]:
        assert 0 <= row["x0"] < row["x1"] <= 80 and 0 <= row["y0"] < row["y1"] <= 60
        thumb = Image.open(io.BytesIO(row["thumbnail"]))
        assert thumb.format == "PNG" and max(thumb.size) <= 96
    # Embedded once per unique patch, in rows order, equal to embedding the crops afterwards.
    emb_ids, emb = ps.embeddings["meancolour"]
    assert enc.n == ps.n_encoded == len(ids) and emb_ids == ids and emb.shape == (len(ids), 3)
    again = embed_patches(ps.crops(src), _MeanColour(), batch_size=7)
    np.testing.assert_allclose(emb, again, atol=1e-5)
    # Every box a unit points at is one of the kept boxes, whose patch is the unit's patch.
    assert all(ps.boxes[ps.box_of[key]] == pid for key, pid in ps.assignment.items())
    assert ps.n_decoded == len({i for lr in res.layers.values() for i in lr.top_idx.ravel() if i >= 0})
    acts = ps.fill_activations(res.activations_table())
    assert acts.column("patch_id").null_count == 0
    assert set(acts.column("patch_id").to_pylist()) == set(ids)
    assert ps.table().column_names == ["patch_id", "dataset", "image_id", "x0", "y0", "x1", "y1",
                                       "thumbnail"]


def test_box_is_where_the_unit_fired(recorded):
    """The recorded location of the max lies inside the unit's box on that image."""
    t, src, res = recorded
    ps = extract_patches(t, res, src, layers=["layer2"], dedup_iou=1.01, progress=False)
    lr = res.layers["layer2"]
    rows = {r["patch_id"]: r for r in ps.rows}
    S = t.input_size
    for u in range(0, 128, 9):
        iid = res.image_ids[lr.top_idx[u, 0]]
        r = rows[ps.assignment[("layer2", u, 0)]]
        W, H = src.load(iid).size
        cy = (lr.loc_y[u, 0] + 0.5) / lr.grid_h * S
        cx = (lr.loc_x[u, 0] + 0.5) / lr.grid_w * S
        X0, Y0, X1, Y1 = to_image_box((cx, cy, cx, cy), S, W, H, t.crop_fraction)
        assert r["x0"] - 2 <= X0 <= r["x1"] + 2 and r["y0"] - 2 <= Y0 <= r["y1"] + 2, (u, iid, r["image_id"], lr.loc_y[u, 0], lr.loc_x[u, 0], (r["x0"], r["y0"], r["x1"], r["y1"]))


def test_maps_kept_by_the_recorder_give_the_patches_of_a_second_pass(recorded):
    """One pass: the recorder keeps each unit's maps on its top images, and the boxes cut from
    them are exactly those of recomputing the maps (no model pass in extract_patches)."""
    t, src, res = recorded
    with Recorder(t, ["layer2", "fc"], k=3, dataset=src.dataset, keep_maps=True) as rec:
        for b in src.batches(t.preprocess, 8):
            rec.update(b.image_ids, b.pixels)
    kept = rec.result()
    assert kept.layers["layer2"].top_maps.shape == (128, 3, kept.layers["layer2"].grid_h,
                                                    kept.layers["layer2"].grid_w)
    np.testing.assert_array_equal(kept.layers["layer2"].top_idx, res.layers["layer2"].top_idx)
    calls = []
    handle = t.module.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = extract_patches(t, kept, src, progress=False)
    finally:
        handle.remove()
    b = extract_patches(t, res, src, progress=False)
    assert not calls                                       # no forward pass for the boxes
    assert a.rows == b.rows and a.assignment == b.assignment and a.boxes == b.boxes


def test_a_layers_patches_do_not_depend_on_the_other_layers_cut_beside_it(recorded):
    """A unit's boxes merge only with near-identical boxes of its own layer: layer2 cut beside
    layer1 (whose boxes on the same images are often near-identical) gets exactly the patches,
    and the same population of kept boxes, as cut alone."""
    t, src, _ = recorded
    res = record(t, ["layer1", "layer2"], src, k=3, batch_size=8, progress=False)
    alone = extract_patches(t, res, src, layers=["layer2"], progress=False)
    both = extract_patches(t, res, src, layers=["layer1", "layer2"], progress=False)
    keys = [key for key in both.assignment if key[0] == "layer2"]
    assert len(keys) == 128 * 3 and {k: both.assignment[k] for k in keys} == alone.assignment
    own = lambda ps: [ps.boxes[i] for i in sorted({ps.box_of[k] for k in keys})]   # noqa: E731 (scorers.own_patches)
    assert own(both) == own(alone) and len(own(alone)) < len(keys)   # (layer2's own near-duplicates merge)


def test_known_crops_are_not_encoded_again(recorded):
    t, src, res = recorded
    first = extract_patches(t, res, src, layers=["layer2"], encoders=[_MeanColour()], progress=False)
    known = set(first.patch_ids[: len(first.patch_ids) // 2])
    enc = _MeanColour()
    again = extract_patches(t, res, src, layers=["layer2"], encoders=[enc], known={enc.id: known},
                            progress=False)
    new_ids, _ = again.embeddings[enc.id]
    assert enc.n == len(first.patch_ids) - len(known) and set(new_ids) == set(first.patch_ids) - known


def test_patches_already_stored_get_no_thumbnail_again(recorded):
    """A warm run cuts the same boxes (same ids, same geometry) but makes no thumbnail for the
    patches whose rows the store already holds: it will not write them."""
    t, src, res = recorded
    first = extract_patches(t, res, src, layers=["layer2"], progress=False)
    stored = frozenset(first.patch_ids[::2])
    again = extract_patches(t, res, src, layers=["layer2"], stored=stored, progress=False)
    assert again.assignment == first.assignment and again.boxes == first.boxes
    for a, b in zip(first.rows, again.rows):
        assert {k: v for k, v in a.items() if k != "thumbnail"} == {k: v for k, v in b.items() if k != "thumbnail"}
        assert b["thumbnail"] == (None if a["patch_id"] in stored else a["thumbnail"])


def test_boxes_cut_before_are_looked_up_not_decoded(recorded):
    """With the boxes of an earlier cut (image content hash + box -> patch id), the patches stored
    and their vectors known, no image is decoded: same ids, boxes and rows as cutting them."""
    t, src, _ = recorded
    hashes = []                                            # content hash of each image, recorder order
    with Recorder(t, ["layer2", "fc"], k=3, dataset=src.dataset, keep_maps=True) as rec:
        for b in src.batches(t.preprocess, 8):
            rec.update(b.image_ids, b.pixels)
            hashes += b.hashes
    res = rec.result()
    first = extract_patches(t, res, src, encoders=[_MeanColour()], hashes=hashes, progress=False)
    assert first.n_decoded > 0 and len(first.cuts) == len(first.boxes)    # every kept box, cut once
    cut = {tuple(c[:5]): c[5] for c in first.cuts}
    assert all(pid == crop_id(src.load(res.image_ids[hashes.index(h)]).crop(box))
               for (h, *box), pid in cut.items())
    enc = _MeanColour()
    again = extract_patches(t, res, src, encoders=[enc], known={enc.id: set(first.patch_ids)},
                            stored=frozenset(first.patch_ids), hashes=hashes, cut=cut, progress=False)
    assert again.n_decoded == enc.n == 0 and not again.cuts
    assert (again.assignment, again.boxes, again.box_of) == (first.assignment, first.boxes, first.box_of)
    assert [{**r, "thumbnail": None} for r in first.rows] == again.rows
    # A patch the store lacks (no thumbnail yet) needs its pixels: only its image is decoded.
    missing = first.rows[0]
    third = extract_patches(t, res, src, stored=frozenset(first.patch_ids) - {missing["patch_id"]},
                            hashes=hashes, cut=cut, progress=False)
    assert third.n_decoded == 1 and third.rows[0] == missing


def test_worker_processes_cut_exactly_what_one_process_cuts(recorded):
    """`workers` forked processes do the pixel work (decode, cut, hash, thumbnail, preprocess);
    the patch set is the same, field for field, as cutting in this process: cold, and again with
    half the crops known, a third stored and half the boxes cut before."""
    from neurostore import patches

    t, src, _ = recorded
    hashes = []
    with Recorder(t, ["layer2", "fc"], k=3, dataset=src.dataset, keep_maps=True) as rec:
        for b in src.batches(t.preprocess, 8):
            rec.update(b.image_ids, b.pixels)
            hashes += b.hashes
    res = rec.result()
    warm = {}
    for kind in ("cold", "warm"):
        one, many = (extract_patches(t, res, src, encoders=[_MeanColour()], hashes=hashes, batch_size=4,
                                     workers=w, progress=False, **warm) for w in (0, 3))
        for f in ("rows", "assignment", "boxes", "box_of", "cuts", "n_boxes", "n_decoded", "n_encoded"):
            assert getattr(one, f) == getattr(many, f), (kind, f)
        assert one.embeddings["meancolour"][0] == many.embeddings["meancolour"][0]
        np.testing.assert_array_equal(one.embeddings["meancolour"][1], many.embeddings["meancolour"][1])
        ids = one.patch_ids
        warm = {"known": {"meancolour": frozenset(ids[::2])}, "stored": frozenset(ids[::3]),
                "cut": {tuple(c[:5]): c[5] for c in one.cuts[::2]}}
    assert one.n_encoded < len(ids) and not patches._CUTTER   # the workers' state is let go
