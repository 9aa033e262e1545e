"""The pages in a real headless Chromium (Debian's `chromium`, installed by `make test`'s
`browser` target): pages render with their patch images, search returns results, the console
refuses file access and stops a slow query. Screenshots go to tests/screenshots/.

Skips only when chromium is absent and $CI is not set; in CI a missing chromium fails."""

import os
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest

from _webstore import shared_server, shared_store

SHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("chromium is not installed but $CI is set: run 'make browser' "
                           "(apt-get install -y chromium) before the tests.")
    pytestmark = pytest.mark.skip(reason="chromium not installed (run 'make browser'); required when $CI is set")


def chromium(args, url, tmp_path, timeout=120):
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def dump_dom(url, tmp_path):
    return chromium(["--dump-dom", "--virtual-time-budget=5000"], url, tmp_path)


def screenshot(url, name, tmp_path, height=900):
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    if path.exists():
        path.unlink()
    chromium([f"--screenshot={path}", f"--window-size=1280,{height}", "--virtual-time-budget=5000"], url, tmp_path)
    assert path.exists() and path.stat().st_size > 5000, path
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = shared_server(tmp_path_factory)
    # Record every path the browser asks for (to see that it really fetched the patch images).
    seen = []
    lock = threading.Lock()
    inner = srv.app.handle

    def handle(path, query):
        with lock:
            seen.append(path)
        return inner(path, query)

    srv.app.handle = handle
    srv.seen = seen
    yield srv
    srv.app.handle = inner


def red_pixels(png_path):
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    return int(((px[..., 0] > 180) & (px[..., 1] < 80) & (px[..., 2] < 80)).sum())


def test_neuron_card_renders_with_patch_images(server, tmp_path):
    url = server.url + "neuron/toy-cnn/conv1/0"
    dom = dump_dom(url, tmp_path)
    assert "Unit 0" in dom and "Fires on red things" in dom
    assert dom.count('src="/patch/') == 6
    before = len([p for p in server.seen if p.startswith("/patch/")])
    shot = screenshot(url, "neuron-card", tmp_path)
    fetched = [p for p in server.seen if p.startswith("/patch/")]
    assert len(fetched) - before >= 6, "the browser did not fetch the patch images"
    # Unit 0 of conv1 detects red: its patches must be visible as red pixels in the screenshot.
    assert red_pixels(shot) > 2000


def test_index_and_layer_pages(server, tmp_path):
    dom = dump_dom(server.url, tmp_path)
    assert "toy-cnn" in dom and "blocks.0.mlp.fc1" in dom
    screenshot(server.url, "index", tmp_path)
    dom = dump_dom(server.url + "layer/toy-cnn/layer1.0.conv2", tmp_path)
    assert "Concepts by depth" in dom and "<svg" in dom
    screenshot(server.url + "layer/toy-cnn/layer1.0.conv2", "layer", tmp_path, height=1100)


def test_search_returns_results(server, tmp_path):
    url = server.url + "search?" + urllib.parse.urlencode({"q": "zebra stripes", "mode": "semantic"})
    dom = dump_dom(url, tmp_path)
    assert "Concepts nearest to" in dom and ">striped</a>" in dom
    assert 'href="/neuron/toy-cnn/layer1.0.conv2/' in dom
    screenshot(url, "search-semantic", tmp_path)
    dom = dump_dom(server.url + "search?q=circle&mode=exact", tmp_path)
    assert "units for “circle”" in dom and 'href="/neuron/' in dom


def test_console_refuses_file_access(server, tmp_path):
    url = server.url + "sql?" + urllib.parse.urlencode({"q": "SELECT * FROM read_csv('/etc/passwd')"})
    dom = dump_dom(url, tmp_path)
    assert 'class="error"' in dom and "cannot read or write files" in dom and "root:" not in dom
    screenshot(url, "sql-refused", tmp_path)
    target = tmp_path / "leak.csv"
    url = server.url + "sql?" + urllib.parse.urlencode({"q": f"COPY scores TO '{target}'"})
    dom = dump_dom(url, tmp_path)
    assert "COPY statements are not allowed" in dom
    assert not target.exists()


def test_console_runs_a_query_and_stops_a_slow_one(server, tmp_path):
    url = server.url + "sql?" + urllib.parse.urlencode(
        {"q": "SELECT * FROM concept_neurons($concept, top_n := 5)", "concept": "red"})
    dom = dump_dom(url, tmp_path)
    assert "5 rows" in dom and 'href="/neuron/' in dom
    screenshot(url, "sql-console", tmp_path)
    url = server.url + "sql?" + urllib.parse.urlencode(
        {"q": "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"})
    dom = dump_dom(url, tmp_path)
    assert "Query stopped after" in dom


def test_static_report_opened_from_disk(tmp_path_factory, tmp_path):
    from neurostore.report import build_report

    path, _ = shared_store(tmp_path_factory)
    out = tmp_path_factory.mktemp("report-browser")
    build_report(path, out, progress=False)
    url = (out / "neuron/toy-cnn/conv1/0.html").as_uri()
    dom = dump_dom(url, tmp_path)
    assert dom.count('src="../../../patches/') == 6
    shot = screenshot(url, "report-neuron-card", tmp_path)
    assert red_pixels(shot) > 2000  # the images loaded from disk
    screenshot((out / "model/toy-cnn.html").as_uri(), "report-model", tmp_path)
