"""Image streaming: sorted recursive ids, every kind of odd file converted or rejected with a reason."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from neurostore.errors import BadInput
from neurostore.images import CellWindows, ImageFolder, ImageSource, RejectedImage, load_image, probe_source


def _to_tensor(im):
    return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


@pytest.fixture()
def zoo(tmp_path):
    """One file of every kind; returns (folder, expected reject reasons by name)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rgb).save(d / "a_rgb.jpg")
    Image.fromarray(rgb).convert("CMYK").save(d / "b_cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(d / "c_16bit.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(d / "d_palette.png", transparency=0)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "d_palette2.gif")
    rgba = np.dstack([rgb, np.zeros((40, 50), np.uint8)])  # fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(d / "e_rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(d / "sub" / "f_gray.png")
    Image.fromarray(rgb[:8, :8]).save(d / "sub" / "g_tiny.png")
    (d / "h_zero.jpg").write_bytes(b"")
    (d / "i_text.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (d / "j_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    raw = bytearray(png.getvalue())
    raw[60:200] = bytes(140)  # damage the compressed pixel data, keep the header
    (d / "k_corrupt.png").write_bytes(bytes(raw))
    # A decompression bomb: 9000 x 9000 one-bit pixels is a tiny file but 81 MP.
    Image.new("1", (9000, 9000)).save(d / "l_bomb.png")
    (d / ".hidden.png").write_bytes(b"ignored")
    expected = {"h_zero.jpg": "zero bytes", "i_text.jpg": "not an image",
                "j_truncated.jpg": "truncated", "k_corrupt.png": "", "sub/g_tiny.png": "too small",
                "l_bomb.png": "too large"}
    return d, expected


def test_folder_streams_sorted_converts_and_rejects(zoo):
    d, expected = zoo
    src = ImageFolder(d)
    assert [iid for iid, _ in src.items] == sorted(iid for iid, _ in src.items)
    assert ".hidden.png" not in dict(src.items)
    assert "sub/f_gray.png" in dict(src.items)
    ids = []
    for batch in src.batches(_to_tensor, batch_size=3):
        assert batch.pixels.shape[1:] == (3, 16, 16) and batch.pixels.shape[0] <= 3
        ids += batch.image_ids
    assert ids == ["a_rgb.jpg", "b_cmyk.jpg", "c_16bit.png", "d_palette.png", "d_palette2.gif",
                   "e_rgba.png", "sub/f_gray.png"]
    rejected = {r["path"][len(str(d)) + 1:]: r["reason"] for r in src.rejects}
    assert set(rejected) == set(expected)
    for name, reason in expected.items():
        assert rejected[name].startswith(reason), (name, rejected[name])
    assert "PNG" in rejected["k_corrupt.png"] or "corrupt" in rejected["k_corrupt.png"]
    t = src.rejects_table()
    assert t.column_names == ["dataset", "path", "reason"] and t.num_rows == len(expected)
    images = src.images_table()
    assert images.column_names == ["dataset", "image_id", "path", "width", "height", "label",
                                   "caption", "split", "has_cue"]
    assert images.num_rows == 7 and images.column("width").to_pylist()[0] == 50


def test_conversions_are_rgb_and_sensible(zoo):
    d, _ = zoo
    for name in ["b_cmyk.jpg", "c_16bit.png", "d_palette.png", "e_rgba.png", "sub/f_gray.png"]:
        im = load_image(d / name)
        assert im.mode == "RGB", name
    # Fully transparent RGBA composites to white, not to the hidden colours.
    assert np.asarray(load_image(d / "e_rgba.png")).min() == 255
    # 16-bit values are scaled into 0..255, not clipped to white.
    a16 = np.asarray(load_image(d / "c_16bit.png"))[:, :, 0].astype(float)
    assert 80 < a16.mean() < 175 and a16.std() > 30


def test_limits_are_parameters(zoo):
    d, _ = zoo
    with pytest.raises(RejectedImage, match="too large"):
        load_image(d / "a_rgb.jpg", max_pixels=1000)
    assert load_image(d / "sub/g_tiny.png", min_side=4).size == (8, 8)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no files"):
        ImageFolder(tmp_path / "empty")


def test_max_images_spreads_over_class_folders_and_grows_as_a_superset(tmp_path):
    # ImageNet's val/ layout: before, --max-images took the first classes' files only
    for cls, n in (("a_cls", 6), ("b_cls", 2), ("c_cls", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "loose.jpg").write_bytes(b"x")
    ids = lambda n: [iid for iid, _ in probe_source(tmp_path, None, n).items]
    assert ids(7) == ["a_cls/0.jpg", "a_cls/1.jpg", "b_cls/0.jpg", "b_cls/1.jpg",
                      "c_cls/0.jpg", "c_cls/1.jpg", "loose.jpg"]   # loose files are a group of their own
    assert ids(3) == ["a_cls/0.jpg", "b_cls/0.jpg", "c_cls/0.jpg"]
    for small, big in ((1, 3), (3, 7), (7, 10), (10, 13)):
        assert set(ids(small)) <= set(ids(big)) and len(ids(small)) == small
    assert len(ids(13)) == len(ids(100)) == 13
    assert ids(13) == sorted(ids(13))   # read in disk order
    # a flat folder, and a probe world's table, keep their first files
    flat = tmp_path / "c_cls"
    assert [iid for iid, _ in probe_source(flat, None, 2).items] == ["0.jpg", "1.jpg"]
    src = ImageSource("w", [(f"i{k}", f"/p{k}") for k in range(5)], labels={f"i{k}": "x" for k in range(5)})
    src.take(2)
    assert [i for i, _ in src.items] == ["i0", "i1"]


def test_dataset_id_is_stable_and_changes_with_content(zoo):
    d, _ = zoo
    a, b = ImageFolder(d).dataset, ImageFolder(d).dataset
    assert a == b and a.startswith("imgs-")
    Image.new("RGB", (20, 20)).save(d / "z_new.png")
    assert ImageFolder(d).dataset != a


def test_memory_is_bounded_by_batch(tmp_path):
    """Batches are decoded lazily: drawing the first batch decodes only that batch."""
    for i in range(20):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"{i:02d}.png")
    seen = []

    def pre(im):
        seen.append(im.getpixel((0, 0))[0])
        return _to_tensor(im)

    it = ImageFolder(tmp_path).batches(pre, batch_size=4)
    first = next(it)
    assert first.image_ids == ["00.png", "01.png", "02.png", "03.png"] and seen == [0, 1, 2, 3]


def test_source_from_table_and_load(zoo):
    import pyarrow as pa

    d, _ = zoo
    t = pa.table({"image_id": ["x", "y"], "path": [str(d / "a_rgb.jpg"), str(d / "h_zero.jpg")],
                  "label": ["cat", "dog"]})
    src = ImageSource.from_table("w", t)
    assert src.load("x").size == (50, 40)
    batches = list(src.batches(_to_tensor, 8))
    assert batches[0].image_ids == ["x"] and src.rejects[0]["reason"] == "zero bytes"
    assert src.images_table().column("label").to_pylist() == ["cat"]


def test_usual_preprocessing_travels_as_uint8_and_gives_the_same_pixels(zoo):
    """A preprocessing of the usual form (PIL steps, ToTensor, Normalize) is split: workers send
    uint8, `batches` normalises a whole batch on its device. Bit for bit what the whole
    preprocessing gives image by image, from worker processes too, for `also` as well."""
    from neurostore.models import simple_preprocess

    d, _ = zoo
    pre, enc = simple_preprocess(24, 28), simple_preprocess(20, 20, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    whole = list(ImageFolder(d).batches(lambda im: pre(im), 3, also=(lambda im: enc(im),)))   # not splittable
    split = list(ImageFolder(d).batches(pre, 3, num_workers=2, also=(enc,), device="cpu"))
    assert len(split) == len(whole) and sum(len(b.image_ids) for b in split) == 7
    for a, b in zip(split, whole):
        assert a.image_ids == b.image_ids and a.pixels.dtype == torch.float32
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.also[0], b.also[0])


def test_cell_windows_centre_a_window_twice_the_cell_on_each_cell():
    """4 x 4 cells of a 64-px image: 32-px windows, row by row, each centred on its cell (edge
    pixels repeated past the border), then the 12 border cells' windows shifted inside the image;
    with a centre crop only the central square is gridded."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:32, 32:48] = 255                                   # cell (row 1, column 2) is white
    as_tensor = lambda im: torch.from_numpy(np.asarray(im).copy())   # noqa: E731  [h, w, 3]
    a[0:2, :] = 200                                          # a 2-px line along the top edge
    w = CellWindows(as_tensor, 4, None)(Image.fromarray(a))
    assert w.shape == (16 + 12, 32, 32, 3)
    assert w[0][:10].eq(200).all()                          # repeated: the line is a 10-px band
    assert torch.equal(w[16], torch.from_numpy(a[0:32, 0:32]))   # shifted: cell (0, 0) sees the image's corner
    assert torch.equal(w[16 + 3], torch.from_numpy(a[0:32, 32:64]))   # cell (0, 3)
    assert torch.equal(w[-1], torch.from_numpy(a[32:64, 32:64]))    # cell (3, 3)
    white = [int((x == 255).all(dim=-1).sum()) for x in w]
    assert white[1 * 4 + 2] == 16 * 16 and w[6][8:24, 8:24].eq(255).all()   # its cell, in the middle
    assert white[0] == 0 and white[1 * 4 + 1] == 8 * 16                    # a neighbour sees half of it
    edge = CellWindows(as_tensor, 4, None)(Image.fromarray(np.pad(a[:, :, :1], ((0, 0), (0, 0), (0, 2)))))
    assert edge.shape == (28, 32, 32, 3)
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 32:96] = a                                      # the centre crop of a wide image is `a`
    assert torch.equal(CellWindows(as_tensor, 4, 1.0)(Image.fromarray(wide)), w)


def test_cell_windows_split_like_the_encoders_preprocessing(tmp_path):
    """With a preprocessing of torchvision's form, the windows travel from the workers as uint8
    and are normalised a batch at once: exactly the tensors of the whole preprocessing, through
    ImageSource.batches (which picks the split form by itself)."""
    from torchvision import transforms as T

    from neurostore.encoding import SplitPreprocess
    from neurostore.images import SplitWindows

    pre = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24), T.ToTensor(),
                     T.Normalize((0.48, 0.45, 0.40), (0.27, 0.26, 0.28))])
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    cells = CellWindows(pre, 4, 0.875)
    split = SplitPreprocess.of(cells)
    assert isinstance(split, SplitWindows) and split.uint8(im).dtype == torch.uint8
    assert torch.equal(split.finish(split.uint8(im)[None])[0], cells(im))
    assert SplitPreprocess.of(CellWindows(_to_tensor, 4, None)) is None      # no split form: whole
    (tmp_path / "imgs").mkdir()
    im.save(tmp_path / "imgs" / "a.png")
    b = next(ImageFolder(tmp_path / "imgs").batches(pre, 4, also=(cells,)))
    assert b.also[0].dtype == torch.float32 and torch.equal(b.also[0][0], cells(im))
