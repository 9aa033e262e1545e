"""The static report: pages that work opened from disk, images written once and referenced."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _webstore import shared_store
from neurostore.errors import BadInput, UnknownModel
from neurostore.plots import depth_profile_svg, histogram_svg
from neurostore.report import build_report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path, info = shared_store(tmp_path_factory)
    out = tmp_path_factory.mktemp("report")
    summary = build_report(path, out, progress=False)
    return out, summary, info


def test_summary_counts(report):
    out, s, info = report
    assert s["models"] == 2 and s["layers"] == info["n_layers"] and s["neurons"] == info["n_units"]
    assert s["images"] == info["n_patches"]
    # index + 2 model pages + layers + neurons + audit + compare
    assert s["pages"] == 1 + 2 + info["n_layers"] + info["n_units"] + 2
    assert (out / "index.html").exists() and (out / "style.css").exists()


def test_images_written_once_and_referenced(report):
    out, s, info = report
    pngs = sorted((out / "patches").glob("*.png"))
    assert len(pngs) == info["n_patches"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (out / "neuron/toy-cnn/conv1/0.html").read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(srcs) == 6 and all(s.startswith("../../../patches/") for s in srcs)
    for html in out.rglob("*.html"):
        assert "data:image" not in html.read_text()  # referenced, never inlined


def test_every_local_link_resolves(report):
    out, _, _ = report
    broken = []
    for html in out.rglob("*.html"):
        for ref in re.findall(r'(?:href|src)="([^"#?]+)"', html.read_text()):
            if ref.startswith(("http:", "https:", "/")):
                broken.append((html, ref, "absolute"))
                continue
            if not (html.parent / ref).resolve().exists():
                broken.append((html.relative_to(out), ref))
    assert broken == []


def test_neuron_page_content(report):
    out, _, info = report
    html = (out / "neuron/toy-vit/blocks.1.mlp.fc1/2.html").read_text()
    truth = info["truth"][("toy-vit", "blocks.1.mlp.fc1", 2)]
    assert f"Fires on {truth} things" in html
    assert "Activation histogram" in html and "<svg" in html
    assert "patch" in html and "iou" in html
    layer = (out / "layer/toy-cnn/fc.html").read_text()
    assert 'class="tick hl"' in layer and "Concepts by depth" in layer
    assert "No findings yet" in (out / "audit.html").read_text()


def test_report_refuses_the_store_folder_and_unknown_models(tmp_path_factory):
    path, _ = shared_store(tmp_path_factory)
    with pytest.raises(BadInput, match="into the store itself"):
        build_report(path, path / "report", progress=False)
    with pytest.raises(UnknownModel, match="Unknown model 'toy-cn'.*Did you mean toy-cnn"):
        build_report(path, tmp_path_factory.mktemp("r2"), models=["toy-cn"], progress=False)


def test_cli_report_json(tmp_path_factory, tmp_path):
    path, info = shared_store(tmp_path_factory)
    out = subprocess.run([sys.executable, "-m", "neurostore.cli", "report", "--store", str(path), "--out",
                          str(tmp_path / "r"), "--model", "toy-vit", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s["models"] == 1 and s["neurons"] == 10 and Path(s["index"]).exists()
    bad = subprocess.run([sys.executable, "-m", "neurostore.cli", "report", "--store", str(tmp_path / "none"),
                          "--out", str(tmp_path / "r3")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: No neurostore store at")


def test_plots():
    svg = histogram_svg([0, 1, 2, 3], [1, 5, 2], marks={"q99": 2.9})
    assert svg.count('class="bar"') == 3 and "q99" in svg and "5 images" in svg
    assert "no histogram" in histogram_svg(None, None)
    assert "no histogram" in histogram_svg([0, 1], [1, 2])  # edges and counts disagree
    svg = depth_profile_svg({"shape": [0.0, 0.5, 1.0], "colour": [1.0, None, 0.0]}, ["a", "b", "c"],
                            highlight="b")
    assert svg.count("<path") == 2 and 'class="tick hl"' in svg and "shape at c: 100%" in svg
    assert "no layers" in depth_profile_svg({}, [])
    assert "&lt;script&gt;" in depth_profile_svg({"<script>": [1.0]}, ["x"])


def test_whole_images_only_where_their_files_exist(report, tmp_path):
    import duckdb
    from PIL import Image

    from neurostore.web import data as D

    # The fixture's images name no real file: the cards draw the crop in its box, reference no whole image.
    out, s, info = report
    page = (out / "neuron/toy-cnn/conv1/0.html").read_text()
    assert page.count('class="where"') == 6 and "images/" not in page and not (out / "images").exists()
    # A real file is served scaled down; a missing or non-image file gives None, not an error.
    Image.new("RGB", (640, 480), (200, 10, 10)).save(tmp_path / "big.png")
    (tmp_path / "junk.png").write_text("not an image")
    con = duckdb.connect()
    con.execute("CREATE TABLE images AS SELECT * FROM (VALUES ('d', 'a', $1), ('d', 'b', $2), ('d', 'c', '/nonexistent'))"
                " t(dataset, image_id, path)", [str(tmp_path / "big.png"), str(tmp_path / "junk.png")])

    def run(sql, params=None):
        return con.sql(sql, params=params).to_arrow_table()

    import hashlib
    import io

    key = {i: hashlib.md5(f"d/{i}".encode()).hexdigest()[:16] for i in "abc"}
    png = D.image_png(run, key["a"])
    assert Image.open(io.BytesIO(png)).size == (320, 240)
    assert D.image_png(run, key["b"]) is None and D.image_png(run, key["c"]) is None


def test_cards_carry_heatmaps_and_co_activated_units(report):
    """Every conv top image gets its heatmap file (the fixture's conv layers: 12 units x 6 images),
    referenced from its card; linear units none. Co-activated units link to their cards."""
    out, s, _ = report
    files = sorted((out / "heatmaps").glob("*.jpg"))
    assert s["heatmaps"] == len(files) == 12 * 6 and all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)
    page = (out / "neuron/toy-cnn/conv1/0.html").read_text()
    heat = re.findall(r'<image class="heat" href="([^"]+)"', page)
    assert len(heat) == 6 and all(h.startswith("../../../heatmaps/") for h in heat)
    assert all((out / "neuron/toy-cnn/conv1" / h).resolve() in files for h in heat)
    assert 'class="heat"' not in (out / "neuron/toy-cnn/fc/0.html").read_text()
    assert "co-activation (Pearson r over 24 probe images)" in page
    assert page.count('href="../../../neuron/toy-cnn/layer1.0.conv2/') >= 5


def test_cards_show_the_wiring_or_the_command_that_computes_it(report, tmp_path_factory):
    """Without unit_edges the card names 'neurostore groups MODEL'; with them (a copy of the store)
    the report's card links the units it feeds by relative paths, with their bars."""
    import shutil

    import pyarrow as pa

    from neurostore.store import Store

    out, _, _ = report
    assert "run <code>neurostore groups toy-cnn</code>" in (out / "neuron/toy-cnn/conv1/0.html").read_text()
    path, _ = shared_store(tmp_path_factory)
    copy = tmp_path_factory.mktemp("wired-report") / "store"
    shutil.copytree(path, copy)
    store = Store.open(copy)
    store.write("unit_edges", pa.Table.from_pylist([
        {"kind": "unit", "src_layer": "conv1", "src_unit": 0, "dst_layer": "layer1.0.conv2", "dst_unit": u,
         "class": None, "weight": w, "n_images": 64, "dataset": "probe-test", "model": "toy-cnn"}
        for u, w in ((1, 0.9), (2, -0.45))]))
    store.close()
    out2 = tmp_path_factory.mktemp("wired-out")
    build_report(copy, out2, models=["toy-cnn"], max_units=1, progress=False)
    page = (out2 / "neuron/toy-cnn/conv1/0.html").read_text()
    feeds = page.split("<h3>Feeds")[1].split("</div>")[0]
    assert re.findall(r'href="([^"]+)">unit', feeds) == ["../../../neuron/toy-cnn/layer1.0.conv2/1.html",
                                                         "../../../neuron/toy-cnn/layer1.0.conv2/2.html"]
    assert feeds.count('class="edgebar"') == 2
    fed = (out2 / "neuron/toy-cnn/layer1.0.conv2/0.html").read_text()  # unit 0 of the next layer has no edge in
    assert "none stored for this unit" in fed and "none: the last layer with edges" in fed
    assert "none: the first layer with edges" in page


def test_a_report_stopped_half_way_has_no_index(tmp_path_factory, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the neuron pages: the folder holds no index.html (a complete
    report's is removed first and written last), so it cannot pass for a finished one."""
    from neurostore.web import data as D

    path, _ = shared_store(tmp_path_factory)
    dest = tmp_path / "r"
    dest.mkdir()
    (dest / "index.html").write_text("an older, complete report's index")
    calls = []

    def stop(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "neuron_cards", stop)
    with pytest.raises(KeyboardInterrupt):
        build_report(path, dest, progress=False)
    assert calls and not (dest / "index.html").exists() and (dest / "style.css").exists()
